"""Helpers of the KServe pod suites (test_kserve_local*.py): the pod on loopback and the checks they share.

The pod is `make kserve-local`: TorchServe from a bundle of the shapes archive, KServe's model server in front.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from kserve import InferenceRESTClient, RESTConfig
from support import ROOT, SHAPES_MAR, png_bytes

from camserve_tools.kserve.bundle import write_bundle
from camserve_tools.kserve.local import KServeLocal
from camserve_tools.servers.torchserve import free_port


@contextmanager
def running_pod(base: Path, api: str) -> Iterator[KServeLocal]:
    """The pod for protocol `api` (v1 or v2) in `base`, on free loopback ports, bundled with the production config;
    stopped on the way out."""
    bundle = write_bundle(base / "bundle", [SHAPES_MAR], ROOT / "config" / "production.properties", api)
    local = KServeLocal(
        run_dir=base / "run",
        bundle=bundle,
        api=api,
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
    """The scene's image as base64 PNG, as an envelope carries it."""
    return base64.b64encode(png_bytes(scene.image)).decode("ascii")


def envelope_request(api: str, image: str) -> bytes:
    """A one-image request body in the envelope of protocol `api`, `image` being base64."""
    if api == "v1":
        return json.dumps({"instances": [{"data": image}]}).encode()
    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [image]}]}).encode()


def worker_pid(pod: KServeLocal) -> int:
    """The pid of the pod's one TorchServe worker, which must be READY."""
    ((pid, status),) = [
        (worker["pid"], worker["status"])
        for worker in requests.get(f"{pod.torchserve.management_url}/models/shapes", timeout=10).json()[0]["workers"]
    ]
    assert status == "READY"
    return pid


def front_answers(pod: KServeLocal, scene) -> None:
    """The front still answers a good request with the map of `scene`'s image."""
    if pod.api == "v1":
        response = requests.post(f"{pod.url}/v1/models/shapes:predict", json={"instances": [{"data": encoded(scene)}]}, timeout=60)
        answer = response.json()["predictions"][0]
    else:
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded(scene)]}]}
        response = requests.post(f"{pod.url}/v2/models/shapes/infer", json=body, timeout=60)
        answer = response.json()["outputs"][0]["data"][0]
    assert response.status_code == 200, response.text[:300]
    assert answer["cam"]["size"] == list(scene.image.size)
