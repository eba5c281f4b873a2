"""Pictures for people: the endpoint's overlay drawn from an answer's heat map, and evaluation's boxes on top."""

from __future__ import annotations

import io
from collections.abc import Sequence

GROUND_TRUTH_COLOUR = (0, 220, 0)
MAP_BOX_COLOUR = (255, 255, 255)


def heatmap_overlay(body: bytes, heatmap_png: bytes) -> bytes:
    """The endpoint's overlay (camserve.protocol.responses.overlay_image), drawn from the answer's heat map (scaled
    to the image), so an offline run gets the JSON *and* the picture from one pass through the handler."""
    import numpy as np
    import torch
    from PIL import Image

    from camserve.protocol.decoding import decode_image
    from camserve.protocol.responses import overlay_image

    image, _ = decode_image(body)  # full size, EXIF orientation applied: the map's own geometry
    heatmap = torch.from_numpy(np.asarray(Image.open(io.BytesIO(heatmap_png)), dtype=np.float32) / 255.0)
    return overlay_image(image, heatmap, "png")


def annotated_overlay(
    body: bytes,
    heatmap_png: bytes,
    truth: Sequence[Sequence[float]],
    map_box: Sequence[int] | None,
    peak: Sequence[int] | None,
    caption: str,
) -> bytes:
    """The overlay with the ground-truth boxes (green), the map's box (white), its peak (a cross) and a caption; an
    empty map has neither box nor peak to draw."""
    from PIL import Image, ImageDraw

    image = Image.open(io.BytesIO(heatmap_overlay(body, heatmap_png))).convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(2, min(image.size) // 150)
    for x0, y0, x1, y1 in truth:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=GROUND_TRUTH_COLOUR, width=width)
    if map_box is not None:
        x0, y0, x1, y1 = map_box
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=MAP_BOX_COLOUR, width=width)
    if peak is not None:
        x, y = peak
        arm = 4 * width
        draw.line([x - arm, y, x + arm, y], fill=MAP_BOX_COLOUR, width=width)
        draw.line([x, y - arm, x, y + arm], fill=MAP_BOX_COLOUR, width=width)
    draw.rectangle([0, 0, min(image.width, 8 + 7 * len(caption)), 14], fill=(0, 0, 0))
    draw.text((4, 2), caption, fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
