"""The map answer from the grid: peak and box equal to the full-size map's, heat map pixels within one level of it."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from camserve.cam.localization import bounding_box, map_is_empty, peak, peak_and_box, upsample_map
from camserve.protocol.responses import HEATMAP_LEVELS, HEATMAP_STEP, heatmap_png_of_grid

# Output sizes: camera and web sizes, odd ones, down-sampling, one-pixel sides, and the small outputs (height +
# width <= 128) that torch computes with another kernel.
SIZES = [(1280, 960), (640, 480), (333, 517), (97, 1203), (300, 5), (1, 700), (12, 9), (1, 1), (64, 64)]


def grid_cases(count: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Maps as served and maps that stress the rules: plateaus, ties, many regions, empty maps."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for case in range(count):
        h, w = (int(v) for v in torch.randint(1, 20, (2,), generator=generator))
        kind = case % 6
        if kind == 0:  # smooth, as most CAMs: a product of bumps
            y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            centre = torch.rand(2, generator=generator) * 2 - 1
            grid = torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) * 3)
        elif kind == 1:  # noise: many regions above 20 %
            grid = torch.rand(h, w, generator=generator)
        elif kind == 2:  # plateaus and equal regions
            grid = torch.floor(torch.rand(h, w, generator=generator) * 3) / 3
        elif kind == 3:  # sparse spikes: several separate blobs, ties at the maximum
            grid = (torch.rand(h, w, generator=generator) > 0.8).float()
        elif kind == 4:  # steep: most values far below the maximum
            grid = torch.rand(h, w, generator=generator) ** 6
        else:  # flat: all zero (a constant map normalises to zero)
            grid = torch.zeros(h, w)
        cases.append((f"{case}:{kind}:{h}x{w}", grid / grid.max() if grid.max() > 0 else grid))
    return cases


def full_size_peak_and_box(grid: torch.Tensor, size: tuple[int, int]) -> tuple | None:
    """The reference: peak and box of the map upsampled to `size`, None where it has no box (an empty map)."""
    heatmap = upsample_map(grid, size)
    box = bounding_box(heatmap)
    return None if box is None else (peak(heatmap), box)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_peak_and_box_are_those_of_the_upsampled_map(size: tuple[int, int]) -> None:
    for name, grid in grid_cases(60, seed=size[0] * 7 + size[1]):
        assert peak_and_box(grid, size) == full_size_peak_and_box(grid, size), name


def test_peak_and_box_of_named_maps() -> None:
    two_blobs = torch.zeros(7, 7)
    two_blobs[2, 4], two_blobs[5, 1] = 1.0, 0.9
    corner = torch.zeros(16, 16)
    corner[15, 15] = 1.0  # the maximum on the last knot: a plateau to the image corner, where torch's rounding wiggles
    saturated = torch.zeros(16, 16)
    saturated[4:7, 4:7] = 1.0  # a flat top: many pixels tie at the maximum
    for grid in (two_blobs, corner, saturated, torch.ones(4, 4)):
        for size in [(640, 480), (1280, 960), (301, 199)]:
            assert peak_and_box(grid, size) == full_size_peak_and_box(grid, size) is not None


@pytest.mark.parametrize("size", [(640, 480), (12, 9)], ids=["grid way", "full-size way"])
def test_an_empty_map_has_no_peak_and_no_box(size: tuple[int, int]) -> None:
    nan, infinite = torch.rand(16, 16), torch.rand(16, 16)
    nan[3, 5], infinite[7, 1] = float("nan"), float("inf")
    for grid in (torch.zeros(16, 16), torch.full((4, 4), float("nan")), nan, infinite, torch.full((5, 5), -0.5), torch.zeros(0, 3)):
        assert map_is_empty(grid)
        assert map_is_empty(grid.numpy())
        assert peak_and_box(grid, size) is None
    assert bounding_box(torch.zeros(16, 16)) is None
    assert bounding_box(torch.full((4, 4), float("nan"))) is None
    assert not map_is_empty(torch.eye(4) * 1e-6)
    assert peak_and_box(torch.eye(4) * 1e-6, size) is not None


def test_grids_outside_the_unit_range_take_the_full_size_way() -> None:
    grid = torch.rand(9, 9, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.3
    heatmap = upsample_map(grid, (640, 480))
    assert peak_and_box(grid, (640, 480)) == (peak(heatmap), bounding_box(heatmap))


def old_pixels(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """The heat map pixels as the answer had them before: torch's upsampling at full size, rounded to 64 levels."""
    return ((upsample_map(grid, size) * HEATMAP_LEVELS).round() * HEATMAP_STEP).to(torch.uint8).numpy()


@pytest.mark.parametrize("size", [(1280, 960), (640, 480), (333, 517), (7, 1), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_heatmap_png_pixels_are_within_one_level_of_the_full_size_map(size: tuple[int, int]) -> None:
    differing = total = 0
    for name, grid in grid_cases(30, seed=size[0] + size[1]):
        image = Image.open(io.BytesIO(heatmap_png_of_grid(grid, size)))
        assert image.format == "PNG", name
        assert image.mode == "L", name
        assert image.size == size, name
        pixels = np.asarray(image).astype(int)
        assert (pixels % HEATMAP_STEP == 0).all()
        assert pixels.max() <= HEATMAP_LEVELS * HEATMAP_STEP
        difference = np.abs(pixels - old_pixels(grid, size))
        assert difference.max() <= HEATMAP_STEP, name
        if name.split(":")[1] in ("0", "1", "4"):  # continuous values; plateaus and spikes sit on level boundaries
            differing += int((difference > 0).sum())
            total += difference.size
    # Float rounding differs only on the rare pixel whose value sits on a level boundary.
    assert differing <= max(1, total * 1e-4)


def test_heatmap_png_clamps_and_survives_nan() -> None:
    grid = torch.tensor([[-0.5, 2.0], [float("nan"), 0.5]])
    pixels = np.asarray(Image.open(io.BytesIO(heatmap_png_of_grid(grid, (4, 4)))))
    assert pixels.shape == (4, 4)
    assert pixels.min() >= 0
    assert pixels.max() == HEATMAP_LEVELS * HEATMAP_STEP


def test_this_torch_is_reproduced_so_the_grid_way_is_taken() -> None:
    from camserve.cam.localization import _torch_fuses

    assert _torch_fuses() is not None


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_read_only_package_imports_and_answers_without_numbas_cache() -> None:
    """A pod with a read-only image and home: numba finds nowhere to cache, and the package must still work."""
    package = Path(__file__).resolve().parent.parent / "camserve"
    root = Path(tempfile.mkdtemp(prefix="camserve-read-only-"))
    try:
        shutil.copytree(package, root / "camserve", ignore=shutil.ignore_patterns("__pycache__"))
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        program = (
            f"import sys; sys.path.insert(0, {str(root)!r}); import torch; "
            "from camserve.cam.localization import peak_and_box; "
            "print(peak_and_box(torch.tensor([[0.0, 1.0], [0.5, 0.0]]), (640, 480)))"
        )
        unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", program]
        environment = {**os.environ, "HOME": "/nonexistent"}
        environment.pop("NUMBA_CACHE_DIR", None)
        result = subprocess.run(unprivileged, capture_output=True, text=True, timeout=300, env=environment, cwd=root)
        assert result.returncode == 0, result.stderr[-2000:]
        heatmap = upsample_map(torch.tensor([[0.0, 1.0], [0.5, 0.0]]), (640, 480))
        assert result.stdout.strip() == str((peak(heatmap), bounding_box(heatmap)))
        assert not list(root.rglob("*.nbi"))
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root)
