"""`camserve evaluate MODEL DATA --boxes FILE --out DIR`: quality of predictions and of maps on a labelled set.

Each image goes through the server's own handler (in-process), asking for the map of every ground-truth class of
the image (X-CAM-Target), so the figures judge localization apart from classification. Writes DIR/metrics.json
(overall and per class), DIR/summary.md, and DIR/worst/ (overlays of the worst maps: ground truth green, the map's
box white, its peak a cross). An annotation entry that cannot be used (a box of no area, an unknown image or class,
an image name outside DATA) is dropped, counted and named in metrics.json (`data_errors`), and the rest is
evaluated; images are read only inside DATA.

Figures - over images for top1, over (image, ground-truth class) maps for the rest:
  top1                  the top-1 prediction is one of the image's classes
  pointing_game         the map's peak lies inside a ground-truth box of its class
  empty_maps            maps that point nowhere (all zero): no peak, no box; counted as misses (pointing and IoU 0)
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
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from camserve_tools.commands.common import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_OK,
    CommandFailed,
    UsageError,
    add_output_arguments,
    check_out_dir,
    emit,
    format_table,
    progress,
)

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
MAX_TARGETS = 10  # the handler's MAX_MAPS: classes per request
LISTED_DATA_ERRORS = 100  # metrics.json names this many data errors and counts them all


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
        return f"{self.key} = {_shown(actual)} (--{self.bound} {self.key}={self.value:g} wants {sign} {self.value:g})"


@dataclass(frozen=True)
class EvaluateSettings:
    method: str | None = None
    batch_size: int = 8
    steps: int = 16
    worst: int = 8
    seed: int = 0
    sanity: bool = True


@dataclass
class MapRecord:
    """One map: an image's ground-truth class, what the map says about it, and the scores it gets."""

    image: str
    label: str
    class_index: int
    predicted: str  # the image's top-1 label
    probability: float | None  # of this class, as the endpoint answered; None when outside its top-k
    peak: list[int] | None  # None: the map is empty
    bbox: list[int] | None
    pointing: bool
    iou: float
    deletion_auc: float
    insertion_auc: float
    randomization_spearman: float | None = None
    empty: bool = False  # the answer said the map points nowhere: a miss for the pointing game and IoU

    @property
    def badness(self) -> tuple:
        """Sort key, worst first: a missed peak, then a poor box, then a poor insertion-minus-deletion gap."""
        return (self.pointing, self.iou, self.insertion_auc - self.deletion_auc)


@dataclass
class Evaluation:
    images: int = 0
    top1_hits: list[tuple[list[int], int]] = field(default_factory=list)  # (image's classes, top-1 index)
    maps: list[MapRecord] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    worst: list[tuple[MapRecord, str, list, Path]] = field(default_factory=list)  # record, heatmap b64, gt boxes, path


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="quality of predictions and maps on a labelled set (COCO / VOC boxes), a CI gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES_HELP.format(failed="a --min/--max threshold is breached (each is named on stderr), or an image failed")
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
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per handler call (default: 8)")
    parser.add_argument("--steps", type=int, default=16, metavar="N", help="deletion / insertion steps (default: 16)")
    parser.add_argument("--worst", type=int, default=8, metavar="N", help="overlays of the N worst maps in DIR/worst/ (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-initialised model of the sanity check (default: 0)")
    parser.add_argument("--no-sanity", action="store_true", help="skip the randomisation sanity check (halves the handler time)")
    add_output_arguments(parser)
    parser.set_defaults(run=run)


def parse_thresholds(raw_min: list[str], raw_max: list[str]) -> list[Threshold]:
    """`key=value` pairs -> thresholds; an unknown key or a value that is not a number is a usage error."""
    thresholds = []
    for bound, raws in (("min", raw_min), ("max", raw_max)):
        for raw in raws:
            key, sep, value = raw.partition("=")
            key = key.strip()
            if not sep:
                raise UsageError(f"--{bound} {raw!r}: expected KEY=VALUE, e.g. --{bound} top1=0.9")
            if key not in METRIC_KEYS:
                raise UsageError(f"--{bound} {raw!r}: unknown key {key!r}; known: {', '.join(METRIC_KEYS)}")
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"--{bound} {raw!r}: {value!r} is not a number") from None
            thresholds.append(Threshold(key, bound, number))
    return thresholds


