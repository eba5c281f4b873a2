"""Compiled loops behind camserve.cam.localization.peak_and_box: the peak and box of a map upsampled from its grid,
without computing the full-size map.

upsample_map's full-size map costs more than everything else in an answer, and the PNG does not need it
(camserve.protocol.responses). peak_and_box gets the same peak and box from the grid: these loops reproduce
torch's bilinear upsampling bit for bit, but only at the few pixels that can decide the answer. They are compiled
by numba: as numpy passes they would cost several times more, mostly the fixed cost of a hundred calls on small
arrays (docs/benchmarks.md, "Response encoding").

torch (CPU, float32, align_corners=False) computes output pixel (y, x) from the knots around it as
    row(r, x) = fma(grid[r, x_low], wx_low, grid[r, x_high] * wx_high)        (r = y_low and y_high)
    value     = fma(row(y_low, x), wy_low, row(y_high, x) * wy_high)
with source = fma(in / out, i + 0.5, -0.5) per axis, clamped at 0 (`bilinear_axis`). fma rounds once where
torch's kernels fuse multiply-adds (its AVX2 and AVX-512 builds) and twice where they do not (its DEFAULT build);
localization._torch_fuses asks torch once which. Between two knots the value is affine in each weight, so in
exact arithmetic a region's extremes sit on its first or last pixel; torch's rounding moves a value by at most a
few units in the last place (ULPs) from that, which SLACK covers with margin. Pixels whose outcome that slack could
change are computed exactly, the others follow from the affine model. tests/test_localization.py checks the result
against upsample_map + peak + bounding_box.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

SLACK = 4e-6  # bound on |torch's value - the affine model|: ~30 ULPs at 1.0, for values in [0, 1]
# What grid_peak_and_box answers instead of a peak and box (all six values alike).
NOTHING_ABOVE_ZERO = -2  # the upsampled map is zero everywhere: no peak, no box
RUNS_OVERFLOW = -1  # the box's mask has more runs than the loops keep room for (a mask no map draws)
EMPTY_MASK = -3  # the mask lost the peak: only an error of these loops could do that


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
class Axis:
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
def bilinear_axis(n_in: int, n_out: int, fused: bool) -> Axis:
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
    axis = Axis(
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
def upsampled(
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
def grid_peak_and_box(
    grid: np.ndarray, x_low: np.ndarray, x_high: np.ndarray, x_weight_low: np.ndarray, x_weight_high: np.ndarray,
    x_first: np.ndarray, x_last: np.ndarray, y_low: np.ndarray, y_high: np.ndarray, y_weight_low: np.ndarray,
    y_weight_high: np.ndarray, y_first: np.ndarray, y_last: np.ndarray, y_segment: np.ndarray, fused: bool, threshold: float,
) -> tuple[int, int, int, int, int, int]:  # fmt: skip
    """(peak x, peak y, x0, y0, x1, y1) of the upsampled map; all NOTHING_ABOVE_ZERO if the map is zero everywhere
    (a grid whose positive knots fall between the pixels sampled), all RUNS_OVERFLOW or EMPTY_MASK where these
    loops cannot answer and the full-size way must."""
    width = x_low.shape[0]
    rows = _knot_rows(grid, x_low, x_high, x_weight_low, x_weight_high, fused)
    best, best_index = _peak(rows, x_first, x_last, y_low, y_high, y_weight_low, y_weight_high, y_first, y_last, fused)
    if not best > 0:  # the grid's positive knots carry no weight at this size: the upsampled map is zero
        return _answered(NOTHING_ABOVE_ZERO)
    limit = np.float32(threshold * np.float64(best))
    cell_low, cell_high = _cell_bounds(grid, x_low, x_high, x_first, y_low, y_high, y_first)
    run_row, run_x0, run_x1, runs = _mask_runs(
        rows, x_weight_high, x_first, x_last, y_low, y_high, y_weight_low, y_weight_high, y_segment, cell_low, cell_high, limit, fused
    )
    if runs < 0:  # full: _add_interval keeps -1 once it is reached
        return _answered(RUNS_OVERFLOW)
    if runs == 0:  # the peak is always in the mask
        return _answered(EMPTY_MASK)
    x0, y0, x1, y1 = largest_region(run_row[:runs], run_x0[:runs], run_x1[:runs])
    return best_index % width, best_index // width, x0, y0, x1, y1


@_compiled
def _answered(code: int) -> tuple[int, int, int, int, int, int]:
    """grid_peak_and_box's answer where it has no peak and box: `code` six times."""
    return code, code, code, code, code, code


