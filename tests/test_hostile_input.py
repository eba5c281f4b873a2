"""A corpus of hostile and broken inputs against the real TorchServe: each gets its expected outcome, never a 5xx,
and the worker survives (the next good request is answered by the same worker process)."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image
from support import encoded, png_bytes, png_declaring

pytestmark = pytest.mark.server


def corrupt_png_chunk(image: Image.Image) -> bytes:
    data = bytearray(encoded(image, "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8 : idat + 40] = b"\xff" * 32  # scrambled compressed data, CRC now wrong
    return bytes(data)


def rgb(size=(200, 150), colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(rgb((300, 200)), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [rgb(colour=(i * 40, 0, 0)) for i in range(3)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


def multipage_tiff() -> bytes:
    return encoded(rgb(), "TIFF", save_all=True, append_images=[rgb(colour=(0, 0, 200))])


def palette_with_transparency() -> bytes:
    image = rgb().convert("P")
    return encoded(image, "PNG", transparency=0)


# name -> (body, headers, expected status, expected error type or None)
CORPUS = {
    "empty body": (b"", {}, 400, None),
    "plain text": (b"hello, this is text", {"Content-Type": "text/plain"}, 400, "invalid_base64"),
    "html": (b"<html><body>hi</body></html>", {}, 400, "invalid_image"),
    "truncated jpeg": (lambda: encoded(rgb(), "JPEG")[:200], {}, 400, "invalid_image"),
    "corrupt png chunk": (lambda: corrupt_png_chunk(rgb()), {}, 400, "invalid_image"),
    "wrong magic bytes": (lambda: b"GIF00" + encoded(rgb(), "PNG")[5:], {}, 400, "invalid_image"),
    "huge declared dimensions": (lambda: png_declaring(50_000, 50_000), {}, 413, "image_too_large"),
    "invalid base64": (json.dumps({"data": "!!!not base64!!!"}).encode(), {"Content-Type": "application/json"}, 400, "invalid_base64"),
    "invalid json": (b'{"data": ', {"Content-Type": "application/json"}, 400, "invalid_json"),
    "json without data": (json.dumps({"image": "x"}).encode(), {"Content-Type": "application/json"}, 400, "missing_image"),
    "unknown option": (lambda: encoded(rgb(), "PNG"), {"X-CAM-Colour": "red"}, 400, "unknown_option"),
    "unknown method": (lambda: encoded(rgb(), "PNG"), {"X-CAM-Method": "magic"}, 400, "invalid_option"),
    "out-of-range class": (lambda: encoded(rgb(), "PNG"), {"X-CAM-Target": "99"}, 400, "invalid_option"),
    "unknown label": (lambda: encoded(rgb(), "PNG"), {"X-CAM-Target": "dog"}, 400, "invalid_option"),
    "unknown layer": (lambda: encoded(rgb(), "PNG"), {"X-CAM-Layer": "nowhere"}, 400, "invalid_option"),
    "non-numeric topk": (lambda: encoded(rgb(), "PNG"), {"X-CAM-Topk": "lots"}, 400, "invalid_option"),
    # valid, if unusual, images: answered
    "1x1 image": (lambda: encoded(rgb((1, 1)), "PNG"), {}, 200, None),
    "16-bit png": (lambda: encoded(Image.new("I;16", (120, 90), 40000), "PNG"), {}, 200, None),
    "cmyk jpeg": (lambda: encoded(rgb().convert("CMYK"), "JPEG"), {}, 200, None),
    "palette png with transparency": (palette_with_transparency, {}, 200, None),
    "animated gif": (animated_gif, {}, 200, None),
    "multi-page tiff": (multipage_tiff, {}, 200, None),
    "grayscale": (lambda: encoded(rgb().convert("L"), "PNG"), {}, 200, None),
    "exif-rotated jpeg": (exif_rotated, {}, 200, None),
    "webp": (lambda: encoded(rgb(), "WEBP"), {}, 200, None),
    "bmp": (lambda: encoded(rgb(), "BMP"), {}, 200, None),
    "base64 json": (
        lambda: json.dumps({"data": base64.b64encode(encoded(rgb(), "PNG")).decode()}).encode(),
        {"Content-Type": "application/json"},
        200,
        None,
    ),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_input_gets_its_expected_outcome(predict, scenes, name: str) -> None:
    body, headers, status, kind = CORPUS[name]
    payload = body() if callable(body) else body
    response = predict(payload, headers=headers)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    if status != 200:
        error = response.json()
        assert error["code"] == status
        assert error["message"]
        if kind:
            assert error["type"] == kind, error
    elif name == "exif-rotated jpeg":
        assert response.json()["cam"]["size"] == [200, 300]  # as a viewer shows it
    # the worker is alive and answers the next good request
    assert predict(png_bytes(scenes[0].image)).status_code == 200


def test_no_worker_restarted(engine_server, predict, scenes) -> None:
    """Run last in this module: every bad input above was refused by the handler, not by a crashing worker."""
    assert predict(png_bytes(scenes[1].image)).status_code == 200
    torchserve_log = engine_server.log_dir / "model_log.log"  # KServe's engine has no separate worker to die
    assert not torchserve_log.exists() or "Backend worker process died" not in torchserve_log.read_text()
