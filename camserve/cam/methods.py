"""The CAM family: one small unit per method, each turning what the extractor captured into a raw map.

Every method receives a `LayerCapture` for one target layer, with shapes
  activations  A: (B, K, H, W)  the layer's output for the batch
  gradients    G: (B, K, H, W)  d(score of each sample's target class)/dA, when `needs_gradients`
  class_weights W: (B, K)       the head's Linear weights of each target class, when `needs_class_weights`
  masked_scores                 y^c of the input times masks, when `needs_forward_passes` (Score-CAM)
and returns the raw saliency (B, H, W). The extractor applies ReLU when `relu` is set, then normalisation is
the caller's. Formulas follow the papers and pytorch-grad-cam's conventions (whose maps are our test oracle).

Adding a method: write a function below and register it with `@method(...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass(frozen=True)
class LayerCapture:
    """What one target layer gives a method for one target class; a method reads only the fields it declared."""

    activations: Tensor
    gradients: Tensor | None = None
    class_weights: Tensor | None = None
    input_size: tuple[int, ...] = ()  # (H, W) of the network input
    # Score-CAM: (sample b, masks (K, H, W) over the input) -> the target class's logit for the input times each mask
    masked_scores: Callable[[int, Tensor], Tensor] | None = None


MapFn = Callable[[LayerCapture], Tensor]


@dataclass(frozen=True)
class CamMethod:
    name: str
    compute: MapFn
    needs_gradients: bool = False
    needs_class_weights: bool = False
    needs_forward_passes: bool = False
    relu: bool = True


METHODS: dict[str, CamMethod] = {}


def method(name: str, **requirements: bool) -> Callable[[MapFn], MapFn]:
    def register(compute: MapFn) -> MapFn:
        METHODS[name] = CamMethod(name=name, compute=compute, **requirements)
        return compute

    return register


def _weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """sum_k w_k A_k for channel weights (B, K)."""
    return torch.einsum("bk,bkhw->bhw", weights, activations)


@method("cam", needs_class_weights=True)
def cam(capture: LayerCapture) -> Tensor:
    """CAM: L^c = ReLU(sum_k w_k^c A_k), with w^c the class's row of the Linear layer after global average pooling.

    Zhou et al. 2016, "Learning Deep Features for Discriminative Localization", https://arxiv.org/abs/1512.04150
    The ReLU makes min-max normalisation divide by the maximum alone, so the paper's box rule (above 20 % of
    the map's maximum) holds on the normalised map; it also makes CAM equal Grad-CAM up to scale exactly.
    """
    assert capture.class_weights is not None
    return _weighted_sum(capture.class_weights, capture.activations)


@method("gradcam", needs_gradients=True)
def gradcam(capture: LayerCapture) -> Tensor:
    """Grad-CAM: L^c = ReLU(sum_k a_k^c A_k), a_k^c = mean_ij dy^c/dA_k^ij.

    Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
    https://arxiv.org/abs/1610.02391
    """
    assert capture.gradients is not None
    return _weighted_sum(capture.gradients.mean(dim=(2, 3)), capture.activations)


@method("gradcampp", needs_gradients=True)
def gradcampp(capture: LayerCapture) -> Tensor:
    """Grad-CAM++: a_k^c = sum_ij alpha_k^ij ReLU(g_k^ij), alpha = g^2 / (2 g^2 + sum_ab A_k^ab g^3).

    Chattopadhay et al. 2018, "Grad-CAM++: Improved Visual Explanations for Deep Convolutional Networks",
    https://arxiv.org/abs/1710.11063 (second/third derivatives of exp(y^c) expressed through g = dy^c/dA).
    """
    grads, activations = capture.gradients, capture.activations
    assert grads is not None
    grads_2 = grads.pow(2)
    spatial_sum = activations.sum(dim=(2, 3), keepdim=True)
    alpha = grads_2 / (2 * grads_2 + spatial_sum * grads_2 * grads + 1e-6)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return _weighted_sum((alpha * grads.clamp(min=0)).sum(dim=(2, 3)), activations)


@method("xgradcam", needs_gradients=True)
def xgradcam(capture: LayerCapture) -> Tensor:
    """XGrad-CAM: a_k^c = sum_ij (A_k^ij / sum_ab A_k^ab) dy^c/dA_k^ij.

    Fu et al. 2020, "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs",
    https://arxiv.org/abs/2008.02312
    """
    grads, activations = capture.gradients, capture.activations
    assert grads is not None
    spatial_sum = activations.sum(dim=(2, 3), keepdim=True)
    return _weighted_sum((grads * activations / (spatial_sum + 1e-7)).sum(dim=(2, 3)), activations)


@method("hirescam", needs_gradients=True)
def hirescam(capture: LayerCapture) -> Tensor:
    """HiResCAM: L^c = ReLU(sum_k g_k ⊙ A_k), the element-wise product instead of averaged gradients.

    Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional neural
    networks", https://arxiv.org/abs/2011.08891
    """
    assert capture.gradients is not None
    return (capture.gradients * capture.activations).sum(dim=1)


@method("layercam", needs_gradients=True)
def layercam(capture: LayerCapture) -> Tensor:
    """LayerCAM: L^c = ReLU(sum_k ReLU(g_k) ⊙ A_k), positive gradients as per-location weights.

    Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization",
    https://ieeexplore.ieee.org/document/9462463
    """
    assert capture.gradients is not None
    return (capture.gradients.clamp(min=0) * capture.activations).sum(dim=1)


@method("eigencam")
def eigencam(capture: LayerCapture) -> Tensor:
    """Eigen-CAM: the projection of the centred activations (HW x K) on their first right-singular vector.

    Muhammad & Yeasin 2020, "Eigen-CAM: Class Activation Map using Principal Components",
    https://arxiv.org/abs/2008.00299 . Gradient-free and class-agnostic. The singular vector's sign is arbitrary;
    we orient it so that the map correlates positively with the mean activation (where the layer fires).
    """
    activations = capture.activations
    batch, channels, height, width = activations.shape
    tokens = activations.reshape(batch, channels, height * width).transpose(1, 2)  # (B, HW, K)
    # float64: the Gram matrix squares the condition number, and LAPACK's float32 eigh is far slower here.
    centred = (tokens - tokens.mean(dim=1, keepdim=True)).double()
    # X v1 = s1 u1: the top eigenpair of the smaller Gram matrix gives it without a full SVD (several times
    # cheaper on a CPU when HW and K differ, as they do at every usual target layer).
    if height * width <= channels:
        eigenvalues, eigenvectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))  # (B, HW, HW)
        projection = eigenvectors[..., -1:] * eigenvalues[..., -1:, None].clamp(min=0).sqrt()
    else:
        _, eigenvectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)  # (B, K, K)
        projection = centred @ eigenvectors[..., -1:]
    mean_activation = tokens.mean(dim=2, keepdim=True).double()
    sign = torch.sign(((projection - projection.mean(1, keepdim=True)) * mean_activation).sum(dim=(1, 2), keepdim=True))
    projection = projection * torch.where(sign == 0, torch.ones_like(sign), sign)
    return projection.reshape(batch, height, width).to(activations.dtype)


SCORECAM_BATCH = 32
# Channels Score-CAM scores by default, the most active first: each costs a forward pass per image and class.
# The default of a model's `scorecam_max_channels` (camserve.model_spec), of the extractor and of the option rules.
SCORECAM_MAX_CHANNELS = 64


@method("scorecam", needs_forward_passes=True)
def scorecam(capture: LayerCapture) -> Tensor:
    """Score-CAM: a_k^c = softmax_k(y^c(X ⊙ norm(up(A_k)))), one forward pass per channel, in batches.

    Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks",
    https://arxiv.org/abs/1910.01929 . Cost: K extra forward passes per image (K = channels scored, which the
    extractor caps; channels past the cap get weight 0).
    """
    activations, masked_scores = capture.activations, capture.masked_scores
    assert masked_scores is not None
    batch, channels = activations.shape[:2]
    # align_corners=True: pytorch-grad-cam's UpsamplingBilinear2d, our reference.
    upsampled = F.interpolate(activations, size=capture.input_size, mode="bilinear", align_corners=True)
    flat = upsampled.flatten(2)
    lows, highs = flat.min(dim=2).values[..., None, None], flat.max(dim=2).values[..., None, None]
    masks = (upsampled - lows) / (highs - lows + 1e-8)  # (B, K, H, W)
    scores = torch.empty(batch, channels, dtype=activations.dtype, device=activations.device)
    for b in range(batch):
        for start in range(0, channels, SCORECAM_BATCH):
            scores[b, start : start + SCORECAM_BATCH] = masked_scores(b, masks[b, start : start + SCORECAM_BATCH])
    return _weighted_sum(torch.softmax(scores, dim=1), activations)
