"""What one map's answer costs (cam_json: upsample, PNG, peak, box, base64), old and new side by side in one run.

    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.encoding                 # the table (about a minute)
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.encoding --steps         # adds the new answer step by step
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.encoding --alternatives  # adds the candidates measured for it

The old answer is the implementation before issue 12, kept below as the reference: torch's bilinear upsampling
to a float map at full size, the PNG quantised from it (Sub filter, stdlib zlib level 1), numpy's argmax and the
run-based box of that map. The new one is camserve.protocol.responses.cam_json: peak and box from the grid
(camserve.cam.localization.peak_and_box, compiled loops; outputs of width + height <= 128 from the full-size map), the
PNG from OpenCV's resize of the grid and zlib-ng. Both make the heat map at the image's size, today's
`heatmap_size=original` answer; the default answer's heat map is the model input's longest side whatever the
image (camserve.protocol.responses.heatmap_png_size), so its PNG costs what this table's smaller sizes cost.

Maps: three smooth Gaussian blobs on a 16x16 and on a 7x7 grid, a 16x16 torch.rand grid (noise, the worst case
for bytes), and the default model's Grad-CAM of a generated scene (its layer's grid, 24x24 at 192 px). Rounds
alternate old and new, each going first in half of them, so drifting machine load and cache state weigh on both
alike; figures are medians over rounds, in milliseconds, with torch and OpenCV on one thread. Before timing,
every case checks that old and new give the same peak and box, and counts the heat map pixels that differ (by
one level of 64 at most).
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import statistics
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from zlib_ng import zlib_ng

from camserve.cam import CamExtractor
from camserve.cam.localization import bounding_box, peak, peak_and_box, upsample_map
from camserve.model_spec import ModelSpec, load_model
from camserve.preprocessing import whole_image_transform
from camserve.protocol.responses import HEATMAP_LEVELS, HEATMAP_STEP, cam_json, decode_heatmap, heatmap_png_of_grid
from camserve_tools.data.scenes import EVAL_SEED_START, make_scene

ROOT = Path(__file__).resolve().parents[2]
SIZES = [(320, 240), (640, 480), (1280, 960)]  # (width, height) of the original image
LABELS = ["a"]


# --- the reference: the answer before issue 12 ---


def old_heatmap_png(heatmap: torch.Tensor) -> bytes:
    """The quantised full-size map, Sub filter, stdlib zlib level 1."""
    levels = np.rint(np.clip(heatmap.numpy(), 0, 1) * np.float32(HEATMAP_LEVELS)).astype(np.uint8) * np.uint8(HEATMAP_STEP)
    rows = np.empty((levels.shape[0], levels.shape[1] + 1), dtype=np.uint8)
    rows[:, 0] = 1
    rows[:, 1] = levels[:, 0]
    np.subtract(levels[:, 1:], levels[:, :-1], out=rows[:, 2:])
    return png_file(rows, zlib.compress(rows.tobytes(), 1))


def _zlib(rows: np.ndarray, level: int) -> bytes:
    return zlib.compress(rows.tobytes(), level)


def _zlib_ng(rows: np.ndarray, level: int) -> bytes:
    return bytes(zlib_ng.compress(rows.tobytes(), level))


def png_file(rows: np.ndarray, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    header = struct.pack(">IIBBBBB", rows.shape[1] - 1, rows.shape[0], 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def old_cam_json(grid: torch.Tensor, size: tuple[int, int]) -> dict:
    heatmap = upsample_map(grid, size)
    return {
        "size": list(size),
        "heatmap": base64.b64encode(old_heatmap_png(heatmap)).decode("ascii"),
        "bbox": list(bounding_box(heatmap) or ()),
        "peak": list(peak(heatmap)),
    }


def new_cam_json(grid: torch.Tensor, size: tuple[int, int]) -> dict:
    return cam_json(grid, size, "gradcam", ("features",), 0, LABELS)


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


def scene_map(seed: int = EVAL_SEED_START + 9_000_003) -> torch.Tensor:
    """The default model's Grad-CAM (its served default) of a generated scene."""
    spec = ModelSpec.from_model_dir(ROOT / "models" / "shapes")
    model = load_model(spec, ROOT / "models" / "shapes")
    image = make_scene(seed).image
    inputs = whole_image_transform(spec.input_size, spec.mean, spec.std)(image)[None]
    return CamExtractor(model, spec.input_size)(inputs, method=spec.method).maps[0, 0]


