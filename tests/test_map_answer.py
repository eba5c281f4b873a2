"""The heat map's size and the empty map, pinned through real TorchServe servers.

- Default (`auto`): the image's aspect ratio, its longest side the model input's longest side, never larger than
  the image; `size`, `bbox` and `peak` stay those of the original image, as with `original`.
- `original`: byte for byte the answer from before the default changed. The reference is that encoder's answers,
  recorded in tests/golden/answers_before_sized_heatmaps.json as the sha256 of their bytes, with the maps they
  encode. Through TorchServe the maps are made known exactly by a model built for it (KNOWN_MAP_PY: its layer's
  output is a fixed pattern of small powers of two, so every step of Grad-CAM is exact in float32 and the served
  grid is GRID, bit for bit), so the served bytes can be compared with the recorded ones for the same grid.
- An empty map (all zero, or not finite) answers `"bbox": null, "peak": null, "empty": true`: on the known-map
  model's class of negative weight (ReLU leaves nothing), and on the default model for a photograph without a
  shape, whose Grad-CAM map is all zero.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from support import SHAPES_MAR, TEST_SEED_START, default_heatmap_size, encoded, png_bytes, run_camserve, start_server

from camserve.protocol.options import OptionRules, parse_options
from camserve.protocol.responses import decode_heatmap, encode_answer, heatmap_png_size, json_bytes
from camserve_tools.data.scenes import CLASSES

# The known-map model's layer output, whatever the image: a large blob and a smaller, weaker one.
PATTERN = [
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 2, 4, 4, 0, 0, 0, 0],
    [0, 2, 4, 4, 2, 0, 0, 0],
    [0, 0, 2, 2, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 1, 2, 1],
    [0, 0, 0, 0, 0, 0, 1, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
]
GRID = torch.tensor(PATTERN, dtype=torch.float32) / 4  # Grad-CAM of class 0, min-max normalised: exact
KNOWN_MAP_INPUT = 64
KNOWN_MAP_LABELS = {"0": "pattern", "1": "nothing", "2": "half"}
KNOWN_MAP_PY = """
import torch
from torch import nn
from torch.nn import functional as F


class KnownMap(nn.Module):
    \"\"\"`features` outputs the buffer `pattern` whatever the image (a zero 1x1 convolution keeps the image in the
    graph); the head is global average pooling and one Linear layer, as CAM's. Grad-CAM of a class of weight w > 0
    is then ReLU(w / 64 x pattern) normalised: pattern / max(pattern), exactly; of w < 0, zero everywhere.\"\"\"

    def __init__(self):
        super().__init__()
        self.probe = nn.Conv2d(3, 1, 1)
        self.features = nn.ReLU()
        self.fc = nn.Linear(1, 3)
        self.register_buffer("pattern", torch.zeros(1, 1, 8, 8))

    def forward(self, x):
        probe = F.adaptive_avg_pool2d(self.probe(x), 8)
        return self.fc(self.features(self.pattern + probe).mean(dim=(2, 3)))
"""
# Image sizes of the served checks: a photo, a 1xN strip within the aspect bound (20:1), a strip longer than the
# model input, a camera-sized JPEG.
SERVED_SIZES = [(640, 480), (1, 20), (16, 320), (4000, 3000)]


def image_of_size(size: tuple[int, int], seed: int = 0) -> tuple[bytes, str]:
    """A noise image of `size`: camera-sized ones as JPEG (as a camera sends them), the others as PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if size[0] * size[1] > 4_000_000:
        return encoded(image, "JPEG", quality=85), "image/jpeg"
    return png_bytes(image), "image/png"


