"""`camserve evaluate`'s scoring: each annotated image through the model's pipeline, each of its maps against
the ground truth and against the model itself.

The engine-free pipeline is called stage by stage (camserve.pipeline.CamPipeline's `read` and `predict`), so an
image is decoded once, by the server's own decode and resize, and every figure comes from the float map the
model computed: peak and box as the endpoint computes them (camserve.cam.localization.peak_and_box, at the
image's size), deletion, insertion and the randomisation check from the map upsampled to the model's input
(upsample_map), never from an answer's 64-level PNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from camserve.cam.localization import map_is_empty, peak_and_box, upsample_map
from camserve.pipeline import CamPipeline, Prediction, Request, RequestError, Row
from camserve_tools.commands.common import progress

MAX_TARGETS = 10  # the pipeline's limit on maps per request: classes per image beyond it are not mapped


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
    probability: float  # of this class, from the model's softmax
    peak: list[int] | None  # None: the map is empty
    bbox: list[int] | None
    pointing: bool
    iou: float
    deletion_auc: float
    insertion_auc: float
    randomization_spearman: float | None = None
    empty: bool = False  # the map points nowhere (all zero, or not finite): a miss for the pointing game and IoU

    @property
    def badness(self) -> tuple[bool, float, float]:
        """Sort key, worst first: a missed peak, then a poor box, then a poor insertion-minus-deletion gap."""
        return (self.pointing, self.iou, self.insertion_auc - self.deletion_auc)


@dataclass
class WorstMap:
    """A map kept for drawing: its record, the map at the layer's resolution, the ground truth and the image."""

    record: MapRecord
    grid: Tensor
    boxes: list[Any]
    path: Path


@dataclass
class Evaluation:
    images: int = 0
    top1_hits: list[tuple[list[int], int]] = field(default_factory=list)  # (image's classes, top-1 index)
    maps: list[MapRecord] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    worst: list[WorstMap] = field(default_factory=list)


@dataclass(frozen=True)
class ImageResult:
    """One image's way through the pipeline: its decoded request and predictions, or why it has none."""

    request: Request | None = None
    prediction: Prediction | None = None
    random_prediction: Prediction | None = None
    error: dict[str, Any] | None = None  # the JSON error the endpoint would answer


def randomise_weights(pipeline: CamPipeline, seed: int) -> None:
    """Re-initialise the pipeline's model in place, as its own constructor initialises it, from a fixed seed."""
    from camserve.model_spec import build_architecture

    torch.manual_seed(seed)
    fresh = build_architecture(pipeline.spec.architecture, pipeline.spec.num_classes)
    pipeline.model.load_state_dict(fresh.state_dict())


def evaluate_images(
    pipeline: CamPipeline, random_pipeline: CamPipeline | None, images: list[Any], settings: EvaluateSettings, quiet: bool
) -> Evaluation:
    """Every annotated image scored into one Evaluation, `settings.batch_size` images per forward pass."""
    evaluation = Evaluation()
    with progress(total=len(images), desc="evaluate", quiet=quiet) as bar:
        for start in range(0, len(images), settings.batch_size):
            batch = images[start : start + settings.batch_size]
            for image, result in zip(batch, run_batch(pipeline, random_pipeline, batch, settings.method), strict=True):
                if result.error is not None:
                    evaluation.failed.append({"path": str(image.path), "status": result.error["code"], "error": result.error})
                elif result.request is not None and result.prediction is not None:
                    score_image(pipeline, evaluation, image, result.request, result.prediction, result.random_prediction, settings)
            bar.update(len(batch))
    return evaluation


def request_row(body: bytes, classes: list[int], method: str | None) -> Row:
    """The row a client would send for the maps of the image's own classes (the X-CAM-* headers, lower-cased)."""
    headers = {"x-cam-target": ",".join(str(c) for c in classes[:MAX_TARGETS]), "x-cam-output": "grid"}
    if method:
        headers["x-cam-method"] = method
    return Row(fields={"body": body}, headers=headers)


def run_batch(pipeline: CamPipeline, random_pipeline: CamPipeline | None, batch: list[Any], method: str | None) -> list[ImageResult]:
    """Read, decode and predict a batch: each image decoded once; the re-initialised model (same preprocessing,
    same archive) predicts from the very same inputs."""
    from camserve_tools.commands.inputs import read_image

    results: list[ImageResult] = []
    for image in batch:
        body = read_image(image.path)
        if isinstance(body, dict):  # a file that could not be read keeps the error a server would answer
            results.append(ImageResult(error=body))
            continue
        (request,) = pipeline.read([request_row(body, image.classes, method)])
        results.append(ImageResult(error=request.to_json()) if isinstance(request, RequestError) else ImageResult(request=request))
    live = [result.request for result in results if result.request is not None]
    predictions = iter(pipeline.predict(live))
    random_predictions = iter(random_pipeline.predict(live) if random_pipeline is not None else [])
    return [_with_predictions(result, predictions, random_predictions) for result in results]


