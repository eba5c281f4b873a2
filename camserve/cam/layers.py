"""Target layers: finding the default one, naming them, and reading their outputs as (B, K, H, W) grids."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Heads that pool a feature map away; their outputs are not what a user means by "the last feature map".
_POOLING_HEADS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout)
_MAX_EXTRA_TOKENS = 8  # class / distillation / register tokens ahead of the patch tokens


class LayerError(ValueError):
    """A layer name that does not exist or whose output cannot be read as a spatial map."""


def to_grid(output: Tensor) -> Tensor:
    """A layer output as a (B, K, H, W) grid.

    4-D outputs are taken as NCHW. 3-D outputs (B, T, D) are transformer tokens: the trailing square number of
    tokens are the patches, the few leading ones (class, distillation tokens) are dropped.
    """
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        batch, tokens, dim = output.shape
        side = math.isqrt(tokens)
        extra = tokens - side * side
        if side >= 2 and extra <= _MAX_EXTRA_TOKENS:
            return output[:, extra:].reshape(batch, side, side, dim).permute(0, 3, 1, 2)
    raise LayerError(f"output of shape {tuple(output.shape)} is not a spatial map (need (B, C, H, W) or (B, tokens, D))")


def is_grid(output: object) -> bool:
    if not isinstance(output, Tensor) or output.dim() not in (3, 4):
        return False
    try:
        grid = to_grid(output)
    except LayerError:
        return False
    return grid.shape[-1] * grid.shape[-2] > 1


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise LayerError(f"unknown layer {name!r}") from None


def find_target_layer(model: nn.Module, input_size: tuple[int, int]) -> str:
    """The last module whose output is a spatial map that the class score still depends on.

    A probe forward + backward on a random input records every module's output, newest first; the first that is
    a grid (NCHW, or square token grids for transformers) and receives a non-zero gradient on its spatial
    positions wins. The gradient test is what picks `encoder.layers[-1].ln_1` in a ViT: after the last
    attention only the class token reaches the head, so later token outputs get no gradient on the patches.
    """
    outputs: list[tuple[str, Tensor]] = []

    def record(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(module, _POOLING_HEADS) and is_grid(output):
                assert isinstance(output, Tensor)
                outputs.append((name, output))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    was_training = model.training
    try:
        model.eval()
        parameter = next(model.parameters())
        probe = torch.randn(1, 3, *input_size, device=parameter.device, dtype=parameter.dtype)
        with torch.enable_grad():
            probe.requires_grad_(True)
            logits = model(probe)
            # Newest first; a module that runs more than once (a shared ReLU) counts with its last output.
            newest: dict[str, Tensor] = {}
            for name, output in reversed(outputs):
                newest.setdefault(name, output)
            grads = torch.autograd.grad(logits[:, 0].sum(), list(newest.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name, grad in zip(newest, grads, strict=True):
        if grad is not None and to_grid(grad).abs().sum() > 0:
            return name
    raise LayerError(
        f"{type(model).__name__}: no module's spatial output receives a gradient from the score (a zero-initialised "
        f"classifier gives none); name a target layer"
    )


def find_class_weights(model: nn.Module, channels: int, num_classes: int) -> nn.Module | None:
    """The last linear layer mapping `channels` features to `num_classes` logits: the head CAM reads its weights from.

    An nn.Linear, or failing that a module whose own parameters are just a (num_classes, channels) `weight` and an
    optional (num_classes,) `bias`: what a Linear becomes in a `torch.export.unflatten`ed program (its modules are
    InterpreterModules). The caller verifies logits == head(GAP(activations)) before using it, so a look-alike
    that is not the head is never used.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == channels and m.out_features == num_classes]
    if linears:
        return linears[-1]
    look_alikes = [m for m in model.modules() if _is_linear_like(m, channels, num_classes)]
    return look_alikes[-1] if look_alikes else None


def _is_linear_like(module: nn.Module, channels: int, num_classes: int) -> bool:
    own = dict(module.named_parameters(recurse=False))
    weight, bias = own.get("weight"), own.get("bias")
    return (
        set(own) <= {"weight", "bias"}
        and weight is not None
        and tuple(weight.shape) == (num_classes, channels)
        and (bias is None or tuple(bias.shape) == (num_classes,))
    )
