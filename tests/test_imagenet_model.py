"""The pretrained `imagenet` model (EfficientNet-Lite0) through a real TorchServe, on real photographs.

The photos ship with scikit-image and scikit-learn (camserve_tools/data/photos.py): the right class family is the top-1, and
the map's peak falls on the object, inside a box drawn by hand. On composites (the object pasted at a random
place on another photo) the peak follows the object.
"""

from __future__ import annotations

import io
import json

import pytest
import requests
from support import IMAGENET_MAR, ROOT, require_archive, start_server

from camserve_tools.data.photos import BACKGROUNDS, LABELLED, composite

pytestmark = pytest.mark.server
SUBJECTS = {photo.name: photo for photo in LABELLED[:2]}  # chelsea (a cat), coffee (an espresso)
labels = [
    name
    for _, name in sorted((int(k), v) for k, v in json.loads((ROOT / "models" / "imagenet" / "index_to_name.json").read_text()).items())
]


def jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory):
    require_archive(IMAGENET_MAR)
    server = start_server(tmp_path_factory.mktemp("imagenet-server"), {"imagenet": IMAGENET_MAR})
    try:
        yield lambda body, headers=None: requests.post(
            f"{server.inference_url}/predictions/imagenet", data=body, headers=headers or {}, timeout=120
        )
    finally:
        server.stop()


def inside(point: list[int], box: tuple[int, int, int, int]) -> bool:
    x, y = point
    return box[0] <= x < box[2] and box[1] <= y < box[3]


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_photo_top1_is_the_right_family_and_the_peak_is_on_the_object(imagenet, name: str) -> None:
    photo = SUBJECTS[name]
    image = photo.image()
    response = imagenet(jpeg(image))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"][0]["label"] in photo.family, body["predictions"]
    assert body["cam"]["layer"] == "head_activation"
    assert body["cam"]["size"] == [image.width, image.height]
    assert inside(body["cam"]["peak"], photo.box), (body["cam"]["peak"], photo.box)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("background", BACKGROUNDS)
@pytest.mark.parametrize("name", list(SUBJECTS))
def test_on_a_composite_the_peak_follows_the_object(imagenet, name: str, background: str, seed: int) -> None:
    item = composite(SUBJECTS[name], background, seed)
    family = sorted(labels.index(label) for label in item.subject.family)
    # One map per family member, and every class's probability: the object's class is the family's most probable.
    response = imagenet(jpeg(item.image), {"X-CAM-Target": ",".join(map(str, family)), "X-CAM-Topk": "1000"})
    assert response.status_code == 200, response.text
    body = response.json()
    probability = {p["index"]: p["probability"] for p in body["predictions"]}
    cam = max(body["cam"], key=lambda c: probability[c["index"]])
    assert inside(cam["peak"], item.box), (cam["label"], cam["peak"], item.box, body["predictions"][:3])


def test_cam_applies_to_its_gap_linear_head(imagenet) -> None:
    response = imagenet(jpeg(SUBJECTS["coffee"].image()), {"X-CAM-Method": "cam"})
    assert response.status_code == 200, response.text
    assert response.json()["cam"]["method"] == "cam"
    assert response.json()["predictions"][0]["label"] in SUBJECTS["coffee"].family
