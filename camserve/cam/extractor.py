"""CamExtractor: one forward pass gives the logits and the class activation maps, at almost no extra cost.

The trick that keeps Grad-CAM cheap: the forward pass starts under `torch.no_grad()`, so the trunk up to the target
layer records no autograd graph. A forward hook on the (first) target layer detaches its output into a fresh leaf
that requires grad and switches grad mode on, so only the layers *after* it are recorded; the backward pass then
runs from the class score to the target layer and no further.

Cheaper still where the layer feeds global average pooling + one Linear layer (ResNets, EfficientNets, the default
model...): there dy^c/dA = W[c] / (H W) at every location, exactly. Once a call has verified that the logits are
Linear(GAP(A)) for a layer, later calls run the whole forward under `inference_mode` and use that closed form,
re-checking the identity on every batch (and falling back to autograd, for good, if it ever fails).

Hooks live for one call and are always removed; nothing but that per-layer verdict is kept between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from camserve.cam.layers import LayerError, find_class_weights, find_target_layer, get_module, to_grid
from camserve.cam.methods import METHODS, CamMethod, LayerCapture


class MethodError(ValueError):
    """A method that is unknown or cannot apply to the chosen model and layer; the message says why."""


@dataclass
class CamResult:
    logits: Tensor  # (B, classes)
    targets: Tensor  # (B, T) class indices the maps are for
    maps: Tensor  # (B, T, h, w) in [0, 1], at the (finest) target layer's resolution
    layers: tuple[str, ...]


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max each map (over its last two dims) to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - low
    return torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(maps.dtype).tiny), torch.zeros_like(flat)).view_as(maps)


def fuse_maps(maps: Sequence[Tensor]) -> Tensor:
    """Several layers' normalised maps (B, T, h_i, w_i) -> one: upsample to the finest, element-wise max, renormalise."""
    if len(maps) == 1:
        return maps[0]
    height, width = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
    resized = [m if m.shape[-2:] == (height, width) else F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False) for m in maps]
    return normalize_maps(torch.stack(resized).amax(dim=0))


