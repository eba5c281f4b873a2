"""`camserve evaluate`'s report: the figures over all maps and per class (metrics.json), and the same for
people (summary.md and the table on stdout)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from camserve_tools.commands.common import format_table
from camserve_tools.commands.evaluate_scoring import EvaluateSettings, Evaluation, MapRecord

LISTED_DATA_ERRORS = 100  # metrics.json names this many data errors and counts them all
FIGURE_COLUMNS = ("empty_maps", "top1", "pointing_game", "iou50", "mean_iou", "deletion_auc", "insertion_auc", "randomization_spearman")


def _mean(values: list[float] | list[float | None]) -> float | None:
    """The mean of the finite values, rounded for the report; None where there is none (no maps, no sanity check)."""
    kept = [v for v in values if v is not None and v == v]
    return round(sum(kept) / len(kept), 4) if kept else None


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
            "maps": (
                "one per (image, ground-truth class), requested with X-CAM-Target; scored from the float map: peak and box "
                "at the image's size, deletion, insertion and randomisation at the input size"
            ),
        },
        "failed_images": evaluation.failed,
        "data_error_count": len(annotated.data_errors),
        "data_errors": [asdict(error) for error in annotated.data_errors[:LISTED_DATA_ERRORS]],
        "unmatched_labels": annotated.unmatched_labels,
        "missing_images": annotated.missing_images,
        "unannotated_images": annotated.unannotated_images,
        "worst": [asdict(entry.record) for entry in evaluation.worst],
    }


def shown(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown_cell(text: str) -> str:
    """Text from labels or file names as one markdown table cell: no '|' or line break ends it early."""
    return " ".join(str(text).replace("|", "\\|").split())


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
        f"| overall | {metrics['images']} | {metrics['maps']} | " + " | ".join(shown(metrics[k]) for k in FIGURE_COLUMNS) + " |",
    ]
    for label, figures in metrics["per_class"].items():
        figures_cells = " | ".join(shown(figures[k]) for k in FIGURE_COLUMNS)
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
            f"Randomisation sanity check (seed {sanity['seed']}): mean Spearman {shown(sanity['randomization_spearman'])}, "
            f"mean |Spearman| {shown(sanity['randomization_spearman_abs'])} over {sanity['maps_compared']} maps "
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
                f"{shown(verdict['actual'])} | {'pass' if verdict['passed'] else '**FAIL**'} |"
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
        f"{v['key']} {'>=' if v['bound'] == 'min' else '<='} {v['value']:g}: {shown(v['actual'])} {'pass' if v['passed'] else 'FAIL'}"
        for v in metrics["thresholds"]
    ]
    failed = [f"{len(metrics['failed_images'])} image(s) failed"] if metrics["failed_images"] else []
    return "\n".join([table, *verdicts, *failed, f"metrics.json, summary.md and worst/ written ({metrics['seconds']} s)"])
