"""What TorchServe sends back: compact JSON bytes, and every default answer of the photo pool within 8 KB."""

from __future__ import annotations

import json

import pytest
import requests
from support import IMAGENET_MAR, SHAPES_MAR, default_heatmap_size, png_bytes, start_server, stopped_after

from camserve.protocol.responses import decode_heatmap
from camserve_tools.data.answer_pool import photo_pool

pytestmark = pytest.mark.server

# Bytes of any default JSON answer of the pool, shapes and imagenet, 640x480 and 1280x960 (camserve_tools/bench/answer_size.py).
ANSWER_BUDGET = 8_000


def test_answers_are_compact_json_bytes(predict, scenes) -> None:
    response = predict(png_bytes(scenes[0].image))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    # TorchServe would have written a dict as indented JSON; the handler sends compact bytes instead.
    assert response.content == json.dumps(body, separators=(",", ":")).encode()
    error = predict(b"not an image")
    assert error.status_code == 400
    assert error.content == json.dumps(error.json(), separators=(",", ":")).encode()


def test_heatmap_size_through_torchserve(predict, scenes) -> None:
    scene = scenes[2]
    default = predict(png_bytes(scene.image)).json()["cam"]
    full = predict(png_bytes(scene.image), headers={"X-CAM-Heatmap-Size": "original"}).json()["cam"]
    small = predict(png_bytes(scene.image), headers={"X-CAM-Heatmap-Size": "64"}).json()["cam"]
    assert small["size"] == full["size"] == full["heatmap_size"] == default["size"] == [scene.image.width, scene.image.height]
    assert default["heatmap_size"] == list(default_heatmap_size(scene.image.size, 192))
    width, height = small["heatmap_size"]
    assert max(width, height) == 64
    assert decode_heatmap(small["heatmap"]).shape == (height, width)
    assert (small["peak"], small["bbox"]) == (full["peak"], full["bbox"]) == (default["peak"], default["bbox"])
    from_input = predict(png_bytes(scene.image), headers={"X-CAM-Heatmap-Size": "input"}).json()["cam"]
    assert from_input["heatmap_size"] == [192, 192]  # the default model's input
    assert predict(png_bytes(scene.image), headers={"X-CAM-Heatmap-Size": "auto"}).content == predict(png_bytes(scene.image)).content
    bad = predict(png_bytes(scene.image), headers={"X-CAM-Heatmap-Size": "2"})
    assert bad.status_code == 400
    assert bad.json()["option"] == "heatmap_size"


@pytest.fixture(scope="module")
def both_models(tmp_path_factory: pytest.TempPathFactory):
    if not IMAGENET_MAR.exists():
        pytest.fail(f"{IMAGENET_MAR} is missing: run `make model_store/imagenet.mar` (make test builds it)")
    with stopped_after(
        start_server(tmp_path_factory.mktemp("answer-size-server"), {"shapes": SHAPES_MAR, "imagenet": IMAGENET_MAR})
    ) as server:
        yield server


@pytest.mark.parametrize("size", [(640, 480), (1280, 960)], ids=["640x480", "1280x960"])
@pytest.mark.parametrize("model", ["shapes", "imagenet"])
def test_every_default_answer_of_the_pool_fits_the_budget(both_models, model: str, size: tuple[int, int]) -> None:
    sizes = {}
    for name, body in photo_pool(size).items():
        response = requests.post(
            f"{both_models.inference_url}/predictions/{model}", data=body, headers={"Content-Type": "image/png"}, timeout=120
        )
        assert response.status_code == 200, (name, response.text)
        cam = response.json()["cam"]
        assert cam["size"] == list(size)
        assert cam["heatmap_size"] == list(default_heatmap_size(size, 192 if model == "shapes" else 224))
        sizes[name] = len(response.content)
    assert max(sizes.values()) <= ANSWER_BUDGET, sorted(sizes.items(), key=lambda item: -item[1])[:5]
