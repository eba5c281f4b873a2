"""One pipeline, three engines: the same request gets the same bytes from TorchServe, from KServe's own model server
and from Ray Serve.

Plain requests go to `/predictions/shapes` on all three; KServe's envelopes go to TorchServe under the matching config
(config/kserve*.properties) and to KServe's own routes (`:predict`, `:explain`, `/infer`) on the native engine.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from support import png_bytes

pytestmark = pytest.mark.server


def post(url: str, body: bytes | None = None, headers: dict | None = None, **kwargs) -> requests.Response:
    return requests.post(url, data=body, headers=headers or {}, timeout=60, **kwargs)


def same_answer(torchserve: requests.Response, kserve: requests.Response) -> None:
    assert torchserve.status_code == kserve.status_code, (torchserve.text[:200], kserve.text[:200])
    assert torchserve.headers["content-type"].split(";")[0] == kserve.headers["content-type"].split(";")[0]
    assert torchserve.content == kserve.content


PLAIN_CASES = {
    "default": ({}, "scene"),
    "cam, two classes": ({"X-CAM-Method": "cam", "X-CAM-Target": "circle,star"}, "scene"),
    "grid, layercam": ({"X-CAM-Method": "layercam", "X-CAM-Output": "grid"}, "scene"),
    "overlay image": ({"Accept": "image/png"}, "scene"),
    "plain prediction": ({"X-CAM-Method": "none", "X-CAM-Topk": "6"}, "scene"),
    "not an image": ({}, "garbage"),
    "unknown option": ({"X-CAM-Colour": "red"}, "scene"),
    "too costly": ({"X-CAM-Method": "scorecam", "X-CAM-Maps": "6"}, "scene"),
}


@pytest.fixture(scope="module", params=["kserve", "ray"])
def other_engine(request: pytest.FixtureRequest):
    """An engine other than TorchServe hosting the same pipeline: KServe's model server, Ray Serve."""
    return request.getfixturevalue(f"{request.param}_engine")


@pytest.mark.parametrize("name", list(PLAIN_CASES))
def test_plain_requests_get_identical_bytes(shapes_server, other_engine, scenes, name: str) -> None:
    headers, body = PLAIN_CASES[name]
    payload = png_bytes(scenes[0].image) if body == "scene" else b"this is no image"
    same_answer(
        post(f"{shapes_server.inference_url}/predictions/shapes", payload, {**shapes_server.auth_headers(), **headers}),
        post(f"{other_engine.inference_url}/predictions/shapes", payload, headers),
    )


def test_explanations_get_identical_bytes(shapes_server, other_engine, scenes) -> None:
    payload = png_bytes(scenes[2].image)
    for headers in ({}, {"X-CAM-Method": "cam", "X-CAM-Output": "grid"}):
        same_answer(
            post(f"{shapes_server.inference_url}/explanations/shapes", payload, headers),
            post(f"{other_engine.inference_url}/explanations/shapes", payload, headers),
        )


def test_form_and_json_bodies_get_identical_bytes(shapes_server, other_engine, scenes) -> None:
    image = png_bytes(scenes[1].image)
    body = json.dumps({"data": base64.b64encode(image).decode(), "maps": 2}).encode()
    forms, bodies = [], []
    for engine in (shapes_server, other_engine):
        url = f"{engine.inference_url}/predictions/shapes"
        forms.append(requests.post(url, files={"data": image}, data={"method": "cam"}, timeout=60))
        bodies.append(post(url, body, {"Content-Type": "application/json"}))
    same_answer(*forms)
    same_answer(*bodies)


def v1_body(images: list[str], **options) -> bytes:
    return json.dumps({"instances": [{"data": image, **options} for image in images]}).encode()


