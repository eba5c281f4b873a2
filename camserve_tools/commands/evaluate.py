"""`camserve evaluate MODEL DATA --boxes FILE --out DIR`: quality of predictions and of maps on a labelled set.

Each image goes through the server's own pipeline (in-process, camserve_tools/commands/evaluate_scoring.py), asking
for the map of every ground-truth class of the image (X-CAM-Target), so the figures judge localization apart from
classification; they come from the float maps the model computed (camserve_tools/commands/evaluate_report.py). Writes DIR/metrics.json
(overall and per class), DIR/summary.md, and DIR/worst/ (overlays of the worst maps: ground truth green, the map's
box white, its peak a cross). An annotation entry that cannot be used (a box of no area, an unknown image or class,
an image name outside DATA) is dropped, counted and named in metrics.json (`data_errors`), and the rest is
evaluated; images are read only inside DATA.

Figures - over images for top1, over (image, ground-truth class) maps for the rest:
  top1                  the top-1 prediction is one of the image's classes
  pointing_game         the map's peak lies inside a ground-truth box of its class
  empty_maps            maps that point nowhere (all zero, or not finite): no peak, no box; counted as misses (pointing and IoU 0)
  iou50                 the map's box has IoU >= 0.5 with a ground-truth box of its class (mean_iou: the mean)
  deletion_auc          RISE deletion (lower is better): the class probability as the most salient pixels turn
                        black, 1/STEPS of the pixels at a time; the area under that curve
  insertion_auc         RISE insertion (higher is better): the same pixels put back, from a blurred image
  randomization_spearman  Adebayo et al. 2018: mean Spearman correlation between the map and the map of the
                        same model re-initialised (fixed seed); low means the map depends on what was learned
Boxes: COCO JSON, a Pascal VOC XML file or a folder of them; labels map to the model's classes by name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camserve_tools.commands import common
from camserve_tools.commands.evaluate_report import metrics_report, people_table, shown, summary_markdown
from camserve_tools.commands.evaluate_scoring import EvaluateSettings, Evaluation, evaluate_images, randomise_weights

if TYPE_CHECKING:  # the pipeline (torch) loads when a run starts, not for `camserve --help`
    from camserve.pipeline import CamPipeline

# Overall figures a threshold may name; lower is better for the last three (use --max for them).
METRIC_KEYS = (
    "top1",
    "pointing_game",
    "iou50",
    "mean_iou",
    "insertion_auc",
    "deletion_auc",
    "randomization_spearman",
    "randomization_spearman_abs",
)
LOWER_IS_BETTER = frozenset({"deletion_auc", "randomization_spearman", "randomization_spearman_abs"})


@dataclass(frozen=True)
class Threshold:
    key: str
    bound: str  # "min" or "max"
    value: float

    def passes(self, actual: float | None) -> bool:
        if actual is None or actual != actual:
            return False
        return actual >= self.value if self.bound == "min" else actual <= self.value

    def describe(self, actual: float | None) -> str:
        sign = ">=" if self.bound == "min" else "<="
        return f"{self.key} = {shown(actual)} (--{self.bound} {self.key}={self.value:g} wants {sign} {self.value:g})"


def register(subparsers: Any) -> None:
    parser = common.add_command(
        subparsers,
        "evaluate",
        "quality of predictions and maps on a labelled set (COCO / VOC boxes), a CI gate",
        __doc__,
        common.exit_codes("a --min/--max threshold is breached (each is named on stderr), or an image failed")
        + f"\nthreshold keys: {', '.join(METRIC_KEYS)}",
    )
    parser.add_argument("model", type=Path, metavar="MODEL", help="a .mar archive or a model directory with model-config.yaml")
    parser.add_argument("data", type=Path, metavar="DATA", help="the folder the annotations' file names are relative to")
    parser.add_argument("--boxes", type=Path, required=True, metavar="FILE", help="COCO JSON, a VOC XML file, or a folder of VOC XML files")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="where metrics.json, summary.md and worst/ go")
    parser.add_argument("--method", help="CAM method (default: the model's)")
    parser.add_argument(
        "--min", action="append", default=[], metavar="KEY=VALUE", help="fail (exit 1) when an overall figure is below VALUE; repeatable"
    )
    parser.add_argument(
        "--max",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fail (exit 1) when an overall figure is above VALUE, e.g. deletion_auc=0.3",
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default: 8)")
    parser.add_argument("--steps", type=int, default=16, metavar="N", help="deletion / insertion steps (default: 16)")
    parser.add_argument("--worst", type=int, default=8, metavar="N", help="overlays of the N worst maps in DIR/worst/ (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-initialised model of the sanity check (default: 0)")
    parser.add_argument("--no-sanity", action="store_true", help="skip the randomisation sanity check (halves the model time)")
    common.add_output_arguments(parser)
    parser.set_defaults(run=run)


def parse_thresholds(raw_min: list[str], raw_max: list[str]) -> list[Threshold]:
    """`key=value` pairs -> thresholds; an unknown key or a value that is not a number is a usage error."""
    thresholds = []
    for bound, raws in (("min", raw_min), ("max", raw_max)):
        for raw in raws:
            key, sep, value = raw.partition("=")
            key = key.strip()
            if not sep:
                raise common.UsageError(f"--{bound} {raw!r}: expected KEY=VALUE, e.g. --{bound} top1=0.9")
            if key not in METRIC_KEYS:
                raise common.UsageError(f"--{bound} {raw!r}: unknown key {key!r}; known: {', '.join(METRIC_KEYS)}")
            try:
                number = float(value)
            except ValueError:
                raise common.UsageError(f"--{bound} {raw!r}: {value!r} is not a number") from None
            thresholds.append(Threshold(key, bound, number))
    return thresholds


def run(args: argparse.Namespace) -> int:
    from camserve.model_source import ModelSourceError
    from camserve_tools.data.annotations import AnnotationError, read_annotations
    from camserve_tools.local_model import open_model

    thresholds = parse_thresholds(args.min, args.max)
    if min(args.batch_size, args.steps) < 1 or args.worst < 0:
        raise common.UsageError("--batch-size and --steps must be at least 1, --worst at least 0")
    if not args.data.is_dir():
        raise common.UsageError(f"DATA {args.data} is not a folder")
    if not args.boxes.exists():
        raise common.UsageError(f"--boxes {args.boxes} does not exist")
    out = common.check_out_dir(args.out)
    settings = EvaluateSettings(args.method, args.batch_size, args.steps, args.worst, args.seed, not args.no_sanity)
    started = time.perf_counter()
    try:
        model = open_model(args.model)
        randomised = open_model(args.model) if settings.sanity else None
    except ModelSourceError as error:
        raise common.UsageError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - a damaged archive, or whatever the model's own code raises while loading
        raise common.CommandFailed(f"{args.model} cannot be loaded: {type(error).__name__}: {error}") from None
    try:
        check_method(model.pipeline, settings.method)
        try:
            annotated = read_annotations(args.boxes, args.data, model.labels)
        except AnnotationError as error:
            raise common.UsageError(str(error)) from None
        if not annotated.images:
            raise common.UsageError(
                f"no image of {args.data} has a box of a class the model knows "
                f"(unmatched labels: {annotated.unmatched_labels[:10]}, missing images: {len(annotated.missing_images)}, "
                f"data errors: {len(annotated.data_errors)}{describe_data_errors(annotated.data_errors, 3)})"
            )
        if randomised is not None:
            randomise_weights(randomised.pipeline, settings.seed)
        evaluation = evaluate_images(model.pipeline, randomised.pipeline if randomised else None, annotated.images, settings, args.quiet)
        metrics = metrics_report(evaluation, model.name, settings.method or model.pipeline.spec.method, settings, args.boxes, annotated)
        metrics["seconds"] = round(time.perf_counter() - started, 1)
        verdicts = [
            {"key": t.key, "bound": t.bound, "value": t.value, "actual": metrics[t.key], "passed": t.passes(metrics[t.key])}
            for t in thresholds
        ]
        metrics["thresholds"] = verdicts
        metrics["passed"] = all(v["passed"] for v in verdicts) and not evaluation.failed
        write_outputs(out, metrics, evaluation)
    finally:
        model.close()
        if randomised is not None:
            randomised.close()
    for threshold, verdict in zip(thresholds, verdicts, strict=True):
        if not verdict["passed"]:
            print(f"threshold breached: {threshold.describe(verdict['actual'])}", file=sys.stderr)
    if annotated.data_errors:
        print(
            f"{len(annotated.data_errors)} annotation {'entry' if len(annotated.data_errors) == 1 else 'entries'} dropped as data "
            f"errors{describe_data_errors(annotated.data_errors, 3)}; all are counted in metrics.json (data_errors)",
            file=sys.stderr,
        )
    common.emit(metrics, args.json, people_table(metrics))
    return common.exit_status(metrics["passed"])


def describe_data_errors(errors: list, count: int) -> str:
    """': where: problem; ...' for the first `count` data errors, for a message; empty for none."""
    return (": " + "; ".join(f"{error.where}: {error.problem}" for error in errors[:count])) if errors else ""


def check_method(pipeline: CamPipeline, method: str | None) -> None:
    """A usage error unless `method` (or the model's default) is a method the model can map with."""
    from camserve.protocol.decoding import RequestError
    from camserve.protocol.options import parse_options

    try:
        options = parse_options({"method": method} if method else {}, pipeline.rules)
    except RequestError as error:
        raise common.UsageError(str(error)) from None
    if options.method is None:
        raise common.UsageError("evaluate needs maps: --method none gives none")


# -- outputs ---------------------------------------------------------------------------------------------------------


def write_outputs(out: Path, metrics: dict[str, Any], evaluation: Evaluation) -> None:
    """DIR/worst/, metrics.json and summary.md. The overlays are drawn into a new folder first and swapped in
    whole, and each file replaces its old self at once: until this run's results are ready, the last run's stay."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".worst-new-", dir=out))
    try:
        files = write_worst(staging, evaluation)
        for entry, (name, problem) in zip(metrics["worst"], files, strict=True):
            entry["file"] = name
            if problem is not None:
                entry["overlay_error"] = problem
        swap_folder(staging, out / "worst")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_atomically(out / "summary.md", summary_markdown(metrics))


def swap_folder(new: Path, target: Path) -> None:
    """Put the folder `new` in the place of `target` (a folder, a file, a symlink or nothing), then remove the old."""
    retired = None
    if target.is_symlink() or target.exists():
        retired = Path(tempfile.mkdtemp(prefix=".worst-old-", dir=target.parent)) / target.name
        target.rename(retired)
    new.rename(target)
    if retired is not None:
        if retired.is_dir() and not retired.is_symlink():
            shutil.rmtree(retired.parent, ignore_errors=True)
        else:
            retired.unlink()
            retired.parent.rmdir()


def write_atomically(path: Path, text: str) -> None:
    """The file's new text, in place at once (written beside it, then renamed over it)."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def safe_name_part(text: str, limit: int = 60) -> str:
    """`text` as part of a file name: letters, digits, '.', '_' and '-' only (a label like "T-shirt/top" names no
    folder), never starting with '.', at most `limit` characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")[:limit] or "_"


def write_worst(folder: Path, evaluation: Evaluation) -> list[tuple[str | None, str | None]]:
    """Overlays of the worst maps, ground truth drawn on, into `folder`; for each, (its name under DIR, or None,
    and why it could not be drawn, or None)."""
    import torch

    from camserve.protocol.responses import heatmap_png_of_grid
    from camserve_tools.commands.inputs import read_image
    from camserve_tools.commands.overlays import annotated_overlay

    files: list[tuple[str | None, str | None]] = []
    for rank, worst in enumerate(evaluation.worst, start=1):
        record = worst.record
        name = f"{rank:02d}_{safe_name_part(Path(record.image).stem)}_{safe_name_part(record.label)}.png"
        verdict = "empty map" if record.empty else "hit" if record.pointing else "miss"
        caption = f"{record.label}: top-1 {record.predicted}, IoU {record.iou:.2f}, {verdict}"
        body = read_image(worst.path)
        if isinstance(body, dict):
            files.append((None, body["message"]))
            continue
        # The map at its own resolution: the overlay upsamples it to the image, as the endpoint's overlay does;
        # an empty map is drawn blank, as the endpoint answers it.
        grid = torch.zeros_like(worst.grid) if record.empty else worst.grid
        heatmap_png = heatmap_png_of_grid(grid, (grid.shape[1], grid.shape[0]))
        try:
            overlay = annotated_overlay(body, heatmap_png, worst.boxes, record.bbox, record.peak, caption)
        except (OSError, ValueError) as error:  # an image changed on disk since it was scored, say
            files.append((None, f"{type(error).__name__}: {error}"))
            continue
        (folder / name).write_bytes(overlay)
        files.append((f"worst/{name}", None))
    return files
