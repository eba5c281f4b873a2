"""`camserve explain MODEL INPUTS... --out DIR`: offline batch explanations, through the server's own pipeline.

Writes DIR/explanations.jsonl, one line per image:

    {"path": "/abs/img.jpg", "status": 200, "answer": {<the endpoint's JSON>}, "file": "maps/img.jpg.png"}

and the images of --output: `png` writes each decoded heat map (DIR/maps/), `overlay` the map drawn over the
image (DIR/overlays/), `grid` none (the grid floats are in the JSON). A failed image's line carries the endpoint's
JSON error (status 4xx) and the run goes on. Images already in the JSONL are skipped, so an interrupted run
continues where it stopped.
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camserve_tools.commands.common import (
    CommandFailed,
    UsageError,
    add_command,
    add_output_arguments,
    check_out_dir,
    emit,
    exit_codes,
    exit_status,
    key_values,
    progress,
)

if TYPE_CHECKING:  # the pipeline (torch) loads when a run starts, not for `camserve --help`
    from camserve.pipeline import CamPipeline

OUTPUTS = ("png", "overlay", "grid")
JOURNAL_NAME = "explanations.jsonl"
OUTPUT_FOLDERS = {"png": "maps", "overlay": "overlays"}
# Threads by default (camserve_tools/bench/explain_throughput.py compares them): a heat map costs too little to write
# for a thread to pay (its handoffs slow the model's own threads more than writing inline does), while drawing an
# overlay costs more than the model, and PIL draws and encodes outside the GIL.
DEFAULT_JOBS = {"png": 0, "grid": 0, "overlay": 2}


@dataclass(frozen=True)
class ExplainSettings:
    method: str | None = None  # None: the model's default
    layer: str | None = None  # None: the model's default target layer(s)
    output: str = "png"
    batch_size: int = 8
    jobs: int | None = None  # None: DEFAULT_JOBS for the output
    retry_failed: bool = False

    @property
    def threads(self) -> int:
        return DEFAULT_JOBS[self.output] if self.jobs is None else self.jobs

    def request_headers(self) -> dict[str, str]:
        """The options as a client would send them: overlay is drawn here from the JSON's map (camserve_tools.commands.overlays)."""
        headers = {"X-CAM-Output": "grid" if self.output == "grid" else "png"}
        if self.method:
            headers["X-CAM-Method"] = self.method
        if self.layer:
            headers["X-CAM-Layer"] = self.layer
        return headers


@dataclass
class ExplainSummary:
    model: str
    inputs: int
    skipped: int
    explained: int
    failed: int  # inputs whose last line is an error, this run's or an earlier one's
    seconds: float
    journal: str

    @property
    def images_per_second(self) -> float:
        return self.explained / self.seconds if self.seconds > 0 else 0.0


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "explain",
        "offline batch explanations of images (JSONL + heat maps), resumable",
        __doc__,
        exit_codes("some images failed (their lines carry the error)"),
    )
    parser.add_argument("model", type=Path, metavar="MODEL", help="a .mar archive or a model directory with model-config.yaml")
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUTS", help="images, folders (searched recursively) or text files listing image paths"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where explanations.jsonl and the images go")
    parser.add_argument("--method", help="CAM method (default: the model's), e.g. gradcam, cam, layercam, scorecam")
    parser.add_argument("--layer", help="target layer name(s), comma-separated (default: the model's)")
    parser.add_argument(
        "--output",
        choices=OUTPUTS,
        default="png",
        help="png: heat map PNGs; overlay: map over image; grid: floats in the JSON only (default: png)",
    )
    parser.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="images per forward pass (default: 8)")
    parser.add_argument(
        "--jobs",
        type=_not_negative,
        metavar="N",
        help="threads that read images ahead and draw / write output images behind the model; 0: all in one "
        "thread (default: 0 for png and grid, 2 for overlay)",
    )
    parser.add_argument("--retry-failed", action="store_true", help="explain again the images whose last line is an error")
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {raw}")
    return value


def _not_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {raw}")
    return value


