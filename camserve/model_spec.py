"""What a served model is: the `handler:` section of its model-config.yaml, and how to build the model from it.

handler:
  architecture: camserve.models.shapes_net:ShapesNet   # "module:Class", "torchvision:resnet18", "timm:<name>" or "torch.export"
  num_classes: 6
  weights: shapes_net.pt          # state-dict file inside the archive (a torch.export.save file for "torch.export")
  labels: index_to_name.json      # {"0": "circle", ...}
  input_size: [192, 192]          # [height, width] the whole image is resized to
  mean: [0.5, 0.5, 0.5]
  std: [0.25, 0.25, 0.25]
  method: gradcam                 # default CAM method
  target_layers: []               # module names; empty = found automatically
  topk: 3                         # classes listed in an answer by default (DEFAULT_TOPK)
  scorecam_max_channels: 64       # channels Score-CAM scores (camserve.cam.methods.SCORECAM_MAX_CHANNELS)
  max_request_cost: null          # forward passes one request may cost; null = twice a default Score-CAM map
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import yaml
from torch import nn

from camserve.cam.methods import SCORECAM_MAX_CHANNELS
from camserve.protocol.options import default_request_cost_limit

# The defaults of a model-config's handler section: the one source for every tool that writes one.
DEFAULT_INPUT_SIZE = (224, 224)
DEFAULT_METHOD = "gradcam"
DEFAULT_TOPK = 3


class SpecError(ValueError):
    """A model-config that cannot describe a loadable model; says which key is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    num_classes: int
    weights: str
    labels: str | None = None
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    method: str = DEFAULT_METHOD
    target_layers: tuple[str, ...] = field(default_factory=tuple)
    topk: int = DEFAULT_TOPK
    scorecam_max_channels: int = SCORECAM_MAX_CHANNELS
    max_request_cost: int | None = None

    @property
    def request_cost_limit(self) -> int:
        """At most this many forward passes of one image per request (see camserve.protocol.options.request_cost);
        by default camserve.protocol.options.default_request_cost_limit."""
        return self.max_request_cost or default_request_cost_limit(self.scorecam_max_channels)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ModelSpec:
        """The spec in `model_dir/model-config.yaml`, as the handler reads it from an archive."""
        return cls.from_dict(yaml.safe_load((Path(model_dir) / "model-config.yaml").read_text())["handler"])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SpecError(f"unknown key(s) {unknown} in the model-config handler section; known: {sorted(known)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in raw]
        if missing:
            raise SpecError(f"the model-config handler section lacks {missing}")
        values = dict(raw)
        for key in ("input_size", "mean", "std", "target_layers"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
            elif key in values:
                del values[key]
        return cls(**values)


# A program written by torch.export.save: served without the model's Python source (see load_model).
EXPORTED = "torch.export"


def construct(cls: type[nn.Module], num_classes: int) -> nn.Module:
    """An instance as TorchServe builds a model file's class (no arguments), given `num_classes` where the
    constructor names that parameter."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a signature Python cannot read: build it as TorchServe would
        parameters = MappingProxyType({})
    return cls(num_classes=num_classes) if "num_classes" in parameters else cls()


def build_architecture(architecture: str, num_classes: int) -> nn.Module:
    """An untrained instance of `module:Class`, `torchvision:<builder>` or `timm:<name>`."""
    module_name, _, attribute = architecture.partition(":")
    if not attribute:
        raise SpecError(f"architecture {architecture!r} must look like 'package.module:Class', 'torchvision:resnet18' or 'timm:<name>'")
    if module_name == "torchvision":
        from torchvision import models

        try:
            builder = models.get_model_builder(attribute)
        except ValueError:
            raise SpecError(f"torchvision has no model builder {attribute!r}; see torchvision.models.list_models()") from None
        # aux_logits off: GoogLeNet / Inception v3 then return plain logits, and their aux weights are not needed.
        extra = {"aux_logits": False, "init_weights": False} if attribute in ("googlenet", "inception_v3") else {}
        return builder(weights=None, num_classes=num_classes, **extra)
    if module_name == "timm":
        import timm

        if not timm.is_model(attribute):
            raise SpecError(f"timm has no model {attribute!r}; see timm.list_models()")
        # pretrained=False: the weights come from the archive, nothing is downloaded at serving time.
        return timm.create_model(attribute, pretrained=False, num_classes=num_classes)
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise SpecError(f"cannot import architecture {architecture!r}: {error}") from None
    return construct(cls, num_classes)


def load_model(spec: ModelSpec, model_dir: Path, device: torch.device | str = "cpu") -> nn.Module:
    """The model with its weights, in eval mode, parameters frozen (serving never trains)."""
    path = Path(model_dir) / spec.weights
    if spec.architecture == EXPORTED:
        # unflatten restores the module tree (names, forward hooks, gradients); the program itself takes no hooks.
        program: nn.Module = torch.export.unflatten(torch.export.load(path))
        return program.to(device).eval().requires_grad_(False)
    model = build_architecture(spec.architecture, spec.num_classes)
    state = torch.load(path, map_location=device, weights_only=True)
    # Aux-classifier weights of GoogLeNet / Inception v3 checkpoints are unused at inference.
    state = without_auxiliary_heads(state)
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def without_auxiliary_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict less GoogLeNet's and Inception v3's auxiliary classifiers, which inference never runs."""
    return {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}


def load_labels(spec: ModelSpec, model_dir: Path) -> list[str]:
    if not spec.labels:
        return [str(i) for i in range(spec.num_classes)]
    mapping = json.loads((Path(model_dir) / spec.labels).read_text())
    labels = [mapping.get(str(i), str(i)) for i in range(spec.num_classes)]
    # torchvision-style labels files map to [wnid, name]; keep the name.
    return [str(label[-1]) if isinstance(label, list) else str(label) for label in labels]
