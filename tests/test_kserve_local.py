"""The KServe pod on loopback (make kserve-local): TorchServe from the bundle, KServe's model server in front,
driven by KServe's own InferenceRESTClient in protocols v1 and v2; on v2, KServe's and TorchServe's gRPC APIs too.
Hostile requests through the front get a 4xx naming the problem, quote nothing of the request in the front's log,
and leave TorchServe's worker as it was."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import orjson
import psutil
import pytest
import requests
from support import ROOT, SHAPES_MAR, default_heatmap_size, png_bytes
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kserve_pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as kserve_grpc
from kserve.protocol.infer_type import InferInput, InferRequest
from PIL import Image

from camserve.protocol.responses import decode_heatmap
from camserve_tools.data.scenes import CLASSES
from camserve_tools.kserve.bundle import PROBE_NAME, read_archive, read_properties, write_bundle
from camserve_tools.kserve.local import KServeLocal
from camserve_tools.servers.torchserve import free_port
from camserve_tools.servers.torchserve_grpc import compile_stubs

pytestmark = [pytest.mark.serving]


@pytest.fixture(scope="module", params=["v1", "v2"])
def pod(request, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp(f"kserve-{request.param}")
    bundle = write_bundle(base / "bundle", [SHAPES_MAR], ROOT / "config" / "production.properties", request.param)
    local = KServeLocal(
        run_dir=base / "run",
        bundle=bundle,
        api=request.param,
        port=free_port(),
        inference_port=free_port(),
        management_port=free_port(),
        metrics_port=free_port(),
        grpc_inference_port=free_port(),
        grpc_management_port=free_port(),
        front_grpc_port=free_port(),
    )
    local.start()
    try:
        yield local
    finally:
        local.stop()


def run(coroutine_factory, api: str):
    """One call with a fresh KServe client (its httpx client belongs to the event loop that made it)."""

    async def call():
        async with InferenceRESTClient(RESTConfig(protocol=api, timeout=60, retries=0)) as client:
            return await coroutine_factory(client)

    return asyncio.run(call())


def encoded(scene) -> str:
    return base64.b64encode(png_bytes(scene.image)).decode("ascii")


def v2_request(*images: str) -> InferRequest:
    return InferRequest(
        model_name="shapes",
        infer_inputs=[InferInput(name=f"image{i}", shape=[1], datatype="BYTES", data=[image]) for i, image in enumerate(images)],
    )


def test_bundle_layout_and_settings(pod: KServeLocal) -> None:
    assert sorted(p.name for p in (pod.bundle / "model-store").iterdir()) == ["shapes.mar"]
    properties = dict(read_properties(pod.bundle / "config" / "config.properties"))
    assert properties["inference_address"] == "http://127.0.0.1:8085" and properties["metrics_address"] == "http://0.0.0.0:8082"
    assert properties["metrics_mode"] == "prometheus"
    # camserve's handler answers the envelope the runtime names in TS_SERVICE_ENVELOPE; TorchServe must not unwrap it.
    assert properties["enable_envvars_config"] == "false" and "service_envelope" not in properties
    assert properties["disable_token_authorization"] == "true", "TorchServe's per-process keys cannot work inside the pod"
    snapshot = json.loads(properties["model_snapshot"])["models"]["shapes"]["1.0"]
    assert {k: snapshot[k] for k in read_archive(SHAPES_MAR).settings} == read_archive(SHAPES_MAR).settings
    # The pod's environment (TS_DISABLE_TOKEN_AUTHORIZATION) reached TorchServe: no key file was written.
    assert not (pod.torchserve.run_dir / "key_file.json").exists()
    # The InferenceServices' liveness probe runs from the bundle.
    assert (pod.bundle / "config" / PROBE_NAME).read_text() == (ROOT / "camserve_tools" / "model_probe.py").read_text()


def test_torchserve_runs_with_the_bundles_jvm_settings(pod: KServeLocal) -> None:
    """The bundle's vmargs (heap from the container's limit, exit on out-of-memory) reach the JVM, as in the pod."""
    (java,) = [
        process
        for process in psutil.Process(pod.torchserve.process.pid).children(recursive=True)
        if "org.pytorch.serve.ModelServer" in " ".join(process.cmdline())
    ]
    arguments = java.cmdline()
    assert {"-XX:MaxRAMPercentage=25.0", "-XX:+ExitOnOutOfMemoryError", "-XX:+UseContainerSupport"} <= set(arguments), arguments
    assert f"-Djava.io.tmpdir={pod.torchserve.socket_dir}" in arguments and "-Xmx1g" not in arguments


def test_model_is_ready(pod: KServeLocal) -> None:
    assert run(lambda client: client.is_model_ready(pod.url, "shapes"), pod.api) is True
    assert run(lambda client: client.is_server_live(pod.url), pod.api) is True


def test_predict_returns_label_and_map(pod: KServeLocal, scenes) -> None:
    scene = scenes[0]
    if pod.api == "v1":
        answer = run(
            lambda client: client.infer(pod.url, {"instances": [{"data": encoded(scene), "method": "cam"}]}, model_name="shapes"), "v1"
        )["predictions"][0]
    else:
        response = run(lambda client: client.infer(pod.url, v2_request(encoded(scene)), model_name="shapes"), "v2")
        assert response.model_name == "shapes" and response.outputs[0].datatype == "BYTES"
        answer = response.outputs[0].data[0]
    assert answer["predictions"][0]["label"] in CLASSES
    assert answer["cam"]["label"] == answer["predictions"][0]["label"]
    assert answer["cam"]["method"] == ("cam" if pod.api == "v1" else "gradcam")
    width, height = default_heatmap_size(scene.image.size, 192)
    assert answer["cam"]["heatmap_size"] == [width, height] and decode_heatmap(answer["cam"]["heatmap"]).shape == (height, width)


def test_not_an_image_is_a_400_through_both_layers(pod: KServeLocal) -> None:
    not_an_image = base64.b64encode(b"plain text, no image").decode()
    if pod.api == "v1":
        call = lambda client: client.infer(pod.url, {"instances": [{"data": not_an_image}]}, model_name="shapes")  # noqa: E731
    else:
        call = lambda client: client.infer(pod.url, v2_request(not_an_image), model_name="shapes")  # noqa: E731
    with pytest.raises(httpx.HTTPStatusError) as raised:
        run(call, pod.api)
    assert raised.value.response.status_code == 400
    body = raised.value.response.json()
    assert body["type"] == "invalid_image" and "not an image" in body["error"]


def test_explain_answers_with_our_maps(pod: KServeLocal, scenes) -> None:
    if pod.api == "v2":
        # KServe routes :explain on v1 only; a v2 pod says so instead of handing TorchServe a body it cannot read.
        response = requests.post(f"{pod.url}/v1/models/shapes:explain", json={"instances": [{"data": encoded(scenes[1])}]}, timeout=60)
        assert response.status_code == 400 and response.json()["type"] == "unsupported_route"
        return
    explained = run(
        lambda client: client.explain(pod.url, "shapes", {"instances": [{"data": encoded(scenes[1]), "method": "layercam"}]}), "v1"
    )
    explanation = explained["explanations"][0]
    assert "predictions" not in explanation and explanation["cam"]["method"] == "layercam"
    assert explanation["cam"]["size"] == [scenes[1].image.width, scenes[1].image.height]


HOSTILE_BODIES = {
    "truncated JSON": b'{"instances": [{"data": "iVBOR',
    "not UTF-8": b'\xff\xfe{"instances": []}',
    "non-ASCII everywhere": json.dumps(
        {
            "instances": [{"data": "\u00fc\u20ac\u65e5\u672c", "m\u00e9thode": "\u2603"}],
            "inputs": [{"name": "\u00fc", "shape": [1], "datatype": "BYTES", "data": ["\u65e5"]}],
        },
        ensure_ascii=False,
    ).encode(),
    "nested 5000 deep": b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b', "inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "a JSON list": b"[1, 2, 3]",
    "wrong types": b'{"instances": "x", "inputs": [{"name": 1, "shape": "x", "datatype": "BYTES", "data": "x"}]}',
    "empty": b"",
    "null": b"null",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_bodies_get_a_4xx_with_json(pod: KServeLocal, name: str) -> None:
    path = "/v1/models/shapes:predict" if pod.api == "v1" else "/v2/models/shapes/infer"
    response = requests.post(pod.url + path, data=HOSTILE_BODIES[name], headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert isinstance(response.json(), dict) and response.json()


def test_huge_body_is_refused_before_parsing(pod: KServeLocal) -> None:
    path = "/v1/models/shapes:predict" if pod.api == "v1" else "/v2/models/shapes/infer"
    huge = b'{"instances": [{"data": "' + b"A" * (pod.max_body_bytes + 1) + b'"}]}'
    response = requests.post(pod.url + path, data=huge, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413 and response.json()["type"] == "request_too_large"


def test_metrics_carry_what_the_autoscalers_read(pod: KServeLocal) -> None:
    text = requests.get(f"{pod.torchserve.metrics_url}/metrics", timeout=30).text
    for name in ("ts_queue_latency_microseconds", "ts_inference_requests_total"):
        assert f'{name}{{model_name="shapes"' in text, name


# -- hostile requests through the front: a 4xx naming the problem, the same worker, nothing quoted in the log --------


def worker_pid(pod: KServeLocal) -> int:
    ((pid, status),) = [
        (worker["pid"], worker["status"])
        for worker in requests.get(f"{pod.torchserve.management_url}/models/shapes", timeout=10).json()[0]["workers"]
    ]
    assert status == "READY"
    return pid


def front_answers(pod: KServeLocal, scene) -> None:
    if pod.api == "v1":
        response = requests.post(f"{pod.url}/v1/models/shapes:predict", json={"instances": [{"data": encoded(scene)}]}, timeout=60)
        answer = response.json()["predictions"][0]
    else:
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded(scene)]}]}
        response = requests.post(f"{pod.url}/v2/models/shapes/infer", json=body, timeout=60)
        answer = response.json()["outputs"][0]["data"][0]
    assert response.status_code == 200 and answer["cam"]["size"] == list(scene.image.size)


def small_png_base64() -> str:
    return base64.b64encode(png_bytes(Image.new("RGB", (64, 48), (30, 200, 30)))).decode()


def binary_body(json_part: dict, *sections: bytes, json_length: int | str | None = None) -> tuple[bytes, dict[str, str]]:
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
    json_headers = {"Content-Type": "application/json"}
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
    assert error["code"] == status and error["type"] == kind and error["message"], error
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
    assert refused["code"] == 400 and refused["option"] == "output", refused


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
    assert answer["cam"]["size"] == list(scene.image.size) and answer["predictions"][0]["label"] in CLASSES


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


# Through TorchServe directly under the bundle's envelope, a body the envelope cannot read, or an overlay answer it
# cannot carry, fails the whole request with 503 ("Prediction failed") unless the handler refuses it first.
def envelope_request(api: str, image: str) -> bytes:
    if api == "v1":
        return json.dumps({"instances": [{"data": image}]}).encode()
    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}).encode()


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
        assert answer["code"] == 400 and answer["type"] and answer["message"], answer
    else:
        assert response.headers["content-type"].startswith("application/json") and ("predictions" in answer or "outputs" in answer)
    front_answers(pod, scenes[7])
    assert worker_pid(pod) == before


# -- gRPC: TorchServe's own API and the Open Inference Protocol, on the v2 bundle (kservev2 envelope) ----------------


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory):
    return compile_stubs(tmp_path_factory.mktemp("grpc-stubs"))


@pytest.fixture()
def channel(pod: KServeLocal):
    if pod.api != "v2":
        pytest.skip("the Open Inference Protocol is on in v2 bundles")
    with grpc.insecure_channel(f"127.0.0.1:{pod.grpc_inference_port}") as channel:
        yield channel


def test_grpc_open_inference_protocol(channel, stubs, scenes) -> None:
    oip = stubs.oip_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert oip.ModelReady(stubs.oip_pb2.ModelReadyRequest(name="shapes"), timeout=30).ready
    tensor = stubs.oip_pb2.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=stubs.oip_pb2.InferTensorContents(bytes_contents=[png_bytes(scenes[2].image)])
    )
    response = oip.ModelInfer(stubs.oip_pb2.ModelInferRequest(model_name="shapes", inputs=[tensor]), timeout=60)
    assert response.model_name == "shapes" and response.outputs[0].datatype == "BYTES"
    answer = json.loads(response.outputs[0].contents.bytes_contents[0])
    assert answer["cam"]["size"] == [scenes[2].image.width, scenes[2].image.height]


def test_grpc_open_inference_protocol_refuses_a_bad_image_with_invalid_argument(channel, stubs) -> None:
    """TorchServe 0.12's gRPC job drops a handler's per-request status (an OK reply would hold our error): only an
    error of the whole batch reaches the client as a gRPC code."""
    oip = stubs.oip_pb2_grpc.GRPCInferenceServiceStub(channel)
    bad = stubs.oip_pb2.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=stubs.oip_pb2.InferTensorContents(bytes_contents=[b"no image"])
    )
    with pytest.raises(grpc.RpcError) as raised:
        oip.ModelInfer(stubs.oip_pb2.ModelInferRequest(model_name="shapes", inputs=[bad]), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert '"invalid_image"' in raised.value.details()  # our JSON answer, the error in its image's place


def test_grpc_predictions_with_a_v2_body(channel, stubs, scenes) -> None:
    """TorchServe's own Predictions under the kservev2 envelope: the input holds a v2 JSON request (KServe's grpc-v2 wrapper sends this)."""
    inference = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded(scenes[3])]}]}
    response = inference.Predictions(
        stubs.inference_pb2.PredictionsRequest(model_name="shapes", input={"data": json.dumps(body).encode()}), timeout=60
    )
    answer = json.loads(response.prediction)["outputs"][0]["data"][0]
    assert answer["cam"]["size"] == [scenes[3].image.width, scenes[3].image.height]


@pytest.fixture()
def front_grpc(pod: KServeLocal):
    if pod.api != "v2":
        pytest.skip("KServe's gRPC speaks v2")
    with grpc.insecure_channel(f"127.0.0.1:{pod.front_grpc_port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        yield kserve_grpc.GRPCInferenceServiceStub(channel)


def model_infer(*elements: bytes, datatype: str = "BYTES") -> kserve_pb.ModelInferRequest:
    if datatype == "BYTES":
        contents = kserve_pb.InferTensorContents(bytes_contents=list(elements))
    else:
        contents = kserve_pb.InferTensorContents(fp32_contents=[1.0])
    tensor = kserve_pb.ModelInferRequest.InferInputTensor(name="image", datatype=datatype, shape=[len(elements) or 1], contents=contents)
    return kserve_pb.ModelInferRequest(model_name="shapes", inputs=[tensor])


def test_the_fronts_grpc_answers_with_our_json(front_grpc, scenes) -> None:
    """KServe's gRPC ModelInfer (the runtime's grpc-v2 mode): each output element is our JSON answer."""
    assert front_grpc.ModelReady(kserve_pb.ModelReadyRequest(name="shapes"), timeout=30).ready
    response = front_grpc.ModelInfer(model_infer(png_bytes(scenes[8].image)), timeout=60)
    assert response.outputs[0].datatype == "BYTES"
    answer = json.loads(response.outputs[0].contents.bytes_contents[0])
    assert answer["cam"]["size"] == list(scenes[8].image.size)
    two = front_grpc.ModelInfer(model_infer(png_bytes(scenes[8].image), png_bytes(scenes[9].image)), timeout=60)
    sizes = [json.loads(element)["cam"]["size"] for element in two.outputs[0].contents.bytes_contents]
    assert sizes == [list(scenes[8].image.size), list(scenes[9].image.size)]


FRONT_GRPC_MISTAKES = {
    "not an image": (lambda: model_infer(b"plain text"), grpc.StatusCode.INVALID_ARGUMENT),
    "aspect ratio over 20": (lambda: model_infer(png_bytes(Image.new("L", (4000, 150), 90))), grpc.StatusCode.INVALID_ARGUMENT),
    "image over 16384 pixels a side": (lambda: model_infer(png_bytes(Image.new("L", (1, 16_385)))), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "two non-images in one tensor": (lambda: model_infer(b"a", b"b"), grpc.StatusCode.INVALID_ARGUMENT),
    "FP32 tensor": (lambda: model_infer(datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT),
    "no inputs": (lambda: kserve_pb.ModelInferRequest(model_name="shapes"), grpc.StatusCode.INVALID_ARGUMENT),
    "message over the size limit": (lambda: model_infer(b"x" * (17 * 1024 * 1024)), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "unknown model": (lambda: kserve_pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
}


@pytest.mark.parametrize("name", list(FRONT_GRPC_MISTAKES))
def test_the_fronts_grpc_refuses_client_mistakes_with_a_client_code(pod: KServeLocal, front_grpc, scenes, name: str) -> None:
    """Never UNAVAILABLE (clients retry it), never CANCELLED: what the client got wrong, with our error in the details."""
    before = worker_pid(pod)
    make_request, code = FRONT_GRPC_MISTAKES[name]
    with pytest.raises(grpc.RpcError) as raised:
        front_grpc.ModelInfer(make_request(), timeout=60)
    assert raised.value.code() == code, (name, raised.value.code(), raised.value.details())
    assert len(raised.value.details()) < 2000
    front_answers(pod, scenes[9])
    assert worker_pid(pod) == before


def test_a_model_torchserve_lost_is_not_ready(pod: KServeLocal, stubs, scenes) -> None:
    """TorchServe 0.12 drops the worker for a gRPC StreamPredictions2 call made while it is busy, and still lists it
    READY. The front's readiness proves an answer, so it says not ready, and the probe of deploy/ fails: in a pod,
    the liveness probe restarts the container. (This leaves the pod's model dead: the next test stops the pod.)"""
    pid = worker_pid(pod)
    log = pod.torchserve.log_dir / "ts_log.log"
    offset = log.stat().st_size
    slow = threading.Thread(
        target=requests.post,
        args=(f"{pod.torchserve.inference_url}/predictions/shapes", envelope_request(pod.api, encoded(scenes[10]))),
        kwargs={"headers": {"Content-Type": "application/json", "X-CAM-Method": "scorecam", "X-CAM-Target": "0,1"}, "timeout": 120},
    )
    slow.start()
    time.sleep(0.3)
    streamed = stubs.inference_pb2.PredictionsRequest(
        model_name="shapes", input={"data": envelope_request(pod.api, encoded(scenes[3]))}, sequence_id="s1"
    )
    with grpc.insecure_channel(f"127.0.0.1:{pod.grpc_inference_port}") as channel:
        stream = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel).StreamPredictions2(iter([streamed]), timeout=30)
        with pytest.raises(grpc.RpcError):
            list(stream)
    slow.join()
    deadline = time.monotonic() + 60
    while "Stream is already completed" not in log.read_bytes()[offset:].decode(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert worker_pid(pod) == pid, "TorchServe still lists the lost worker as READY"
    ready_path = "/v1/models/shapes" if pod.api == "v1" else "/v2/models/shapes/ready"
    deadline = time.monotonic() + 60
    while requests.get(pod.url + ready_path, timeout=60).status_code == 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert requests.get(pod.url + ready_path, timeout=60).status_code == 503
    envelope = {"v1": "kserve", "v2": "kservev2"}[pod.api]
    probe = subprocess.run(
        [sys.executable, str(pod.bundle / "config" / PROBE_NAME), "--url", pod.torchserve.inference_url, "--timeout", "5", "shapes"],
        env={**os.environ, "TS_SERVICE_ENVELOPE": envelope},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 1 and "not answering: shapes" in probe.stdout, probe.stdout + probe.stderr


def test_stop_ends_both_processes_and_only_them(pod: KServeLocal) -> None:
    front, torchserve = pod.front.pid, pod.torchserve.process.pid
    bystander = os.getpid()
    pod.stop()
    for pid in (front, torchserve):
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    os.kill(bystander, 0)
    assert not pod.front_pid_file.exists() and not (pod.torchserve.run_dir / "torchserve.pid").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(pod.url, timeout=5)
