"""config/production.properties on a real TorchServe: tokens are required, registering models is refused."""

from __future__ import annotations

import json

import pytest
import requests

from conftest import ROOT, SHAPES_MAR, png_bytes, start_server

pytestmark = [pytest.mark.slow, pytest.mark.serving]


@pytest.fixture(scope="module")
def production_server(tmp_path_factory: pytest.TempPathFactory):
    server = start_server(tmp_path_factory.mktemp("production"), {"shapes": SHAPES_MAR}, config=ROOT / "config" / "production.properties")
    try:
        yield server
    finally:
        server.stop()


def test_inference_needs_the_token(production_server, scenes) -> None:
    url = f"{production_server.inference_url}/predictions/shapes"
    image = png_bytes(scenes[0].image)
    assert production_server.inference_key(), "token authorization is on, so TorchServe wrote a key file"
    missing = requests.post(url, data=image, timeout=60)
    wrong = requests.post(url, data=image, headers={"Authorization": "Bearer not-the-key"}, timeout=60)
    for refused in (missing, wrong):
        assert refused.status_code in (400, 401, 403) and "token" in refused.text.lower()
    right = requests.post(url, data=image, headers=production_server.auth_headers(), timeout=60)
    assert right.status_code == 200 and right.json()["cam"]["method"] == "gradcam"


def test_registering_a_model_is_refused(production_server) -> None:
    keys = json.loads((production_server.run_dir / "key_file.json").read_text())
    response = requests.post(
        f"{production_server.management_url}/models",
        params={"url": "shapes.mar", "model_name": "another"},
        headers={"Authorization": f"Bearer {keys['management']['key']}"},
        timeout=60,
    )
    assert response.status_code >= 400
    assert "another" not in requests.get(f"{production_server.management_url}/models", headers={"Authorization": f"Bearer {keys['management']['key']}"}, timeout=60).text
