"""`camserve smoke ARCHIVE.mar`: serve the archive alone, probe it, stop - the step before an archive is promoted.

1. inspect: the archive is a whole zip (every member's CRC) of bounded size whose members all stay inside it,
   with a manifest naming a valid model name (nothing outside the run dir is ever written: the name becomes a file
   name there), a model-config.yaml whose handler section describes a model, and its labels;
2. start: TorchServe on free ports with this archive alone, in its own run dir and TMPDIR
   (camserve_tools.servers.torchserve.TorchServe), until the model answers a real prediction - a worker that cannot load, or an
   archive the server refuses, fails here as soon as the server's logs say so;
3. probe: generated scenes (PNG and JPEG) must get 200 with labels of the archive's label set, a heat map that
   decodes to the image's size, a peak inside the image and a box within it; a body that is not an image must get
   a 4xx with a JSON error;
4. stop: always, whatever happened before.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from camserve_tools.commands.common import (
    UsageError,
    add_command,
    add_output_arguments,
    emit,
    exit_codes,
    exit_status,
    format_table,
    progress,
)

PROBE_SEEDS = (3, 11, 29)  # offsets from camserve_tools.data.scenes.EVAL_SEED_START: scenes of several sizes and classes
NOT_AN_IMAGE = b"this body is not an image\n"
# Bounds of what an archive may unpack to, checked from its directory before any member is read: the largest
# torchvision classifiers' weights are a few GB, and TorchServe unpacks the whole archive again.
MAX_UNPACKED_BYTES = 8 * 1024**3
MAX_MEMBERS = 100_000
MAX_SMALL_MEMBER_BYTES = 64 * 1024**2  # the manifest, model-config.yaml and the labels, read here


class SmokeFailure(Exception):
    """The archive failed a stage before the probes; the message says why."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


@dataclass
class ProbeResult:
    probe: str
    status: int | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class ArchiveFacts:
    name: str
    labels: list[str]


def register(subparsers: Any) -> None:
    from camserve_tools.servers.torchserve import ROOT

    parser = add_command(
        subparsers,
        "smoke",
        "start TorchServe with one archive, probe it, stop (before promoting it)",
        __doc__,
        exit_codes("the archive failed: unreadable, could not load, or a probe's answer was wrong"),
    )
    parser.add_argument("archive", type=Path, metavar="ARCHIVE.mar")
    parser.add_argument(
        "--config", type=Path, default=ROOT / "config" / "dev.properties", help="TorchServe config.properties (default: %(default)s)"
    )
    parser.add_argument(
        "--engine",
        choices=("torchserve", "kserve"),
        default="torchserve",
        help="serve it on TorchServe or on KServe's own model server (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds the model may take to answer its first prediction (default: 120)"
    )
    parser.add_argument(
        "--run-dir", type=Path, help="the server's run dir, kept afterwards (default: a temporary one, kept only on failure)"
    )
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.archive.is_file():
        raise UsageError(f"{args.archive} is not a file")
    if not args.config.is_file():
        raise UsageError(f"--config {args.config} is not a file")
    started = time.perf_counter()
    report = smoke_test(args.archive, args.config, args.timeout, args.run_dir, args.quiet, engine=args.engine)
    report["seconds"] = round(time.perf_counter() - started, 1)
    emit(report, args.json, people_table(report))
    return exit_status(report["ok"])


def smoke_test(
    archive: Path, config: Path, timeout: float, run_dir: Path | None, quiet: bool = True, engine: str = "torchserve"
) -> dict[str, Any]:
    """Every stage in order; the report says which failed and why. The server is stopped whatever happens."""
    report: dict[str, Any] = {
        "archive": str(archive),
        "engine": engine,
        "model": None,
        "ok": False,
        "stage": "inspect",
        "error": None,
        "probes": [],
        "logs": None,
    }
    own_run_dir = run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="camserve-smoke-")) if run_dir is None else run_dir.resolve()
    server = None
    try:
        facts = inspect_archive(archive)
        report["model"] = facts.name
        report["stage"] = "start"
        server = start_alone(archive, facts.name, config, run_dir, timeout, engine)
        report["stage"] = "probe"
        results = probe(server, facts, quiet)
        report["probes"] = [{**asdict(result), "ok": result.ok} for result in results]
        report["ok"] = all(result.ok for result in results)
        if not report["ok"]:
            report["error"] = "; ".join(f"{r.probe}: {', '.join(r.problems)}" for r in results if r.problems)
    except SmokeFailure as failure:
        report.update(stage=failure.stage, error=str(failure))
    finally:
        if server is not None:
            server.stop()
        if report["ok"] or report["stage"] == "inspect":
            if own_run_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
        else:
            report["logs"] = str(run_dir / "logs")
    if report["ok"]:
        report["stage"] = "done"
    return report


