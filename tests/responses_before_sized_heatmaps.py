# ruff: noqa
# fmt: off
"""FROZEN REFERENCE, not used by camserve: camserve/protocol/responses.py exactly as it was before the heat map
was sized by the model input by default (commit 8358c3f), below this docstring line for line.

tests/test_map_answer.py pins `heatmap_size=original` to it: for the same maps and the same request, today's
`original` answer must be these bytes. A recorded answer would pin the bytes of one machine's OpenCV and zlib-ng
builds instead; this code computes the reference on the machine that runs the test. Never edit it to make a test
pass: a difference is a change of the answer.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from zlib_ng import zlib_ng

from camserve.cam.localization import peak_and_box, upsample_map
from camserve.protocol.options import Options

# A worker's answer is encoded on the core that runs its forward pass (one torch thread per worker; TorchServe
# scales by workers): OpenCV's own thread pool would only compete with the other workers.
cv2.setNumThreads(1)

HEATMAP_STEP = 4  # 64 grey levels: indistinguishable in a heat map, and about 40 % fewer PNG bytes than 256
HEATMAP_LEVELS = 255 // HEATMAP_STEP
# zlib-ng's level 2 (its fast strategy) takes a third to a half of level 4's time on these rows for 20-35 % more
# bytes, and keeps every default 640x480 answer of the photo pool within 16 KB (docs/benchmarks.md).
HEATMAP_COMPRESS_LEVEL = 2

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_SUB = 1  # PNG filter type 1: each byte minus the byte to its left


def heatmap_png_of_grid(grid: Tensor | np.ndarray, size: tuple[int, int]) -> bytes:
    """The map `grid` (h, w) in [0, 1] at `size` (width, height) as an 8-bit grayscale PNG, 64 levels.

    The pixels of upsample_map(grid, size) rounded to 64 levels, give or take one level where float rounding
    puts a value on a level boundary (about one pixel in a million), at a fraction of the cost
    (scripts/bench_encoding.py):
    - OpenCV's SIMD bilinear resize (same sampling as torch's align_corners=False) of the grid already
      scaled to levels, then rounded to uint8 levels in one pass: no float map at full size in between.
    - Every row gets PNG's Sub filter, in one numpy pass; then zlib-ng at HEATMAP_COMPRESS_LEVEL, which gives
      fewer bytes than stdlib zlib's level 1 in less than half its time on these rows.
    """
    width, height = size
    small = np.nan_to_num(grid.detach().cpu().float().numpy() if isinstance(grid, Tensor) else np.asarray(grid, dtype=np.float32))
    small = np.clip(small, 0, 1) * np.float32(HEATMAP_LEVELS)
    levels = cv2.convertScaleAbs(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR))  # rounds half to even
    if levels.ndim == 1:  # OpenCV drops a dimension of size 1
        levels = levels.reshape(height, width)
    return _png(_sub_filtered(levels), HEATMAP_COMPRESS_LEVEL)


def _sub_filtered(levels: np.ndarray) -> np.ndarray:
    """PNG rows (h, w + 1) of grey values HEATMAP_STEP x `levels`: the Sub filter type, then each byte minus its left."""
    height, width = levels.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 1] = levels[:, 0]
    np.subtract(levels[:, 1:], levels[:, :-1], out=rows[:, 2:])  # modulo 256, as PNG's filters are
    rows *= np.uint8(HEATMAP_STEP)  # (a - b) x 4 = 4a - 4b modulo 256: filtering levels is filtering grey values
    rows[:, 0] = _PNG_SUB
    return rows


def _png(rows: np.ndarray, compress_level: int) -> bytes:
    """An 8-bit greyscale PNG from its filtered rows (h, w + 1)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    height, width = rows.shape[0], rows.shape[1] - 1
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, greyscale, deflate, filters, no interlace
    return b"".join((_PNG_SIGNATURE, chunk(b"IHDR", header), chunk(b"IDAT", zlib_ng.compress(rows, compress_level)), chunk(b"IEND", b"")))


def predictions_json(probabilities: Tensor, labels: list[str], topk: int) -> list[dict[str, Any]]:
    values, indices = probabilities.topk(min(topk, probabilities.numel()))
    return [{"index": int(i), "label": labels[int(i)], "probability": round(float(p), 6)} for p, i in zip(values, indices)]


