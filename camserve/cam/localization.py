"""From a low-resolution map to what a user reads: the map at original size, its peak, and a bounding box."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

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
    into regions by compiled code (_largest_region).
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
    return _largest_region(rows, x0, x1)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- Peak and box from the grid itself ------------------------------------------------------------------------
#
# upsample_map's full-size map costs more than everything else in an answer (4 ms at 1280x960), and the PNG does
# not need it (camserve.protocol.responses). peak_and_box gets the same peak and box from the grid: it reproduces
# torch's bilinear upsampling bit for bit, but only at the few pixels that can decide the answer. Its loops are
# compiled by numba: as numpy passes they cost 0.4-0.9 ms per answer, mostly the fixed cost of a hundred calls on
# small arrays, against 0.03-0.13 ms compiled (docs/benchmarks.md, "Response encoding").
#
# torch (CPU, float32, align_corners=False) computes output pixel (y, x) from the knots around it as
#     row(r, x) = fma(grid[r, x_low], wx_low, grid[r, x_high] * wx_high)        (r = y_low and y_high)
#     value     = fma(row(y_low, x), wy_low, row(y_high, x) * wy_high)
# with source = fma(in / out, i + 0.5, -0.5) per axis, clamped at 0 (`_axis`). fma rounds once where torch's
# kernels fuse multiply-adds (its AVX2 and AVX-512 builds) and twice where they do not (its DEFAULT build);
# `_torch_fuses` asks torch once which. Between two knots the value is affine in each weight, so in exact
# arithmetic a region's extremes sit on its first or last pixel; torch's rounding moves a value by at most a few
# units in the last place (ULPs) from that, which _SLACK covers with margin. Pixels whose outcome that slack
# could change are computed exactly, the others follow from the affine model. tests/test_localization.py checks
# the result against upsample_map + peak + bounding_box.

_SMALL_OUTPUT = 128  # torch's _use_channels_last_kernel_2d threshold on output height + width
_SLACK = 4e-6  # bound on |torch's value - the affine model|: ~30 ULPs at 1.0, for values in [0, 1]


def _compiled(function: Callable[..., Any]) -> Any:
    """numba.njit, cached on disk where numba finds a writable place (beside this file, NUMBA_CACHE_DIR, the user's
    cache directory). Without one (a read-only image and home) numba refuses to cache at import time: compiled in
    memory then, once per process, rather than a handler that cannot be imported. nogil: the worker's other
    threads go on meanwhile."""
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(function)
    except RuntimeError:
        return numba.njit(nogil=True, boundscheck=False)(function)


@dataclass(frozen=True)
class _Axis:
    """Where torch's bilinear upsampling reads each output pixel along one axis, and with which weights.

    A "segment" is a run of pixels between the same two knots; within it the weights change monotonically.
    """

    low: np.ndarray  # (n_out,) int64: the knot at or before the pixel
    high: np.ndarray  # (n_out,) int64: the knot after it (= low at the last knot)
    weight_low: np.ndarray  # (n_out,) float32
    weight_high: np.ndarray  # (n_out,) float32, increasing within a segment
    first: np.ndarray  # (segments,) first pixel of each segment
    last: np.ndarray  # (segments,) its last pixel (inclusive)
    segment: np.ndarray  # (n_out,) the segment of each pixel


@functools.lru_cache(maxsize=64)
def _axis(n_in: int, n_out: int, fused: bool) -> _Axis:
    """torch's area_pixel_compute_source_index and guard_index_and_lambda, in numpy, bit for bit.

    Cached: a server sees the same few image sizes over and over.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    pixels = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    if fused:  # a * b is exact in float64: one rounding, as an fma
        source = (np.float64(scale) * pixels.astype(np.float64) - 0.5).astype(np.float32)
    else:
        source = (scale * pixels).astype(np.float32) - np.float32(0.5)
    np.maximum(source, np.float32(0), out=source)
    low = np.minimum(source.astype(np.int64), n_in - 1)
    weight_high: np.ndarray = np.clip(source - low.astype(np.float32), np.float32(0), np.float32(1))
    first = np.flatnonzero(np.diff(low, prepend=-1))
    last = np.append(first[1:], n_out) - 1
    axis = _Axis(
        low,
        np.minimum(low + 1, n_in - 1),
        np.float32(1) - weight_high,
        weight_high,
        first,
        last,
        np.repeat(np.arange(len(first)), last - first + 1),
    )
    for array in vars(axis).values():
        array.flags.writeable = False
    return axis


