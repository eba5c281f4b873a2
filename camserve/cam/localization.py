"""From a low-resolution map to what a user reads: the map at original size, its peak, and a bounding box."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.sparse import csgraph
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


def bounding_box(heatmap: Tensor, threshold: float = BBOX_THRESHOLD) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1) of the largest connected region where the map exceeds `threshold` x its maximum.

    x1 and y1 are exclusive (pixel edges), so the box of a single pixel (x, y) is (x, y, x + 1, y + 1).
    Regions are 4-connected (pixels sharing an edge), as scipy.ndimage.label's default; of regions of equal
    size, the one whose first pixel comes first in reading order wins. An all-zero map has no region: the box
    is then the whole image (as for a map of NaN).

    Labelling every pixel (scipy.ndimage.label) took 3 ms at 640x480 and 8-15 ms at 1280x960, more than the map
    itself. The mask is read as runs of pixels per row instead, in a few numpy passes (0.7 ms at 640x480, 1.4 ms
    at 1280x960; scripts/bench_encoding.py). The usual CAM above the threshold is one blob, one run per row
    overlapping the next, whose box is the runs' extent; other masks join their runs into regions.
    """
    height, width = heatmap.shape
    values = heatmap.detach().cpu().numpy()
    maximum = float(values.max())
    if not maximum > 0:  # all zero, or NaN
        return 0, 0, width, height
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
        return 0, 0, width, height
    rows = starts // stride
    x0, x1 = starts - rows * stride - 1, ends - rows * stride - 1  # image columns, x1 exclusive
    return _largest_region_box(rows, x0, x1, width)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- Peak and box from the grid itself ------------------------------------------------------------------------
#
# upsample_map's full-size map costs more than everything else in an answer (4 ms at 1280x960), and the PNG no
# longer needs it (camserve.protocol.responses). peak_and_box gets the same peak and box from the grid: it
# reproduces torch's bilinear upsampling bit for bit, but only at the few pixels that can decide the answer.
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
# Below this many output pixels the full-size map is the cheaper way: the grid way's hundred-odd numpy calls cost
# about 0.3 ms whatever the size, torch's upsampling + peak + bounding_box 0.2 ms at 280x220 (scripts/bench_encoding.py).
_FULL_SIZE_PIXELS = 100_000
_SLACK = 4e-6  # bound on |torch's value - the affine model|: ~30 ULPs at 1.0, for values in [0, 1]


@dataclass(frozen=True)
class _Axis:
    """Where torch's bilinear upsampling reads each output pixel along one axis, and with which weights.

    A "segment" is a run of pixels between the same two knots; within it the weights change monotonically.
    """

    low: np.ndarray  # (n_out,) int64: the knot at or before the pixel
    high: np.ndarray  # (n_out,) int64: the knot after it (= low at the last knot)
    weight_low: np.ndarray  # (n_out,) float32
    weight_high: np.ndarray  # (n_out,) float32
    first: np.ndarray  # (segments,) first pixel of each segment
    last: np.ndarray  # (segments,) its last pixel (inclusive)
    segment: np.ndarray  # (n_out,) the segment of each pixel
    ends: np.ndarray  # every segment's first and last pixel, sorted
    keys: np.ndarray  # (n_out,) float64: 2 * segment + weight_high, increasing: searchsorted finds pixels by weight


@functools.lru_cache(maxsize=64)
def _axis(n_in: int, n_out: int, fused: bool) -> _Axis:
    """torch's area_pixel_compute_source_index and guard_index_and_lambda, in numpy, bit for bit.

    Cached: a server sees the same few image sizes over and over.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    source = _fma(np.full(n_out, scale), np.arange(n_out, dtype=np.float32) + np.float32(0.5), np.float32(-0.5), fused)
    np.maximum(source, np.float32(0), out=source)
    low = np.minimum(source.astype(np.int64), n_in - 1)
    weight_high: np.ndarray = np.clip(source - low.astype(np.float32), np.float32(0), np.float32(1))
    first = np.flatnonzero(np.diff(low, prepend=-1))
    last = np.append(first[1:], n_out) - 1
    segment = np.repeat(np.arange(len(first)), last - first + 1)
    axis = _Axis(
        low,
        np.minimum(low + 1, n_in - 1),
        np.float32(1) - weight_high,
        weight_high,
        first,
        last,
        segment,
        np.union1d(first, last),
        2.0 * segment + weight_high,
    )
    for array in vars(axis).values():
        array.flags.writeable = False
    return axis


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray | np.floating, fused: bool) -> np.ndarray:
    """float32 a * b + c as torch's kernels compute it: rounded once if `fused` (a * b is exact in float64), else twice."""
    if fused:
        return (a.astype(np.float64) * b + c).astype(np.float32)
    return (a * b).astype(np.float32) + c


