"""The KServe pod on loopback (make kserve-local): TorchServe from the bundle, KServe's model server in front,
driven by KServe's own InferenceRESTClient in protocols v1 and v2; on v2, TorchServe's gRPC APIs too."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import grpc
import httpx
import pytest
import requests
from conftest import ROOT, SHAPES_MAR, png_bytes
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest

from camserve.protocol.responses import decode_heatmap
from camserve_tools.kserve.bundle import read_archive, read_properties, write_bundle
from camserve_tools.kserve.local import KServeLocal
from camserve_tools.scenes import CLASSES
from camserve_tools.server import free_port
from camserve_tools.torchserve_grpc import compile_stubs

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
    assert decode_heatmap(answer["cam"]["heatmap"]).shape == (scene.image.height, scene.image.width)


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
    # TorchServe 0.12 drops a handler's per-request status on gRPC: the error arrives as an OK answer.
    bad = stubs.oip_pb2.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=stubs.oip_pb2.InferTensorContents(bytes_contents=[b"no image"])
    )
    refused = oip.ModelInfer(stubs.oip_pb2.ModelInferRequest(model_name="shapes", inputs=[bad]), timeout=60)
    assert json.loads(refused.outputs[0].contents.bytes_contents[0])["type"] == "invalid_image"


def test_grpc_predictions_with_a_v2_body(channel, stubs, scenes) -> None:
    """TorchServe's own Predictions under the kservev2 envelope: the input holds a v2 JSON request (KServe's grpc-v2 wrapper sends this)."""
    inference = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded(scenes[3])]}]}
    response = inference.Predictions(
        stubs.inference_pb2.PredictionsRequest(model_name="shapes", input={"data": json.dumps(body).encode()}), timeout=60
    )
    answer = json.loads(response.prediction)["outputs"][0]["data"][0]
    assert answer["cam"]["size"] == [scenes[3].image.width, scenes[3].image.height]


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
