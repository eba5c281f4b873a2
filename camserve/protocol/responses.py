"""Response encoding: predictions and maps -> the JSON body clients read. No model, no TorchServe.

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
from PIL import Image
import torch
from torch import Tensor

from camserve.cam.localization import bounding_box, peak, upsample_map


def heatmap_png(heatmap: Tensor) -> bytes:
    """A (H, W) map in [0, 1] as an 8-bit grayscale PNG."""
    pixels = (heatmap.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=False, compress_level=6)
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


def decode_heatmap(encoded: str) -> np.ndarray:
    """Client side: the base64 PNG back to a (H, W) uint8 array."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))
