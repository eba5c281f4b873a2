"""config/production.properties on a real TorchServe: tokens are required, registering models is refused."""

from __future__ import annotations

import json

import pytest
import requests
from support import ROOT, SHAPES_MAR, png_bytes, start_server, stopped_after

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def production_server(tmp_path_factory: pytest.TempPathFactory):
    with stopped_after(
        start_server(tmp_path_factory.mktemp("production"), {"shapes": SHAPES_MAR}, config=ROOT / "config" / "production.properties")
    ) as server:
        yield server


def test_inference_needs_the_token(production_server, scenes) -> None:
    url = f"{production_server.inference_url}/predictions/shapes"
    image = png_bytes(scenes[0].image)
    assert production_server.inference_key(), "token authorization is on, so TorchServe wrote a key file"
    missing = requests.post(url, data=image, timeout=60)
    wrong = requests.post(url, data=image, headers={"Authorization": "Bearer not-the-key"}, timeout=60)
    # TorchServe 0.12's token plugin answers 400 InvalidKeyException, not 401/403, and a handler cannot change
    # that (docs/protocol.md says so); this assertion makes any change of TorchServe's visible.
    for refused in (missing, wrong):
        assert refused.status_code == 400, refused.text
        assert refused.json()["type"] == "InvalidKeyException", refused.text
    right = requests.post(url, data=image, headers=production_server.auth_headers(), timeout=60)
    assert right.status_code == 200
    assert right.json()["cam"]["method"] == "gradcam"


def test_registering_a_model_is_refused(production_server) -> None:
    keys = json.loads((production_server.run_dir / "key_file.json").read_text())
    response = requests.post(
        f"{production_server.management_url}/models",
        params={"url": "shapes.mar", "model_name": "another"},
        headers={"Authorization": f"Bearer {keys['management']['key']}"},
        timeout=60,
    )
    assert response.status_code >= 400
    assert (
        "another"
        not in requests.get(
            f"{production_server.management_url}/models", headers={"Authorization": f"Bearer {keys['management']['key']}"}, timeout=60
        ).text
    )


def test_a_hostile_request_with_a_valid_token_gets_its_4xx_from_the_same_worker(production_server, scenes) -> None:
    url = f"{production_server.inference_url}/predictions/shapes"
    (worker,) = production_server.worker_pids()
    for headers in ({"X-CAM-Target": "café".encode()}, {"X-CAM-Target": "<script>"}, {"X-CAM-Maps": "²".encode()}):
        response = requests.post(url, data=png_bytes(scenes[0].image), headers={**production_server.auth_headers(), **headers}, timeout=60)
        assert response.status_code == 400, response.text
        assert response.reason == "Bad Request", response.text
        assert response.json()["option"] in ("target", "maps")
    assert requests.post(url, data=png_bytes(scenes[1].image), headers=production_server.auth_headers(), timeout=60).status_code == 200
    assert production_server.worker_pids() == [worker]


def test_metrics_and_every_port_listen_on_loopback_only(production_server) -> None:
    config = (production_server.run_dir / "config.properties").read_text()
    addresses = [line.split("=", 1)[1] for line in config.splitlines() if line.split("=", 1)[0].endswith("_address")]
    assert addresses, addresses
    assert all("127.0.0.1" in address for address in addresses), addresses


def test_api_description_is_open_but_names_no_model_and_no_key(production_server) -> None:
    """TorchServe 0.12 answers /api-description (and OPTIONS /) before its token check, and no setting turns it off:
    docs/deploy.md says to block it where clients enter. It lists TorchServe's generic routes only."""
    keys = json.loads((production_server.run_dir / "key_file.json").read_text())
    for response in (
        requests.get(f"{production_server.inference_url}/api-description", timeout=30),
        requests.options(f"{production_server.inference_url}/", timeout=30),
    ):
        assert response.status_code == 200
        assert "openapi" in response.json()
        assert "shapes" not in response.text
        assert not any(entry["key"] in response.text for entry in keys.values() if isinstance(entry, dict) and "key" in entry)