class CamExtractor:
    """Class activation maps for any classifier whose target layers output NCHW maps or square token grids.

    `target_layers` default to the automatically found last spatial feature map (`find_target_layer`).
    `scorecam_max_channels` caps Score-CAM's cost at that many extra forward passes per image and target.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, int],
        target_layers: Sequence[str] | None = None,
        scorecam_max_channels: int = 64,
    ) -> None:
        self.model = model.eval()
        self.input_size = input_size
        self.default_layers = tuple(target_layers) if target_layers else (find_target_layer(model, input_size),)
        for name in self.default_layers:
            get_module(model, name)
        self.scorecam_max_channels = scorecam_max_channels
        # layer name -> whether its logits were verified to be Linear(GAP(activations)) (see the module docstring)
        self._gap_linear: dict[str, bool] = {}
        self._heads: dict[tuple[int, int], nn.Module | None] = {}  # (channels, classes) -> the candidate head

    @staticmethod
    def method(name: str) -> CamMethod:
        try:
            return METHODS[name]
        except KeyError:
            raise MethodError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None

    def predict(self, inputs: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.model(inputs)

    def __call__(
        self,
        inputs: Tensor,
        method: str = "gradcam",
        targets: Tensor | Callable[[Tensor], Tensor] | None = None,
        layers: Sequence[str] | None = None,
    ) -> CamResult:
        """Logits and maps for `inputs` (B, 3, H, W).

        `targets`: class indices (B,) or (B, T); or a function of the logits returning them, for choices that
        depend on the prediction (top-k classes) without a second forward pass; default each sample's top-1.
        """
        cam_method = self.method(method)
        layer_names = tuple(layers) if layers else self.default_layers
        modules = [get_module(self.model, name) for name in layer_names]
        captured: dict[str, Tensor] = {}
        closed_form = cam_method.needs_gradients and len(layer_names) == 1 and self._gap_linear.get(layer_names[0], False)
        needs_grad = cam_method.needs_gradients and not closed_form

        def capture(name: str):
            def hook(module: nn.Module, args: object, output: object) -> Tensor:
                if not isinstance(output, Tensor):
                    raise LayerError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
                if needs_grad and not torch.is_grad_enabled():
                    # First target layer reached: everything before it ran without autograd; record from here on.
                    output = output.detach().requires_grad_(True)
                    torch.set_grad_enabled(True)
                captured[name] = output
                # The network continues on a copy, so an in-place op downstream cannot change what we captured.
                return output.clone()

            return hook

        handles = [module.register_forward_hook(capture(name)) for name, module in zip(layer_names, modules)]
        try:
            # no_grad restores the caller's grad mode on exit, whatever the hook switched on.
            with torch.no_grad() if needs_grad else torch.inference_mode():
                logits = self.model(inputs)
                torch.set_grad_enabled(False)  # the hook may have switched it on; map arithmetic needs no graph
                missing = [name for name in layer_names if name not in captured]
                if missing:
                    raise LayerError(f"layer(s) {missing} did not run in the forward pass")
                if targets is None:
                    targets = logits.argmax(dim=1)
                elif callable(targets):
                    targets = targets(logits.detach())
                targets = (targets if targets.dim() == 2 else targets[:, None]).to(logits.device)
                head = None
                if cam_method.needs_gradients and len(layer_names) == 1:
                    head = self._gap_linear_head(layer_names[0], to_grid(captured[layer_names[0]].detach()), logits)
                    if closed_form and head is None:
                        self._gap_linear[layer_names[0]] = False
                        return self(inputs, method, targets, layers)  # this batch breaks the identity: autograd
                    self._gap_linear.setdefault(layer_names[0], head is not None)
                closed_form_head = head if closed_form else None
                maps = [self._layer_maps(cam_method, name, captured, logits, targets, inputs, closed_form_head) for name in layer_names]
        finally:
            for handle in handles:
                handle.remove()
        return CamResult(logits=logits.detach(), targets=targets, maps=fuse_maps(maps), layers=layer_names)

    def _layer_maps(
        self,
        cam_method: CamMethod,
        name: str,
        captured: dict[str, Tensor],
        logits: Tensor,
        targets: Tensor,
        inputs: Tensor,
        closed_form_head: nn.Module | None,
    ) -> Tensor:
        raw = captured[name]
        activations = to_grid(raw.detach())
        per_target = []
        for t in range(targets.shape[1]):
            capture = LayerCapture(activations=activations, inputs=inputs, targets=targets[:, t])
            if closed_form_head is not None:
                height, width = activations.shape[-2:]
                weights = closed_form_head.weight[targets[:, t]] / (height * width)
                capture.gradients = weights[:, :, None, None].expand_as(activations)
            elif cam_method.needs_gradients:
                with torch.enable_grad():
                    score = logits.gather(1, targets[:, t : t + 1]).sum()
                # Each sample's score depends only on its own activations, so one backward serves the batch.
                (grad,) = torch.autograd.grad(score, raw, retain_graph=t + 1 < targets.shape[1] or len(captured) > 1)
                capture.gradients = to_grid(grad)
            if cam_method.needs_class_weights:
                capture.class_weights = self._class_weights(name, activations, logits)[targets[:, t]]
            if cam_method.needs_forward_passes:
                capture = self._scorecam_subset(capture)
            saliency = cam_method.compute(capture)
            if cam_method.relu:
                saliency = saliency.clamp(min=0)
            per_target.append(saliency)
        return normalize_maps(torch.stack(per_target, dim=1))

    def _gap_linear_head(self, name: str, activations: Tensor, logits: Tensor) -> nn.Module | None:
        """The linear layer such that logits == Linear(GAP(activations)) on this batch, if there is one (an nn.Linear or
        its look-alike in an unflattened torch.export program: `find_class_weights`)."""
        key = (activations.shape[1], logits.shape[1])
        if key not in self._heads:
            self._heads[key] = find_class_weights(self.model, *key)
        head = self._heads[key]
        if head is None:
            return None
        pooled = F.linear(activations.mean(dim=(2, 3)), head.weight, getattr(head, "bias", None))
        scale = float(logits.abs().max().clamp(min=1.0))
        return head if torch.allclose(pooled, logits, rtol=1e-4, atol=1e-4 * scale) else None

    def _class_weights(self, name: str, activations: Tensor, logits: Tensor) -> Tensor:
        """The head's weights, after checking that the logits really are Linear(GAP(activations))."""
        head = self._gap_linear_head(name, activations, logits)
        if head is not None:
            return head.weight
        gradient_methods = sorted(m.name for m in METHODS.values() if not m.needs_class_weights)
        raise MethodError(
            f"method 'cam' needs layer {name!r} to feed global average pooling and one Linear layer straight into "
            f"the logits, and this model's head is not that; use one of {gradient_methods}"
        )

    def _scorecam_subset(self, capture: LayerCapture) -> LayerCapture:
        """Score only the most active channels (at most `scorecam_max_channels`); the rest weigh 0."""
        activations = capture.activations
        if activations.shape[1] > self.scorecam_max_channels:
            top = activations.mean(dim=(2, 3)).topk(self.scorecam_max_channels, dim=1).indices
            activations = activations.gather(1, top[..., None, None].expand(-1, -1, *activations.shape[2:]))
        capture.activations = activations
        capture.score_fn = self.predict
        return capture