def cam_json(
    grid: Tensor,
    size: tuple[int, int],
    method: str,
    layers: tuple[str, ...],
    index: int,
    labels: list[str],
    heatmap_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The map of one class for one image: PNG at `heatmap_size` (default: the original `size`), box and peak.

    Peak and box are those of the map upsampled to the original size (camserve.cam.localization.peak_and_box),
    whatever the heat map's size. On the CPU whatever the grid's device: the grid is small.
    """
    grid = grid.detach().cpu()
    heatmap_size = heatmap_size or size
    (x, y), box = peak_and_box(grid, size)
    return {
        "method": method,
        "layer": layers[0] if len(layers) == 1 else list(layers),
        "index": index,
        "label": labels[index],
        "size": list(size),
        "heatmap_size": list(heatmap_size),
        "heatmap": base64.b64encode(heatmap_png_of_grid(grid, heatmap_size)).decode("ascii"),
        "bbox": list(box),
        "peak": [x, y],
    }


def cam_grid_json(grid: Tensor, method: str, layers: tuple[str, ...], index: int, labels: list[str]) -> dict[str, Any]:
    """The map at the layer's own resolution as floats in [0, 1] (output=grid): for clients that post-process."""
    return {
        "method": method,
        "layer": layers[0] if len(layers) == 1 else list(layers),
        "index": index,
        "label": labels[index],
        "shape": list(grid.shape),
        "grid": [[round(float(v), 4) for v in row] for row in grid],
    }


def overlay_image(image: Image.Image, grid: Tensor, image_format: str) -> bytes:
    """The heat map (blue -> yellow -> red) over the original image, encoded as PNG or JPEG.

    Each pixel's opacity follows the map (at most 70 %), so cold regions show the image as it is.
    """
    heatmap = upsample_map(grid, image.size)
    gray = Image.fromarray((heatmap * 255).round().to(torch.uint8).cpu().numpy(), mode="L")
    coloured = ImageOps.colorize(gray, black="#0000ff", mid="#ffff00", white="#ff0000")
    blended = Image.composite(coloured, image.convert("RGB"), gray.point(lambda v: int(v * 0.7)))
    buffer = io.BytesIO()
    blended.save(buffer, format="JPEG" if image_format == "jpeg" else "PNG", quality=90)
    return buffer.getvalue()


def heatmap_png_size(option: str | int, size: tuple[int, int], input_size: tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) of the heat map PNG for Options.heatmap_size, given the image `size` (width, height).

    `input`: the model input's size (`input_size` is (height, width), as in model-config.yaml). A side in pixels:
    the image's size scaled so that its longest side is that many pixels (aspect ratio kept, never enlarged).
    """
    if option == "input":
        return size if input_size is None else (input_size[1], input_size[0])
    if option == "original":
        return size
    width, height = size
    scale = min(1.0, int(option) / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_answer(
    options: Options,
    probabilities: Tensor,
    maps: Tensor | None,
    targets: list[int],
    size: tuple[int, int],
    layers: tuple[str, ...],
    labels: list[str],
    image: Image.Image | None = None,
    explain: bool = False,
    input_size: tuple[int, int] | None = None,
) -> tuple[Any, str]:
    """One request's answer and its content type.

    `maps` (T, h, w) and `targets` (T classes) are the maps of the requested classes (None for a plain prediction).
    `explain` (the /explanations route) answers the map payload alone, without predictions. `input_size` (the
    model's, (height, width)) serves heatmap_size=input.
    """
    if options.output == "overlay" and image is not None and maps is not None and len(maps):
        return overlay_image(image, maps[0], options.image_format), f"image/{options.image_format}"
    body: dict[str, Any] = {} if explain else {"predictions": predictions_json(probabilities, labels, options.topk)}
    method = options.method
    if method is not None and maps is not None and options.output != "none" and len(maps):
        if options.output == "grid":
            cams = [cam_grid_json(grid, method, layers, t, labels) for grid, t in zip(maps, targets)]
        else:
            png_size = heatmap_png_size(options.heatmap_size, size, input_size)
            cams = [cam_json(grid, size, method, layers, t, labels, png_size) for grid, t in zip(maps, targets)]
        body["cam"] = cams[0] if len(cams) == 1 else cams
    return body, "application/json"


def json_bytes(body: Any) -> bytes:
    """A JSON answer as compact bytes: what the client receives when the handler returns it as bytes."""
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def answer_size(answer: Any) -> int:
    """The bytes of an answer as sent: bytes as they are, a JSON body serialised compactly."""
    return len(answer) if isinstance(answer, (bytes, bytearray)) else len(json_bytes(answer))


def decode_heatmap(encoded: str) -> np.ndarray:
    """Client side: the base64 PNG back to a (H, W) uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