def run(args: argparse.Namespace) -> int:
    from camserve.model_source import ModelSourceError
    from camserve_tools.commands.inputs import InputError, collect_images
    from camserve_tools.commands.journal import JournalError
    from camserve_tools.local_model import open_model

    out = check_out_dir(args.out)
    try:
        paths = collect_images(args.inputs)
    except InputError as error:
        raise UsageError(str(error)) from None
    paths = without_outputs(paths, args.inputs, out)
    if not paths:
        raise UsageError("INPUTS name no images")
    settings = ExplainSettings(args.method, args.layer, args.output, args.batch_size, args.jobs, args.retry_failed)
    try:
        model = open_model(args.model)
    except ModelSourceError as error:
        raise UsageError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - a damaged archive, or whatever the model's own code raises while loading
        raise CommandFailed(f"{args.model} cannot be loaded: {type(error).__name__}: {error}") from None
    with model:
        check_settings(model.pipeline, settings)
        try:
            summary = explain_images(model.pipeline, model.name, paths, out, settings, quiet=args.quiet)
        except JournalError as error:
            raise UsageError(str(error)) from None
    report = {**asdict(summary), "images_per_second": round(summary.images_per_second, 2)}
    emit(report, args.json, key_values(report))
    return exit_status(not summary.failed)


def without_outputs(paths: list[Path], inputs: list[str], out: Path) -> list[Path]:
    """The input images less those inside DIR, where this command's own maps are (DIR may sit in an input
    folder); symlinks are resolved on both sides, so no way of naming DIR makes its maps inputs of the next run.
    DIR that is an input folder, or holds one, is a usage error: every image there would be left out."""
    real_out = Path(os.path.realpath(out))
    for raw in inputs:
        folder = Path(os.path.realpath(raw))
        if Path(raw).is_dir() and folder.is_relative_to(real_out):
            raise UsageError(
                f"--out {out} is the input folder {raw} or holds it: its maps would be explained as inputs; choose another folder"
            )
    return [path for path in paths if not Path(os.path.realpath(path)).is_relative_to(real_out)]


def check_settings(pipeline: CamPipeline, settings: ExplainSettings) -> None:
    """A method or layer the model refuses is a usage error, found once here rather than on every image."""
    from camserve.protocol.decoding import RequestError, options_from_headers
    from camserve.protocol.options import parse_options

    try:
        parse_options(options_from_headers(settings.request_headers()), pipeline.rules)
    except RequestError as error:
        raise UsageError(str(error)) from None


def explain_images(
    pipeline: CamPipeline, model_name: str, paths: list[Path], out_dir: Path, settings: ExplainSettings, quiet: bool = True
) -> ExplainSummary:
    """Explain every image of `paths` not yet in DIR's journal; lines are appended as their files are written."""
    from camserve_tools.commands.journal import Journal
    from camserve_tools.local_model import answer_batch

    journal = Journal(out_dir / JOURNAL_NAME)
    pending = [path for path in paths if not journal.is_done(str(path), settings.retry_failed)]
    headers = settings.request_headers()
    started = time.perf_counter()
    pool, line_executor = executors(settings.threads)
    with pool, journal.open_for_append() as out, progress(total=len(pending), desc="explain", quiet=quiet) as bar:
        writer = OrderedWriter(journal, out, line_executor)
        try:
            for batch, bodies in prefetched_batches(pending, settings.batch_size, pool):
                for path, body, (status, answer) in zip(
                    batch, bodies, answer_batch(pipeline, bodies, [headers] * len(bodies)), strict=True
                ):
                    line = {"path": str(path), "status": status, "answer": answer, "file": None}
                    writer.add(line, submit_output(pool, out_dir, path, body, status, answer, settings.output))
                writer.flush()
                bar.update(len(batch))
        finally:
            writer.close()  # interrupted or not, every line whose image is done is written
    seconds = time.perf_counter() - started
    failed = sum(1 for path in paths if journal.statuses.get(str(path), 200) != 200)
    return ExplainSummary(model_name, len(paths), len(paths) - len(pending), len(pending), failed, round(seconds, 3), str(journal.path))


# -- reading ---------------------------------------------------------------------------------------------------------