@pytest.fixture(scope="module")
def known_map(tmp_path_factory: pytest.TempPathFactory):
    """A TorchServe serving the known-map model, archived as `make archive MODEL_FILE=...` archives it."""
    from camserve_tools.archive.forms import ArchiveRequest, archive

    work = tmp_path_factory.mktemp("known-map")
    (work / "known_map.py").write_text(textwrap.dedent(KNOWN_MAP_PY))
    (work / "labels.json").write_text(json.dumps(KNOWN_MAP_LABELS))
    state = {
        "probe.weight": torch.zeros(1, 3, 1, 1),
        "probe.bias": torch.zeros(1),
        "fc.weight": torch.tensor([[1.0], [-1.0], [0.5]]),
        "fc.bias": torch.zeros(3),
        "pattern": torch.tensor(PATTERN, dtype=torch.float32)[None, None],
    }
    torch.save(state, work / "known_map.pth")
    request = ArchiveRequest(
        model_file=work / "known_map.py",
        weights=str(work / "known_map.pth"),
        labels=work / "labels.json",
        name="known_map",
        input_size=(KNOWN_MAP_INPUT, KNOWN_MAP_INPUT),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        layers=("features",),
    )
    mar = archive(request, work / "store")
    server = start_server(work / "server", {"known_map": mar})

    def post(body: bytes, content_type: str, headers: dict[str, str] | None = None, route: str = "predictions") -> requests.Response:
        return requests.post(
            f"{server.inference_url}/{route}/known_map",
            data=body,
            headers={"Content-Type": content_type, **(headers or {})},
            timeout=300,
        )

    try:
        yield post
    finally:
        server.stop()


# -- through TorchServe: the known map ---------------------------------------------------------------------------


@pytest.mark.server
def test_the_known_map_model_serves_exactly_the_known_grid(known_map) -> None:
    body, content_type = image_of_size((300, 200))
    answer = known_map(body, content_type, {"X-CAM-Output": "grid"}).json()
    assert answer["predictions"][0]["label"] == "pattern"
    assert answer["cam"]["grid"] == GRID.tolist()
    assert "empty" not in answer["cam"]


@pytest.mark.server
@pytest.mark.parametrize("size", SERVED_SIZES, ids=[f"{w}x{h}" for w, h in SERVED_SIZES])
def test_original_is_byte_for_byte_the_answer_from_before(known_map, size: tuple[int, int]) -> None:
    body, content_type = image_of_size(size)
    response = known_map(body, content_type, {"X-CAM-Heatmap-Size": "original"})
    assert response.status_code == 200, response.text[:500]
    served = response.json()
    assert response.content == json_bytes(served)  # the answer is its members' canonical bytes, so the `cam` member's pin it
    cam = json_bytes(served["cam"])
    recorded = next(case for case in BEFORE["served"] if case["size"] == list(size))
    assert (hashlib.sha256(cam).hexdigest(), len(cam)) == (recorded["sha256"], recorded["bytes"])


@pytest.mark.server
@pytest.mark.parametrize("size", SERVED_SIZES, ids=[f"{w}x{h}" for w, h in SERVED_SIZES])
def test_the_default_map_is_sized_by_the_model_input_and_keeps_box_and_peak(known_map, size: tuple[int, int]) -> None:
    body, content_type = image_of_size(size)
    default = known_map(body, content_type).json()["cam"]
    original = known_map(body, content_type, {"X-CAM-Heatmap-Size": "original"}).json()["cam"]
    assert default["heatmap_size"] == list(default_heatmap_size(size, KNOWN_MAP_INPUT))
    width, height = default["heatmap_size"]
    assert decode_heatmap(default["heatmap"]).shape == (height, width)
    assert {k: v for k, v in default.items() if k not in ("heatmap", "heatmap_size")} == {
        k: v for k, v in original.items() if k not in ("heatmap", "heatmap_size")
    }
    assert default["size"] == list(size)
    assert default["bbox"] is not None


@pytest.mark.server
def test_an_all_zero_map_through_torchserve_has_no_box_and_no_peak(known_map) -> None:
    body, content_type = image_of_size((640, 480))
    for headers in ({}, {"X-CAM-Heatmap-Size": "original"}):
        cam = known_map(body, content_type, {"X-CAM-Target": "nothing", **headers}).json()["cam"]
        assert (cam["label"], cam["bbox"], cam["peak"], cam["empty"]) == ("nothing", None, None, True)
        assert not decode_heatmap(cam["heatmap"]).any()
    grid = known_map(body, content_type, {"X-CAM-Target": "nothing", "X-CAM-Output": "grid"}).json()["cam"]
    assert grid["empty"] is True
    assert not np.any(grid["grid"])
    # Several maps: each says for itself.
    cams = known_map(body, content_type, {"X-CAM-Target": "pattern,nothing"}).json()["cam"]
    assert "empty" not in cams[0]
    assert cams[0]["bbox"] is not None
    assert cams[1]["empty"] is True
    explanation = known_map(body, content_type, {"X-CAM-Target": "nothing"}, route="explanations").json()
    assert (explanation["cam"]["bbox"], explanation["cam"]["empty"]) == (None, True)


