"""What encoding one map's answer costs, step by step, old and new implementation side by side in one run.

    PYTHONPATH=. .venv/bin/python scripts/bench_encoding.py                  # the table (under a minute)
    PYTHONPATH=. .venv/bin/python scripts/bench_encoding.py --levels 1,2,3,6  # adds a zlib level sweep of the PNG

For every prediction with a map the handler calls camserve.protocol.responses.cam_json: upsample the low-res
map to the original image size, take its peak, its bounding box, encode it as a PNG, then base64 and JSON.
This runs those steps as cam_json does and times each, for maps as CAMs look (three smooth Gaussian blobs on
a 16x16 and on a 7x7 grid) and for a 16x16 torch.rand grid, at 320x240, 640x480 and 1280x960.

The implementation before this script (torch.argmax, scipy.ndimage.label on every full-size mask, PIL's PNG
encoder at compress_level 6; upsampling is unchanged) is kept below as the reference. Rounds alternate old and new,
each going first in half of them, so drifting machine load and cache state weigh on both alike; figures are
medians over rounds, in milliseconds. Each case first checks that old and new give exactly the same bbox, peak
and decoded PNG pixels; "same answer" repeats that check on the whole answer. torch runs on one thread
(--threads), as in a TorchServe worker with one thread. The bbox is faster only for maps whose region above
20 % is one blob (one run per row): three separate blobs and noise are labelled pixel by pixel, as before.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from camserve.cam.localization import BBOX_THRESHOLD, _labelled_box, bounding_box, peak, upsample_map
from camserve.protocol.responses import HEATMAP_STEP, _png, _sub_filter, decode_heatmap, heatmap_png

SIZES = [(320, 240), (640, 480), (1280, 960)]  # (width, height) of the original image


# --- the reference: the implementation before this benchmark ---


def old_peak(heatmap: torch.Tensor) -> tuple[int, int]:
    index = int(torch.argmax(heatmap))
    width = heatmap.shape[1]
    return index % width, index // width


def old_heatmap_png(heatmap: torch.Tensor) -> bytes:
    pixels = ((heatmap.clamp(0, 1) * (255 // HEATMAP_STEP)).round() * HEATMAP_STEP).to(torch.uint8).cpu().numpy()
    return pil_png(pixels, 6)


def grey_png(pixels: np.ndarray, compress_level: int) -> bytes:
    """heatmap_png's encoder on given pixels at any zlib level: for the level sweep (--levels)."""
    rows = np.empty((pixels.shape[0], pixels.shape[1] + 1), dtype=np.uint8)
    _sub_filter(pixels, rows)
    return _png(rows, compress_level)


