"""What a map adds to one request's wait: sequential single-client latency through one real TorchServe.

    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.sequential_latency            # the full run (about 3 min)
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.sequential_latency --models shapes --rounds 3
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.sequential_latency --rounds 10 --profile  # + the handler's stages

One TorchServe (own TMPDIR, free ports, stopped at the end) serves the built archives model_store/shapes.mar and
model_store/imagenet.mar with their own settings, as `make serve` does. The pool: the photographs of
camserve_tools/data/photos.py (scikit-image's and scikit-learn's sample images), each resized to every --sizes entry and
encoded as JPEG (quality 90). One client posts them one at a time over one keep-alive connection, each image with
every method in turn (`X-CAM-Method`), the methods' order rotated from one image to the next, so drifting load on
this shared machine falls on all methods alike. A warm-up pass over the pool precedes each model × size.

A latency is the client's wall time from sending the request to the answer's last byte. Every answer is checked
outside that window: HTTP 200, predictions with labels, no map for `none`; for map methods the method asked for,
the top-1 class's map, `size` equal to the image's, a heat map PNG of the answer's `heatmap_size` and no larger
than the image (the default answer: the model input's longest side), a box and a peak (or none of either, for an
answer that says its map is empty). A wrong answer stops the run. The report is a markdown table per model × size:
median and p90 per method, and the ratios of the medians to `none` (the target: gradcam ÷ none ≤ 1.10).
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.client
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from camserve_tools.bench.load_runs import start_torchserve
from camserve_tools.data.image_pool import Sample
from camserve_tools.data.photos import BACKGROUNDS, LABELLED, load
from camserve_tools.servers.torchserve import TorchServe

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("shapes", "imagenet")
METHODS = ("none", "gradcam", "cam")
SIZES = ((640, 480), (1280, 960))
PHOTOS = tuple(dict.fromkeys([photo.name for photo in LABELLED] + list(BACKGROUNDS)))
JPEG_QUALITY = 90
GRADCAM_TARGET = 1.10  # gradcam ÷ none, median latency, with the default (input-sized) heat map


class WrongAnswer(ValueError):
    """The server answered, but not what the method promises."""


@functools.lru_cache(maxsize=4)
def jpeg_photo_pool(size: tuple[int, int], names: tuple[str, ...] = PHOTOS) -> dict[str, Sample]:
    """Name -> the photo resized to `size` (width, height) as a JPEG, as a camera or a browser sends it; encoded
    once per size, for the served run and the stage profile alike."""
    pool = {}
    for name in names:
        buffer = io.BytesIO()
        load(name).resize(size, Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        pool[name] = Sample(body=buffer.getvalue(), content_type="image/jpeg", size=size)
    return pool


def check_answer(status: int, content: bytes, method: str, sample: Sample) -> None:
    def expect(condition: bool, message: str) -> None:
        if not condition:
            raise WrongAnswer(f"{method}: {message}")

    expect(status == 200, f"HTTP {status}: {content[:200]!r}")
    body = json.loads(content)
    predictions = body.get("predictions")
    expect(isinstance(predictions, list) and len(predictions) > 0, "no predictions")
    expect(all(isinstance(p.get("label"), str) for p in predictions), "a prediction without a label")
    if method == "none":
        expect("cam" not in body, "a map although none was asked for")
        return
    cam = body.get("cam")
    expect(isinstance(cam, dict), "no map in 'cam'")
    expect(cam["method"] == method, f"the map's method is {cam['method']}")
    expect(cam["index"] == predictions[0]["index"], f"map of class {cam['index']}, top-1 is {predictions[0]['index']}")
    expect(cam["size"] == list(sample.size), f"size {cam['size']}, image {list(sample.size)}")
    width, height = cam["heatmap_size"]
    expect(0 < width <= sample.size[0] and 0 < height <= sample.size[1], f"heatmap_size {cam['heatmap_size']} for a {sample.size} image")
    heatmap = Image.open(io.BytesIO(base64.b64decode(cam["heatmap"])))
    expect(heatmap.format == "PNG" and heatmap.size == (width, height), f"heat map {heatmap.format} {heatmap.size}")
    for key in ("bbox", "peak"):
        expect(isinstance(cam.get(key), list) or (cam.get(key) is None and cam.get("empty") is True), f"no {key}")


class KeepAliveClient:
    """One HTTP/1.1 connection for every request, as a client that sends one request after another keeps it."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
        self.headers = headers or {}

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, float]:
        """Status, body and seconds from sending the request to the answer's last byte."""
        started = time.perf_counter()
        self.connection.request("POST", path, body=body, headers={**self.headers, **headers})
        response = self.connection.getresponse()
        content = response.read()
        return response.status, content, time.perf_counter() - started

    def close(self) -> None:
        self.connection.close()