@functools.cache
def _torch_fuses() -> bool | None:
    """Whether this torch build fuses bilinear upsampling's multiply-adds; None if neither way matches it.

    Asked once: a probe grid upsampled both ways, compared bit for bit with torch's own result.
    """
    probe = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    size = (97, 61)  # width + height > _SMALL_OUTPUT: the kernel that peak_and_box reproduces
    reference = upsample_map(probe, size).numpy()
    for fused in (True, False):
        x, y = _axis(7, size[0], fused), _axis(5, size[1], fused)
        values = _upsampled(probe.numpy(), x.low, x.high, x.weight_low, x.weight_high, y.low, y.high, y.weight_low, y.weight_high, fused)
        if np.array_equal(np.clip(values, 0, 1), reference):
            return fused
    return None


def peak_and_box(
    grid: Tensor | np.ndarray, size: tuple[int, int], threshold: float = BBOX_THRESHOLD
) -> tuple[tuple[int, int], tuple[int, int, int, int]] | None:
    """peak(m) and bounding_box(m, threshold) of m = upsample_map(grid, size), without computing m; None where m
    has neither: an empty grid (map_is_empty: all zero, or not finite), or m zero everywhere (a grid that is
    positive only between the pixels sampled, as a 1-pixel-wide image samples one column).

    The same answer at a fraction of the cost. A grid with values outside [0, 1] (never a normalised map), an
    output that torch upsamples with its other kernel, and a torch whose rounding this does not reproduce take
    the full-size way.
    """
    values = np.ascontiguousarray(grid.detach().cpu().float().numpy() if isinstance(grid, Tensor) else np.asarray(grid, dtype=np.float32))
    if map_is_empty(values):
        return None
    width, height = size
    fused = _torch_fuses()
    if width + height <= _SMALL_OUTPUT or fused is None or not (values.min() >= 0 and values.max() <= 1):
        return _full_size_peak_and_box(values, size, threshold)
    x, y = _axis(values.shape[1], width, fused), _axis(values.shape[0], height, fused)
    found = _grid_peak_and_box(
        values, x.low, x.high, x.weight_low, x.weight_high, x.first, x.last,
        y.low, y.high, y.weight_low, y.weight_high, y.first, y.last, y.segment, fused, threshold,
    )  # fmt: skip
    if found[0] == -2:
        return None
    if found[0] < 0:  # more runs than room (a mask no map draws): the full-size way has no such limit
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


@_compiled
def _fma(a: np.float32, b: np.float32, c: np.float32, fused: bool) -> np.float32:
    """float32 a * b + c as torch's kernels compute it: rounded once if `fused` (a * b is exact in float64), else twice."""
    if fused:
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))
    return np.float32(a * b) + c


@_compiled
def _knot_rows(
    grid: np.ndarray, x_low: np.ndarray, x_high: np.ndarray, x_weight_low: np.ndarray, x_weight_high: np.ndarray, fused: bool
) -> np.ndarray:
    """Every knot row interpolated along x, torch's first step: (h, width) float32."""
    rows = np.empty((grid.shape[0], x_low.shape[0]), dtype=np.float32)
    for r in range(grid.shape[0]):
        for x in range(x_low.shape[0]):
            rows[r, x] = _fma(grid[r, x_low[x]], x_weight_low[x], np.float32(grid[r, x_high[x]] * x_weight_high[x]), fused)
    return rows


@_compiled
def _value(
    rows: np.ndarray,
    y_low: np.ndarray,
    y_high: np.ndarray,
    y_weight_low: np.ndarray,
    y_weight_high: np.ndarray,
    y: int,
    x: int,
    fused: bool,
) -> np.float32:
    """torch's value at pixel (y, x), before upsample_map's clamp."""
    return _fma(rows[y_low[y], x], y_weight_low[y], np.float32(rows[y_high[y], x] * y_weight_high[y]), fused)


@_compiled
def _upsampled(
    grid: np.ndarray, x_low: np.ndarray, x_high: np.ndarray, x_weight_low: np.ndarray, x_weight_high: np.ndarray,
    y_low: np.ndarray, y_high: np.ndarray, y_weight_low: np.ndarray, y_weight_high: np.ndarray, fused: bool,
) -> np.ndarray:  # fmt: skip
    """Every pixel of the map, unclamped: the probe that tells whether this reproduces torch."""
    rows = _knot_rows(grid, x_low, x_high, x_weight_low, x_weight_high, fused)
    values = np.empty((y_low.shape[0], x_low.shape[0]), dtype=np.float32)
    for y in range(y_low.shape[0]):
        for x in range(x_low.shape[0]):
            values[y, x] = _value(rows, y_low, y_high, y_weight_low, y_weight_high, y, x, fused)
    return values