def pil_png(pixels: np.ndarray, compress_level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def old_bounding_box(heatmap: torch.Tensor, threshold: float = BBOX_THRESHOLD) -> tuple[int, int, int, int]:
    """Every pixel labelled, whatever the mask: what bounding_box still does for all but single blobs."""
    height, width = heatmap.shape
    maximum = float(heatmap.max())
    if maximum <= 0:
        return 0, 0, width, height
    return _labelled_box((heatmap >= threshold * maximum).cpu().numpy())


# --- maps ---


def blobs(side: int, seed: int) -> torch.Tensor:
    """A (side, side) map of three Gaussian blobs of random place, width and height, normalised to max 1."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    grid = torch.zeros(side, side)
    for _ in range(3):
        cx, cy, sigma, height = torch.rand(4, generator=generator).tolist()
        grid += (0.3 + 0.7 * height) * torch.exp(-((x - cx * side) ** 2 + (y - cy * side) ** 2) / (2 * (side * (0.08 + 0.15 * sigma)) ** 2))
    return grid / grid.max()


def grids() -> dict[str, torch.Tensor]:
    return {"blobs 16x16": blobs(16, 0), "blobs 7x7": blobs(7, 1), "rand 16x16": torch.rand(16, 16, generator=torch.Generator().manual_seed(2))}


# --- timing ---


def steps(upsample_fn: Callable, peak_fn: Callable, bbox_fn: Callable, heatmap_png_fn: Callable) -> Callable:
    """cam_json's work, timed step by step: returns {step: seconds} and the answer's parts."""

    def run(grid: torch.Tensor, size: tuple[int, int]) -> tuple[dict[str, float], dict]:
        times = {}
        start = time.perf_counter()
        heatmap = upsample_fn(grid, size)
        times["upsample"] = (now := time.perf_counter()) - start
        xy = peak_fn(heatmap)
        times["peak"] = (after := time.perf_counter()) - now
        box = bbox_fn(heatmap)
        times["bbox"] = (now := time.perf_counter()) - after
        png = heatmap_png_fn(heatmap)
        times["png"] = (after := time.perf_counter()) - now
        body = json.dumps({"cam": {"size": list(size), "heatmap": base64.b64encode(png).decode("ascii"), "bbox": list(box), "peak": list(xy)}})
        times["b64+json"] = time.perf_counter() - after
        times["total"] = time.perf_counter() - start
        return times, {"png": png, "bbox": box, "peak": xy, "body": len(body)}

    return run


OLD = steps(upsample_map, old_peak, old_bounding_box, old_heatmap_png)
NEW = steps(upsample_map, peak, bounding_box, heatmap_png)
STEPS = ["upsample", "peak", "bbox", "png", "b64+json", "total"]


def compare(grid: torch.Tensor, size: tuple[int, int], rounds: int) -> tuple[dict, dict, dict, dict, bool]:
    """Old and new timings, their answers, and whether the two answers are the same."""
    # On one map, the new bbox, peak and PNG pixels must be exactly the old ones.
    heatmap = upsample_map(grid, size)
    assert bounding_box(heatmap) == old_bounding_box(heatmap), (bounding_box(heatmap), old_bounding_box(heatmap))
    assert peak(heatmap) == old_peak(heatmap)
    assert np.array_equal(pixels(heatmap_png(heatmap)), pixels(old_heatmap_png(heatmap)))
    old_answer, new_answer = OLD(grid, size)[1], NEW(grid, size)[1]  # also the warm-up
    same = old_answer["bbox"] == new_answer["bbox"] and old_answer["peak"] == new_answer["peak"] \
        and np.array_equal(pixels(old_answer["png"]), pixels(new_answer["png"]))
    old_times: dict[str, list[float]] = {step: [] for step in STEPS}
    new_times: dict[str, list[float]] = {step: [] for step in STEPS}
    for round_ in range(rounds):
        pair = ((OLD, old_times), (NEW, new_times))
        for run, times in pair if round_ % 2 else pair[::-1]:  # each goes first in half the rounds: what runs
            for step, seconds in run(grid, size)[0].items():  # just before (caches) weighs on both alike
                times[step].append(seconds)
    median = lambda times: {step: statistics.median(values) * 1e3 for step, values in times.items()}  # noqa: E731
    return median(old_times), median(new_times), old_answer, new_answer, same


def pixels(png: bytes) -> np.ndarray:
    return decode_heatmap(base64.b64encode(png).decode("ascii"))


def level_sweep(levels: list[int], rounds: int) -> None:
    print("\n### PNG of the same pixels: PIL's encoder vs grey_png (Sub filter) at each zlib level (ms / KB)\n")
    print("| map | size | PIL level 6 | PIL level 1 | " + " | ".join(f"Sub, level {level}" for level in levels) + " |")
    print("|---|---|---|---|" + "---|" * len(levels))
    for name, grid in grids().items():
        for size in SIZES:
            heatmap = upsample_map(grid, size)
            grey = ((heatmap * (255 // HEATMAP_STEP)).round() * HEATMAP_STEP).to(torch.uint8).numpy()
            candidates = [lambda: pil_png(grey, 6), lambda: pil_png(grey, 1)] + [lambda level=level: grey_png(grey, level) for level in levels]
            cells = []
            for encode in candidates:
                encoded = encode()
                seconds = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    encode()
                    seconds.append(time.perf_counter() - start)
                cells.append(f"{statistics.median(seconds) * 1e3:.2f} / {len(encoded) / 1e3:.1f}")
            print(f"| {name} | {size[0]}x{size[1]} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as one TorchServe worker thread)")
    parser.add_argument("--levels", default="", help="also sweep this encoder's zlib levels, e.g. 1,2,3,6")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"### cam_json step by step, old -> new (median ms over {args.rounds} alternating rounds; torch threads {args.threads})\n")
    print("| map | size | " + " | ".join(STEPS) + " | speed-up | PNG bytes old -> new | body bytes old -> new | same answer |")
    print("|---|---|" + "---|" * (len(STEPS) + 4))
    for name, grid in grids().items():
        for size in SIZES:
            old, new, old_answer, new_answer, same = compare(grid, size, args.rounds)
            cells = [f"{old[step]:.2f} -> {new[step]:.2f}" for step in STEPS]
            print(f"| {name} | {size[0]}x{size[1]} | " + " | ".join(cells) + f" | {old['total'] / new['total']:.1f}x"
                  f" | {len(old_answer['png']):,} -> {len(new_answer['png']):,} | {old_answer['body']:,} -> {new_answer['body']:,}"
                  f" | {'yes' if same else 'no'} |")
    if args.levels:
        level_sweep([int(level) for level in args.levels.split(",")], args.rounds)


if __name__ == "__main__":
    main()
