"""deploy/kubernetes/ on a real TorchServe: its ConfigMap's config.properties serves our archive, the image's readiness
probe (camserve_tools.container.probe, the Deployment's exec command) passes only on a real answer, and TorchServe's
own gRPC inference API (no envelope) is answered by our handler.

The server runs with token authorization on (the ConfigMap turns it off, docs/deploy.md "Keys"), so that the probe's
use of the pod's key file and gRPC's token check are exercised too; every other setting is the ConfigMap's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from support import ROOT, SHAPES_MAR, png_bytes, start_server

from camserve_tools.servers.torchserve_grpc import compile_stubs

pytestmark = pytest.mark.server

CONFIG_MAP = next(doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text()) if doc)


@pytest.fixture(scope="module")
def pod_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ConfigMap's file, as the Deployment mounts it at /etc/camserve."""
    directory = tmp_path_factory.mktemp("etc-camserve")
    for name, text in CONFIG_MAP["data"].items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture(scope="module")
def server(pod_files: Path, tmp_path_factory: pytest.TempPathFactory):
    # camserve_tools.servers.torchserve puts the addresses on loopback and free ports.
    server = start_server(
        tmp_path_factory.mktemp("kubernetes"),
        {"shapes": SHAPES_MAR},
        config=pod_files / "config.properties",
        extra_properties={"disable_token_authorization": "false"},
    )
    assert server.inference_key(), "TorchServe wrote its key file into its working directory"
    try:
        yield server
    finally:
        server.stop()


def probe(pod_files: Path, server, *models: str, key_file: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAMSERVE_PROBE_URL": server.inference_url, "CAMSERVE_KEY_FILE": str(key_file or pod_files / "absent.json")}
    return subprocess.run(
        [sys.executable, "-m", "camserve_tools.container.probe", *models], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_readiness_probe_passes_on_a_real_answer(pod_files: Path, server) -> None:
    result = probe(pod_files, server, "shapes", key_file=server.run_dir / "key_file.json")
    assert result.returncode == 0, result.stdout + result.stderr


def test_readiness_probe_fails_without_an_answer(pod_files: Path, server, tmp_path: Path) -> None:
    missing = probe(pod_files, server, "shapes", "not-loaded", key_file=server.run_dir / "key_file.json")
    assert missing.returncode == 1
    assert "not ready: not-loaded" in missing.stdout
    wrong_key = tmp_path / "key_file.json"
    wrong_key.write_text(json.dumps({"inference": {"key": "not-the-key"}}))
    refused = probe(pod_files, server, "shapes", key_file=wrong_key)
    assert refused.returncode == 1
    assert "not ready: shapes" in refused.stdout
    assert probe(pod_files, server, "shapes").returncode == 1, "no key file while tokens are on"


class _WithToken:
    """A stub whose calls carry `authorization: Bearer <inference key>` metadata, as TorchServe's gRPC interceptor wants."""

    def __init__(self, stub, key: str) -> None:
        self.stub, self.metadata = stub, (("authorization", f"Bearer {key}"),)

    def Predictions(self, request, timeout: float):
        return self.stub.Predictions(request, timeout=timeout, metadata=self.metadata)


@pytest.fixture(scope="module")
def stub(server, tmp_path_factory: pytest.TempPathFactory):
    stubs = compile_stubs(tmp_path_factory.mktemp("grpc-stubs"))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_inference_port}") as channel:
        yield stubs, _WithToken(stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel), server.inference_key())


def test_grpc_needs_the_inference_token(server, stub) -> None:
    stubs, inference = stub
    request = stubs.inference_pb2.PredictionsRequest(model_name="shapes", input={"data": b"x"})
    for metadata in ((), (("authorization", "Bearer not-the-key"),)):
        with pytest.raises(grpc.RpcError) as raised:
            inference.stub.Predictions(request, timeout=30, metadata=metadata)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_predictions_answer_with_a_map(stub, scenes) -> None:
    stubs, inference = stub
    scene = scenes[4]
    # Inputs are the request's fields: the image under "data", options beside it (no headers on gRPC).
    request = stubs.inference_pb2.PredictionsRequest(
        model_name="shapes", input={"data": png_bytes(scene.image), "method": b"eigencam", "topk": b"2"}
    )
    answer = json.loads(inference.Predictions(request, timeout=60).prediction)
    assert len(answer["predictions"]) == 2
    assert answer["cam"]["method"] == "eigencam"
    assert answer["cam"]["size"] == [scene.image.width, scene.image.height]


def test_grpc_an_unknown_model_is_a_grpc_error(stub) -> None:
    stubs, inference = stub
    with pytest.raises(grpc.RpcError) as raised:
        inference.Predictions(stubs.inference_pb2.PredictionsRequest(model_name="nope", input={"data": b"x"}), timeout=60)
    assert raised.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL)


@pytest.mark.parametrize("inputs", [{"data": b"\x89PNG truncated"}, {"data": b"x", "mehtod": b"cam"}], ids=["truncated", "unknown option"])
def test_grpc_client_mistakes_are_invalid_argument(stub, inputs: dict) -> None:
    """TorchServe 0.12's gRPC job drops a prediction's own status: only an error of the whole batch (a single request
    here) reaches the client as a gRPC code, INVALID_ARGUMENT, with our JSON error as its details."""
    stubs, inference = stub
    with pytest.raises(grpc.RpcError) as raised:
        inference.Predictions(stubs.inference_pb2.PredictionsRequest(model_name="shapes", input=inputs), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = json.loads(raised.value.details().split("\n")[0])
    assert error["code"] == 400
    assert error["type"] in ("unknown_option", "invalid_image")