@_compiled
def _peak(
    rows: np.ndarray, x_first: np.ndarray, x_last: np.ndarray, y_low: np.ndarray, y_high: np.ndarray,
    y_weight_low: np.ndarray, y_weight_high: np.ndarray, y_first: np.ndarray, y_last: np.ndarray, fused: bool,
) -> tuple[np.float32, int]:  # fmt: skip
    """(value, flat index) of the upsampled map's maximum, clamped at 1, the first in reading order.

    In exact arithmetic the maximum sits on a segment's first or last row and column, so the largest value there
    is a lower bound of the true maximum. A pixel can reach it only where its two knot rows, interpolated along x,
    do (its value is a convex combination of them); those pixels, usually a few columns next to the top knot, are
    computed exactly.
    """
    width = rows.shape[1]
    slack = np.float32(SLACK)
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
    return best, best_index


@_compiled
def _cell_bounds(
    grid: np.ndarray, x_low: np.ndarray, x_high: np.ndarray, x_first: np.ndarray, y_low: np.ndarray, y_high: np.ndarray,
    y_first: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Lowest and highest knot of each cell between knots (the last knot repeated past the edge), per segment of
    rows and columns: every pixel of the cell lies between them."""
    cell_low = np.empty((y_first.shape[0], x_first.shape[0]), dtype=np.float32)
    cell_high = np.empty_like(cell_low)
    for sy in range(y_first.shape[0]):
        r0, r1 = y_low[y_first[sy]], y_high[y_first[sy]]
        for sx in range(x_first.shape[0]):
            c0, c1 = x_low[x_first[sx]], x_high[x_first[sx]]
            a, b, c, d = grid[r0, c0], grid[r0, c1], grid[r1, c0], grid[r1, c1]
            cell_low[sy, sx], cell_high[sy, sx] = min(min(a, b), min(c, d)), max(max(a, b), max(c, d))
    return cell_low, cell_high


@_compiled
def _mask_runs(
    rows: np.ndarray, x_weight_high: np.ndarray, x_first: np.ndarray, x_last: np.ndarray, y_low: np.ndarray,
    y_high: np.ndarray, y_weight_low: np.ndarray, y_weight_high: np.ndarray, y_segment: np.ndarray,
    cell_low: np.ndarray, cell_high: np.ndarray, limit: np.float32, fused: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # fmt: skip
    """The mask of pixels at or above `limit` as runs [x0, x1) per row: (rows, x0s, x1s, count), count -1 if the
    runs overflow their room.

    A row crosses one segment of columns per pair of neighbouring knots. Where the four knots around such a stretch
    are all above the limit (or all below), so is every pixel of it. Elsewhere the two end pixels are computed:
    along the stretch the value is affine in exact arithmetic, so unless the limit lies between them, they decide
    it. Where it does, the pixels whose affine value is within SLACK of the limit, usually one or two, are computed
    exactly (_window); the pixels before and after them follow the affine model. One loop over every row and
    segment, no call per stretch: that would cost more than the work.
    """
    slack = np.float32(SLACK)
    room = y_low.shape[0] * (x_first.shape[0] + 2)
    run_row = np.empty(room, dtype=np.int64)
    run_x0, run_x1 = np.empty(room, dtype=np.int64), np.empty(room, dtype=np.int64)
    runs = 0
    for y in range(y_low.shape[0]):
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
            window_start, window_stop = _window(x_weight_high, first, stop, start_value, end_value, limit)
            rising = end_value > start_value
            if not rising and window_start > first:  # falling: the pixels before the window are above
                runs = _add_interval(run_row, run_x0, run_x1, runs, row_start, y, first, window_start)
            for x in range(window_start, window_stop):
                if _value(rows, y_low, y_high, y_weight_low, y_weight_high, y, x, fused) >= limit:
                    runs = _add_interval(run_row, run_x0, run_x1, runs, row_start, y, x, x + 1)
            if rising and window_stop < stop:  # rising: the pixels after it are
                runs = _add_interval(run_row, run_x0, run_x1, runs, row_start, y, window_stop, stop)
        if runs < 0:
            break
    return run_row, run_x0, run_x1, runs


@_compiled
def _window(
    x_weight_high: np.ndarray, first: int, stop: int, start_value: np.float32, end_value: np.float32, limit: np.float32
) -> tuple[int, int]:
    """The pixels [start, stop) of a stretch to compute exactly: those whose weight puts the affine value within
    SLACK of the limit (the whole stretch where the affine model is flat)."""
    window_start, window_stop = first, stop
    start_weight, end_weight = np.float64(x_weight_high[first]), np.float64(x_weight_high[stop - 1])
    span = np.float64(end_value) - np.float64(start_value)
    if span != 0 and end_weight != start_weight:
        near_a = start_weight + (end_weight - start_weight) * (np.float64(limit) - SLACK - start_value) / span
        near_b = start_weight + (end_weight - start_weight) * (np.float64(limit) + SLACK - start_value) / span
        lowest, highest = min(near_a, near_b), max(near_a, near_b)
        window_start = first + int(np.searchsorted(x_weight_high[first:stop], lowest, side="left"))
        window_stop = max(window_start, first + int(np.searchsorted(x_weight_high[first:stop], highest, side="right")))
    return window_start, window_stop


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
def largest_region(rows: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[int, int, int, int]:
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
