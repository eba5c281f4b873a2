"""CamExtractor: one forward pass gives the logits and the class activation maps, at almost no extra cost.

The trick that keeps Grad-CAM cheap: the forward pass starts under `torch.no_grad()`, so the trunk up to the target
layer records no autograd graph. A forward hook on the (first) target layer detaches its output into a fresh leaf
that requires grad and switches grad mode on, so only the layers *after* it are recorded; the backward pass then
runs from the class score to the target layer and no further.

Cheaper still where the layer feeds global average pooling + one Linear layer (ResNets, EfficientNets, the default
model...): there dy^c/dA = W[c] / (H W) at every location, exactly. Once a call has verified that the logits are
Linear(GAP(A)) for a layer, later calls run the whole forward under `inference_mode` and use that closed form.
The identity is checked again on every batch; a batch that breaks it is run once more with autograd, and that
layer stays on autograd from then on.

Hooks live for one forward pass and are always removed before any map is computed, so Score-CAM's extra forward
passes see the plain model. Nothing but the per-layer verdicts and the candidate heads is kept between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from camserve.cam.layers import LayerError, find_class_weights, find_target_layer, get_module, to_grid
from camserve.cam.methods import METHODS, SCORECAM_MAX_CHANNELS, CamMethod, LayerCapture

Targets = Tensor | Callable[[Tensor], Tensor] | None


class MethodError(ValueError):
    """A method that is unknown or cannot apply to the chosen model and layer; the message says why."""


@dataclass
class CamResult:
    logits: Tensor  # (B, classes)
    targets: Tensor  # (B, T) class indices the maps are for
    maps: Tensor  # (B, T, h, w) in [0, 1], at the (finest) target layer's resolution
    layers: tuple[str, ...]


@dataclass
class _Forward:
    logits: Tensor
    outputs: dict[str, Tensor]  # each target layer's output; a leaf requiring grad when the graph was recorded


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
    resized = [
        m if m.shape[-2:] == (height, width) else F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False) for m in maps
    ]
    return normalize_maps(torch.stack(resized).amax(dim=0))


def _weight(head: nn.Module) -> Tensor:
    """A linear head's (classes, channels) weight: an nn.Linear's, or its look-alike's in an unflattened program."""
    weight = head.weight
    assert isinstance(weight, Tensor)
    return weight


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
        scorecam_max_channels: int = SCORECAM_MAX_CHANNELS,
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

    def __call__(self, inputs: Tensor, method: str = "gradcam", targets: Targets = None, layers: Sequence[str] | None = None) -> CamResult:
        """Logits and maps for `inputs` (B, 3, H, W).

        `targets`: class indices (B,) or (B, T); or a function of the logits returning them, for choices that
        depend on the prediction (top-k classes) without a second forward pass; default each sample's top-1.
        `layers` repeated are taken once.
        """
        cam_method = self.method(method)
        layer_names = tuple(dict.fromkeys(layers)) if layers else self.default_layers
        for name in layer_names:
            get_module(self.model, name)
        # The closed form needs one layer: with several, the head sees only the last one.
        single = layer_names[0] if len(layer_names) == 1 else None
        head = None
        if cam_method.needs_gradients and single is not None and self._gap_linear.get(single, False):
            forward = self._forward(inputs, layer_names, record_graph=False)
            head = self._verified_head(to_grid(forward.outputs[single]), forward.logits)
            if head is None:
                self._gap_linear[single] = False
        if head is None:
            forward = self._forward(inputs, layer_names, record_graph=cam_method.needs_gradients)
            if cam_method.needs_gradients and single is not None and single not in self._gap_linear:
                self._gap_linear[single] = (
                    self._verified_head(to_grid(forward.outputs[single].detach()), forward.logits.detach()) is not None
                )
        chosen = self._choose_targets(forward.logits.detach(), targets)
        with torch.no_grad():
            maps = self._maps(cam_method, forward, chosen, inputs, head)
        return CamResult(logits=forward.logits.detach(), targets=chosen, maps=fuse_maps(maps), layers=layer_names)

    def _forward(self, inputs: Tensor, layer_names: tuple[str, ...], record_graph: bool) -> _Forward:
        """One forward pass capturing the target layers' outputs; autograd records only after the first of them."""
        outputs: dict[str, Tensor] = {}

        def capture(name: str) -> Callable[[nn.Module, object, object], Tensor]:
            def hook(module: nn.Module, args: object, output: object) -> Tensor:
                if not isinstance(output, Tensor):
                    raise LayerError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
                if record_graph and not torch.is_grad_enabled():
                    output = output.detach().requires_grad_(True)
                    torch.set_grad_enabled(True)
                outputs[name] = output
                # The network continues on a copy, so an in-place op downstream cannot change what we captured.
                return output.clone()

            return hook

        handles = [get_module(self.model, name).register_forward_hook(capture(name)) for name in layer_names]
        try:
            # no_grad restores the caller's grad mode on exit, whatever the hook switched on.
            with torch.no_grad() if record_graph else torch.inference_mode():
                logits = self.model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in layer_names if name not in outputs]
        if missing:
            raise LayerError(f"layer(s) {missing} did not run in the forward pass")
        if logits.dim() != 2:
            raise MethodError(f"the model returns logits of shape {tuple(logits.shape)}, not (batch, classes)")
        return _Forward(logits=logits, outputs=outputs)

    @staticmethod
    def _choose_targets(logits: Tensor, targets: Targets) -> Tensor:
        if targets is None:
            chosen = logits.argmax(dim=1)
        elif callable(targets):
            chosen = targets(logits)
        else:
            chosen = targets
        return (chosen if chosen.dim() == 2 else chosen[:, None]).to(logits.device)

    def _maps(self, cam_method: CamMethod, forward: _Forward, targets: Tensor, inputs: Tensor, head: nn.Module | None) -> list[Tensor]:
        """Each target layer's normalised maps (B, T, h, w)."""
        names = list(forward.outputs)
        activations = {name: to_grid(output.detach()) for name, output in forward.outputs.items()}
        gradients: dict[str, list[Tensor]] = {name: [] for name in names}
        if cam_method.needs_gradients:
            for t in range(targets.shape[1]):
                for name, grad in zip(
                    names, self._gradients(forward, names, targets[:, t], head, retain=t + 1 < targets.shape[1]), strict=True
                ):
                    gradients[name].append(grad)
        maps = []
        for name in names:
            class_weights = self._class_weights(name, activations[name], forward.logits) if cam_method.needs_class_weights else None
            per_target = []
            for t in range(targets.shape[1]):
                capture = LayerCapture(
                    activations=self._scored_channels(activations[name]) if cam_method.needs_forward_passes else activations[name],
                    gradients=gradients[name][t] if cam_method.needs_gradients else None,
                    class_weights=class_weights[targets[:, t]] if class_weights is not None else None,
                    input_size=tuple(inputs.shape[-2:]),
                    masked_scores=self._masked_scores(inputs, targets[:, t]) if cam_method.needs_forward_passes else None,
                )
                saliency = cam_method.compute(capture)
                per_target.append(saliency.clamp(min=0) if cam_method.relu else saliency)
            maps.append(normalize_maps(torch.stack(per_target, dim=1)))
        return maps

    def _gradients(self, forward: _Forward, names: list[str], target: Tensor, head: nn.Module | None, retain: bool) -> list[Tensor]:
        """d(score of each sample's `target` class)/d(each layer's output), as (B, K, h, w) grids."""
        if head is not None:
            activations = to_grid(forward.outputs[names[0]])
            height, width = activations.shape[-2:]
            return [(_weight(head)[target] / (height * width))[:, :, None, None].expand_as(activations)]
        with torch.enable_grad():
            score = forward.logits.gather(1, target[:, None]).sum()
        # Each sample's score depends only on its own activations, so one backward serves the batch.
        grads = torch.autograd.grad(score, [forward.outputs[name] for name in names], retain_graph=retain, allow_unused=True)
        unused = [name for name, grad in zip(names, grads, strict=True) if grad is None]
        if unused:
            raise LayerError(f"the class score does not depend on layer(s) {unused}; choose a layer the prediction uses")
        return [to_grid(grad) for grad in grads]

    def _verified_head(self, activations: Tensor, logits: Tensor) -> nn.Module | None:
        """The linear layer such that logits == Linear(GAP(activations)) on this batch, if there is one: an nn.Linear,
        or its look-alike in an unflattened torch.export program (`find_class_weights`)."""
        key = (activations.shape[1], logits.shape[1])
        if key not in self._heads:
            self._heads[key] = find_class_weights(self.model, *key)
        head = self._heads[key]
        if head is None:
            return None
        pooled = F.linear(activations.mean(dim=(2, 3)), _weight(head), getattr(head, "bias", None))
        scale = float(logits.abs().max().clamp(min=1.0))
        return head if torch.allclose(pooled, logits, rtol=1e-4, atol=1e-4 * scale) else None

    def _class_weights(self, name: str, activations: Tensor, logits: Tensor) -> Tensor:
        """The head's weights (classes, K), after checking that the logits really are Linear(GAP(activations))."""
        head = self._verified_head(activations, logits)
        if head is not None:
            return _weight(head)
        gradient_methods = sorted(m.name for m in METHODS.values() if not m.needs_class_weights)
        raise MethodError(
            f"method 'cam' needs layer {name!r} to feed global average pooling and one Linear layer straight into "
            f"the logits, and this model's head is not that; use one of {gradient_methods}"
        )

    def _scored_channels(self, activations: Tensor) -> Tensor:
        """Score-CAM scores only the most active channels (at most `scorecam_max_channels`); the rest weigh 0."""
        if activations.shape[1] <= self.scorecam_max_channels:
            return activations
        top = activations.mean(dim=(2, 3)).topk(self.scorecam_max_channels, dim=1).indices
        return activations.gather(1, top[..., None, None].expand(-1, -1, *activations.shape[2:]))

    def _masked_scores(self, inputs: Tensor, target: Tensor) -> Callable[[int, Tensor], Tensor]:
        """For Score-CAM: (sample b, masks (K, H, W)) -> the target's logit for the input times each mask (K,)."""

        def score(b: int, masks: Tensor) -> Tensor:
            return self.predict(inputs[b, None] * masks[:, None])[:, target[b]]

        return score