def inspect_archive(archive: Path) -> ArchiveFacts:
    """Read the archive as TorchServe will: a whole zip, its manifest, model-config.yaml and labels. Only these
    members are unpacked, after check_members has passed the whole archive."""
    import json

    import yaml

    from camserve.model_source import MANIFEST, MODEL_CONFIG
    from camserve.model_spec import ModelSpec, SpecError, load_labels
    from camserve_tools.archive.checks import model_name_problem

    try:
        with zipfile.ZipFile(archive) as mar:
            check_members(mar)
            broken = mar.testzip()
            if broken is not None:
                raise SmokeFailure("inspect", f"member {broken!r} is damaged (CRC mismatch)")
            with tempfile.TemporaryDirectory(prefix="camserve-smoke-mar-") as directory:
                try:
                    manifest = json.loads(read_member(mar, MANIFEST, directory).read_text()).get("model", {})
                    config = yaml.safe_load(read_member(mar, MODEL_CONFIG, directory).read_text()) or {}
                    spec = ModelSpec.from_dict(config.get("handler") or {})
                    if spec.labels:
                        read_member(mar, spec.labels, directory)
                    labels = load_labels(spec, Path(directory))
                    if spec.weights not in mar.namelist():
                        raise SpecError(f"the weights file {spec.weights!r} is missing")
                except (SpecError, OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as error:
                    raise SmokeFailure("inspect", f"{type(error).__name__}: {error}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise SmokeFailure("inspect", f"not a readable .mar (zip) archive, truncated or damaged: {error}") from None
    name = manifest.get("modelName") if isinstance(manifest, dict) else None
    if not name or not manifest.get("handler"):
        raise SmokeFailure("inspect", "MAR-INF/MANIFEST.json names no model or handler")
    if (problem := model_name_problem(str(name))) is not None:
        # The name becomes the archive's file name in the run dir and a path in every request URL.
        raise UsageError(f"{archive}: MAR-INF/MANIFEST.json: {problem}; nothing was copied or started")
    return ArchiveFacts(name=str(name), labels=labels)


def check_members(mar: zipfile.ZipFile) -> None:
    """The archive's directory, before any member is read: members that would land outside the folder it is
    unpacked into (absolute, '..', a drive), too many members, or more unpacked bytes than MAX_UNPACKED_BYTES."""
    members = mar.infolist()
    if len(members) > MAX_MEMBERS:
        raise SmokeFailure("inspect", f"the archive has {len(members)} members, over {MAX_MEMBERS}")
    for member in members:
        parts = PurePosixPath(member.filename.replace("\\", "/")).parts
        if member.filename.startswith(("/", "\\")) or ".." in parts or (parts and parts[0].endswith(":")):
            raise SmokeFailure("inspect", f"member {member.filename[:200]!r} points outside the archive")
    unpacked = sum(member.file_size for member in members)
    if unpacked > MAX_UNPACKED_BYTES:
        raise SmokeFailure("inspect", f"the archive unpacks to {unpacked} bytes, over {MAX_UNPACKED_BYTES}")


def read_member(mar: zipfile.ZipFile, name: str, directory: str) -> Path:
    """Unpack one member that the inspection reads into `directory` (its size bounded); its path there."""
    try:
        member = mar.getinfo(name)
    except KeyError:
        raise ValueError(f"the archive has no {name}") from None
    if member.file_size > MAX_SMALL_MEMBER_BYTES:
        raise ValueError(f"{name} is {member.file_size} bytes, over {MAX_SMALL_MEMBER_BYTES}")
    return Path(mar.extract(member, directory))


def start_alone(archive: Path, name: str, config: Path, run_dir: Path, timeout: float, engine: str = "torchserve") -> Any:
    """`engine` serving only this archive, on free ports, with its own model store, TMPDIR and logs."""
    from camserve_tools.servers.kserve import KServeEngine
    from camserve_tools.servers.torchserve import TorchServe

    store = run_dir / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    target = store / f"{name}.mar"  # inspect_archive passed the name: letters, digits, '_', '.', '-' only
    if target.resolve().parent != store.resolve():
        raise UsageError(f"model name {name!r} names no file of the run dir's model store")
    shutil.copy2(archive, target)
    server: TorchServe | KServeEngine
    if engine == "kserve":
        server = KServeEngine.on_free_ports(run_dir=run_dir, archives=[target], config=config.resolve())
    else:
        server = TorchServe.on_free_ports(run_dir=run_dir, config=config.resolve(), model_store=store, models=f"{name}={name}.mar")
    try:
        server.start(timeout=timeout)  # stops the server itself when the worker dies or the model never answers
    except (RuntimeError, TimeoutError, OSError) as error:
        server.stop()
        raise SmokeFailure("start", str(error)) from None
    return server


# -- probes ----------------------------------------------------------------------------------------------------------


def probe_images() -> list[tuple[str, bytes, tuple[int, int], str]]:
    """(name, body, (width, height), content type) of each image probe: generated scenes, as PNG and as JPEG."""
    from camserve_tools.data.scenes import EVAL_SEED_START, make_scene

    probes = []
    for number, offset in enumerate(PROBE_SEEDS):
        image = make_scene(EVAL_SEED_START + offset).image
        fmt = "JPEG" if number == 1 else "PNG"
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        probes.append(
            (f"scene-{offset} ({fmt.lower()} {image.width}x{image.height})", buffer.getvalue(), image.size, f"image/{fmt.lower()}")
        )
    return probes


def probe(server: Any, facts: ArchiveFacts, quiet: bool) -> list[ProbeResult]:
    import requests

    url = f"{server.inference_url}/predictions/{facts.name}"
    images = probe_images()
    results = []
    with progress(total=len(images) + 1, desc="smoke", unit="probe", quiet=quiet) as bar:
        for name, body, size, content_type in images:
            try:
                response = requests.post(url, data=body, headers={**server.auth_headers(), "Content-Type": content_type}, timeout=60)
            except requests.RequestException as error:
                results.append(ProbeResult(name, None, [f"no answer: {type(error).__name__}"]))
            else:
                results.append(ProbeResult(name, response.status_code, check_image_answer(response, size, facts.labels)))
            bar.update(1)
        try:
            response = requests.post(
                url, data=NOT_AN_IMAGE, headers={**server.auth_headers(), "Content-Type": "application/octet-stream"}, timeout=60
            )
        except requests.RequestException as error:
            results.append(ProbeResult("not an image", None, [f"no answer: {type(error).__name__}"]))
        else:
            results.append(ProbeResult("not an image", response.status_code, check_refusal(response)))
        bar.update(1)
    return results


def check_image_answer(response: Any, size: tuple[int, int], labels: list[str]) -> list[str]:
    """What is wrong with an answer to an image: status, labels, and the map's geometry against the image's."""
    if response.status_code != 200:
        return [f"HTTP {response.status_code}: {response.text[:200]}"]
    try:
        answer = response.json()
    except ValueError:
        return ["the answer is not JSON"]
    problems = []
    predictions = answer.get("predictions") or []
    if not predictions:
        problems.append("no predictions")
    for prediction in predictions:
        if prediction.get("label") not in labels:
            problems.append(f"label {prediction.get('label')!r} is not in the archive's label set")
        if not 0.0 <= float(prediction.get("probability", -1)) <= 1.0:
            problems.append(f"probability {prediction.get('probability')!r} out of [0, 1]")
    cam = answer.get("cam")
    cam = cam[0] if isinstance(cam, list) and cam else cam
    if not isinstance(cam, dict):
        return problems + ["no cam in the answer"]
    return problems + check_cam(cam, size, labels)


def check_cam(cam: dict[str, Any], size: tuple[int, int], labels: list[str]) -> list[str]:
    from camserve.protocol.responses import decode_heatmap

    width, height = size
    problems = []
    if cam.get("label") not in labels:
        problems.append(f"cam label {cam.get('label')!r} is not in the archive's label set")
    if cam.get("size") != [width, height]:
        problems.append(f"cam size {cam.get('size')} is not the image's {[width, height]}")
    try:
        heatmap = decode_heatmap(cam["heatmap"])
        map_width, map_height = cam["heatmap_size"]
        if heatmap.shape != (map_height, map_width) or not (map_width <= width and map_height <= height):
            problems.append(
                f"heat map decodes to {heatmap.shape[1]}x{heatmap.shape[0]}, heatmap_size {cam['heatmap_size']}, image {width}x{height}"
            )
    except Exception as error:  # noqa: BLE001 - any way it fails to decode is the finding
        problems.append(f"heat map does not decode: {type(error).__name__}")
    if cam.get("empty") is True:  # a map that points nowhere answers no peak and no box
        return problems + ([] if cam.get("peak") is None and cam.get("bbox") is None else ["an empty map with a peak or a box"])
    x, y = (cam.get("peak") or [-1, -1])[:2]
    if not (0 <= x < width and 0 <= y < height):
        problems.append(f"peak {cam.get('peak')} is outside the {width}x{height} image")
    box = cam.get("bbox") or []
    if len(box) != 4 or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        problems.append(f"bbox {box} is not within the {width}x{height} image")
    return problems


def check_refusal(response: Any) -> list[str]:
    """A body that is not an image must get a 4xx and a JSON error naming the problem."""
    problems = [] if 400 <= response.status_code < 500 else [f"HTTP {response.status_code}, not a 4xx"]
    try:
        error = response.json()
        if not isinstance(error, dict) or not error.get("message") or not error.get("type"):
            problems.append("the error JSON has no type and message")
    except ValueError:
        problems.append("the error is not JSON")
    return problems


def people_table(report: dict[str, Any]) -> str:
    rows = [
        {"probe": p["probe"], "status": p["status"], "ok": "yes" if p["ok"] else "NO", "problems": "; ".join(p["problems"])}
        for p in report["probes"]
    ]
    lines = [format_table(rows, ("probe", "status", "ok", "problems"))] if rows else []
    if report["ok"]:
        lines.append(f"smoke test passed: {report['model']} from {report['archive']} ({report['seconds']} s)")
    else:
        lines.append(f"smoke test FAILED at {report['stage']}: {report['error']}")
        if report["logs"]:
            lines.append(f"server logs: {report['logs']}")
    return "\n".join(lines)