@_compiled
def _grid_peak_and_box(
    grid: np.ndarray, x_low: np.ndarray, x_high: np.ndarray, x_weight_low: np.ndarray, x_weight_high: np.ndarray,
    x_first: np.ndarray, x_last: np.ndarray, y_low: np.ndarray, y_high: np.ndarray, y_weight_low: np.ndarray,
    y_weight_high: np.ndarray, y_first: np.ndarray, y_last: np.ndarray, y_segment: np.ndarray, fused: bool, threshold: float,
) -> tuple[int, int, int, int, int, int]:  # fmt: skip
    """(peak x, peak y, x0, y0, x1, y1) of the upsampled map; all -1 if the box's runs overflow their room, all -2
    if the map is zero everywhere (a grid whose positive knots fall between the pixels sampled).

    Peak: in exact arithmetic the maximum sits on a segment's first or last row and column, so the largest value
    there is a lower bound of the true maximum. A pixel can reach it only where its two knot rows, interpolated
    along x, do (its value is a convex combination of them); those pixels, usually a few columns next to the top
    knot, are computed exactly, and the first of the largest in reading order wins.

    Box: a row crosses one segment of columns per pair of neighbouring knots. Where the four knots around such a
    stretch are all above the limit (or all below), so is every pixel of it. Elsewhere the two end pixels are
    computed: along the stretch the value is affine in exact arithmetic, so unless the limit lies between them,
    they decide it. Where it does, the pixels whose affine value is within _SLACK of the limit, usually one or
    two, are computed exactly; the pixels before and after them follow the affine model. The mask's runs per
    row go to _largest_region.
    """
    width, height = x_low.shape[0], y_low.shape[0]
    rows = _knot_rows(grid, x_low, x_high, x_weight_low, x_weight_high, fused)
    slack = np.float32(_SLACK)

    lower = np.float32(-1)
    for sy in range(y_first.shape[0]):
        for y in (y_first[sy], y_last[sy]):
            for sx in range(x_first.shape[0]):
                for x in (x_first[sx], x_last[sx]):
                    lower = max(lower, min(_value(rows, y_low, y_high, y_weight_low, y_weight_high, y, x, fused), np.float32(1)))
    best, best_index = np.float32(-1), -1
    for sy in range(y_first.shape[0]):
        top, bottom = rows[y_low[y_first[sy]]], rows[y_high[y_first[sy]]]
        for x in range(width):
            if max(top[x], bottom[x]) >= lower - 2 * slack:
                for y in range(y_first[sy], y_last[sy] + 1):
                    value = min(_value(rows, y_low, y_high, y_weight_low, y_weight_high, y, x, fused), np.float32(1))
                    index = y * width + x
                    if value > best or (value == best and index < best_index):
                        best, best_index = value, index
    if not best > 0:  # the grid's positive knots carry no weight at this size: the upsampled map is zero
        return -2, -2, -2, -2, -2, -2
    limit = np.float32(threshold * np.float64(best))

    # Bounds of each cell between knots (the last knot repeated past the edge), per segment of rows and columns.
    cell_low = np.empty((y_first.shape[0], x_first.shape[0]), dtype=np.float32)
    cell_high = np.empty_like(cell_low)
    for sy in range(y_first.shape[0]):
        r0, r1 = y_low[y_first[sy]], y_high[y_first[sy]]
        for sx in range(x_first.shape[0]):
            c0, c1 = x_low[x_first[sx]], x_high[x_first[sx]]
            a, b, c, d = grid[r0, c0], grid[r0, c1], grid[r1, c0], grid[r1, c1]
            cell_low[sy, sx], cell_high[sy, sx] = min(min(a, b), min(c, d)), max(max(a, b), max(c, d))

    room = height * (x_first.shape[0] + 2)
    run_row = np.empty(room, dtype=np.int64)
    run_x0, run_x1 = np.empty(room, dtype=np.int64), np.empty(room, dtype=np.int64)
    runs = 0
    for y in range(height):
        row_start = runs
        sy = y_segment[y]
        for sx in range(x_first.shape[0]):
            first, stop = x_first[sx], x_last[sx] + 1
            if cell_high[sy, sx] + slack < limit:
                continue
            if cell_low[sy, sx] - slack >= limit:
                runs = _add_interval(run_row, run_x0, run_x1, runs, row_start, y, first, stop)
                continue
            start_value = _value(rows, y_low, y_high, y_weight_low, y_weight_high, y, first, fused)
            end_value = _value(rows, y_low, y_high, y_weight_low, y_weight_high, y, stop - 1, fused)
            if min(start_value, end_value) - slack >= limit:
                runs = _add_interval(run_row, run_x0, run_x1, runs, row_start, y, first, stop)
                continue
            if max(start_value, end_value) + slack < limit:
                continue
            # The window of pixels to compute: those whose weight puts the affine value within _SLACK of the limit.
            window_start, window_stop = first, stop
            start_weight, end_weight = np.float64(x_weight_high[first]), np.float64(x_weight_high[stop - 1])
            span = np.float64(end_value) - np.float64(start_value)
            if span != 0 and end_weight != start_weight:
                near_a = start_weight + (end_weight - start_weight) * (np.float64(limit) - _SLACK - start_value) / span
                near_b = start_weight + (end_weight - start_weight) * (np.float64(limit) + _SLACK - start_value) / span
                lowest, highest = min(near_a, near_b), max(near_a, near_b)
                window_start = first + np.searchsorted(x_weight_high[first:stop], lowest, side="left")
                window_stop = max(window_start, first + np.searchsorted(x_weight_high[first:stop], highest, side="right"))
            rising = end_value > start_value
            if not rising and window_start > first:  # falling: the pixels before the window are above
                runs = _add_interval(run_row, run_x0, run_x1, runs, row_start, y, first, window_start)
            for x in range(window_start, window_stop):
                if _value(rows, y_low, y_high, y_weight_low, y_weight_high, y, x, fused) >= limit:
                    runs = _add_interval(run_row, run_x0, run_x1, runs, row_start, y, x, x + 1)
            if rising and window_stop < stop:  # rising: the pixels after it are
                runs = _add_interval(run_row, run_x0, run_x1, runs, row_start, y, window_stop, stop)
        if runs < 0:  # full: _add_interval keeps -1 once it is reached
            return -1, -1, -1, -1, -1, -1
    if runs == 0:  # the peak is always in the mask: only an error of this code could leave it empty
        return -1, -1, -1, -1, -1, -1
    x0, y0, x1, y1 = _largest_region(run_row[:runs], run_x0[:runs], run_x1[:runs])
    return best_index % width, best_index // width, x0, y0, x1, y1


