"""The handler through TorchServe's own MockContext: initialize from a model dir, then whole batches."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, default_heatmap_size, png_bytes
from PIL import Image

from camserve.models.shapes_net import ShapesNet
from camserve.protocol.responses import decode_heatmap
from camserve.serving.handler import CamHandler
from camserve_tools.local_handler import BatchContext, batch_context, initialised_handler


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir like an extracted archive; random weights are enough to test the plumbing."""
    directory = tmp_path_factory.mktemp("shapes-model-dir")
    torch.manual_seed(0)
    torch.save(ShapesNet().state_dict(), directory / "shapes_net.pt")
    for name in ("model-config.yaml", "index_to_name.json"):
        shutil.copy2(ROOT / "models" / "shapes" / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> CamHandler:
    handler = initialised_handler(model_dir, "shapes_net.pt", "shapes")
    assert isinstance(handler, CamHandler)
    return handler


def run(handler: CamHandler, rows: list[dict], headers: list[dict] | None = None) -> tuple[list, BatchContext]:
    context = batch_context(headers or [{} for _ in rows])
    return handler.handle(rows, context), context


def test_initialize_reads_model_config(handler: CamHandler) -> None:
    assert handler.initialized
    assert handler.labels == ["circle", "square", "triangle", "star", "cross", "hexagon"]
    assert handler.extractor.default_layers == ("features",)


def test_a_batch_answers_each_request_with_its_own_map(handler: CamHandler, scenes) -> None:
    # The heat map at the default size, and at the image's (where the peak indexes it) in the same batch.
    rows = [{"body": png_bytes(scene.image)} for scene in scenes[:3]] + [{"body": png_bytes(scenes[3].image), "heatmap_size": b"original"}]
    responses, context = run(handler, rows)
    assert len(responses) == 4
    for response, scene, index in zip(responses, scenes, range(4)):
        assert context.get_response_status(index)[0] == 200
        assert [p["index"] for p in response["predictions"]] and len(response["predictions"]) == 3
        cam = response["cam"]
        assert cam["method"] == "gradcam" and cam["layer"] == "features"
        assert cam["index"] == response["predictions"][0]["index"]
        assert cam["size"] == list(scene.image.size)
        heatmap = decode_heatmap(cam["heatmap"])
        width, height = scene.image.size if index == 3 else default_heatmap_size(scene.image.size, 192)
        assert cam["heatmap_size"] == [width, height] and heatmap.shape == (height, width) and heatmap.dtype.name == "uint8"
        x0, y0, x1, y1 = cam["bbox"]
        assert 0 <= x0 < x1 <= scene.image.width and 0 <= y0 < y1 <= scene.image.height
        if index == 3:
            assert heatmap[cam["peak"][1], cam["peak"][0]] == heatmap.max()


def test_a_bad_request_fails_alone(handler: CamHandler, scenes) -> None:
    rows = [{"body": png_bytes(scenes[0].image)}, {"body": b"garbage"}, {"body": png_bytes(scenes[1].image), "method": b"cam"}]
    responses, context = run(handler, rows)
    assert context.get_response_status(1)[0] == 400
    assert responses[1]["type"] == "invalid_image" and "image" in responses[1]["message"]
    assert context.get_response_status(0)[0] == 200 and "cam" in responses[0]
    assert context.get_response_status(2)[0] == 200 and responses[2]["cam"]["method"] == "cam"


def test_plain_prediction_and_several_targets(handler: CamHandler, scenes) -> None:
    rows = [{"body": png_bytes(scenes[0].image), "method": b"none"}, {"body": png_bytes(scenes[1].image), "target": b"star,circle"}]
    responses, _ = run(handler, rows)
    assert "cam" not in responses[0]
    assert [cam["label"] for cam in responses[1]["cam"]] == ["star", "circle"]


def test_a_photo_decoded_at_reduced_scale_still_gets_full_size_answers(handler: CamHandler, scenes) -> None:
    """JPEGs decode at a reduced DCT scale for the model; the heat map and the overlay keep the photo's size."""
    photo = scenes[0].image.resize((1280, 960))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    rows = [{"body": buffer.getvalue()}, {"body": buffer.getvalue()}, {"body": buffer.getvalue(), "heatmap_size": b"original"}]
    responses, context = run(handler, rows, headers=[{}, {"Accept": "image/png"}, {}])
    assert responses[0]["cam"]["size"] == responses[2]["cam"]["size"] == [1280, 960]
    assert decode_heatmap(responses[0]["cam"]["heatmap"]).shape == (144, 192)  # the default: the model input's side
    assert decode_heatmap(responses[2]["cam"]["heatmap"]).shape == (960, 1280)
    assert context.get_response_content_type(1) == "image/png"
    with Image.open(io.BytesIO(responses[1])) as overlay:
        assert overlay.size == (1280, 960)
