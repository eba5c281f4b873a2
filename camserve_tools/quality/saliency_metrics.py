"""How good a map is, against ground truth and against the model itself. Plain numpy / torch, no handler.

- pointing game (Zhang et al. 2016): the map's peak lies inside a ground-truth box of the class;
- box IoU: the map's box (the handler's `bbox`) against the best-matching ground-truth box of the class;
- deletion and insertion (RISE, Petsiuk et al. 2018): pixels are removed from (deletion) or put back into
  (insertion) the image in order of saliency, in `steps` equal steps; the class probability's curve over the
  fraction of pixels has an area (AUC) - low for deletion and high for insertion when the map ranks the pixels
  the model needs first. Deleted pixels become black (zeros in [0, 1] pixel space, before normalisation);
  insertion starts from the image blurred (Gaussian, kernel 11, sigma 5 at the model's input size, as RISE);
- randomisation sanity check (Adebayo et al. 2018): the Spearman rank correlation between the map of the trained
  model and the map of the same architecture re-initialised with a fixed seed; low means the map depends on the
  learned weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from camserve.cam.localization import box_iou

Box = Sequence[float]
DEFAULT_STEPS = 16
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0


def pointing_hit(peak: Sequence[int], boxes: Sequence[Box]) -> bool:
    """The peak pixel (x, y) lies inside one of `boxes` [x0, y0, x1, y1)."""
    x, y = peak
    return any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in boxes)


def best_iou(box: Box, boxes: Sequence[Box]) -> float:
    """The IoU of `box` with the ground-truth box it overlaps best (0 where there is none)."""
    # box_iou computes with any numbers; its annotation names the integer map boxes it was written for, and
    # ground-truth boxes are floats (COCO's).
    iou = cast(Any, box_iou)
    return max((float(iou(box, other)) for other in boxes), default=0.0)


def saliency_order(saliency: Tensor) -> Tensor:
    """Pixel indices, most salient first; equal values keep reading order (a stable sort), so runs repeat exactly."""
    return torch.sort(saliency.flatten(), descending=True, stable=True).indices


def perturbation_inputs(pixels: Tensor, saliency: Tensor, steps: int = DEFAULT_STEPS) -> tuple[Tensor, Tensor]:
    """The deletion and insertion series for one image: each (steps + 1, 3, H, W) in [0, 1] pixel space.

    `pixels` (3, H, W) is the image at the model's input size, `saliency` (H, W) its map at that size. Step k has
    the first k/steps of the pixels (in saliency order) deleted (set to zero), or inserted into the blurred image.
    """
    from torchvision.transforms.functional import gaussian_blur

    channels, height, width = pixels.shape
    order = saliency_order(saliency)
    blurred = gaussian_blur(pixels[None], [BLUR_KERNEL, BLUR_KERNEL], [BLUR_SIGMA, BLUR_SIGMA])[0]
    # rank[i] = position of pixel i in the order; pixel i is "taken" at step k when rank[i] < k * n / steps.
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    counts = torch.tensor([round(k * order.numel() / steps) for k in range(steps + 1)])
    taken = (rank[None, :] < counts[:, None]).view(steps + 1, 1, height, width)
    deletion = torch.where(taken, torch.zeros(()), pixels[None])
    insertion = torch.where(taken, pixels[None], blurred[None])
    return deletion, insertion


def curve_auc(probabilities: Sequence[float]) -> float:
    """Area under a probability curve sampled at fractions 0, 1/steps, ..., 1 (trapezoids), in [0, 1]."""
    values = np.asarray(probabilities, dtype=np.float64)
    return float(np.trapz(values, dx=1.0 / (len(values) - 1)))


def deletion_insertion_auc(
    class_probability: Callable[[Tensor], Tensor],
    pixels: Tensor,
    saliency: Tensor,
    steps: int = DEFAULT_STEPS,
) -> tuple[float, float]:
    """(deletion AUC, insertion AUC) of one map; `class_probability` maps (N, 3, H, W) pixels to (N,) probabilities."""
    deletion, insertion = perturbation_inputs(pixels, saliency, steps)
    probabilities = class_probability(torch.cat([deletion, insertion])).tolist()
    return curve_auc(probabilities[: steps + 1]), curve_auc(probabilities[steps + 1 :])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (ties ranked by their mean); NaN where either map is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.min() == a.max() or b.min() == b.max():
        return float("nan")
    return float(spearmanr(a, b).statistic)
