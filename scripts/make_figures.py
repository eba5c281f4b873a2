"""Regenerate the overlay figures in docs/ (what `output=overlay` returns): the default model on generated scenes,
and the imagenet model (model_store/imagenet.mar, `make model_store/imagenet.mar`) on a real photograph.

    .venv/bin/python scripts/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from camserve.cam import CamExtractor
from camserve.model_spec import ModelSpec, load_model
from camserve.preprocessing import whole_image_transform
from camserve.protocol.responses import overlay_image
from camserve_tools.archive.packing import load_archive
from camserve_tools.data.photos import LABELLED
from camserve_tools.data.scenes import EVAL_SEED_START, make_scene

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"overlay-gradcam.png": (EVAL_SEED_START + 3, "gradcam"), "overlay-layercam.png": (EVAL_SEED_START + 5, "layercam")}
IMAGENET_FIGURE = "overlay-imagenet.png"


def main() -> None:
    model_dir = ROOT / "models" / "shapes"
    spec = ModelSpec.from_model_dir(model_dir)
    extractor = CamExtractor(load_model(spec, model_dir), spec.input_size)
    transform = whole_image_transform(spec.input_size, spec.mean, spec.std)
    for name, (seed, method) in FIGURES.items():
        scene = make_scene(seed, size=(480, 360))
        result = extractor(transform(scene.image)[None], method=method)
        (ROOT / "docs" / name).write_bytes(overlay_image(scene.image, result.maps[0, 0], "png"))
        print(f"docs/{name}: {scene.name}, predicted {int(result.targets[0, 0])}, {method}")
    imagenet_figure()


def imagenet_figure() -> None:
    """The coffee photo, side by side: Grad-CAM of the top-1 class, on the served archive's own preprocessing."""
    model, spec, labels = load_archive(ROOT / "model_store" / "imagenet.mar")
    extractor = CamExtractor(model, spec.input_size)
    transform = whole_image_transform(spec.input_size, spec.mean, spec.std)
    photo = next(p for p in LABELLED if p.name == "coffee")
    image = photo.image()
    result = extractor(transform(image)[None], method="gradcam")
    (ROOT / "docs" / IMAGENET_FIGURE).write_bytes(overlay_image(image, result.maps[0, 0], "png"))
    probability = float(result.logits.softmax(dim=1)[0, result.targets[0, 0]])
    print(
        f"docs/{IMAGENET_FIGURE}: {photo.source}, predicted {labels[int(result.targets[0, 0])]!r} ({probability:.2f}), "
        f"gradcam at {extractor.default_layers[0]}"
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