@dataclass
class CellLatency:
    """One model × image size: per method, every request's latency (ms) and answer bytes."""

    model: str
    size: tuple[int, int]
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    answer_bytes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def requests_per_method(self) -> int:
        return min(len(values) for values in self.latencies_ms.values())

    def median_ms(self, method: str) -> float:
        return statistics.median(self.latencies_ms[method])

    def p90_ms(self, method: str) -> float:
        """Nearest rank: a latency that was measured."""
        ordered = sorted(self.latencies_ms[method])
        return ordered[math.ceil(0.9 * len(ordered)) - 1]

    def ratio(self, method: str, baseline: str = "none") -> float:
        return self.median_ms(method) / self.median_ms(baseline)


def measure(
    url: str,
    model: str,
    pool: dict[str, Sample],
    methods: Sequence[str] = METHODS,
    rounds: int = 10,
    warmup_rounds: int = 1,
    headers: dict[str, str] | None = None,
) -> CellLatency:
    """`rounds` passes over `pool`, each image with every method in turn; the first `warmup_rounds` are not kept."""
    (size,) = {sample.size for sample in pool.values()}
    cell = CellLatency(model, size, {method: [] for method in methods}, {method: [] for method in methods})
    client = KeepAliveClient(url, headers)
    try:
        for round_index in range(-warmup_rounds, rounds):
            for image_index, (name, sample) in enumerate(pool.items()):
                # Each method goes first, second and third equally often: no method is always the one after a new image.
                shift = (round_index + image_index) % len(methods)
                for method in (*methods[shift:], *methods[:shift]):
                    status, content, seconds = client.post(
                        f"/predictions/{model}", sample.body, {"Content-Type": sample.content_type, "X-CAM-Method": method}
                    )
                    try:
                        check_answer(status, content, method, sample)
                    except (ValueError, KeyError, TypeError, AttributeError) as error:  # a malformed answer too
                        raise WrongAnswer(f"{model} {name} {size[0]}x{size[1]}: {error}") from error
                    if round_index >= 0:
                        cell.latencies_ms[method].append(seconds * 1000)
                        cell.answer_bytes[method].append(len(content))
    finally:
        client.close()
    return cell


@contextmanager
def served(model_store: Path, models: Sequence[str], run_dir: Path) -> Iterator[TorchServe]:
    """One TorchServe of the archives `<model>.mar` in `model_store`, in its own run dir on free ports."""
    missing = [f"{name}.mar" for name in models if not (model_store / f"{name}.mar").exists()]
    if missing:
        raise FileNotFoundError(f"no {', '.join(missing)} in {model_store}: `make {' '.join(f'model_store/{mar}' for mar in missing)}`")
    server = start_torchserve(model_store, ",".join(f"{name}={name}.mar" for name in models), None, run_dir, timeout=300)
    try:
        yield server
    finally:
        server.stop()


def run(
    models: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    methods: Sequence[str],
    rounds: int,
    model_store: Path,
    run_dir: Path,
    warmup_rounds: int = 1,
) -> list[CellLatency]:
    pools = {size: jpeg_photo_pool(size) for size in sizes}
    cells = []
    with served(model_store, models, run_dir) as server:
        for model in models:
            for size in sizes:
                cell = measure(server.inference_url, model, pools[size], methods, rounds, warmup_rounds, server.auth_headers())
                print(f"{model} {size[0]}x{size[1]}: " + ", ".join(f"{m} {cell.median_ms(m):.1f} ms" for m in methods), flush=True)
                cells.append(cell)
    return cells