def run(args: argparse.Namespace) -> int:
    from camserve.model_source import ModelSourceError
    from camserve_tools.data.annotations import AnnotationError, read_annotations
    from camserve_tools.local_model import open_model

    thresholds = parse_thresholds(args.min, args.max)
    if min(args.batch_size, args.steps) < 1 or args.worst < 0:
        raise UsageError("--batch-size and --steps must be at least 1, --worst at least 0")
    if not args.data.is_dir():
        raise UsageError(f"DATA {args.data} is not a folder")
    if not args.boxes.exists():
        raise UsageError(f"--boxes {args.boxes} does not exist")
    out = check_out_dir(args.out)
    settings = EvaluateSettings(args.method, args.batch_size, args.steps, args.worst, args.seed, not args.no_sanity)
    started = time.perf_counter()
    try:
        model = open_model(args.model)
        randomised = open_model(args.model) if settings.sanity else None
    except ModelSourceError as error:
        raise UsageError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - a damaged archive, or whatever the model's own code raises while loading
        raise CommandFailed(f"{args.model} cannot be loaded: {type(error).__name__}: {error}") from None
    try:
        check_method(model.pipeline, settings.method)
        try:
            annotated = read_annotations(args.boxes, args.data, model.labels)
        except AnnotationError as error:
            raise UsageError(str(error)) from None
        if not annotated.images:
            raise UsageError(
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
    for threshold, verdict in zip(thresholds, verdicts):
        if not verdict["passed"]:
            print(f"threshold breached: {threshold.describe(verdict['actual'])}", file=sys.stderr)
    if annotated.data_errors:
        print(
            f"{len(annotated.data_errors)} annotation {'entry' if len(annotated.data_errors) == 1 else 'entries'} dropped as data "
            f"errors{describe_data_errors(annotated.data_errors, 3)}; all are counted in metrics.json (data_errors)",
            file=sys.stderr,
        )
    emit(metrics, args.json, people_table(metrics))
    return EXIT_OK if metrics["passed"] else EXIT_FAILED


def describe_data_errors(errors: list, shown: int) -> str:
    """': where: problem; ...' for the first `shown` data errors, for a message; empty for none."""
    return (": " + "; ".join(f"{error.where}: {error.problem}" for error in errors[:shown])) if errors else ""


def check_method(handler: Any, method: str | None) -> None:
    from camserve.protocol.decoding import RequestError
    from camserve.protocol.options import parse_options

    try:
        options = parse_options({"method": method} if method else {}, handler.rules)
    except RequestError as error:
        raise UsageError(str(error)) from None
    if options.method is None:
        raise UsageError("evaluate needs maps: --method none gives none")


def randomise_weights(handler: Any, seed: int) -> None:
    """Re-initialise the handler's model in place, as its own constructor initialises it, from a fixed seed."""
    import torch

    from camserve.model_spec import build_architecture

    torch.manual_seed(seed)
    fresh = build_architecture(handler.spec.architecture, handler.spec.num_classes)
    handler.model.load_state_dict(fresh.state_dict())


# -- the run ---------------------------------------------------------------------------------------------------------


def evaluate_images(handler: Any, random_handler: Any, images: list, settings: EvaluateSettings, quiet: bool) -> Evaluation:
    from camserve_tools.commands.inputs import read_image
    from camserve_tools.local_model import answer_batch

    evaluation = Evaluation()
    with progress(total=len(images), desc="evaluate", quiet=quiet) as bar:
        for start in range(0, len(images), settings.batch_size):
            batch = images[start : start + settings.batch_size]
            bodies = [read_image(image.path) for image in batch]
            headers = [request_headers(image.classes, settings.method) for image in batch]
            answers = answer_batch(handler, bodies, headers)
            random_answers = answer_batch(random_handler, bodies, headers) if random_handler is not None else [(0, None)] * len(batch)
            for image, body, answer, random_answer in zip(batch, bodies, answers, random_answers):
                score_image(handler, evaluation, image, body, answer, random_answer, settings)
            bar.update(len(batch))
    return evaluation


def request_headers(classes: list[int], method: str | None) -> dict[str, str]:
    headers = {"X-CAM-Target": ",".join(str(c) for c in classes[:MAX_TARGETS]), "X-CAM-Output": "png"}
    if method:
        headers["X-CAM-Method"] = method
    return headers


def score_image(
    handler: Any,
    evaluation: Evaluation,
    image: Any,
    body: bytes,
    answer: tuple[int, Any],
    random_answer: tuple[int, Any],
    settings: EvaluateSettings,
) -> None:
    """Score one image's answer (and each of its maps) into `evaluation`."""
    from camserve_tools.local_model import answer_cams

    status, body_json = answer
    if status != 200:
        evaluation.failed.append({"path": str(image.path), "status": status, "error": body_json})
        return
    evaluation.images += 1
    top1 = body_json["predictions"][0]
    evaluation.top1_hits.append((image.classes, int(top1["index"])))
    probabilities = {p["index"]: p["probability"] for p in body_json["predictions"]}
    pixels = model_pixels(handler, body)
    random_cams = answer_cams(random_answer[1]) if random_answer[0] == 200 else []
    for position, cam in enumerate(answer_cams(body_json)):
        record, heatmap = score_map(handler, image, cam, pixels, settings.steps)
        record.predicted = top1["label"]
        record.probability = probabilities.get(cam["index"])
        if position < len(random_cams):
            record.randomization_spearman = randomization_spearman(handler, heatmap, random_cams[position])
        evaluation.maps.append(record)
        keep_worst(evaluation, record, cam["heatmap"], image.boxes_of(record.class_index), image.path, settings.worst)


def model_pixels(handler: Any, body: bytes) -> Any:
    """The image as the model sees it, in [0, 1] before normalisation: the handler's own decode and resize."""
    from torchvision import transforms

    from camserve.protocol.decoding import decode_image

    image, _ = decode_image(body, at_least=handler.decode_at_least)
    return transforms.Compose(handler.transform.transforms[:-1])(image)  # all but the final Normalize


def map_at_input_size(handler: Any, heatmap: Any) -> Any:
    """A uint8 heat map (any size: the answer's heatmap_size) resized to the model's input, as floats in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    height, width = handler.spec.input_size
    resized = Image.fromarray(heatmap).resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)


def score_map(handler: Any, image: Any, cam: dict[str, Any], pixels: Any, steps: int) -> tuple[MapRecord, Any]:
    from camserve.protocol.responses import decode_heatmap
    from camserve_tools.quality.saliency_metrics import best_iou, deletion_insertion_auc, pointing_hit

    class_index = int(cam["index"])
    boxes = image.boxes_of(class_index)
    heatmap = decode_heatmap(cam["heatmap"])
    normalize = handler.transform.transforms[-1]

    def class_probability(batch: Any) -> Any:
        return handler.extractor.predict(normalize(batch)).softmax(dim=1)[:, class_index]

    deletion, insertion = deletion_insertion_auc(class_probability, pixels, map_at_input_size(handler, heatmap), steps)
    empty = cam.get("empty") is True or cam.get("bbox") is None or cam.get("peak") is None
    record = MapRecord(
        image=str(image.path),
        label=cam["label"],
        class_index=class_index,
        predicted="",
        probability=None,
        peak=None if empty else list(cam["peak"]),
        bbox=None if empty else list(cam["bbox"]),
        pointing=False if empty else pointing_hit(cam["peak"], boxes),
        iou=0.0 if empty else round(best_iou(cam["bbox"], boxes), 4),
        deletion_auc=round(deletion, 4),
        insertion_auc=round(insertion, 4),
        empty=empty,
    )
    return record, heatmap


def randomization_spearman(handler: Any, heatmap: Any, random_cam: dict[str, Any]) -> float | None:
    """Spearman between the trained and the re-initialised model's maps of the same class, at the input size."""
    from camserve.protocol.responses import decode_heatmap
    from camserve_tools.quality.saliency_metrics import spearman

    trained = map_at_input_size(handler, heatmap).numpy()
    random = map_at_input_size(handler, decode_heatmap(random_cam["heatmap"])).numpy()
    value = spearman(trained, random)
    return None if value != value else round(value, 4)


def keep_worst(evaluation: Evaluation, record: MapRecord, heatmap_b64: str, boxes: list, path: Path, limit: int) -> None:
    """The `limit` worst maps so far, with what drawing them needs (only these heat maps are kept in memory)."""
    if limit <= 0:
        return
    evaluation.worst.append((record, heatmap_b64, boxes, path))
    evaluation.worst.sort(key=lambda entry: entry[0].badness)
    del evaluation.worst[limit:]


# -- figures ---------------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return round(sum(values) / len(values), 4) if values else None


def map_figures(records: list[MapRecord]) -> dict[str, Any]:
    spearmans = [r.randomization_spearman for r in records]
    return {
        "maps": len(records),
        "empty_maps": sum(r.empty for r in records),
        "pointing_game": _mean([float(r.pointing) for r in records]),
        "iou50": _mean([float(r.iou >= 0.5) for r in records]),
        "mean_iou": _mean([r.iou for r in records]),
        "deletion_auc": _mean([r.deletion_auc for r in records]),
        "insertion_auc": _mean([r.insertion_auc for r in records]),
        "randomization_spearman": _mean(spearmans),
        "randomization_spearman_abs": _mean([abs(s) for s in spearmans if s is not None]),
    }


def metrics_report(
    evaluation: Evaluation, model_name: str, method: str, settings: EvaluateSettings, boxes: Path, annotated: Any
) -> dict[str, Any]:
    from camserve_tools.quality.saliency_metrics import BLUR_KERNEL, BLUR_SIGMA

    top1 = _mean([float(predicted in classes) for classes, predicted in evaluation.top1_hits])
    per_class: dict[str, dict[str, Any]] = {}
    by_label: dict[str, list[MapRecord]] = defaultdict(list)
    for record in evaluation.maps:
        by_label[record.label].append(record)
    for label, records in sorted(by_label.items(), key=lambda item: item[1][0].class_index):
        index = records[0].class_index
        hits = [float(predicted == index) for classes, predicted in evaluation.top1_hits if index in classes]
        per_class[label] = {"images": len(hits), "top1": _mean(hits), **map_figures(records)}
    overall = map_figures(evaluation.maps)
    sanity_values = [r.randomization_spearman for r in evaluation.maps]
    return {
        "model": model_name,
        "method": method,
        "images": evaluation.images,
        "top1": top1,
        **overall,
        "per_class": per_class,
        "sanity": {
            "check": "randomization (Adebayo et al. 2018): Spearman between maps of the trained and a re-initialised model",
            "ran": settings.sanity,
            "seed": settings.seed,
            "maps_compared": sum(v is not None for v in sanity_values),
            "constant_maps": sum(v is None for v in sanity_values) if settings.sanity else 0,
            "randomization_spearman": overall["randomization_spearman"],
            "randomization_spearman_abs": overall["randomization_spearman_abs"],
        },
        "settings": {
            "boxes": str(boxes),
            "steps": settings.steps,
            "deletion": "most salient pixels first, set to zero (black) in [0, 1] pixel space, at the model's input size",
            "insertion": (
                f"from the image Gaussian-blurred (kernel {BLUR_KERNEL}, sigma {BLUR_SIGMA} px at the input size), "
                "most salient pixels first"
            ),
            "maps": "one per (image, ground-truth class), requested with X-CAM-Target",
        },
        "failed_images": evaluation.failed,
        "data_error_count": len(annotated.data_errors),
        "data_errors": [asdict(error) for error in annotated.data_errors[:LISTED_DATA_ERRORS]],
        "unmatched_labels": annotated.unmatched_labels,
        "missing_images": annotated.missing_images,
        "unannotated_images": annotated.unannotated_images,
        "worst": [asdict(entry[0]) for entry in evaluation.worst],
    }


# -- outputs ---------------------------------------------------------------------------------------------------------


def write_outputs(out: Path, metrics: dict[str, Any], evaluation: Evaluation) -> None:
    """DIR/worst/, metrics.json and summary.md. The overlays are drawn into a new folder first and swapped in
    whole, and each file replaces its old self at once: until this run's results are ready, the last run's stay."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".worst-new-", dir=out))
    try:
        files = write_worst(staging, evaluation)
        for entry, (name, problem) in zip(metrics["worst"], files):
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
    import base64

    from camserve_tools.commands.inputs import read_image
    from camserve_tools.commands.overlays import annotated_overlay

    files: list[tuple[str | None, str | None]] = []
    for rank, (record, heatmap_b64, boxes, path) in enumerate(evaluation.worst, start=1):
        name = f"{rank:02d}_{safe_name_part(Path(record.image).stem)}_{safe_name_part(record.label)}.png"
        verdict = "empty map" if record.empty else "hit" if record.pointing else "miss"
        caption = f"{record.label}: top-1 {record.predicted}, IoU {record.iou:.2f}, {verdict}"
        body = read_image(path)
        if isinstance(body, dict):
            files.append((None, body["message"]))
            continue
        try:
            overlay = annotated_overlay(body, base64.b64decode(heatmap_b64), boxes, record.bbox, record.peak, caption)
        except (OSError, ValueError) as error:  # an image changed on disk since it was scored, say
            files.append((None, f"{type(error).__name__}: {error}"))
            continue
        (folder / name).write_bytes(overlay)
        files.append((f"worst/{name}", None))
    return files


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown_cell(text: str) -> str:
    """Text from labels or file names as one markdown table cell: no '|' or line break ends it early."""
    return " ".join(str(text).replace("|", "\\|").split())


FIGURE_COLUMNS = ("empty_maps", "top1", "pointing_game", "iou50", "mean_iou", "deletion_auc", "insertion_auc", "randomization_spearman")


def summary_markdown(metrics: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation of `{metrics['model']}` ({metrics['method']})",
        "",
        f"{metrics['images']} images, {metrics['maps']} maps (one per image and ground-truth class), "
        f"{metrics['empty_maps']} of them empty (no peak, no box: counted as misses); boxes from "
        f"`{metrics['settings']['boxes']}`; {metrics['seconds']} s.",
        "",
        "| scope | images | maps | " + " | ".join(FIGURE_COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(FIGURE_COLUMNS),
        f"| overall | {metrics['images']} | {metrics['maps']} | " + " | ".join(_shown(metrics[k]) for k in FIGURE_COLUMNS) + " |",
    ]
    for label, figures in metrics["per_class"].items():
        figures_cells = " | ".join(_shown(figures[k]) for k in FIGURE_COLUMNS)
        lines.append(f"| {_markdown_cell(label)} | {figures['images']} | {figures['maps']} | {figures_cells} |")
    sanity = metrics["sanity"]
    lines += [
        "",
        f"Deletion: {metrics['settings']['deletion']}; insertion: {metrics['settings']['insertion']}; "
        f"{metrics['settings']['steps']} steps each.",
        "",
    ]
    if sanity["ran"]:
        lines.append(
            f"Randomisation sanity check (seed {sanity['seed']}): mean Spearman {_shown(sanity['randomization_spearman'])}, "
            f"mean |Spearman| {_shown(sanity['randomization_spearman_abs'])} over {sanity['maps_compared']} maps "
            f"({sanity['constant_maps']} constant maps of the re-initialised model left out); low means the maps "
            f"depend on the learned weights."
        )
    else:
        lines.append("Randomisation sanity check: skipped (--no-sanity).")
    if metrics["thresholds"]:
        lines += ["", "| threshold | actual | verdict |", "|---|---|---|"]
        for verdict in metrics["thresholds"]:
            lines.append(
                f"| {verdict['key']} {'>=' if verdict['bound'] == 'min' else '<='} {verdict['value']:g} | "
                f"{_shown(verdict['actual'])} | {'pass' if verdict['passed'] else '**FAIL**'} |"
            )
    problems = [f"{len(metrics['failed_images'])} image(s) failed"] if metrics["failed_images"] else []
    if metrics["data_error_count"]:
        problems.append(
            f"{metrics['data_error_count']} annotation entries dropped as data errors (listed in metrics.json), first: "
            + "; ".join(_markdown_cell(f"{error['where']}: {error['problem']}") for error in metrics["data_errors"][:5])
        )
    if metrics["unmatched_labels"]:
        problems.append(f"labels without a model class: {_markdown_cell(', '.join(metrics['unmatched_labels']))}")
    problems += [f"{len(metrics['missing_images'])} annotated image(s) not found"] if metrics["missing_images"] else []
    if problems:
        lines += ["", "Problems: " + "; ".join(problems) + "."]
    if metrics["worst"]:
        lines += [
            "",
            "## Worst maps",
            "",
            "Ground truth green, the map's box white, its peak a white cross.",
            "",
            "| # | image | class | top-1 | peak in box | IoU | deletion | insertion | overlay |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for rank, entry in enumerate(metrics["worst"], start=1):
            lines.append(
                f"| {rank} | {_markdown_cell(Path(entry['image']).name)} | {_markdown_cell(entry['label'])} | "
                f"{_markdown_cell(entry['predicted'])} | "
                f"{'empty map' if entry['empty'] else 'yes' if entry['pointing'] else 'no'} | "
                f"{entry['iou']:.2f} | {entry['deletion_auc']:.3f} | {entry['insertion_auc']:.3f} | "
                + (f"[{entry['file']}]({entry['file']}) |" if entry.get("file") else "- |")
            )
    return "\n".join(lines) + "\n"


def people_table(metrics: dict[str, Any]) -> str:
    rows = [{"scope": "overall", "images": metrics["images"], "maps": metrics["maps"], **{k: metrics[k] for k in FIGURE_COLUMNS}}]
    rows += [
        {"scope": label, "images": f["images"], "maps": f["maps"], **{k: f[k] for k in FIGURE_COLUMNS}}
        for label, f in metrics["per_class"].items()
    ]
    table = format_table(rows, ("scope", "images", "maps", *FIGURE_COLUMNS))
    verdicts = [
        f"{v['key']} {'>=' if v['bound'] == 'min' else '<='} {v['value']:g}: {_shown(v['actual'])} {'pass' if v['passed'] else 'FAIL'}"
        for v in metrics["thresholds"]
    ]
    failed = [f"{len(metrics['failed_images'])} image(s) failed"] if metrics["failed_images"] else []
    return "\n".join([table, *verdicts, *failed, f"metrics.json, summary.md and worst/ written ({metrics['seconds']} s)"])
