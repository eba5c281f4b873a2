"""The models the serving benchmark and the handler profile measure: ours (a model dir) and the built-in's (a model file)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from camserve.model_spec import ModelSpec
from camserve_tools.archive import torchvision_model_dir

ROOT = Path(__file__).resolve().parents[2]

# The built-in handler loads an eager model from a file that defines exactly one class.
RESNET18_MODEL_FILE = '''"""torchvision resnet18 as one class, for TorchServe's eager model loading."""
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=1000)
'''


@dataclass(frozen=True)
class BenchModel:
    name: str
    model_dir: Path  # ours: weights, labels, model-config.yaml
    model_file: Path  # the built-in's eager model class

    def spec(self) -> ModelSpec:
        return ModelSpec.from_model_dir(self.model_dir)


def prepare_models(names: list[str], work_dir: Path) -> list[BenchModel]:
    models = []
    for name in names:
        if name == "shapes":
            models.append(BenchModel("shapes", ROOT / "models" / "shapes", ROOT / "camserve" / "models" / "shapes_net.py"))
        elif name == "resnet18":
            import torchvision

            torch.manual_seed(0)
            weights = work_dir / "resnet18-random.pt"
            torch.save(torchvision.models.resnet18().state_dict(), weights)
            model_dir = torchvision_model_dir("resnet18", str(weights), work_dir / "resnet18")
            model_file = work_dir / "resnet18_model.py"
            model_file.write_text(RESNET18_MODEL_FILE)
            models.append(BenchModel("resnet18", model_dir, model_file))
        else:
            sys.exit(f"unknown benchmark model {name!r}: shapes or resnet18")
    return models
