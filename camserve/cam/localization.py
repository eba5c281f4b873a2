"""From a low-resolution map to what a user reads: the map at original size, its peak, and a bounding box."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torch.nn import functional as F

BBOX_THRESHOLD = 0.2  # the CAM paper's rule: the largest connected region above 20 % of the map's maximum


def upsample_map(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """A (h, w) map in [0, 1] resized to `size` = (width, height) of the original image."""
    width, height = size
    resized = F.interpolate(grid[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp_(0, 1)


def peak(heatmap: Tensor) -> tuple[int, int]:
    """(x, y) of the map's maximum."""
    index = int(torch.argmax(heatmap))
    width = heatmap.shape[1]
    return index % width, index // width


def bounding_box(heatmap: Tensor, threshold: float = BBOX_THRESHOLD) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1) of the largest connected region where the map exceeds `threshold` x its maximum.

    x1 and y1 are exclusive (pixel edges), so the box of a single pixel (x, y) is (x, y, x + 1, y + 1).
    An all-zero map has no region: the box is then the whole image.
    """
    height, width = heatmap.shape
    maximum = float(heatmap.max())
    if maximum <= 0:
        return 0, 0, width, height
    mask = (heatmap >= threshold * maximum).cpu().numpy()
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return int(x0), int(y0), int(x1) + 1, int(y1) + 1


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
