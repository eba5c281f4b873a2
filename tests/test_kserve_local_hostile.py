"""Hostile requests to the KServe pod on loopback (make kserve-local), in protocols v1 and v2: through the front
they get a 4xx naming the problem and quote nothing of the request in the front's log; straight to TorchServe under
the bundle's envelope they are never a 5xx; and TorchServe's worker is left as it was."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
import requests
from kserve.protocol.infer_type import InferInput, InferRequest
from kserve_pod import encoded, envelope_request, front_answers, run, running_pod, worker_pid
from PIL import Image
from support import png_bytes

from camserve_tools.data.scenes import CLASSES
from camserve_tools.kserve.local import KServeLocal

pytestmark = pytest.mark.server


@pytest.fixture(scope="module", params=["v1", "v2"])
def pod(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeLocal]:
    with running_pod(tmp_path_factory.mktemp(f"kserve-hostile-{request.param}"), request.param) as local:
        yield local


# -- through the front: a 4xx naming the problem, the same worker, nothing quoted in the log -----------------------


def small_png_base64() -> str:
    return base64.b64encode(png_bytes(Image.new("RGB", (64, 48), (30, 200, 30)))).decode()


def binary_body(json_part: dict, *sections: bytes, json_length: int | str | None = None) -> tuple[bytes, dict[str, str | bytes]]:
    """A v2 request in the binary data extension: the JSON part, then the inputs' bytes."""
    head = json.dumps(json_part).encode()
    return head + b"".join(sections), {
        "Inference-Header-Content-Length": str(len(head) if json_length is None else json_length),
        "Content-Type": "application/octet-stream",
    }


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def hostile_front_request(name: str, api: str) -> tuple[bytes, dict[str, str | bytes]]:
    """(body, headers) of each hostile case for a pod speaking `api`."""
    image = small_png_base64()
    if api == "v1":
        plain = json.dumps({"instances": [{"data": image}]}).encode()
    else:
        plain = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}).encode()
    json_headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    png = base64.b64decode(image)
    v2_binary = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(png) + 4}}]}
    cases: dict[str, tuple[bytes, dict[str, str | bytes]]] = {
        "non-ASCII Authorization": (plain, {**json_headers, "Authorization": "Bearer café".encode()}),
        "non-ASCII X-Request-Id": (plain, {**json_headers, "X-Request-Id": "é-1".encode()}),
        "UTF-8 X-CAM-Target": (plain, {**json_headers, "X-CAM-Target": "café".encode()}),
        "Latin-1 X-CAM-Method": (plain, {**json_headers, "X-CAM-Method": "caf\xe9".encode("latin-1")}),
        "X-CAM-Output overlay": (plain, {**json_headers, "X-CAM-Output": "OVERLAY"}),
    }
    if api == "v1":
        cases |= {
            "output as a list": (json.dumps({"instances": [{"data": image, "output": ["overlay"]}]}).encode(), json_headers),
            "Output spelt with a capital": (json.dumps({"instances": [{"data": image, "Output": "Overlay"}]}).encode(), json_headers),
            "output inside the data object": (
                json.dumps({"instances": [{"data": {"data": image, "output": "overlay"}}]}).encode(),
                json_headers,
            ),
            "lone surrogate in an option name": (b'{"instances": [{"data": "' + image.encode() + b'", "\\ud800": "x"}]}', json_headers),
        }
    else:
        cases |= {
            "lone surrogate as the id": (
                b'{"id": "\\udfff", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["' + image.encode() + b'"]}]}',
                json_headers,
            ),
            "binary: JSON length past the body": binary_body(v2_binary, bytes_tensor(png), json_length=10**6),
            "binary: JSON length cutting the JSON": binary_body(v2_binary, bytes_tensor(png), json_length=7),
            "binary: JSON length of 5000 digits": binary_body(v2_binary, bytes_tensor(png), json_length="9" * 5000),
            "binary: element longer than its input": binary_body(v2_binary, struct.pack("<I", 10**6) + png),
            "binary: bytes after the last input": binary_body(v2_binary, bytes_tensor(png), png[:100]),
            "shape that does not match the images": (
                json.dumps({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": [image, image]}]}).encode(),
                json_headers,
            ),
            "binary: FP32 input": binary_body(
                {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}, b"\x00" * 4
            ),
        }
    return cases[name]


HOSTILE_FRONT = {
    # name -> (the protocols it applies to, status, error type, what the body names)
    "non-ASCII Authorization": ({"v1", "v2"}, 400, "invalid_header", {"header": "authorization"}),
    "non-ASCII X-Request-Id": ({"v1", "v2"}, 400, "invalid_header", {"header": "x-request-id"}),
    # Option headers keep their bytes: the handler judges them as on TorchServe directly.
    "UTF-8 X-CAM-Target": ({"v1", "v2"}, 400, "invalid_option", {"option": "target"}),
    "Latin-1 X-CAM-Method": ({"v1", "v2"}, 400, "invalid_option", {"option": "method"}),
    "X-CAM-Output overlay": ({"v1", "v2"}, 400, "invalid_option", {"option": "output"}),
    "output as a list": ({"v1"}, 400, "invalid_option", {"option": "output"}),
    "Output spelt with a capital": ({"v1"}, 400, "invalid_option", {"option": "output"}),
    "output inside the data object": ({"v1"}, 400, "invalid_option", {"option": "output"}),
    "lone surrogate in an option name": ({"v1"}, 400, "invalid_request", {}),
    "lone surrogate as the id": ({"v2"}, 400, "invalid_request", {}),
    "binary: JSON length past the body": ({"v2"}, 400, "invalid_binary_request", {}),
    "binary: JSON length cutting the JSON": ({"v2"}, 400, "invalid_binary_request", {}),
    "binary: JSON length of 5000 digits": ({"v2"}, 400, "invalid_binary_request", {}),
    "binary: element longer than its input": ({"v2"}, 400, "invalid_binary_request", {}),
    "binary: bytes after the last input": ({"v2"}, 400, "invalid_binary_request", {}),
    "binary: FP32 input": ({"v2"}, 400, "invalid_binary_request", {}),
    "shape that does not match the images": ({"v2"}, 400, "shape_mismatch", {}),
}


@pytest.mark.parametrize("name", list(HOSTILE_FRONT))
def test_hostile_request_through_the_front_gets_a_4xx_naming_it(pod: KServeLocal, scenes, name: str) -> None:
    apis, status, kind, named = HOSTILE_FRONT[name]
    if pod.api not in apis:
        pytest.skip(f"a {'/'.join(sorted(apis))} request")
    before = worker_pid(pod)
    body, headers = hostile_front_request(name, pod.api)
    path = "/v1/models/shapes:predict" if pod.api == "v1" else "/v2/models/shapes/infer"
    response = requests.post(pod.url + path, data=body, headers=headers, timeout=60)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    error = orjson.loads(response.content)  # strict: a lone surrogate in the body would fail here
    assert error["code"] == status, error
    assert error["type"] == kind, error
    assert error["message"], error
    assert {key: error.get(key) for key in named} == named, error
    assert len(response.content) < 2000, "the error quotes at most a short excerpt"
    front_answers(pod, scenes[5])
    assert worker_pid(pod) == before, "the worker was restarted"


def test_one_instance_asking_for_an_overlay_costs_no_other_its_answer(pod: KServeLocal, scenes) -> None:
    """An overlay is an image, which no envelope carries: that instance is refused in its place, the others answered."""
    if pod.api != "v1":
        pytest.skip("v1 options travel beside each instance")
    instances = [{"data": encoded(scenes[4])}, {"data": encoded(scenes[4]), "Output": ["overlay"]}]
    response = requests.post(f"{pod.url}/v1/models/shapes:predict", json={"instances": instances}, timeout=60)
    assert response.status_code == 200, response.text[:300]
    answered, refused = response.json()["predictions"]
    assert answered["cam"]["size"] == list(scenes[4].image.size)
    assert refused["code"] == 400, refused
    assert refused["option"] == "output", refused


def test_several_images_in_one_v2_tensor_are_each_answered(pod: KServeLocal, scenes) -> None:
    if pod.api != "v2":
        pytest.skip("a v2 tensor")
    images = [encoded(scenes[11]), encoded(scenes[12])]
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": images}]}
    response = requests.post(f"{pod.url}/v2/models/shapes/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text[:300]
    answers = response.json()["outputs"][0]["data"]
    assert [answer["cam"]["size"] for answer in answers] == [list(scenes[11].image.size), list(scenes[12].image.size)]


def test_binary_data_extension_is_answered(pod: KServeLocal, scenes) -> None:
    """KServe's own client sending the image as binary data (Inference-Header-Content-Length) gets its answer."""
    if pod.api != "v2":
        pytest.skip("the binary data extension is v2's")
    scene = scenes[6]
    tensor = InferInput(name="image", shape=[1], datatype="BYTES")
    tensor.set_data_from_numpy(np.array([png_bytes(scene.image)], dtype=np.object_), binary_data=True)
    request = InferRequest(model_name="shapes", infer_inputs=[tensor])
    response = run(lambda client: client.infer(pod.url, request, model_name="shapes"), "v2")
    answer = response.outputs[0].data[0]
    assert answer["cam"]["size"] == list(scene.image.size)
    assert answer["predictions"][0]["label"] in CLASSES


def test_the_front_log_has_one_line_per_refusal_and_no_request_bytes(pod: KServeLocal) -> None:
    """Run after the hostile requests above: KServe's own handlers wrote two tracebacks per 400, and a v2 binary
    request's whole image into a single line."""
    text = (pod.run_dir / "front.log").read_text(errors="replace")
    assert "Traceback" not in text
    assert max(len(line) for line in text.splitlines()) < 600
    image = small_png_base64()
    for quoted in (image[:40], "\\x89PNG", "IHDR", "café"):
        assert quoted not in text, quoted
    assert text.count(" -> 400 ") >= sum(1 for apis, *_ in HOSTILE_FRONT.values() if pod.api in apis)


# -- straight to TorchServe under the bundle's envelope ---------------------------------------------------------------


# Through TorchServe directly under the bundle's envelope, a body the envelope cannot read, or an overlay answer it
# cannot carry, fails the whole request with 503 ("Prediction failed") unless the handler refuses it first.


ENVELOPE_CASES = {
    # name -> (body, headers, status): straight to TorchServe, where camserve's handler reads the envelope itself
    "a raw image": (lambda api, image: base64.b64decode(image), {"Content-Type": "image/png"}, 400),
    "a malformed envelope": (lambda api, image: b'{"instances": 3, "inputs": 3}', {"Content-Type": "application/json"}, 400),
    # Envelopes carry JSON: Accept is not read, and the answer is JSON.
    "Accept: image/png": (envelope_request, {"Content-Type": "application/json", "Accept": "image/png"}, 200),
}


@pytest.mark.parametrize("name", list(ENVELOPE_CASES))
def test_envelope_mistakes_straight_to_torchserve_are_never_a_5xx(pod: KServeLocal, scenes, name: str) -> None:
    """TorchServe's own envelopes answered these with 503 ("Prediction failed"), losing the request."""
    before = worker_pid(pod)
    make_body, headers, status = ENVELOPE_CASES[name]
    response = requests.post(
        f"{pod.torchserve.inference_url}/predictions/shapes", data=make_body(pod.api, small_png_base64()), headers=headers, timeout=60
    )
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    answer = orjson.loads(response.content)
    if status == 400:
        assert answer["code"] == 400, answer
        assert answer["type"], answer
        assert answer["message"], answer
    else:
        assert response.headers["content-type"].startswith("application/json")
        assert "predictions" in answer or "outputs" in answer
    front_answers(pod, scenes[7])
    assert worker_pid(pod) == before
