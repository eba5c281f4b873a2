"""Shared fixtures: generated scenes, and one real TorchServe per test session started from the built .mar."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from camserve_tools.data.scenes import EVAL_SEED_START, Scene, make_scene
from camserve_tools.servers.kserve import KServeEngine
from camserve_tools.servers.ray_cluster import RayCluster, body_limit
from camserve_tools.servers.torchserve import TorchServe

ROOT = Path(__file__).resolve().parent.parent
SHAPES_MAR = ROOT / "model_store" / "shapes.mar"
# Tests use their own seed range, after the evaluation script's, so no figure is tuned on a test scene.
TEST_SEED_START = EVAL_SEED_START + 5_000_000


def encoded(image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_bytes(image) -> bytes:
    return encoded(image, "PNG")


def default_heatmap_size(size: tuple[int, int], input_side: int) -> tuple[int, int]:
    """(width, height) of the default heat map for an image of `size` (width, height): the image's aspect ratio,
    its longest side the model input's longest side (`input_side`), never larger than the image."""
    width, height = size
    scale = min(1.0, input_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (a decompression bomb's calling card), with almost no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def scenes() -> list[Scene]:
    return [make_scene(TEST_SEED_START + i) for i in range(24)]


def start_server(run_dir: Path, mars: dict[str, Path], config: Path = ROOT / "config" / "dev.properties", **kwargs) -> TorchServe:
    """A TorchServe in `run_dir` (own TMPDIR, free ports) serving copies of `mars` from a private model store."""
    store = run_dir / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    for name, mar in mars.items():
        shutil.copy2(mar, store / f"{name}.mar")
    server = TorchServe.on_free_ports(
        run_dir=run_dir,
        config=config,
        model_store=store,
        models=",".join(f"{name}={name}.mar" for name in mars),
        **kwargs,
    )
    server.start()
    return server


@pytest.fixture(scope="session")
def shapes_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    if not SHAPES_MAR.exists():
        pytest.fail(f"{SHAPES_MAR} is missing: run `make archive` (make test builds it)")
    server = start_server(tmp_path_factory.mktemp("shapes-server"), {"shapes": SHAPES_MAR})
    try:
        yield server
    finally:
        server.stop()


def start_kserve_engine(run_dir: Path, archives: list[Path]) -> KServeEngine:
    """camserve on KServe's own model server (no TorchServe) in `run_dir`, on free ports, serving `archives`."""
    engine = KServeEngine.on_free_ports(run_dir=run_dir, archives=archives, config=ROOT / "config" / "dev.properties")
    engine.start()
    return engine


@pytest.fixture(scope="session")
def kserve_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeEngine]:
    engine = start_kserve_engine(tmp_path_factory.mktemp("kserve-engine"), [SHAPES_MAR])
    try:
        yield engine
    finally:
        engine.stop()


def start_ray_engine(run_dir: Path, archives: dict[str, Path], **fields) -> RayCluster:
    """A local Ray cluster in `run_dir` serving `archives` through Ray Serve on a free port, with the body limit of
    config/dev.properties; skipped with a message where Ray cannot be imported."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray[serve]==2.60.0' (pinned in pyproject.toml)")
    cluster = RayCluster.on_free_ports(
        run_dir=run_dir, archives=archives, max_body_bytes=body_limit(ROOT / "config" / "dev.properties"), **fields
    )
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def ray_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """The shapes model on Ray Serve: a one-node cluster, one replica (the hostile suites check that one process)."""
    cluster = start_ray_engine(
        tmp_path_factory.mktemp("ray-engine"), {"shapes": SHAPES_MAR}, deployment_options={"shapes": {"num_replicas": 1}}
    )
    try:
        yield cluster
    finally:
        cluster.stop()


ENGINES = ("torchserve", "kserve", "ray")
ENGINE_FIXTURES = {"torchserve": "shapes_server", "kserve": "kserve_engine", "ray": "ray_engine"}


@pytest.fixture(scope="session", params=ENGINES)
def engine_server(request: pytest.FixtureRequest) -> TorchServe | KServeEngine | RayCluster:
    """The shapes model on each engine in turn: TorchServe, KServe's own model server and Ray Serve (the same pipeline)."""
    return request.getfixturevalue(ENGINE_FIXTURES[request.param])


@pytest.fixture
def predict(engine_server: TorchServe | KServeEngine | RayCluster):
    """POST to /predictions/shapes (or `path`) of the engine under test, with its authorization."""
    shapes_server = engine_server

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
        headers = {**shapes_server.auth_headers(), **(headers or {})}
        return requests.post(
            f"{shapes_server.inference_url}/{path}",
            data=body if data is None else data,
            json=json,
            files=files,
            headers=headers,
            timeout=timeout,
        )

    return post