@_compiled
def _add_interval(run_row: np.ndarray, run_x0: np.ndarray, run_x1: np.ndarray, runs: int, row_start: int, y: int, x0: int, x1: int) -> int:
    """Add the mask's pixels [x0, x1) of row y, joined to the row's last run if they touch; the new count of runs, -1 if full."""
    if runs < 0:
        return runs
    if runs > row_start and run_x1[runs - 1] == x0:
        run_x1[runs - 1] = x1
        return runs
    if runs == run_row.shape[0]:
        return -1
    run_row[runs], run_x0[runs], run_x1[runs] = y, x0, x1
    return runs + 1


@_compiled
def _largest_region(rows: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) box of the largest 4-connected region of a mask given as runs [x0, x1) in `rows`, in reading order.

    Runs of consecutive rows that share a column are one region (union-find, each region named by its first run).
    Of regions of equal size, the one whose first pixel comes first in reading order wins, as scipy.ndimage.label's
    numbering would pick (tests/test_cam_math.py checks against it).
    """
    count = rows.shape[0]
    parent = np.arange(count)
    previous_start, previous_stop, start = 0, 0, 0
    while start < count:
        stop = start
        while stop < count and rows[stop] == rows[start]:
            stop += 1
        if previous_stop > previous_start and rows[previous_start] == rows[start] - 1:
            above = previous_start
            for run in range(start, stop):
                while above < previous_stop and x1[above] <= x0[run]:
                    above += 1
                other = above
                while other < previous_stop and x0[other] < x1[run]:
                    a, b = _root(parent, run), _root(parent, other)
                    parent[max(a, b)] = min(a, b)
                    other += 1
        previous_start, previous_stop, start = start, stop, stop
    size = np.zeros(count, dtype=np.int64)
    left, right, bottom = x0.copy(), x1.copy(), rows.copy()
    for run in range(count):
        root = _root(parent, run)
        size[root] += x1[run] - x0[run]
        left[root], right[root], bottom[root] = min(left[root], x0[run]), max(right[root], x1[run]), max(bottom[root], rows[run])
    largest = 0
    for run in range(count):
        if size[run] > size[largest]:
            largest = run
    return left[largest], rows[largest], right[largest], bottom[largest] + 1


@_compiled
def _root(parent: np.ndarray, run: int) -> int:
    """The first run of `run`'s region, halving the path on the way."""
    while parent[run] != run:
        parent[run] = parent[parent[run]]
        run = parent[run]
    return run
