"""A real TorchServe, started from model_store/shapes.mar with nothing of the repo on its PYTHONPATH, real HTTP."""

from __future__ import annotations

import base64
import io

import pytest
import requests
from PIL import Image
from support import default_heatmap_size, png_bytes

from camserve.protocol.responses import decode_heatmap

pytestmark = pytest.mark.server


def test_prediction_with_map_points_at_the_object(predict, scenes) -> None:
    hits = correct = 0
    sample = scenes[:12]
    for scene in sample:
        response = predict(png_bytes(scene.image))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        top = body["predictions"][0]
        assert set(top) == {"index", "label", "probability"}
        assert 0 <= top["probability"] <= 1
        cam = body["cam"]
        assert cam["method"] == "gradcam"
        assert cam["layer"] == "features"
        assert cam["size"] == [scene.image.width, scene.image.height]
        width, height = cam["heatmap_size"]
        assert (width, height) == default_heatmap_size(scene.image.size, 192)
        assert decode_heatmap(cam["heatmap"]).shape == (height, width)
        x, y = cam["peak"]
        x0, y0, x1, y1 = scene.box
        correct += top["label"] == scene.name
        hits += x0 <= x < x1 and y0 <= y < y1
    # Loose floors on a small sample, below the committed model's own figures (on 1,000 scenes, in
    # docs/shapes-model.md: 80 % top-1, 69 % pointing) and far above what a broken pipeline gives (chance: 2/12).
    assert correct >= 8, f"{correct}/{len(sample)} correct labels"
    assert hits >= 7, f"{hits}/{len(sample)} peaks inside the true box"


def test_cam_method_from_the_request(predict, scenes) -> None:
    scene = scenes[0]
    response = predict(png_bytes(scene.image), headers={"X-CAM-Method": "cam"})
    assert response.status_code == 200, response.text
    assert response.json()["cam"]["method"] == "cam"


def test_garbage_gets_a_4xx_json_error_and_the_server_keeps_serving(predict, scenes) -> None:
    bad = predict(b"this is not an image at all")
    assert 400 <= bad.status_code < 500
    error = bad.json()
    assert error["type"] == "invalid_image"
    assert "image" in error["message"]
    good = predict(png_bytes(scenes[1].image))
    assert good.status_code == 200
    assert good.json()["predictions"][0]["label"]


def test_options_in_a_json_body(predict, scenes) -> None:
    body = {"data": base64.b64encode(png_bytes(scenes[3].image)).decode(), "method": "cam", "topk": 2}
    response = predict(json=body)
    assert response.status_code == 200, response.text
    assert response.json()["cam"]["method"] == "cam"
    assert len(response.json()["predictions"]) == 2


def test_unknown_option_is_named(predict, scenes) -> None:
    response = predict(png_bytes(scenes[2].image), headers={"X-CAM-Method": "nonsense"})
    assert response.status_code == 400
    assert response.json()["option"] == "method"
    assert "gradcam" in response.json()["message"]


def test_output_kinds(predict, scenes) -> None:
    scene = scenes[4]
    grid = predict(png_bytes(scene.image), headers={"X-CAM-Output": "grid"}).json()["cam"]
    assert grid["shape"] == [24, 24]
    assert len(grid["grid"]) == 24
    assert min(min(row) for row in grid["grid"]) >= 0
    assert max(max(row) for row in grid["grid"]) == 1.0
    none = predict(png_bytes(scene.image), headers={"X-CAM-Output": "none"}).json()
    assert "cam" not in none
    assert none["predictions"]
    overlay = predict(png_bytes(scene.image), headers={"Accept": "image/png"})
    assert overlay.status_code == 200
    assert overlay.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(overlay.content)).size == scene.image.size
    jpeg = predict(png_bytes(scene.image), headers={"X-CAM-Output": "overlay", "X-CAM-Format": "jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert jpeg.content[:2] == b"\xff\xd8"


def test_several_maps_come_as_a_list_in_target_order(predict, scenes) -> None:
    body = predict(png_bytes(scenes[6].image), headers={"X-CAM-Target": "hexagon,0,star"}).json()
    assert [cam["label"] for cam in body["cam"]] == ["hexagon", "circle", "star"]
    top2 = predict(png_bytes(scenes[6].image), headers={"X-CAM-Maps": "2"}).json()
    assert [cam["index"] for cam in top2["cam"]] == [p["index"] for p in top2["predictions"][:2]]


def test_explanations_route_returns_our_map_without_predictions(predict, scenes) -> None:
    response = predict(png_bytes(scenes[7].image), path="explanations/shapes")
    assert response.status_code == 200, response.text
    body = response.json()
    assert "predictions" not in body
    assert body["cam"]["method"] == "gradcam"
    assert len(response.content) < 64_000  # not TorchServe's Integrated-Gradients tensor dump


def test_handler_metrics_on_the_prometheus_endpoint(shapes_server, scenes) -> None:
    url, auth = f"{shapes_server.inference_url}/predictions/shapes", shapes_server.auth_headers()
    assert requests.post(url, data=png_bytes(scenes[8].image), headers={**auth, "X-CAM-Method": "cam"}, timeout=60).status_code == 200
    assert requests.post(url, data=b"not an image", headers=auth, timeout=60).status_code == 400
    text = requests.get(f"{shapes_server.metrics_url}/metrics", timeout=30).text
    expected = ("CamRequests{", 'Method="cam"', 'Output="png"', "CamErrors{", 'Kind="invalid_image"', "CamMapTime{")
    assert [fragment for fragment in expected if fragment not in text] == []


def test_multipart_form_with_options_as_fields(shapes_server, scenes) -> None:
    response = requests.post(
        f"{shapes_server.inference_url}/predictions/shapes",
        files={"file": ("scene.png", png_bytes(scenes[9].image), "image/png")},
        data={"method": "cam", "topk": "1"},
        headers=shapes_server.auth_headers(),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cam"]["method"] == "cam"
    assert len(body["predictions"]) == 1
