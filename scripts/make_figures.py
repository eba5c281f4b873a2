"""Regenerate the overlay figures in docs/ from the default model (what `output=overlay` returns).

    .venv/bin/python scripts/make_figures.py
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from camserve.cam import CamExtractor
from camserve.model_spec import ModelSpec, load_model
from camserve.preprocessing import whole_image_transform
from camserve.protocol.responses import overlay_image
from camserve.scenes import EVAL_SEED_START, make_scene

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"overlay-gradcam.png": (EVAL_SEED_START + 3, "gradcam"), "overlay-layercam.png": (EVAL_SEED_START + 5, "layercam")}


def main() -> None:
    model_dir = ROOT / "models" / "shapes"
    spec = ModelSpec.from_dict(yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"])
    extractor = CamExtractor(load_model(spec, model_dir), spec.input_size)
    transform = whole_image_transform(spec.input_size, spec.mean, spec.std)
    for name, (seed, method) in FIGURES.items():
        scene = make_scene(seed, size=(480, 360))
        result = extractor(transform(scene.image)[None], method=method)
        (ROOT / "docs" / name).write_bytes(overlay_image(scene.image, result.maps[0, 0], "png"))
        print(f"docs/{name}: {scene.name}, predicted {int(result.targets[0, 0])}, {method}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