# -- through TorchServe: the default model ---------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("size", SERVED_SIZES, ids=[f"{w}x{h}" for w, h in SERVED_SIZES])
def test_default_model_heat_map_size(predict, scenes, size: tuple[int, int]) -> None:
    image = scenes[5].image.resize(size, Image.Resampling.BILINEAR)
    body = encoded(image, "JPEG", quality=90) if size[0] * size[1] > 4_000_000 else png_bytes(image)
    default = predict(body).json()["cam"]
    original = predict(body, headers={"X-CAM-Heatmap-Size": "original"}).json()["cam"]
    assert default["size"] == original["size"] == list(size)
    assert default["heatmap_size"] == list(default_heatmap_size(size, 192))
    assert original["heatmap_size"] == list(size)
    width, height = default["heatmap_size"]
    assert decode_heatmap(default["heatmap"]).shape == (height, width)
    assert (default["bbox"], default["peak"], default.get("empty")) == (original["bbox"], original["peak"], original.get("empty"))


@pytest.mark.server
def test_default_model_on_a_photograph_without_a_shape_answers_an_empty_map(predict) -> None:
    """The shapes model sees no shape in a photograph: its Grad-CAM map is all zero, and the answer says so."""
    import skimage.data

    flat = png_bytes(Image.new("RGB", (640, 480), (128, 128, 128)))
    photo = png_bytes(Image.fromarray(skimage.data.coffee()))
    for body in (flat, photo):
        for headers in ({}, {"X-CAM-Method": "cam"}, {"X-CAM-Heatmap-Size": "original"}):
            cam = predict(body, headers=headers).json()["cam"]
            assert (cam["bbox"], cam["peak"], cam["empty"]) == (None, None, True), headers
        grid = predict(body, headers={"X-CAM-Output": "grid"}).json()["cam"]
        assert grid["empty"] is True
        assert not np.any(grid["grid"])


# -- in-process: original against the recorded answers, on many maps -------------------------------------------


RULES = OptionRules(
    methods={"gradcam", "cam"}, layers={"features"}, labels=["circle", "square", "triangle"], default_method="gradcam", default_topk=3
)
ENCODER_SIZES = [(640, 480), (1280, 960), (1, 20), (20, 1), (333, 517), (97, 61), (4000, 3000)]
PROBABILITIES = torch.tensor([0.2, 0.5, 0.3])
BEFORE = json.loads((Path(__file__).parent / "golden" / "answers_before_sized_heatmaps.json").read_text())
RECORDED_GRIDS = [torch.tensor(grid, dtype=torch.float32) for grid in BEFORE["grids"]]


def test_original_encodes_as_the_encoder_before_did() -> None:
    """Every recorded case (7 sizes, 9 maps, 4 kinds of request, predictions and explanations), byte for byte."""
    assert len(BEFORE["encoder"]) >= 0.8 * 2 * len(ENCODER_SIZES) * len(RECORDED_GRIDS)
    for case in BEFORE["encoder"]:
        size, grid = tuple(case["size"]), RECORDED_GRIDS[case["grid"]]
        options = parse_options({**case["request"], "heatmap_size": "original"}, RULES)
        maps = torch.stack([grid, grid.flip(1)])[: options.map_count]
        answer, _ = encode_answer(
            options,
            PROBABILITIES,
            maps,
            options.chosen_targets(PROBABILITIES),
            size,
            ("features",),
            RULES.labels,
            explain=case["explain"],
            input_size=(192, 192),
        )
        data = json_bytes(answer)
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (case["sha256"], case["bytes"]), case


