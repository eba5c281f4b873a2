"""What TorchServe sends back: compact JSON bytes, and the default answer for a 640x480 photo within 16 KB."""

from __future__ import annotations

import json

import pytest
from conftest import png_bytes

from camserve.protocol.responses import decode_heatmap
from camserve_tools.answer_pool import photo_pool

pytestmark = pytest.mark.serving

ANSWER_BUDGET = 16_000  # bytes of the default JSON answer for a 640x480 image


def test_answers_are_compact_json_bytes(predict, scenes) -> None:
    response = predict(png_bytes(scenes[0].image))
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    body = response.json()
    # TorchServe would have written a dict as indented JSON; the handler sends compact bytes instead.
    assert response.content == json.dumps(body, separators=(",", ":")).encode()
    error = predict(b"not an image")
    assert error.status_code == 400 and error.content == json.dumps(error.json(), separators=(",", ":")).encode()


def test_heatmap_size_through_torchserve(predict, scenes) -> None:
    scene = scenes[2]
    full = predict(png_bytes(scene.image)).json()["cam"]
    small = predict(png_bytes(scene.image), headers={"X-CAM-Heatmap-Size": "64"}).json()["cam"]
    assert small["size"] == full["size"] == full["heatmap_size"] == [scene.image.width, scene.image.height]
    width, height = small["heatmap_size"]
    assert max(width, height) == 64 and decode_heatmap(small["heatmap"]).shape == (height, width)
    assert (small["peak"], small["bbox"]) == (full["peak"], full["bbox"])
    from_input = predict(png_bytes(scene.image), headers={"X-CAM-Heatmap-Size": "input"}).json()["cam"]
    assert from_input["heatmap_size"] == [192, 192]  # the default model's input
    bad = predict(png_bytes(scene.image), headers={"X-CAM-Heatmap-Size": "2"})
    assert bad.status_code == 400 and bad.json()["option"] == "heatmap_size"


def test_default_answer_for_a_640x480_photo_fits_the_budget(predict) -> None:
    sizes = {}
    for name, body in photo_pool((640, 480)).items():
        response = predict(body)
        assert response.status_code == 200, (name, response.text)
        assert response.json()["cam"]["size"] == [640, 480]
        sizes[name] = len(response.content)
    assert max(sizes.values()) <= ANSWER_BUDGET, sorted(sizes.items(), key=lambda item: -item[1])[:5]