def v2_body(images: list[str], request_id: str = "req-1") -> bytes:
    return json.dumps(
        {"id": request_id, "inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images}]}
    ).encode()


def test_envelopes_get_identical_bytes(enveloped, kserve_engine, scenes) -> None:
    protocol, torchserve = enveloped
    images = [base64.b64encode(png_bytes(scene.image)).decode() for scene in scenes[:2]]
    json_headers = {"Content-Type": "application/json"}
    ours = f"{torchserve.inference_url}/predictions/shapes"
    if protocol == "kserve":
        cases = {
            ":predict": (v1_body([*images, "!!not base64"], method="cam"), f"{kserve_engine.inference_url}/v1/models/shapes:predict", ours),
            ":explain": (
                v1_body(images[:1]),
                f"{kserve_engine.inference_url}/v1/models/shapes:explain",
                f"{torchserve.inference_url}/explanations/shapes",
            ),
            "only a bad instance": (v1_body(["!!"]), f"{kserve_engine.inference_url}/v1/models/shapes:predict", ours),
            "overlay refused": (v1_body(images[:1], output="overlay"), f"{kserve_engine.inference_url}/v1/models/shapes:predict", ours),
            "no instances": (b'{"instances": []}', f"{kserve_engine.inference_url}/v1/models/shapes:predict", ours),
        }
    else:
        cases = {
            "two images in one tensor": (v2_body(images), f"{kserve_engine.inference_url}/v2/models/shapes/infer", ours),
            "shape that does not match": (
                json.dumps({"id": "x", "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": images}]}).encode(),
                f"{kserve_engine.inference_url}/v2/models/shapes/infer",
                ours,
            ),
        }
    for name, (body, native_url, torchserve_url) in cases.items():
        torchserve_answer = post(torchserve_url, body, json_headers)
        native_answer = post(native_url, body, json_headers)
        assert torchserve_answer.status_code == native_answer.status_code, name
        assert torchserve_answer.content == native_answer.content, (name, torchserve_answer.text[:300], native_answer.text[:300])
    if protocol == "kserve":
        answers = post(ours, cases[":predict"][0], json_headers).json()["predictions"]
        assert [a.get("cam", {}).get("method") for a in answers[:2]] == ["cam", "cam"]
        assert answers[2]["type"] == "invalid_base64"
    else:
        (output,) = post(ours, cases["two images in one tensor"][0], json_headers).json()["outputs"]
        assert output["shape"] == [2], "every image of the tensor is answered"
        assert all("cam" in answer for answer in output["data"]), "every image of the tensor is answered"


def test_a_request_over_the_instance_limit_gets_413_on_both_engines(enveloped, kserve_engine) -> None:
    protocol, torchserve = enveloped
    body = v1_body(["x"] * 100) if protocol == "kserve" else v2_body(["x"] * 100)
    native = (
        f"{kserve_engine.inference_url}/v1/models/shapes:predict"
        if protocol == "kserve"
        else f"{kserve_engine.inference_url}/v2/models/shapes/infer"
    )
    for url in (f"{torchserve.inference_url}/predictions/shapes", native):
        response = post(url, body, {"Content-Type": "application/json"})
        assert response.status_code == 413, response.text[:200]
        assert response.json()["type"] == "too_many_instances", response.text[:200]


def test_v2_grpc_on_the_native_engine_answers_every_image(kserve_engine, scenes) -> None:
    images = [png_bytes(scene.image) for scene in scenes[:2]]
    with grpc.insecure_channel(f"127.0.0.1:{kserve_engine.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(pb.ModelReadyRequest(name="shapes"), timeout=30).ready
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[2], contents=pb.InferTensorContents(bytes_contents=images)
        )
        response = stub.ModelInfer(pb.ModelInferRequest(model_name="shapes", inputs=[tensor]), timeout=60)
        (output,) = response.outputs
        answers = [json.loads(element) for element in output.contents.bytes_contents]
        assert len(answers) == 2
        assert [a["cam"]["size"] for a in answers] == [list(scene.image.size) for scene in scenes[:2]]
        mismatched = pb.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[3], contents=pb.InferTensorContents(bytes_contents=images)
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(pb.ModelInferRequest(model_name="shapes", inputs=[mismatched]), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shape" in refused.value.details()


def test_the_native_engine_answers_requests_in_flight_together(kserve_engine, scenes) -> None:
    """Sixteen clients at once: every one answered correctly while the event loop keeps taking requests."""
    bodies = [png_bytes(scene.image) for scene in scenes[:16]]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda body: post(f"{kserve_engine.inference_url}/predictions/shapes", body), bodies))
    assert all(answer.status_code == 200 for answer in answers)
    assert [answer.json()["cam"]["size"] for answer in answers] == [list(scene.image.size) for scene in scenes[:16]]
    assert requests.get(f"{kserve_engine.inference_url}/v2/models/shapes/ready", timeout=10).json()["ready"] is True


def test_the_native_engine_reports_camserve_metrics(kserve_engine, scenes) -> None:
    url = kserve_engine.inference_url
    assert post(f"{url}/predictions/shapes", png_bytes(scenes[3].image), {"X-CAM-Method": "cam"}).status_code == 200
    assert post(f"{url}/predictions/shapes", b"not an image").status_code == 400
    text = requests.get(f"{url}/metrics", timeout=30).text
    assert 'CamRequests_total{Method="cam",Output="png",model_name="shapes"}' in text
    assert 'CamErrors_total{Kind="invalid_image",model_name="shapes"}' in text
    assert 'CamMapTime_count{Method="cam",model_name="shapes"}' in text