def grids() -> dict[str, torch.Tensor]:
    return {
        "blobs 16x16": blobs(16, 0),
        "blobs 7x7": blobs(7, 1),
        "rand 16x16": torch.rand(16, 16, generator=torch.Generator().manual_seed(2)),
        "scene": scene_map(),
    }


# --- timing ---


def answer_bytes(cam: dict) -> int:
    return len(json.dumps({"cam": cam}, separators=(",", ":")))


def compare(grid: torch.Tensor, size: tuple[int, int], rounds: int) -> dict:
    """Old and new answer: median times, bytes, whether peak and box agree, and how many pixels differ."""
    old, new = old_cam_json(grid, size), new_cam_json(grid, size)  # also the warm-up
    assert (old["peak"], old["bbox"]) == (new["peak"], new["bbox"]), (old["peak"], old["bbox"], new["peak"], new["bbox"])
    old_pixels, new_pixels = decode_heatmap(old["heatmap"]).astype(int), decode_heatmap(new["heatmap"]).astype(int)
    levels_apart = np.abs(old_pixels - new_pixels) // HEATMAP_STEP
    assert levels_apart.max() <= 1, levels_apart.max()
    times: dict[str, list[float]] = {"old": [], "new": []}
    runs: list[tuple[str, Callable]] = [("old", old_cam_json), ("new", new_cam_json)]
    for round_ in range(rounds):
        for name, run in runs if round_ % 2 else runs[::-1]:  # each goes first in half the rounds
            start = time.perf_counter()
            json.dumps(run(grid, size))
            times[name].append(time.perf_counter() - start)
    return {
        "old": statistics.median(times["old"]) * 1e3,
        "new": statistics.median(times["new"]) * 1e3,
        "png": (len(base64.b64decode(old["heatmap"])), len(base64.b64decode(new["heatmap"]))),
        "body": (answer_bytes(old), answer_bytes(new)),
        "differ": int((levels_apart > 0).sum()),
        "max_levels": int(levels_apart.max()),
    }


def timed(function: Callable[[], object], rounds: int) -> float:
    function()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1e3


def steps_table(rounds: int) -> None:
    print("\n### The new answer step by step (median ms)\n")
    print("| map | size | peak + box | PNG: resize + round | PNG: filter + zlib-ng | base64 + JSON | PNG bytes |")
    print("|---|---|---|---|---|---|---|")
    for name, grid in grids().items():
        small = grid.numpy() * np.float32(HEATMAP_LEVELS)
        for width, height in SIZES:
            png = heatmap_png_of_grid(grid, (width, height))
            levels = lambda: cv2.convertScaleAbs(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR))  # noqa: E731
            resize_ms = timed(levels, rounds)
            cells = [
                timed(lambda: peak_and_box(grid, (width, height)), rounds),
                resize_ms,
                timed(lambda: heatmap_png_of_grid(grid, (width, height)), rounds) - resize_ms,
                timed(lambda: json.dumps({"heatmap": base64.b64encode(png).decode("ascii")}), rounds),
            ]
            print(f"| {name} | {width}x{height} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {len(png):,} |")