def test_the_default_differs_from_original_only_in_the_heat_map() -> None:
    grid = RECORDED_GRIDS[-3]  # noise: positive almost everywhere, so not empty even where a strip samples one column
    for size in ENCODER_SIZES:
        default, original = (
            encode_answer(
                parse_options(raw, RULES), PROBABILITIES, grid[None], [1], size, ("features",), RULES.labels, input_size=(224, 224)
            )[0]["cam"]
            for raw in ({}, {"heatmap_size": "original"})
        )
        assert list(default) == list(original)  # the same keys in the same order
        assert default["heatmap_size"] == list(heatmap_png_size("auto", size, (224, 224))) == list(default_heatmap_size(size, 224))
        assert {k: v for k, v in default.items() if not k.startswith("heatmap")} == {
            k: v for k, v in original.items() if not k.startswith("heatmap")
        }
        width, height = default["heatmap_size"]
        small = decode_heatmap(default["heatmap"])
        assert small.shape == (height, width)
        # The same map: the small PNG is the full one resized, within a few levels where the bilinear sampling differs.
        full = Image.fromarray(decode_heatmap(original["heatmap"]))
        resized = np.asarray(full.resize((width, height), Image.Resampling.BILINEAR), dtype=int)
        assert np.abs(resized - small.astype(int)).mean() < 4, size


# -- the command: explain's journal and evaluate's figures ------------------------------------------------------


@pytest.fixture(scope="module")
def shapeless_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photograph without a shape and two flat images (the default model's maps of their top-1 class are empty;
    of any class for the flat ones), and one scene; COCO boxes for the flat images and the scene."""
    import skimage.data

    from camserve_tools.data.scenes import make_scene

    root = tmp_path_factory.mktemp("shapeless")
    (root / "images").mkdir()
    Image.fromarray(skimage.data.coffee()).save(root / "images" / "coffee.png")
    Image.new("RGB", (320, 240), (128, 128, 128)).save(root / "images" / "flat.png")
    Image.new("RGB", (200, 300), (30, 90, 200)).save(root / "images" / "blue.png")
    scene = make_scene(TEST_SEED_START + 4242)
    scene.image.save(root / "images" / "scene.png")
    x0, y0, x1, y1 = scene.box
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 100, 50, 80]},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 50, 50]},
        {"id": 3, "image_id": 3, "category_id": scene.label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0]},
    ]
    coco = {
        "images": [{"id": 1, "file_name": "blue.png"}, {"id": 2, "file_name": "flat.png"}, {"id": 3, "file_name": "scene.png"}],
        "annotations": annotations,
        "categories": [{"id": index + 1, "name": name} for index, name in enumerate(CLASSES)],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    return root


@pytest.mark.server
def test_explain_journals_an_empty_map_as_the_endpoint_answers_it(shapeless_photos: Path, tmp_path: Path) -> None:
    result = run_camserve("explain", SHAPES_MAR, shapeless_photos / "images", "--out", tmp_path / "out", "--json")
    assert result.returncode == 0, result.stderr
    lines = {Path(line["path"]).name: line for line in map(json.loads, (tmp_path / "out" / "explanations.jsonl").read_text().splitlines())}
    for name in ("coffee.png", "flat.png", "blue.png"):
        cam = lines[name]["answer"]["cam"]
        assert (lines[name]["status"], cam["bbox"], cam["peak"], cam["empty"]) == (200, None, None, True)
        assert not np.asarray(Image.open(tmp_path / "out" / lines[name]["file"])).any()  # the heat map written is blank
    assert "empty" not in lines["scene.png"]["answer"]["cam"]
    assert lines["scene.png"]["answer"]["cam"]["bbox"] is not None


@pytest.mark.server
def test_evaluate_counts_empty_maps_as_misses(shapeless_photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "evaluate"
    boxes = shapeless_photos / "coco.json"
    result = run_camserve(
        "evaluate", SHAPES_MAR, shapeless_photos / "images", "--boxes", boxes, "--out", out, "--steps", "4", "--no-sanity", "--json"
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["maps"], metrics["empty_maps"]) == (3, 2)
    assert metrics["per_class"]["circle"]["empty_maps"] == 2
    empty = [entry for entry in metrics["worst"] if entry["empty"]]
    assert len(empty) == 2
    assert all((e["pointing"], e["iou"], e["bbox"], e["peak"]) == (False, 0.0, None, None) for e in empty)
    assert metrics["pointing_game"] <= 1 / 3
    assert metrics["mean_iou"] <= 1 / 3
    summary = (out / "summary.md").read_text()
    assert "2 of them empty" in summary
    assert "empty map" in summary
    assert len(list((out / "worst").glob("*.png"))) == 3  # drawn without a box or a peak where there is none
