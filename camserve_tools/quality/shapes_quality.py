"""The default `shapes` model's quality on freshly generated scenes (never training seeds).

Figures: top-1 accuracy; pointing game (the map's peak lies inside the true box); share of scenes whose map box
(the CAM paper's rule: largest connected region above 20 % of the maximum) has IoU >= 0.5 with the true box.
Runs the same code path as the handler (whole-image resize, CamExtractor, upsampling to original size).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from camserve.cam import CamExtractor
from camserve.cam.localization import bounding_box, box_iou, peak, upsample_map
from camserve.model_spec import ModelSpec, load_model
from camserve.preprocessing import whole_image_transform
from camserve_tools.data.scenes import EVAL_SEED_START, Scene, make_scene

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes"


@dataclass
class Quality:
    scenes: int
    top1: float
    pointing: float
    iou_050: float
    mean_iou: float


def load_generator(path: Path) -> Callable[[int], Scene]:
    """`make_scene` of a Python file: another generator (an earlier camserve_tools/data/scenes.py, say) with the same API."""
    spec = importlib.util.spec_from_file_location(f"generator_{path.stem}", path)
    if spec is None or spec.loader is None:  # not a file Python's import machinery can load as source
        raise ImportError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.make_scene


def evaluate(
    model_dir: Path,
    method: str,
    scenes: int,
    first_seed: int = EVAL_SEED_START,
    batch_size: int = 16,
    scene_maker: Callable[[int], Scene] = make_scene,
    input_size: tuple[int, int] | None = None,
) -> Quality:
    """`input_size` replaces the one in the model's config: how the model would do served at another size."""
    spec = ModelSpec.from_model_dir(model_dir)
    model = load_model(spec, model_dir)
    size = input_size or spec.input_size
    extractor = CamExtractor(model, size, spec.target_layers)
    transform = whole_image_transform(size, spec.mean, spec.std)
    correct = hits = good_boxes = 0
    ious = []
    for start in range(first_seed, first_seed + scenes, batch_size):
        batch = [scene_maker(seed) for seed in range(start, min(start + batch_size, first_seed + scenes))]
        inputs = torch.stack([transform(scene.image) for scene in batch])
        # The map of the true class: localization is judged apart from classification.
        result = extractor(inputs, method=method, targets=torch.tensor([scene.label for scene in batch]))
        predicted = result.logits.argmax(dim=1)
        for scene, grid, guess in zip(batch, result.maps[:, 0], predicted, strict=True):
            heatmap = upsample_map(grid, scene.image.size)
            box = bounding_box(heatmap)  # None for an empty map: a miss on both counts, as camserve evaluate counts it
            x, y = peak(heatmap)
            x0, y0, x1, y1 = scene.box
            correct += int(guess) == scene.label
            hits += box is not None and x0 <= x < x1 and y0 <= y < y1
            iou = box_iou(box, scene.box) if box is not None else 0.0
            ious.append(iou)
            good_boxes += iou >= 0.5
    return Quality(scenes=scenes, top1=correct / scenes, pointing=hits / scenes, iou_050=good_boxes / scenes, mean_iou=sum(ious) / scenes)