@functools.cache
def _torch_fuses() -> bool | None:
    """Whether this torch build fuses bilinear upsampling's multiply-adds; None if neither way matches it.

    Asked once: a probe grid upsampled both ways, compared bit for bit with torch's own result.
    """
    probe = torch.rand(5, 7, generator=torch.Generator().manual_seed(0))
    size = (97, 61)  # width + height > _SMALL_OUTPUT: the kernel that peak_and_box reproduces
    reference = upsample_map(probe, size).numpy()
    for fused in (True, False):
        values = _Upsampled(probe.numpy(), size, fused).values(np.arange(size[1])[:, None], np.arange(size[0])[None, :])
        if np.array_equal(np.clip(values, 0, 1), reference):
            return fused
    return None


class _Upsampled:
    """upsample_map(grid, size) without the full map: exact values at any pixels, and bounds for regions."""

    def __init__(self, grid: np.ndarray, size: tuple[int, int], fused: bool) -> None:
        self.grid, self.fused = grid, fused
        self.width, self.height = size
        self.x = _axis(grid.shape[1], self.width, fused)
        self.y = _axis(grid.shape[0], self.height, fused)
        # Every knot row interpolated along x, as torch's first step: (h, width), small.
        self.rows = _fma(grid[:, self.x.low], self.x.weight_low, grid[:, self.x.high] * self.x.weight_high, fused)

    def values(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Exact float32 values at pixels (ys, xs) (broadcast), before upsample_map's clamp."""
        y = self.y
        return _fma(self.rows[y.low[ys], xs], y.weight_low[ys], self.rows[y.high[ys], xs] * y.weight_high[ys], self.fused)


def peak_and_box(
    grid: Tensor | np.ndarray, size: tuple[int, int], threshold: float = BBOX_THRESHOLD
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """peak(m) and bounding_box(m, threshold) of m = upsample_map(grid, size), without computing m.

    The same answer at a fraction of the cost at camera sizes. A grid with values outside [0, 1] or NaN (never
    a normalised map), an output under _FULL_SIZE_PIXELS, and a torch whose rounding this does not reproduce
    take the full-size way.
    """
    values = grid.detach().cpu().float().numpy() if isinstance(grid, Tensor) else np.asarray(grid, dtype=np.float32)
    width, height = size
    # Outputs with width + height <= 128 go through another torch kernel (channels-last, other rounding), which
    # the grid way does not reproduce; _FULL_SIZE_PIXELS covers them. NaN fails the range check.
    fused = _torch_fuses()
    if width * height < _FULL_SIZE_PIXELS or fused is None or not (values.min() >= 0 and values.max() <= 1):
        heatmap = upsample_map(torch.from_numpy(values), size)
        return peak(heatmap), bounding_box(heatmap, threshold)
    if not values.max() > 0:
        return (0, 0), (0, 0, width, height)  # all zero: peak() and bounding_box() of a zero map
    upsampled = _Upsampled(values, size, fused)
    (x, y), maximum = _peak(upsampled)
    return (x, y), _box(upsampled, np.float32(threshold * float(maximum)))


def _peak(upsampled: _Upsampled) -> tuple[tuple[int, int], np.float32]:
    """The first maximum in reading order of the clamped map, and its value.

    In exact arithmetic the maximum sits on a segment's first or last row and column: the largest value there
    is a lower bound of the true maximum. A pixel can reach it only where its two knot rows, interpolated along
    x, do (its value is a convex combination of them): those pixels, usually a few columns next to the top
    knot, are computed exactly.
    """
    x_axis, y_axis = upsampled.x, upsampled.y
    lower = np.minimum(upsampled.values(y_axis.ends[:, None], x_axis.ends[None, :]), 1).max()
    # Per segment of rows, the columns that may reach `lower`; then every row of that segment at those columns.
    reach = np.maximum(upsampled.rows[y_axis.low[y_axis.first]], upsampled.rows[y_axis.high[y_axis.first]])
    segments, xs = np.nonzero(reach >= lower - 2 * _SLACK)
    counts = y_axis.last[segments] - y_axis.first[segments] + 1
    ys = np.repeat(y_axis.first[segments] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    xs = np.repeat(xs, counts)
    found = np.minimum(upsampled.values(ys, xs), 1)
    maximum = found.max()
    at_maximum = found == maximum
    first = int((ys[at_maximum] * upsampled.width + xs[at_maximum]).min())
    return (first % upsampled.width, first // upsampled.width), maximum


def _box(upsampled: _Upsampled, limit: np.float32) -> tuple[int, int, int, int]:
    """bounding_box of the map for the mask `value >= limit`, from the mask's runs of pixels per row.

    A row crosses one segment of columns per pair of neighbouring knots. Where the four knots around such a
    stretch are all above the limit (or all below), so is every pixel of it (values are convex combinations).
    Elsewhere the two end pixels are computed: along the stretch the value is affine in exact arithmetic, so
    unless the limit lies between them, they decide it. Where it does, the pixels whose affine value is within
    _SLACK of the limit - usually one or two - are computed exactly, and they split the stretch into the part
    above and the part below. Each stretch thus gives at most one interval of the mask, and consecutive
    intervals that touch make the runs.
    """
    x_axis, y_axis, grid = upsampled.x, upsampled.y, upsampled.grid
    # Bounds of each cell between knots (r, r + 1) x (c, c + 1), the last knot repeated past the edge.
    padded = np.concatenate((grid, grid[-1:]), axis=0)
    padded = np.concatenate((padded, padded[:, -1:]), axis=1)
    quad = (padded[:-1, :-1], padded[1:, :-1], padded[:-1, 1:], padded[1:, 1:])
    rows, cols = y_axis.low[y_axis.first][:, None], x_axis.low[x_axis.first][None, :]
    cell_low, cell_high = np.minimum.reduce(quad)[rows, cols], np.maximum.reduce(quad)[rows, cols]
    maybe = (cell_high + _SLACK >= limit)[y_axis.segment]  # (height, segments): stretches that may be in the mask
    sure = (cell_low - _SLACK >= limit)[y_axis.segment]
    ys, js = np.nonzero(maybe)  # in reading order
    sure = sure[ys, js]
    first, last = x_axis.first[js], x_axis.last[js]
    x0, x1 = first.copy(), last + 1
    open_ = np.flatnonzero(~sure)
    if len(open_):
        y, j = ys[open_], js[open_]
        start_value, end_value = upsampled.values(y, first[open_]), upsampled.values(y, last[open_])
        low, high = np.minimum(start_value, end_value), np.maximum(start_value, end_value)
        inside, outside = low - _SLACK >= limit, high + _SLACK < limit
        crossing = ~inside & ~outside
        x1[open_[outside]] = x0[open_[outside]]  # empty
        if crossing.any():
            at = open_[crossing]
            begin, stop = _crossing_interval(upsampled, y[crossing], j[crossing], start_value[crossing], end_value[crossing], limit)
            if begin is None:
                return bounding_box(upsample_map(torch.from_numpy(grid), (upsampled.width, upsampled.height)), BBOX_THRESHOLD)
            x0[at], x1[at] = begin, stop
    keep = x1 > x0
    ys, x0, x1 = ys[keep], x0[keep], x1[keep]
    # Runs: intervals that touch, within a row, are one run.
    joined = (ys[1:] == ys[:-1]) & (x0[1:] == x1[:-1])
    starts = np.flatnonzero(~np.concatenate(([False], joined)))
    ends = np.flatnonzero(~np.concatenate((joined, [False])))
    return _largest_region_box(ys[starts], x0[starts], x1[ends], upsampled.width)


def _crossing_interval(
    upsampled: _Upsampled, ys: np.ndarray, segments: np.ndarray, start_value: np.ndarray, end_value: np.ndarray, limit: np.float32
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """[begin, stop) of the pixels >= limit in stretches of rows `ys` whose end values lie on both sides of it.

    Along a stretch the value is affine in the pixels' weight (exact arithmetic); the pixels whose affine value
    is within _SLACK of the limit are computed. (None, None) if those do not fall into an above part and a
    below part, which float rounding could only do for a stretch that hugs the limit: never seen in a map.
    """
    x_axis = upsampled.x
    first, last = x_axis.first[segments], x_axis.last[segments]
    start_weight, end_weight = x_axis.weight_high[first].astype(np.float64), x_axis.weight_high[last].astype(np.float64)
    rising = end_value > start_value
    span = (end_value - start_value).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = [start_weight + (end_weight - start_weight) * (float(limit) + sign * _SLACK - start_value) / span for sign in (-1, 1)]
    flat = (span == 0) | (end_weight == start_weight)  # no slope to follow: every pixel is computed
    keys = x_axis.keys
    lowest, highest = np.where(flat, start_weight, np.minimum(*near)), np.where(flat, end_weight, np.maximum(*near))
    window_start = np.clip(np.searchsorted(keys, 2.0 * segments + lowest, side="left"), first, last + 1)
    window_stop = np.clip(np.searchsorted(keys, 2.0 * segments + highest, side="right"), window_start, last + 1)
    size = window_stop - window_start
    count = int(size.sum())
    above_in_window = np.zeros(len(ys), dtype=np.int64)
    if count:
        owner = np.repeat(np.arange(len(ys)), size)
        xs = np.repeat(window_start - np.cumsum(size) + size, size) + np.arange(count)
        above = upsampled.values(ys[owner], xs) >= limit
        # Above the limit must be one block at the rising end of the window (or the falling start).
        expected_order = np.where(rising[owner], above, ~above)
        same_owner = owner[1:] == owner[:-1]
        if bool((same_owner & (expected_order[1:] < expected_order[:-1])).any()):
            return None, None
        above_in_window = np.bincount(owner, weights=above, minlength=len(ys)).astype(np.int64)
    # Rising: below before the window and in its first part, above after; falling: the mirror image.
    begin = np.where(rising, window_stop - above_in_window, first)
    stop = np.where(rising, last + 1, window_start + above_in_window)
    return begin, stop


def _largest_region_box(rows: np.ndarray, x0: np.ndarray, x1: np.ndarray, width: int) -> tuple[int, int, int, int]:
    """Box of the largest 4-connected region of a mask given as runs [x0, x1) in `rows`, in reading order.

    Of regions of equal size, the one whose first pixel comes first in reading order wins, as scipy.ndimage.label's
    numbering would pick (tests/test_cam_math.py checks against it).
    """
    one_per_row = bool((np.diff(rows) == 1).all())
    if one_per_row and bool(((x0[1:] < x1[:-1]) & (x0[:-1] < x1[1:])).all()):
        return int(x0.min()), int(rows[0]), int(x1.max()), int(rows[-1]) + 1
    # Runs of consecutive rows that share a column are connected. Keys rank runs in reading order (row-major):
    # the runs of the row above that overlap run i are those from `first` to `stop` (exclusive).
    stride = width + 1
    start_keys, end_keys = rows * stride + x0, rows * stride + x1
    above = (rows - 1) * stride
    first = np.searchsorted(end_keys, above + x0, side="right")
    stop = np.maximum(np.searchsorted(start_keys, above + x1, side="left"), first)
    links = stop - first
    ends = np.cumsum(links)
    other = np.repeat(first - ends + links, links) + np.arange(int(ends[-1]))
    # Row i of the graph lists the runs above that run i touches: built as CSR directly, and read as directed
    # with weak connection (the same components as undirected, without symmetrising the matrix).
    indptr = np.concatenate(([0], ends)).astype(np.int32)
    graph = sparse.csr_matrix((np.ones(len(other)), other.astype(np.int32), indptr), shape=(len(rows), len(rows)))
    _, region = csgraph.connected_components(graph, directed=True, connection="weak")
    sizes = np.bincount(region, weights=x1 - x0)
    # The first run of each region, in reading order, stands for its first pixel.
    first_run = np.unique(region, return_index=True)[1]
    largest = np.flatnonzero(sizes == sizes.max())
    chosen = region == largest[np.argmin(first_run[largest])]
    return int(x0[chosen].min()), int(rows[chosen].min()), int(x1[chosen].max()), int(rows[chosen].max()) + 1
