"""TorchServe batching on (batchSize 8): mixed concurrent requests each get their own, right answer.

One batch may mix methods, layers, targets and outputs, and hold a bad request: the handler groups the work and
answers each request with its own status and content type. Every response is checked against its own request.
"""

from __future__ import annotations

import io
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image
from support import ROOT, TEST_SEED_START, default_heatmap_size, png_bytes, start_server, stopped_after

from camserve.cam import CamExtractor
from camserve.cam.localization import peak, upsample_map
from camserve.model_spec import ModelSpec, load_model
from camserve.preprocessing import whole_image_transform
from camserve.protocol.responses import decode_heatmap
from camserve_tools.archive.packing import build_archive
from camserve_tools.data.scenes import Scene, make_scene

pytestmark = pytest.mark.server

# (headers, what the answer must be): cycled over the scenes
VARIANTS = [
    ({}, "png"),
    ({"X-CAM-Method": "cam"}, "png"),
    ({"X-CAM-Method": "layercam", "X-CAM-Output": "grid"}, "grid"),
    ({"X-CAM-Method": "none"}, "none"),
    ({"Accept": "image/png"}, "overlay"),
    ({"X-CAM-Target": "circle,star"}, "targets"),
    ({"X-CAM-Layer": "features.4"}, "layer"),
    ({"X-CAM-Method": "bogus"}, "bad"),
]


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("batching")
    model_dir = work / "model"
    shutil.copytree(ROOT / "models" / "shapes", model_dir)
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    config.update(batchSize=8, maxBatchDelay=200)
    (model_dir / "model-config.yaml").write_text(yaml.safe_dump(config))
    mar = build_archive("shapes", model_dir, work / "store")
    with stopped_after(start_server(work / "server", {"shapes": mar})) as server:
        yield server


def scenes_the_model_gets_right(count: int, first_seed: int) -> list[Scene]:
    """Scenes the committed model classifies right and points at in-process (default gradcam map), so that a
    wrong served answer is a mix-up, not one of the model's own errors."""
    model_dir = ROOT / "models" / "shapes"
    spec = ModelSpec.from_model_dir(model_dir)
    extractor = CamExtractor(load_model(spec, model_dir), spec.input_size, spec.target_layers)
    transform = whole_image_transform(spec.input_size, spec.mean, spec.std)
    chosen: list[Scene] = []
    seed = first_seed
    while len(chosen) < count:
        scene = make_scene(seed)
        seed += 1
        result = extractor(transform(scene.image)[None], method="gradcam")
        x, y = peak(upsample_map(result.maps[0, 0], scene.image.size))
        x0, y0, x1, y1 = scene.box
        if int(result.logits.argmax()) == scene.label and x0 <= x < x1 and y0 <= y < y1:
            chosen.append(scene)
    return chosen


def check(response: requests.Response, kind: str, scene) -> None:
    if kind == "bad":
        assert response.status_code == 400
        assert response.json()["option"] == "method"
        return
    assert response.status_code == 200, response.text
    if kind == "overlay":
        assert response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == scene.image.size
        return
    body = response.json()
    assert body["predictions"][0]["label"] == scene.name
    if kind == "none":
        assert "cam" not in body
        return
    if kind == "targets":
        assert [cam["label"] for cam in body["cam"]] == ["circle", "star"]
        return
    cam = body["cam"]
    if kind == "grid":
        assert cam["method"] == "layercam"
        assert cam["shape"] == [24, 24]
        return
    assert cam["layer"] == ("features.4" if kind == "layer" else "features")
    width, height = cam["heatmap_size"]
    assert (width, height) == default_heatmap_size(scene.image.size, 192)
    assert decode_heatmap(cam["heatmap"]).shape == (height, width)
    if kind == "png":  # the default layer's map points at this request's object, not a batch neighbour's
        x, y = cam["peak"]
        x0, y0, x1, y1 = scene.box
        assert x0 <= x < x1
        assert y0 <= y < y1


def test_mixed_concurrent_requests_each_get_their_own_answer(batching_server) -> None:
    scenes = scenes_the_model_gets_right(40, TEST_SEED_START + 200)
    jobs = [(scenes[i], *VARIANTS[i % len(VARIANTS)]) for i in range(len(scenes))]
    url = f"{batching_server.inference_url}/predictions/shapes"

    def send(job):
        scene, headers, kind = job
        return requests.post(url, data=png_bytes(scene.image), headers=headers, timeout=120), kind, scene

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(send, jobs))
    misclassified = 0
    for response, kind, scene in results:
        if kind not in ("bad", "overlay") and response.status_code == 200 and response.json()["predictions"][0]["label"] != scene.name:
            misclassified += 1  # batched numerics may tip a borderline scene; a mix-up would cost many
            continue
        check(response, kind, scene)
    assert misclassified <= 2
    log = (Path(batching_server.log_dir) / "model_metrics.log").read_text() + (Path(batching_server.log_dir) / "model_log.log").read_text()
    assert "batchSize: 8" in log