def alternatives_table(rounds: int) -> None:
    """The candidates for each step of the new PNG, on the scene map and the blob map."""
    print("\n### Candidates: upsampling the grid to 8-bit levels (median ms; pixels off by one level vs the old path)\n")
    print("| map | size | torch float (old) | torch uint8 | PIL 'L' | PIL 'F' | OpenCV float (chosen) |")
    print("|---|---|---|---|---|---|---|")
    maps = grids()
    for name, grid in (("scene", maps["scene"]), ("blobs 16x16", maps["blobs 16x16"])):
        for width, height in SIZES[1:]:
            small = grid.numpy() * np.float32(HEATMAP_LEVELS)
            reference = np.rint(upsample_map(grid, (width, height)).numpy() * HEATMAP_LEVELS)
            small8 = np.rint(small * (255 / HEATMAP_LEVELS)).astype(np.uint8)  # 256 levels in, then back to 64
            candidates = {
                "torch float": lambda: np.rint(
                    F.interpolate(grid[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1).numpy()
                    * HEATMAP_LEVELS
                ),
                "torch uint8": lambda: np.rint(
                    F.interpolate(torch.from_numpy(small8)[None, None], size=(height, width), mode="bilinear", align_corners=False)[
                        0, 0
                    ].numpy()
                    * (HEATMAP_LEVELS / 255)
                ),
                "PIL L": lambda: np.rint(
                    np.asarray(Image.fromarray(small8, "L").resize((width, height), Image.Resampling.BILINEAR)) * (HEATMAP_LEVELS / 255)
                ),
                "PIL F": lambda: np.rint(np.asarray(Image.fromarray(small, "F").resize((width, height), Image.Resampling.BILINEAR))),
                "OpenCV": lambda: cv2.convertScaleAbs(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)),
            }
            cells = []
            for candidate in candidates.values():
                off = int((candidate() != reference).sum())
                cells.append(f"{timed(candidate, rounds):.2f} ({off:,} off)")
            print(f"| {name} | {width}x{height} | " + " | ".join(cells) + " |")
    print("\n### Candidates: compressing the same filtered rows (KB / median ms)\n")
    compressors: dict[str, Callable[[np.ndarray], bytes]] = {
        "zlib 1 (old)": functools.partial(_zlib, level=1),
        "zlib 6": functools.partial(_zlib, level=6),
        **{f"zlib-ng {level}": functools.partial(_zlib_ng, level=level) for level in (1, 2, 3, 4, 5, 6)},
    }
    print("| map | size | PIL PNG level 6 | " + " | ".join(compressors) + " |")
    print("|---|---|---|" + "---|" * len(compressors))
    for name, grid in grids().items():
        for width, height in SIZES[1:]:
            levels = cv2.convertScaleAbs(
                cv2.resize(grid.numpy() * np.float32(HEATMAP_LEVELS), (width, height), interpolation=cv2.INTER_LINEAR)
            )
            grey = levels * np.uint8(HEATMAP_STEP)
            rows = np.empty((height, width + 1), dtype=np.uint8)
            rows[:, 0] = 1
            rows[:, 1] = grey[:, 0]
            np.subtract(grey[:, 1:], grey[:, :-1], out=rows[:, 2:])

            def pil_png() -> bytes:
                buffer = io.BytesIO()
                Image.fromarray(grey, "L").save(buffer, format="PNG", compress_level=6)
                return buffer.getvalue()

            cells = [f"{len(pil_png()) / 1e3:.1f} / {timed(pil_png, rounds):.2f}"]
            cells += [f"{len(compress(rows)) / 1e3:.1f} / {timed(lambda: compress(rows), rounds):.2f}" for compress in compressors.values()]
            print(f"| {name} | {width}x{height} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as one TorchServe worker thread)")
    parser.add_argument("--steps", action="store_true", help="also time the new answer step by step")
    parser.add_argument("--alternatives", action="store_true", help="also time the candidates for the PNG's steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"### cam_json, old -> new (median ms over {args.rounds} alternating rounds; torch threads {args.threads})\n")
    print(
        "| map | size | old ms | new ms | speed-up | PNG bytes old -> new | answer bytes old -> new | same peak and box | "
        "pixels one level off |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, grid in grids().items():
        for width, height in SIZES:
            r = compare(grid, (width, height), args.rounds)
            print(
                f"| {name} | {width}x{height} | {r['old']:.2f} | {r['new']:.2f} | {r['old'] / r['new']:.1f}x"
                f" | {r['png'][0]:,} -> {r['png'][1]:,} | {r['body'][0]:,} -> {r['body'][1]:,} | yes"
                f" | {r['differ']:,} of {width * height:,} |",
                flush=True,
            )
    if args.steps:
        steps_table(args.rounds)
    if args.alternatives:
        alternatives_table(max(5, args.rounds // 4))


if __name__ == "__main__":
    main()
