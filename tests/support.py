"""Helpers the test modules share: paths, encoders, hostile PNGs and the starters of real servers.

Plain functions and constants, imported as `from support import ...` (pytest puts tests/ on sys.path, since it has
no __init__.py); conftest.py keeps only the fixtures built on them.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from camserve_tools.data.scenes import EVAL_SEED_START
from camserve_tools.servers.kserve import KServeEngine
from camserve_tools.servers.ray_cluster import RayCluster, body_limit
from camserve_tools.servers.torchserve import TorchServe

ROOT = Path(__file__).resolve().parent.parent
SHAPES_MAR = ROOT / "model_store" / "shapes.mar"
IMAGENET_MAR = ROOT / "model_store" / "imagenet.mar"
DEV_CONFIG = ROOT / "config" / "dev.properties"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
# Tests use their own seed range, after the evaluation script's, so no figure is tuned on a test scene.
TEST_SEED_START = EVAL_SEED_START + 5_000_000


def run_camserve(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The `camserve` command as a pipeline runs it: a subprocess from the repository root (the checkout's .venv
    where there is one), its output captured as text; `timeout` only stops a hang."""
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    return subprocess.run([python, "-m", "camserve_tools.cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def encoded(image, fmt: str, **save) -> bytes:
    """`image` (a PIL image) saved in `fmt` with the save options `save`, as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_bytes(image) -> bytes:
    """`image` (a PIL image) as PNG bytes."""
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


def require_archive(archive: Path) -> None:
    """Fail (not skip) with the command that builds `archive` when it is missing: make test builds every one."""
    if not archive.exists():
        pytest.fail(f"{archive} is missing: run `make {archive.relative_to(ROOT)}` (make test builds it)")


class _HasStop(Protocol):
    def stop(self) -> None: ...


_Stoppable = TypeVar("_Stoppable", bound=_HasStop)


@contextmanager
def stopped_after(server: _Stoppable) -> Iterator[_Stoppable]:
    """`server` for the block, stopped after it whatever happens (a fixture yields inside it)."""
    try:
        yield server
    finally:
        server.stop()


def start_server(run_dir: Path, mars: dict[str, Path], config: Path = DEV_CONFIG, **kwargs) -> TorchServe:
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


def start_kserve_engine(run_dir: Path, archives: list[Path]) -> KServeEngine:
    """camserve on KServe's own model server (no TorchServe) in `run_dir`, on free ports, serving `archives`."""
    engine = KServeEngine.on_free_ports(run_dir=run_dir, archives=archives, config=DEV_CONFIG)
    engine.start()
    return engine


def start_ray_engine(run_dir: Path, archives: dict[str, Path], **fields) -> RayCluster:
    """A local Ray cluster in `run_dir` serving `archives` through Ray Serve on a free port, with the body limit of
    config/dev.properties; skipped with a message where Ray cannot be imported."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray[serve]==2.60.0' (pinned in pyproject.toml)")
    cluster = RayCluster.on_free_ports(run_dir=run_dir, archives=archives, max_body_bytes=body_limit(DEV_CONFIG), **fields)
    cluster.start()
    return cluster
