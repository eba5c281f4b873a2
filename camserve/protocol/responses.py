"""Response encoding: predictions and maps -> the body clients read (JSON, or an overlay image). No model, no TorchServe.

    {"predictions": [{"index": 2, "label": "triangle", "probability": 0.97}, ...],
     "cam": {"method": "gradcam", "layer": "features", "index": 2, "label": "triangle",
             "size": [width, height], "heatmap": "<base64 8-bit grayscale PNG, width x height>",
             "bbox": [x0, y0, x1, y1], "peak": [x, y]}}

Coordinates are original-image pixels; bbox's x1, y1 are exclusive.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageOps
import torch
from torch import Tensor

from camserve.cam.localization import bounding_box, peak, upsample_map
from camserve.protocol.options import Options


HEATMAP_STEP = 4  # 64 grey levels: indistinguishable in a heat map, and about 40 % fewer PNG bytes than 256
HEATMAP_COMPRESS_LEVEL = 1  # zlib level of the heat map PNG: see heatmap_png

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_SUB = 1  # PNG filter type 1: each byte minus the byte to its left
_BAND_PIXELS = 65536  # heatmap_png quantises bands of rows of about this many pixels (256 KB of float32)


def heatmap_png(heatmap: Tensor) -> bytes:
    """A (H, W) map in [0, 1] as an 8-bit grayscale PNG (values quantised to multiples of HEATMAP_STEP).

    The same pixels as before, but no longer encoded by PIL, whose encoder was most of a map's cost
    (scripts/bench_encoding.py, one torch thread, medians of one run on a shared 2-core machine):
    - Rows are quantised in bands small enough to stay in cache: at 1280x960, 2 ms less than running each
      numpy operation over the whole map.
    - Every row gets PNG's Sub filter, in one numpy pass. PIL tries several filters on every row: even at
      compress_level 1 it takes 2-3x as long as this encoder at level 1, for about the same bytes.
    - zlib level 1 (HEATMAP_COMPRESS_LEVEL), not PIL's 6: level 6 takes 3-6x as long on these rows. Level 1
      gives about twice the old bytes for a blob map (23 KB instead of 11 KB at 640x480, 62 KB instead of
      27 KB at 1280x960) and 1.15-1.5x for a noisy one. Level 3 would give 22-30 % fewer bytes than level 1
      for blob maps, at +0.4 to +1.3 ms (+3 to +7 ms for noisy ones). The extra 35 KB (47 KB in base64) is
      0.4 ms on a 1 Gbit/s link: we spend bytes rather than CPU.
    With quantising, a blob map's PNG now takes 1.6-1.8 ms instead of 7.5-10 ms at 640x480, and 5-5.6 ms
    instead of 22-30 ms at 1280x960.
    """
    values = heatmap.detach().cpu().numpy()
    height, width = values.shape
    levels = 255 // HEATMAP_STEP
    rows = np.empty((height, width + 1), dtype=np.uint8)  # each row: its filter type, then its bytes
    band = max(1, _BAND_PIXELS // max(width, 1))
    scaled = np.empty((min(band, height), width), dtype=values.dtype)
    pixels = np.empty(scaled.shape, dtype=np.uint8)
    for top in range(0, height, band):
        count = min(band, height - top)
        level, grey = scaled[:count], pixels[:count]
        np.multiply(values[top : top + count], levels, out=level)
        np.clip(level, 0, levels, out=level)
        np.rint(level, out=level)  # half to even, as torch.round
        np.copyto(grey, level, casting="unsafe")
        grey *= np.uint8(HEATMAP_STEP)
        _sub_filter(grey, rows[top : top + count])
    return _png(rows, HEATMAP_COMPRESS_LEVEL)


def _sub_filter(pixels: np.ndarray, rows: np.ndarray) -> None:
    """PNG's Sub filter of (h, w) `pixels` into (h, w + 1) `rows`: the filter type, then each byte minus its left."""
    rows[:, 0] = _PNG_SUB
    rows[:, 1] = pixels[:, 0]
    np.subtract(pixels[:, 1:], pixels[:, :-1], out=rows[:, 2:])  # modulo 256, as PNG's filters are


def _png(rows: np.ndarray, compress_level: int) -> bytes:
    """An 8-bit greyscale PNG from its filtered rows (h, w + 1)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    height, width = rows.shape[0], rows.shape[1] - 1
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, greyscale, deflate, filters, no interlace
    return b"".join((_PNG_SIGNATURE, chunk(b"IHDR", header), chunk(b"IDAT", zlib.compress(rows, compress_level)), chunk(b"IEND", b"")))


def predictions_json(probabilities: Tensor, labels: list[str], topk: int) -> list[dict[str, Any]]:
    values, indices = probabilities.topk(min(topk, probabilities.numel()))
    return [{"index": int(i), "label": labels[int(i)], "probability": round(float(p), 6)} for p, i in zip(values, indices)]


def cam_json(grid: Tensor, size: tuple[int, int], method: str, layers: tuple[str, ...], index: int, labels: list[str]) -> dict[str, Any]:
    """The map of one class for one image: upsampled to the original `size` (width, height), PNG, box and peak.

    On the CPU whatever the grid's device: the grid is small, and peak, box and PNG read the full-size map
    from host memory anyway.
    """
    heatmap = upsample_map(grid.cpu(), size)
    return {
        "method": method,
        "layer": layers[0] if len(layers) == 1 else list(layers),
        "index": index,
        "label": labels[index],
        "size": list(size),
        "heatmap": base64.b64encode(heatmap_png(heatmap)).decode("ascii"),
        "bbox": list(bounding_box(heatmap)),
        "peak": list(peak(heatmap)),
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
) -> tuple[Any, str]:
    """One request's answer and its content type.

    `maps` (T, h, w) and `targets` (T classes) are the maps of the requested classes (None for a plain prediction).
    `explain` (the /explanations route) answers the map payload alone, without predictions.
    """
    if options.output == "overlay" and image is not None and maps is not None and len(maps):
        return overlay_image(image, maps[0], options.image_format), f"image/{options.image_format}"
    body: dict[str, Any] = {} if explain else {"predictions": predictions_json(probabilities, labels, options.topk)}
    method = options.method
    if method is not None and maps is not None and options.output != "none" and len(maps):
        if options.output == "grid":
            cams = [cam_grid_json(grid, method, layers, t, labels) for grid, t in zip(maps, targets)]
        else:
            cams = [cam_json(grid, size, method, layers, t, labels) for grid, t in zip(maps, targets)]
        body["cam"] = cams[0] if len(cams) == 1 else cams
    return body, "application/json"


def answer_size(answer: Any) -> int:
    """The bytes of an answer as sent: an image as it is, a JSON body serialised compactly."""
    if isinstance(answer, (bytes, bytearray)):
        return len(answer)
    return len(json.dumps(answer, separators=(",", ":")))


def decode_heatmap(encoded: str) -> np.ndarray:
    """Client side: the base64 PNG back to a (H, W) uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
