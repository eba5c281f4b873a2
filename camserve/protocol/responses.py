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
from typing import Any

import numpy as np
from PIL import Image, ImageOps
import torch
from torch import Tensor

from camserve.cam.localization import bounding_box, peak, upsample_map
from camserve.protocol.options import Options


HEATMAP_STEP = 4  # 64 grey levels: indistinguishable in a heat map, and about 40 % fewer PNG bytes than 256


def heatmap_png(heatmap: Tensor) -> bytes:
    """A (H, W) map in [0, 1] as an 8-bit grayscale PNG (values quantised to multiples of HEATMAP_STEP)."""
    pixels = ((heatmap.clamp(0, 1) * (255 // HEATMAP_STEP)).round() * HEATMAP_STEP).to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def predictions_json(probabilities: Tensor, labels: list[str], topk: int) -> list[dict[str, Any]]:
    values, indices = probabilities.topk(min(topk, probabilities.numel()))
    return [{"index": int(i), "label": labels[int(i)], "probability": round(float(p), 6)} for p, i in zip(values, indices)]


def cam_json(grid: Tensor, size: tuple[int, int], method: str, layers: tuple[str, ...], index: int, labels: list[str]) -> dict[str, Any]:
    """The map of one class for one image: upsampled to the original `size` (width, height), PNG, box and peak."""
    heatmap = upsample_map(grid, size)
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
    maps: Tensor,
    targets: Tensor,
    size: tuple[int, int],
    method: str | None,
    layers: tuple[str, ...],
    labels: list[str],
    image: Image.Image | None = None,
    explain: bool = False,
) -> tuple[Any, str]:
    """One request's answer and its content type.

    `maps` (T, h, w) and `targets` (T,) hold the maps of the requested classes (none for a plain prediction).
    `explain` (the /explanations route) answers the map payload alone, without predictions.
    """
    if options.output == "overlay" and image is not None and len(maps):
        return overlay_image(image, maps[0], options.image_format), f"image/{options.image_format}"
    body: dict[str, Any] = {} if explain else {"predictions": predictions_json(probabilities, labels, options.topk)}
    if method is not None and options.output != "none" and len(maps):
        if options.output == "grid":
            cams = [cam_grid_json(grid, method, layers, int(t), labels) for grid, t in zip(maps, targets)]
        else:
            cams = [cam_json(grid, size, method, layers, int(t), labels) for grid, t in zip(maps, targets)]
        body["cam"] = cams[0] if len(cams) == 1 else cams
    return body, "application/json"


def decode_heatmap(encoded: str) -> np.ndarray:
    """Client side: the base64 PNG back to a (H, W) uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
