"""From a low-resolution map to what a user reads: the map at original size, its peak, and a bounding box."""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from camserve.cam.peak_box_kernels import (
    EMPTY_MASK,
    NOTHING_ABOVE_ZERO,
    RUNS_OVERFLOW,
    bilinear_axis,
    grid_peak_and_box,
    largest_region,
    upsampled,
)

logger = logging.getLogger(__name__)

BBOX_THRESHOLD = 0.2  # the CAM paper's rule: the largest connected region above 20 % of the map's maximum


def upsample_map(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """A (h, w) map in [0, 1] resized to `size` = (width, height) of the original image."""
    width, height = size
    resized = F.interpolate(grid[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp_(0, 1)


def peak(heatmap: Tensor) -> tuple[int, int]:
    """(x, y) of the map's maximum, the first in reading order. numpy's argmax: 5-10x faster than torch's on CPU."""
    index = int(heatmap.detach().cpu().numpy().argmax())
    width = heatmap.shape[1]
    return index % width, index // width


def map_is_empty(grid: Tensor | np.ndarray) -> bool:
    """Whether a map points nowhere: all zero (a constant map normalises to zero), or not finite anywhere (a NaN
    or an infinity: nothing in it can be trusted). Such a map has no peak and no box; a box around the whole
    image would claim what the map does not say."""
    values = grid.detach().cpu().numpy() if isinstance(grid, Tensor) else np.asarray(grid)
    return values.size == 0 or not (np.isfinite(values).all() and values.max() > 0)


def bounding_box(heatmap: Tensor, threshold: float = BBOX_THRESHOLD) -> tuple[int, int, int, int] | None:
    """[x0, y0, x1, y1) of the largest connected region where the map exceeds `threshold` x its maximum.

    x1 and y1 are exclusive (pixel edges), so the box of a single pixel (x, y) is (x, y, x + 1, y + 1).
    Regions are 4-connected (pixels sharing an edge), as scipy.ndimage.label's default; of regions of equal
    size, the one whose first pixel comes first in reading order wins. A map with no positive maximum (all
    zero, or NaN) has no region, hence no box: None.

    Labelling every pixel (scipy.ndimage.label) took 3 ms at 640x480 and 8-15 ms at 1280x960, more than the map
    itself. The mask is read as runs of pixels per row instead, in a few numpy passes, and the runs are joined
    into regions by compiled code (peak_box_kernels.largest_region).
    """
    height, width = heatmap.shape
    values = heatmap.detach().cpu().numpy()
    maximum = float(values.max())
    if not maximum > 0:  # all zero, or NaN
        return None
    # The limit in the map's own dtype, as torch compares a tensor with a Python float.
    above = values >= values.dtype.type(threshold * maximum)
    # A False column on each side: in the flattened rows every run then starts and ends inside its own row.
    padded = np.zeros((height, width + 2), dtype=bool)
    padded[:, 1:-1] = above
    flat = padded.reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # flat index of the first pixel after each change
    stride = width + 2
    starts, ends = changes[0::2], changes[1::2]  # run i covers flat[starts[i]:ends[i]]
    if not len(starts):
        return None
    rows = starts // stride
    x0, x1 = starts - rows * stride - 1, ends - rows * stride - 1  # image columns, x1 exclusive
    return largest_region(rows, x0, x1)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- Peak and box from the grid itself (camserve.cam.peak_box_kernels says how) -----------------------------------

_SMALL_OUTPUT = 128  # torch's _use_channels_last_kernel_2d threshold on output height + width

# Why peak_and_box took the full-size way where the compiled one was meant to answer: each is counted (the pipeline
# reports the counts as CamFastPathFallbacks) and logged once per process, since it costs every answer it hits
# milliseconds and says that the compiled loops no longer match this torch, or have a fault.
FALLBACK_REASONS = {
    "torch_rounding": "this torch build's bilinear rounding is not the one the compiled loops reproduce",
    "outside_unit_range": "the grid has values outside [0, 1], which no normalised map has",
    "runs_overflow": "the box's mask has more runs than the compiled loops keep room for",
    "empty_mask": "the compiled loops lost the peak from the box's mask",
}
_fallbacks: Counter[str] = Counter()
_fallbacks_warned: set[str] = set()
_fallbacks_lock = threading.Lock()


def take_fast_path_fallbacks() -> dict[str, int]:
    """The fallbacks counted by reason since the last call, and the count reset: for a metrics sink."""
    with _fallbacks_lock:
        counts = dict(_fallbacks)
        _fallbacks.clear()
    return counts


def _fall_back(reason: str) -> None:
    with _fallbacks_lock:
        _fallbacks[reason] += 1
        first = reason not in _fallbacks_warned
        _fallbacks_warned.add(reason)
    if first:
        logger.warning(
            "camserve: peak and box are computed from the full-size map, a slower way, because %s "
            "(logged once per process; counted as CamFastPathFallbacks)",
            FALLBACK_REASONS[reason],
        )


@functools.cache
def _torch_fuses() -> bool | None:
    """Whether this torch build fuses bilinear upsampling's multiply-adds; None if neither way matches it.

    Asked once: a probe grid upsampled both ways, compared bit for bit with torch's own result.
    """
    probe = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    size = (97, 61)  # width + height > _SMALL_OUTPUT: the kernel that peak_and_box reproduces
    reference = upsample_map(probe, size).numpy()
    for fused in (True, False):
        x, y = bilinear_axis(7, size[0], fused), bilinear_axis(5, size[1], fused)
        values = upsampled(probe.numpy(), x.low, x.high, x.weight_low, x.weight_high, y.low, y.high, y.weight_low, y.weight_high, fused)
        if np.array_equal(np.clip(values, 0, 1), reference):
            return fused
    return None


def peak_and_box(
    grid: Tensor | np.ndarray, size: tuple[int, int], threshold: float = BBOX_THRESHOLD
) -> tuple[tuple[int, int], tuple[int, int, int, int]] | None:
    """peak(m) and bounding_box(m, threshold) of m = upsample_map(grid, size), without computing m; None where m
    has neither: an empty grid (map_is_empty: all zero, or not finite), or m zero everywhere (a grid that is
    positive only between the pixels sampled, as a 1-pixel-wide image samples one column).

    The same answer at a fraction of the cost. An output that torch upsamples with its other kernel takes the
    full-size way, as do (counted and logged: see FALLBACK_REASONS) a grid with values outside [0, 1] and a torch
    whose rounding this does not reproduce.
    """
    values = np.ascontiguousarray(grid.detach().cpu().float().numpy() if isinstance(grid, Tensor) else np.asarray(grid, dtype=np.float32))
    if map_is_empty(values):
        return None
    width, height = size
    if width + height <= _SMALL_OUTPUT:
        return _full_size_peak_and_box(values, size, threshold)
    fused = _torch_fuses()
    if fused is None or not (values.min() >= 0 and values.max() <= 1):
        _fall_back("torch_rounding" if fused is None else "outside_unit_range")
        return _full_size_peak_and_box(values, size, threshold)
    x, y = bilinear_axis(values.shape[1], width, fused), bilinear_axis(values.shape[0], height, fused)
    found = grid_peak_and_box(
        values, x.low, x.high, x.weight_low, x.weight_high, x.first, x.last,
        y.low, y.high, y.weight_low, y.weight_high, y.first, y.last, y.segment, fused, threshold,
    )  # fmt: skip
    if found[0] == NOTHING_ABOVE_ZERO:
        return None
    if found[0] in (RUNS_OVERFLOW, EMPTY_MASK):  # the full-size way has no such limit
        _fall_back("runs_overflow" if found[0] == RUNS_OVERFLOW else "empty_mask")
        return _full_size_peak_and_box(values, size, threshold)
    peak_x, peak_y, x0, y0, x1, y1 = found
    return (peak_x, peak_y), (x0, y0, x1, y1)


def _full_size_peak_and_box(
    values: np.ndarray, size: tuple[int, int], threshold: float
) -> tuple[tuple[int, int], tuple[int, int, int, int]] | None:
    """peak and bounding_box of the map upsampled to `size`: None where nothing is left above zero once clamped."""
    heatmap = upsample_map(torch.from_numpy(values), size)
    box = bounding_box(heatmap, threshold)
    return None if box is None else (peak(heatmap), box)


def compile_peak_and_box() -> None:
    """Compile peak_and_box's loops, or load them from numba's cache: seconds the first time in a fresh copy of
    this package, so that a worker pays them while it starts and not in its first answer."""
    peak_and_box(np.full((2, 2), 0.5, dtype=np.float32), (_SMALL_OUTPUT, _SMALL_OUTPUT))
    bounding_box(torch.ones(1, 1))
