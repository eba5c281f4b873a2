"""`make archive MODEL=<torchvision builder> WEIGHTS=<state-dict file>` archives serve through a real TorchServe.

Weights cannot be downloaded here, so each model is randomly initialised and saved as a local state-dict file,
exactly what a user with their own fine-tuned weights passes. The maps' content is checked against the reference
libraries elsewhere; here what matters is that the archive is self-contained and serves every model family.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests
import torch
from support import ROOT, default_heatmap_size, png_bytes, start_server, stopped_after
from torchvision import models

from camserve.model_spec import ModelSpec
from camserve.protocol.responses import decode_heatmap

pytestmark = pytest.mark.server

# builder -> (expected default layer, whether `cam` applies)
ARCHIVED = {
    "resnet18": ("layer4", True),
    "mobilenet_v3_small": ("features", False),
    "swin_t": ("permute", True),
}
LABELS = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def torchvision_server(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("torchvision-archives")
    (work / "labels.json").write_text(json.dumps({str(i): name for i, name in enumerate(LABELS)}))
    mars = {}
    for builder in ARCHIVED:
        torch.manual_seed(0)
        weights = work / f"{builder}.pth"
        torch.save(models.get_model(builder, weights=None, num_classes=len(LABELS)).state_dict(), weights)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "build_archive.py"),
                "--torchvision",
                builder,
                "--weights",
                str(weights),
                "--labels",
                str(work / "labels.json"),
                "--export-path",
                str(work / "store"),
            ],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        weights.unlink()
        mars[builder] = work / "store" / f"{builder}.mar"
    with stopped_after(start_server(work / "server", mars)) as server:
        yield server


@pytest.mark.parametrize("builder", list(ARCHIVED))
def test_archived_torchvision_model_answers_with_a_map(torchvision_server, scenes, builder: str) -> None:
    layer, cam_applies = ARCHIVED[builder]
    scene = scenes[5]
    url = f"{torchvision_server.inference_url}/predictions/{builder}"
    response = requests.post(url, data=png_bytes(scene.image), timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"][0]["label"] in LABELS
    assert len(body["predictions"]) == ModelSpec.topk
    assert body["cam"]["layer"] == layer
    width, height = body["cam"]["heatmap_size"]
    assert (width, height) == default_heatmap_size(scene.image.size, 224)
    assert decode_heatmap(body["cam"]["heatmap"]).shape == (
        height,
        width,
    )

    cam = requests.post(url, data=png_bytes(scene.image), headers={"X-CAM-Method": "cam"}, timeout=120)
    if cam_applies:
        assert cam.status_code == 200, cam.text
        assert cam.json()["cam"]["method"] == "cam", cam.text
    else:
        assert cam.status_code == 400
        assert cam.json()["option"] == "method"
        assert "gradcam" in cam.json()["message"]