def stage_profile(models: Sequence[str], sizes: Sequence[tuple[int, int]], methods: Sequence[str], rounds: int, work_dir: Path) -> str:
    """Where the time goes: our handler in-process on the same photos, stage by stage (handler_profile.py), in mean
    ms per request; what the served median adds on top is TorchServe's (HTTP, frontend, worker socket) and the
    client's."""
    from camserve_tools.bench.bench_models import prepare_models
    from camserve_tools.bench.handler_profile import StageTimes, ours_pipeline, profile_ours, profile_table

    work_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for model in prepare_models(list(models), work_dir):
        stages = StageTimes()
        pipeline = ours_pipeline(model.model_dir, stages)
        for size in sizes:
            samples = tuple(jpeg_photo_pool(size).values())
            results = {}
            for method in methods:
                profile_ours(pipeline, stages, method, samples, 1)  # warm-up: first calls allocate
                results[method] = profile_ours(pipeline, stages, method, samples, rounds)
            lines += [*profile_table(f"{model.name} {size[0]}×{size[1]}", results), ""]
    return "\n".join(lines)


def markdown_table(cells: Sequence[CellLatency]) -> str:
    methods = list(cells[0].latencies_ms)
    mapped = [method for method in methods if method != "none"]
    header = (
        ["model", "image", "requests per method"]
        + [f"{method} median / p90" for method in methods]
        + [f"{method} ÷ none" for method in mapped]
        + [f"{method} answer (median)" for method in methods]
    )
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for cell in cells:
        row = [cell.model, f"{cell.size[0]}×{cell.size[1]}", str(cell.requests_per_method)]
        row += [f"{cell.median_ms(m):.1f} / {cell.p90_ms(m):.1f} ms" for m in methods]
        row += [f"×{cell.ratio(m):.2f}" for m in mapped]
        row += [f"{statistics.median(cell.answer_bytes[m]) / 1000:.1f} KB" for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def target_lines(cells: Sequence[CellLatency]) -> str:
    lines = []
    for cell in cells:
        ratio = cell.ratio("gradcam")
        verdict = "met" if ratio <= GRADCAM_TARGET else "missed"
        lines.append(f"gradcam ÷ none ≤ {GRADCAM_TARGET:.2f}, {cell.model} {cell.size[0]}×{cell.size[1]}: ×{ratio:.2f}, {verdict}")
    return "\n".join(lines)


def size_list(text: str) -> list[tuple[int, int]]:
    sizes = []
    for entry in text.split(","):
        width, _, height = entry.partition("x")
        sizes.append((int(width), int(height)))
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated archive names (default: %(default)s)")
    parser.add_argument(
        "--sizes", type=size_list, default=list(SIZES), help="WxH,... the photos are resized to (default: 640x480,1280x960)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, `none` first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=100, help="passes over the photo pool per model × size (default: %(default)s)")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="then the same photos through the handler in-process, stage by stage")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run" / "sequential-latency", help="TMPDIR and logs (default: %(default)s)")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if methods[0] != "none":
        sys.exit("--methods must start with none: the ratios are to it")
    started = time.monotonic()
    cells = run(
        args.models.split(","), args.sizes, methods, args.rounds, args.model_store.resolve(), args.run_dir.resolve(), args.warmup_rounds
    )
    print(f"\n{len(PHOTOS)} photos, {args.rounds} rounds, {time.monotonic() - started:.0f} s in all\n")
    print(markdown_table(cells))
    if "gradcam" in methods:
        print("\n" + target_lines(cells))
    if args.profile:
        print("\n" + stage_profile(args.models.split(","), args.sizes, methods, 5, args.run_dir.resolve() / "profile"))


if __name__ == "__main__":
    main()
