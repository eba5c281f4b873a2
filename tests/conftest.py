"""Shared fixtures: generated scenes, and one real server per engine and test session started from the built .mar.

The helpers these fixtures are built on, and that test modules import, live in support.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from support import ROOT, SHAPES_MAR, TEST_SEED_START, require_archive, start_kserve_engine, start_ray_engine, start_server, stopped_after

from camserve_tools.data.scenes import Scene, make_scene
from camserve_tools.servers.kserve import KServeEngine
from camserve_tools.servers.ray_cluster import RayCluster
from camserve_tools.servers.torchserve import TorchServe

# The fixture that serves the shapes model on each engine.
ENGINE_FIXTURES = {"torchserve": "shapes_server", "kserve": "kserve_engine", "ray": "ray_engine"}


@pytest.fixture(scope="session")
def scenes() -> list[Scene]:
    return [make_scene(TEST_SEED_START + i) for i in range(24)]


@pytest.fixture(scope="session")
def shapes_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    require_archive(SHAPES_MAR)
    with stopped_after(start_server(tmp_path_factory.mktemp("shapes-server"), {"shapes": SHAPES_MAR})) as server:
        yield server


@pytest.fixture(scope="session")
def kserve_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeEngine]:
    require_archive(SHAPES_MAR)
    with stopped_after(start_kserve_engine(tmp_path_factory.mktemp("kserve-engine"), [SHAPES_MAR])) as engine:
        yield engine


@pytest.fixture(scope="session")
def ray_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """The shapes model on Ray Serve: a one-node cluster, one replica (the hostile suites check that one process)."""
    require_archive(SHAPES_MAR)
    with stopped_after(
        start_ray_engine(tmp_path_factory.mktemp("ray-engine"), {"shapes": SHAPES_MAR}, deployment_options={"shapes": {"num_replicas": 1}})
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session", params=tuple(ENGINE_FIXTURES))
def engine_server(request: pytest.FixtureRequest) -> TorchServe | KServeEngine | RayCluster:
    """The shapes model on each engine in turn: TorchServe, KServe's own model server and Ray Serve (the same pipeline)."""
    return request.getfixturevalue(ENGINE_FIXTURES[request.param])


@pytest.fixture
def predict(engine_server: TorchServe | KServeEngine | RayCluster):
    """POST to /predictions/shapes (or `path`) of the engine under test, with its authorization."""

    def post(
        body: bytes | dict | None = None,
        *,
        json: dict | None = None,
        headers: dict | None = None,
        files: dict | None = None,
        data: dict | None = None,
        path: str = "predictions/shapes",
        timeout: float = 60,
    ) -> requests.Response:
        headers = {**engine_server.auth_headers(), **(headers or {})}
        return requests.post(
            f"{engine_server.inference_url}/{path}",
            data=body if data is None else data,
            json=json,
            files=files,
            headers=headers,
            timeout=timeout,
        )

    return post


@pytest.fixture(scope="module", params=["kserve", "kserve-v2"])
def enveloped(request, tmp_path_factory: pytest.TempPathFactory):
    """TorchServe serving the shapes archive under a KServe envelope (v1, then v2), as (envelope, server)."""
    with stopped_after(
        start_server(tmp_path_factory.mktemp(request.param), {"shapes": SHAPES_MAR}, config=ROOT / "config" / f"{request.param}.properties")
    ) as server:
        yield request.param, server
