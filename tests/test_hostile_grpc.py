"""Hostile gRPC calls against a real TorchServe (config/dev.properties), with stubs compiled from its own jar.

After each call the same worker process answers a normal request, except where TorchServe 0.12's frontend itself
loses the worker; there the liveness probe (camserve_tools/servers/model_probe.py, what deploy/ runs) must see it.
The last test leaves the model dead on purpose: it runs on this module's own server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc
import pytest
import requests
from PIL import Image
from support import ROOT, SHAPES_MAR, png_bytes, start_server, stopped_after

from camserve_tools.servers.torchserve_grpc import compile_stubs

pytestmark = pytest.mark.server

PROBE = ROOT / "camserve_tools" / "servers" / "model_probe.py"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with stopped_after(start_server(tmp_path_factory.mktemp("grpc-hostile"), {"shapes": SHAPES_MAR})) as server:
        yield server


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory):
    return compile_stubs(tmp_path_factory.mktemp("grpc-stubs"))


@pytest.fixture(scope="module")
def inference(server, stubs):
    # No client-side size limit: the server's own limit is what is tested.
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_inference_port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        yield stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel)


def listed_workers(server) -> list[tuple[int, str]]:
    """The model's workers as the management API lists them: (pid, status)."""
    described = requests.get(f"{server.management_url}/models/shapes", timeout=10).json()
    return [(worker["pid"], worker["status"]) for worker in described[0]["workers"]]


def worker_pid(server, scenes) -> int:
    """The serving worker's pid, once the model answers (a worker TorchServe restarted takes a while to load)."""
    answers_normally(server, scenes, timeout=180)
    ((pid, status),) = listed_workers(server)
    assert status == "READY"
    return pid


def answers_normally(server, scenes, timeout: float = 30) -> None:
    response = requests.post(f"{server.inference_url}/predictions/shapes", data=png_bytes(scenes[0].image), timeout=timeout)
    assert response.status_code == 200
    assert response.json()["cam"]["method"] == "gradcam"


def probe(server, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PROBE), "--url", server.inference_url, "--timeout", str(timeout), "--key-file", "/nonexistent", "shapes"],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )


def request(stubs, sequence_id: str | None = None, **inputs: bytes):
    return stubs.inference_pb2.PredictionsRequest(model_name="shapes", input=inputs, sequence_id=sequence_id)


def test_stream_predictions_answers_once_and_keeps_the_worker(server, stubs, inference, scenes) -> None:
    """StreamPredictions: one reply, our answer, the stream closed; without ts_stream_next in the handler's answer
    TorchServe's frontend throws a NullPointerException after the first reply and restarts the worker."""
    before = worker_pid(server, scenes)
    replies = list(inference.StreamPredictions(request(stubs, data=png_bytes(scenes[1].image)), timeout=60))
    assert len(replies) == 1
    assert json.loads(replies[0].prediction)["cam"]["size"] == list(scenes[1].image.size)
    answers_normally(server, scenes)
    assert worker_pid(server, scenes) == before, "the worker was restarted"


@pytest.mark.parametrize(
    ("name", "inputs", "code"),
    [
        ("not an image", {"data": b"plain text"}, grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown option", {"data": b"x", "mehtod": b"cam"}, grpc.StatusCode.INVALID_ARGUMENT),
        ("aspect ratio over 20", {"data": png_bytes(Image.new("L", (4000, 150), 90))}, grpc.StatusCode.INVALID_ARGUMENT),
        ("image over 40 megapixels", {"data": png_bytes(Image.new("L", (1, 16_385)))}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_client_mistakes_get_a_client_error_code(server, stubs, inference, scenes, name: str, inputs: dict, code) -> None:
    """Never UNAVAILABLE (clients retry it) nor an OK reply holding an error: INVALID_ARGUMENT or RESOURCE_EXHAUSTED."""
    before = worker_pid(server, scenes)
    with pytest.raises(grpc.RpcError) as raised:
        inference.Predictions(request(stubs, **inputs), timeout=60)
    assert raised.value.code() == code, (name, raised.value.code(), raised.value.details())
    assert json.loads(raised.value.details().split("\n")[0])["code"] in (400, 413, 422)
    answers_normally(server, scenes)
    assert worker_pid(server, scenes) == before


def test_an_oversized_message_is_refused_by_the_frontend(server, stubs, inference, scenes) -> None:
    """TorchServe's gRPC server (grpc-java) resets the stream of a message over max_request_size: the client sees
    CANCELLED, not RESOURCE_EXHAUSTED, and nothing in TorchServe's settings changes that (docs/deploy.md, "gRPC").
    Asserted, so that a change in TorchServe shows; the worker never sees the message."""
    before = worker_pid(server, scenes)
    with pytest.raises(grpc.RpcError) as raised:
        inference.Predictions(request(stubs, data=b"x" * (33 * 1024 * 1024)), timeout=60)
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    answers_normally(server, scenes)
    assert worker_pid(server, scenes) == before


def test_the_liveness_probe_passes_on_a_live_model(server, scenes) -> None:
    worker_pid(server, scenes)
    result = probe(server, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stream_predictions2_while_busy_leaves_a_dead_model_that_only_the_probe_sees(server, stubs, inference, scenes) -> None:
    """TorchServe 0.12's frontend bug, reproduced: a StreamPredictions2 call made while the
    worker is busy fails at once, and the queued job then makes the frontend drop the worker for good. The port
    cannot be closed (TorchServe has no setting for it), so the liveness probe must fail, and the pod be restarted."""
    pid = worker_pid(server, scenes)
    log = server.log_dir / "ts_log.log"
    offset = log.stat().st_size
    slow = threading.Thread(
        target=requests.post,
        args=(f"{server.inference_url}/predictions/shapes",),
        kwargs={"data": png_bytes(scenes[2].image), "headers": {"X-CAM-Method": "scorecam", "X-CAM-Target": "0,1"}, "timeout": 120},
    )
    slow.start()
    time.sleep(0.3)
    # With a sequence id the job is queued, then the frontend fails on the model's missing sequence table.
    stream = inference.StreamPredictions2(iter([request(stubs, sequence_id="s1", data=png_bytes(scenes[3].image))]), timeout=30)
    with pytest.raises(grpc.RpcError) as raised:
        list(stream)
    assert raised.value.code() == grpc.StatusCode.UNKNOWN
    slow.join()
    deadline = time.monotonic() + 60
    while "Stream is already completed" not in log.read_bytes()[offset:].decode(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)
    # The frontend dropped the worker when the queued job answered a call it had closed; yet every health signal
    # TorchServe has still says all is well...
    assert "Stream is already completed" in log.read_bytes()[offset:].decode(errors="replace")
    assert listed_workers(server) == [(pid, "READY")], "TorchServe still lists the dead worker as READY"
    assert requests.get(f"{server.inference_url}/ping", timeout=10).json() == {"status": "Healthy"}
    # ... but no request is answered any more, and the probe says so, naming the model.
    result = probe(server, timeout=5)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not answering: shapes" in result.stdout, result.stdout + result.stderr