def prefetched_batches(paths: list[Path], batch_size: int, pool: ThreadPoolExecutor) -> Iterator[tuple[list[Path], list[Any]]]:
    """Batches of (paths, bytes), the next batch read in the pool while the caller works on the current one."""
    batches = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
    from camserve_tools.commands.inputs import read_image

    upcoming = [pool.submit(read_image, path) for path in batches[0]] if batches else []
    for index, batch in enumerate(batches):
        current = upcoming
        if index + 1 < len(batches):
            upcoming = [pool.submit(read_image, path) for path in batches[index + 1]]
        yield batch, [future.result() for future in current]


# -- writing ---------------------------------------------------------------------------------------------------------


def output_name(path: Path, output: str) -> Path:
    """Where an input's image goes inside DIR: its path (relative to the working directory when under it, else
    absolute) mirrored under maps/ or overlays/, with .png added - distinct inputs never share a name."""
    try:
        relative = path.relative_to(Path.cwd())
    except ValueError:
        relative = Path(*path.parts[1:])
    return Path(OUTPUT_FOLDERS[output]) / relative.with_name(relative.name + ".png")


def submit_output(pool: ThreadPoolExecutor, out_dir: Path, path: Path, body: Any, status: int, answer: Any, output: str) -> Future | None:
    """Write the image of --output for a successful answer, in the pool (file creation and overlay drawing overlap
    the model's next batch, so even a heat map's write is cheaper there); None when nothing is written."""
    from camserve_tools.local_model import answer_cams

    cams = answer_cams(answer) if status == 200 and output in OUTPUT_FOLDERS else []
    if not cams or "heatmap" not in cams[0]:
        return None
    cam = cams[0]
    name = output_name(path, output)
    return pool.submit(write_output, out_dir / name, name, body, cam["heatmap"], output)


def write_output(target: Path, name: Path, body: bytes, heatmap_b64: str, output: str) -> str:
    """The heat map PNG as the endpoint sent it, or the overlay drawn from it; returns the name for the line."""
    from camserve_tools.commands.overlays import heatmap_overlay

    png = base64.b64decode(heatmap_b64)
    data = png if output == "png" else heatmap_overlay(body, png)
    target.parent.mkdir(parents=True, exist_ok=True)
    # No temporary name and rename: a file cut short by a crash has no journal line yet, so it is written again.
    target.write_bytes(data)
    return str(name)


class InlineExecutor:
    """An executor whose submit() runs the call at once, in this thread: --jobs 0."""

    def submit(self, fn: Any, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:  # noqa: BLE001 - delivered through the future, as a thread pool does
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def executors(threads: int) -> tuple[Any, Any]:
    """(the pool that reads and draws, the executor that writes journal lines): with threads, lines get a thread
    of their own (one: lines keep their order), so serialising a line overlaps the model's next batch."""
    if threads == 0:
        inline = InlineExecutor()
        return inline, inline
    return ThreadPoolExecutor(threads), ThreadPoolExecutor(1, thread_name_prefix="journal")


class OrderedWriter:
    """Journal lines in input order, each written once its output file is on disk."""

    def __init__(self, journal: Any, out: Any, executor: Any) -> None:
        self.journal, self.out = journal, out
        self.thread = executor
        self.pending: deque[Future] = deque()

    def add(self, line: dict[str, Any], output: Future | None) -> None:
        self.pending.append(self.thread.submit(self._write, line, output))

    def flush(self) -> None:
        """Flush after the lines added so far; raise what any finished write raised (a full disk, say)."""
        self.pending.append(self.thread.submit(self.out.flush))
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()

    def close(self) -> None:
        """Wait for every line; raise the first error."""
        self.thread.shutdown(wait=True)
        while self.pending:
            self.pending.popleft().result()

    def _write(self, line: dict[str, Any], output: Future | None) -> None:
        if output is not None:
            try:
                line["file"] = output.result()
            except Exception as error:  # noqa: BLE001 - a file we cannot write fails that image, not the run
                line.update(status=500, answer={"code": 500, "type": "output_failed", "message": f"{type(error).__name__}: {error}"})
        self.journal.record(self.out, line)
