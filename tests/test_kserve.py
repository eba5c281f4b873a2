"""KServe v1 and v2 protocols through TorchServe's envelopes (config/kserve*.properties), on a real TorchServe."""

from __future__ import annotations

import base64

import pytest
import requests
from support import default_heatmap_size, png_bytes

from camserve.protocol.responses import decode_heatmap

pytestmark = pytest.mark.server


def test_kserve_predict_and_explain(enveloped, scenes) -> None:
    protocol, server = enveloped
    images = [base64.b64encode(png_bytes(scene.image)).decode() for scene in scenes[:2]]
    if protocol == "kserve":
        body = {"instances": [{"data": images[0]}, {"data": images[1], "method": "cam"}, {"data": "!!not base64"}]}
        answers = requests.post(f"{server.inference_url}/predictions/shapes", json=body, timeout=60).json()["predictions"]
        assert answers[0]["cam"]["method"] == "gradcam"
        assert answers[1]["cam"]["method"] == "cam"
        for answer, scene in zip(answers[:2], scenes[:2], strict=True):
            width, height = default_heatmap_size(scene.image.size, 192)
            assert answer["cam"]["heatmap_size"] == [width, height]
            assert decode_heatmap(answer["cam"]["heatmap"]).shape == (height, width)
        assert answers[2]["type"] == "invalid_base64"  # a bad instance fails alone, inside the answer
        # A bad *first* instance does not set the status of a request whose other instances succeed.
        bad_first = requests.post(
            f"{server.inference_url}/predictions/shapes", json={"instances": [{"data": "!!"}, {"data": images[0]}]}, timeout=60
        )
        assert bad_first.status_code == 200, bad_first.text
        assert bad_first.json()["predictions"][0]["type"] == "invalid_base64"
        assert "cam" in bad_first.json()["predictions"][1]
        explained = requests.post(
            f"{server.inference_url}/explanations/shapes", json={"instances": [{"data": images[0]}]}, timeout=60
        ).json()
        assert "predictions" not in explained["explanations"][0]
        assert explained["explanations"][0]["cam"]["method"] == "gradcam"
    else:
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [images[0]]}]}
        answer = requests.post(f"{server.inference_url}/predictions/shapes", json=body, timeout=60).json()
        output = answer["outputs"][0]
        assert output["datatype"] == "BYTES"
        assert answer["model_name"] == "shapes"
        assert output["data"][0]["cam"]["size"] == [scenes[0].image.width, scenes[0].image.height]