def _with_predictions(result: ImageResult, predictions: Any, random_predictions: Any) -> ImageResult:
    """`result` with the next prediction of each model where it was decoded; a refused prediction is its error."""
    if result.request is None:
        return result
    prediction, random_prediction = next(predictions), next(random_predictions, None)
    if isinstance(prediction, RequestError):
        return ImageResult(error=prediction.to_json())
    random_kept = random_prediction if isinstance(random_prediction, Prediction) else None
    return ImageResult(request=result.request, prediction=prediction, random_prediction=random_kept)


def model_pixels(pipeline: CamPipeline, inputs: Tensor) -> Tensor:
    """The image as the model sees it, in [0, 1] before normalisation: the decoded request's inputs with the
    normalisation undone, so that the image is not decoded and resized a second time."""
    mean = torch.tensor(pipeline.spec.mean, dtype=inputs.dtype)[:, None, None]
    std = torch.tensor(pipeline.spec.std, dtype=inputs.dtype)[:, None, None]
    return (inputs * std + mean).clamp_(0, 1)


def map_at_input_size(pipeline: CamPipeline, grid: Tensor) -> Tensor:
    """The float map resized to the model's input (height, width); an empty map is all zero, so that it ranks
    the pixels in reading order and correlates with nothing."""
    height, width = pipeline.spec.input_size
    if map_is_empty(grid):
        return torch.zeros(height, width)
    return upsample_map(grid.detach().cpu(), (width, height))


def score_image(
    pipeline: CamPipeline,
    evaluation: Evaluation,
    image: Any,
    request: Request,
    prediction: Prediction,
    random_prediction: Prediction | None,
    settings: EvaluateSettings,
) -> None:
    """Score one image's `prediction` (and each of its maps, against the re-initialised model's where there is
    one) into `evaluation`."""
    evaluation.images += 1
    top1 = int(prediction.probabilities.argmax())
    evaluation.top1_hits.append((image.classes, top1))
    pixels = model_pixels(pipeline, request.inputs)
    maps = prediction.maps if prediction.maps is not None else torch.empty(0)
    random_maps = random_prediction.maps if random_prediction is not None else None
    for position, (grid, class_index) in enumerate(zip(maps, prediction.targets, strict=True)):
        record = score_map(pipeline, image, request.size, grid, class_index, pixels, settings.steps)
        record.predicted = pipeline.labels[top1]
        record.probability = round(float(prediction.probabilities[class_index]), 6)
        if random_maps is not None and position < len(random_maps):
            record.randomization_spearman = randomization_spearman(pipeline, grid, random_maps[position])
        evaluation.maps.append(record)
        keep_worst(evaluation, WorstMap(record, grid.detach().cpu(), image.boxes_of(class_index), image.path), settings.worst)


def score_map(
    pipeline: CamPipeline, image: Any, size: tuple[int, int], grid: Tensor, class_index: int, pixels: Tensor, steps: int
) -> MapRecord:
    """One map's record: peak and box at the image's `size` (width, height) against the ground truth, and the
    deletion and insertion AUCs of the map at the model's input size."""
    from camserve_tools.quality.saliency_metrics import best_iou, deletion_insertion_auc, pointing_hit

    boxes = image.boxes_of(class_index)
    normalize = pipeline.transform.transforms[-1]

    def class_probability(batch: Tensor) -> Tensor:
        return pipeline.extractor.predict(normalize(batch)).softmax(dim=1)[:, class_index]

    deletion, insertion = deletion_insertion_auc(class_probability, pixels, map_at_input_size(pipeline, grid), steps)
    found = peak_and_box(grid.detach().cpu(), size)
    return MapRecord(
        image=str(image.path),
        label=pipeline.labels[class_index],
        class_index=class_index,
        predicted="",
        probability=0.0,
        peak=None if found is None else list(found[0]),
        bbox=None if found is None else list(found[1]),
        pointing=found is not None and pointing_hit(found[0], boxes),
        iou=0.0 if found is None else round(best_iou(found[1], boxes), 4),
        deletion_auc=round(deletion, 4),
        insertion_auc=round(insertion, 4),
        empty=found is None,
    )


def randomization_spearman(pipeline: CamPipeline, grid: Tensor, random_grid: Tensor) -> float | None:
    """Spearman between the trained and the re-initialised model's maps of the same class, at the input size;
    None where either map is constant."""
    from camserve_tools.quality.saliency_metrics import spearman

    value = spearman(map_at_input_size(pipeline, grid).numpy(), map_at_input_size(pipeline, random_grid).numpy())
    return None if value != value else round(value, 4)


def keep_worst(evaluation: Evaluation, worst: WorstMap, limit: int) -> None:
    """The `limit` worst maps so far, with what drawing them needs (only these maps are kept in memory)."""
    if limit <= 0:
        return
    evaluation.worst.append(worst)
    evaluation.worst.sort(key=lambda entry: entry.record.badness)
    del evaluation.worst[limit:]
