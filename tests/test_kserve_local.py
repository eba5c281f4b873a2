"""The KServe pod on loopback (make kserve-local): TorchServe from the bundle, KServe's model server in front,
driven by KServe's own InferenceRESTClient in protocols v1 and v2; on v2, KServe's and TorchServe's gRPC APIs too.
A model TorchServe lost is not ready, and stop ends both processes. Hostile requests: test_kserve_local_hostile.py."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import psutil
import pytest
import requests
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kserve_pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as kserve_grpc
from kserve.protocol.infer_type import InferInput, InferRequest
from kserve_pod import encoded, envelope_request, front_answers, run, running_pod, worker_pid
from PIL import Image
from support import ROOT, SHAPES_MAR, default_heatmap_size, png_bytes

from camserve.protocol.responses import decode_heatmap
from camserve_tools.data.scenes import CLASSES
from camserve_tools.kserve.bundle import PROBE_NAME, read_archive, read_properties
from camserve_tools.kserve.local import KServeLocal
from camserve_tools.servers.torchserve_grpc import compile_stubs

pytestmark = pytest.mark.server


@pytest.fixture(scope="module", params=["v1", "v2"])
def pod(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeLocal]:
    with running_pod(tmp_path_factory.mktemp(f"kserve-{request.param}"), request.param) as local:
        yield local


def v2_request(*images: str) -> InferRequest:
    return InferRequest(
        model_name="shapes",
        infer_inputs=[InferInput(name=f"image{i}", shape=[1], datatype="BYTES", data=[image]) for i, image in enumerate(images)],
    )


def test_bundle_layout_and_settings(pod: KServeLocal) -> None:
    assert sorted(p.name for p in (pod.bundle / "model-store").iterdir()) == ["shapes.mar"]
    properties = dict(read_properties(pod.bundle / "config" / "config.properties"))
    assert properties["inference_address"] == "http://127.0.0.1:8085"
    assert properties["metrics_address"] == "http://0.0.0.0:8082"
    assert properties["metrics_mode"] == "prometheus"
    # camserve's handler answers the envelope the runtime names in TS_SERVICE_ENVELOPE; TorchServe must not unwrap it.
    assert properties["enable_envvars_config"] == "false"
    assert "service_envelope" not in properties
    assert properties["disable_token_authorization"] == "true", "TorchServe's per-process keys cannot work inside the pod"
    snapshot = json.loads(properties["model_snapshot"])["models"]["shapes"]["1.0"]
    assert {k: snapshot[k] for k in read_archive(SHAPES_MAR).settings} == read_archive(SHAPES_MAR).settings
    # The pod's environment (TS_DISABLE_TOKEN_AUTHORIZATION) reached TorchServe: no key file was written.
    assert not (pod.torchserve.run_dir / "key_file.json").exists()
    # The InferenceServices' liveness probe runs from the bundle.
    assert (pod.bundle / "config" / PROBE_NAME).read_text() == (ROOT / "camserve_tools" / "servers" / "model_probe.py").read_text()


def test_torchserve_runs_with_the_bundles_jvm_settings(pod: KServeLocal) -> None:
    """The bundle's vmargs (heap from the container's limit, exit on out-of-memory) reach the JVM, as in the pod."""
    (java,) = [
        process
        for process in psutil.Process(pod.torchserve.process.pid).children(recursive=True)
        if "org.pytorch.serve.ModelServer" in " ".join(process.cmdline())
    ]
    arguments = java.cmdline()
    assert {"-XX:MaxRAMPercentage=25.0", "-XX:+ExitOnOutOfMemoryError", "-XX:+UseContainerSupport"} <= set(arguments), arguments
    assert f"-Djava.io.tmpdir={pod.torchserve.socket_dir}" in arguments
    assert "-Xmx1g" not in arguments


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
        assert response.model_name == "shapes"
        assert response.outputs[0].datatype == "BYTES"
        answer = response.outputs[0].data[0]
    assert answer["predictions"][0]["label"] in CLASSES
    assert answer["cam"]["label"] == answer["predictions"][0]["label"]
    assert answer["cam"]["method"] == ("cam" if pod.api == "v1" else "gradcam")
    width, height = default_heatmap_size(scene.image.size, 192)
    assert answer["cam"]["heatmap_size"] == [width, height]
    assert decode_heatmap(answer["cam"]["heatmap"]).shape == (height, width)


def test_not_an_image_is_a_400_through_both_layers(pod: KServeLocal) -> None:
    not_an_image = base64.b64encode(b"plain text, no image").decode()
    body = {"instances": [{"data": not_an_image}]} if pod.api == "v1" else v2_request(not_an_image)

    def call(client):  # the KServe client of the pod's protocol
        return client.infer(pod.url, body, model_name="shapes")

    with pytest.raises(httpx.HTTPStatusError) as raised:
        run(call, pod.api)
    assert raised.value.response.status_code == 400
    body = raised.value.response.json()
    assert body["type"] == "invalid_image"
    assert "not an image" in body["error"]


def test_explain_answers_with_our_maps(pod: KServeLocal, scenes) -> None:
    if pod.api == "v2":
        # KServe routes :explain on v1 only; a v2 pod says so instead of handing TorchServe a body it cannot read.
        response = requests.post(f"{pod.url}/v1/models/shapes:explain", json={"instances": [{"data": encoded(scenes[1])}]}, timeout=60)
        assert response.status_code == 400
        assert response.json()["type"] == "unsupported_route"
        return
    explained = run(
        lambda client: client.explain(pod.url, "shapes", {"instances": [{"data": encoded(scenes[1]), "method": "layercam"}]}), "v1"
    )
    explanation = explained["explanations"][0]
    assert "predictions" not in explanation
    assert explanation["cam"]["method"] == "layercam"
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
    assert isinstance(response.json(), dict)
    assert response.json()


def test_huge_body_is_refused_before_parsing(pod: KServeLocal) -> None:
    path = "/v1/models/shapes:predict" if pod.api == "v1" else "/v2/models/shapes/infer"
    huge = b'{"instances": [{"data": "' + b"A" * (pod.max_body_bytes + 1) + b'"}]}'
    response = requests.post(pod.url + path, data=huge, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 413
    assert response.json()["type"] == "request_too_large"


def test_metrics_carry_what_the_autoscalers_read(pod: KServeLocal) -> None:
    text = requests.get(f"{pod.torchserve.metrics_url}/metrics", timeout=30).text
    for name in ("ts_queue_latency_microseconds", "ts_inference_requests_total"):
        assert f'{name}{{model_name="shapes"' in text, name


# -- gRPC: TorchServe's own API and the Open Inference Protocol, on the v2 bundle (kservev2 envelope) ----------------


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory):
    return compile_stubs(tmp_path_factory.mktemp("grpc-stubs"))


@pytest.fixture
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
    assert response.model_name == "shapes"
    assert response.outputs[0].datatype == "BYTES"
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


@pytest.fixture
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
    assert probe.returncode == 1, probe.stdout + probe.stderr
    assert "not answering: shapes" in probe.stdout, probe.stdout + probe.stderr


def test_stop_ends_both_processes_and_only_them(pod: KServeLocal) -> None:
    front, torchserve = pod.front.pid, pod.torchserve.process.pid
    bystander = os.getpid()
    pod.stop()
    for pid in (front, torchserve):
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    os.kill(bystander, 0)
    assert not pod.front_pid_file.exists()
    assert not (pod.torchserve.run_dir / "torchserve.pid").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(pod.url, timeout=5)
