"""The engine-free pipeline in-process: built from a model dir, then whole batches, envelopes and request bounds."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import ROOT, default_heatmap_size, png_bytes

from camserve.models.shapes_net import ShapesNet
from camserve.pipeline import Answer, CamPipeline, Row
from camserve.pipeline.envelopes import v1_answer, v1_rows, v2_answer, v2_request
from camserve.protocol.decoding import RequestError
from camserve.protocol.limits import MAX_INSTANCES
from camserve.protocol.responses import decode_heatmap


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
def pipeline(model_dir: Path) -> CamPipeline:
    return CamPipeline.from_model_dir(model_dir)


def run(pipeline: CamPipeline, rows: list[dict], headers: list[dict] | None = None) -> list[Answer]:
    """Each row as its own client request, in one batch, as a server without an envelope runs them."""
    requests = [[Row(fields=row, headers=h)] for row, h in zip(rows, headers or [{} for _ in rows], strict=True)]
    return [answer for (answer,) in pipeline.answer(requests)]


def test_the_pipeline_reads_its_model_config(pipeline: CamPipeline) -> None:
    assert pipeline.labels == ["circle", "square", "triangle", "star", "cross", "hexagon"]
    assert pipeline.extractor.default_layers == ("features",)


def test_a_batch_answers_each_request_with_its_own_map(pipeline: CamPipeline, scenes) -> None:
    # The heat map at the default size, and at the image's (where the peak indexes it) in the same batch.
    rows = [{"body": png_bytes(scene.image)} for scene in scenes[:3]] + [{"body": png_bytes(scenes[3].image), "heatmap_size": "original"}]
    answers = run(pipeline, rows)
    assert len(answers) == 4
    for index, (answer, scene) in enumerate(zip(answers, scenes[:4], strict=True)):
        assert answer.status == 200
        assert isinstance(answer.body, dict)
        response = answer.body
        assert [p["index"] for p in response["predictions"]]
        assert len(response["predictions"]) == 3
        cam = response["cam"]
        assert cam["method"] == "gradcam"
        assert cam["layer"] == "features"
        assert cam["index"] == response["predictions"][0]["index"]
        assert cam["size"] == list(scene.image.size)
        heatmap = decode_heatmap(cam["heatmap"])
        width, height = scene.image.size if index == 3 else default_heatmap_size(scene.image.size, 192)
        assert cam["heatmap_size"] == [width, height]
        assert heatmap.shape == (height, width)
        assert heatmap.dtype.name == "uint8"
        x0, y0, x1, y1 = cam["bbox"]
        assert 0 <= x0 < x1 <= scene.image.width
        assert 0 <= y0 < y1 <= scene.image.height
        if index == 3:
            assert heatmap[cam["peak"][1], cam["peak"][0]] == heatmap.max()


def test_a_bad_request_fails_alone(pipeline: CamPipeline, scenes) -> None:
    rows = [{"body": png_bytes(scenes[0].image)}, {"body": b"garbage"}, {"body": png_bytes(scenes[1].image), "method": b"cam"}]
    answers = run(pipeline, rows)
    responses = [answer.body for answer in answers]
    assert answers[1].status == 400
    assert responses[1]["type"] == "invalid_image"
    assert "image" in responses[1]["message"]
    assert answers[0].status == 200
    assert "cam" in responses[0]
    assert answers[2].status == 200
    assert responses[2]["cam"]["method"] == "cam"


def test_plain_prediction_and_several_targets(pipeline: CamPipeline, scenes) -> None:
    rows = [{"body": png_bytes(scenes[0].image), "method": b"none"}, {"body": png_bytes(scenes[1].image), "target": b"star,circle"}]
    responses = [answer.body for answer in run(pipeline, rows)]
    assert "cam" not in responses[0]
    assert [cam["label"] for cam in responses[1]["cam"]] == ["star", "circle"]


def test_a_photo_decoded_at_reduced_scale_still_gets_full_size_answers(pipeline: CamPipeline, scenes) -> None:
    """JPEGs decode at a reduced DCT scale for the model; the heat map and the overlay keep the photo's size."""
    photo = scenes[0].image.resize((1280, 960))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    rows = [{"body": buffer.getvalue(), "heatmap_size": "original"}, {"body": buffer.getvalue()}, {"body": buffer.getvalue()}]
    answers = run(pipeline, rows, headers=[{}, {"accept": "image/png"}, {}])
    responses = [answer.body for answer in answers]
    assert responses[0]["cam"]["size"] == responses[2]["cam"]["size"] == [1280, 960]
    assert decode_heatmap(responses[0]["cam"]["heatmap"]).shape == (960, 1280)
    assert decode_heatmap(responses[2]["cam"]["heatmap"]).shape == (144, 192)  # the default: the model input's side
    assert answers[1].content_type == "image/png"
    with Image.open(io.BytesIO(responses[1])) as overlay:
        assert overlay.size == (1280, 960)


# -- a request as a whole ---------------------------------------------------------------------------------------------


def encoded_scene(scene) -> str:
    return base64.b64encode(png_bytes(scene.image)).decode("ascii")


def test_a_request_over_the_instance_limit_is_refused_before_any_work(pipeline: CamPipeline) -> None:
    rows = [Row(fields={"data": "not even base64"}) for _ in range(MAX_INSTANCES + 1)]
    read = pipeline.read(rows)
    assert all(isinstance(r, RequestError) and r.status == 413 and r.kind == "too_many_instances" for r in read)
    with pytest.raises(RequestError, match=str(MAX_INSTANCES)) as refused:
        v1_rows({"instances": [{"data": "x"}] * (MAX_INSTANCES + 1)}, {})
    assert refused.value.status == 413


def test_the_cost_cap_holds_for_the_whole_request(pipeline: CamPipeline, scenes) -> None:
    """Each Score-CAM instance fits the cap alone; together they do not, and nothing is decoded or run."""
    one = {"data": encoded_scene(scenes[0]), "method": "scorecam"}
    assert isinstance(pipeline.read([Row(fields=one)])[0], type(pipeline.decode(Row(fields=one))))
    read = pipeline.read([Row(fields=one)] * 3)
    assert all(isinstance(r, RequestError) and r.status == 422 and r.kind == "request_too_costly" for r in read)
    assert "3 images" in str(read[0])


def test_v1_envelope_answers_each_instance_and_keeps_errors_in_place(pipeline: CamPipeline, scenes) -> None:
    body = {"instances": [{"data": encoded_scene(scenes[0])}, {"data": "!!"}, encoded_scene(scenes[1])]}
    ((*answers,),) = pipeline.answer([v1_rows(body, {})])
    envelope = v1_answer(answers)
    assert envelope.status == 200
    predictions = envelope.body["predictions"]
    assert "cam" in predictions[0]
    assert predictions[1]["type"] == "invalid_base64"
    assert "cam" in predictions[2]
    ((only_bad,),) = pipeline.answer([v1_rows({"instances": [{"data": "!!"}]}, {})])
    assert v1_answer([only_bad]).status == 400


def test_v1_envelope_refuses_overlay_and_ignores_accept(pipeline: CamPipeline, scenes) -> None:
    rows = v1_rows(
        {"instances": [{"data": encoded_scene(scenes[0]), "output": "overlay"}, {"data": encoded_scene(scenes[0])}]},
        {"accept": "image/png"},
    )
    ((overlay, plain),) = pipeline.answer([rows])
    assert overlay.status == 400
    assert overlay.body["option"] == "output"
    assert plain.ok
    assert isinstance(plain.body, dict)
    assert "cam" in plain.body


@pytest.mark.parametrize(
    ("tensor", "kind"),
    [
        ({"name": "image", "shape": [2], "datatype": "BYTES", "data": ["a"]}, "shape_mismatch"),
        ({"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["a"]}, "shape_mismatch"),
        ({"name": "image", "shape": [2**63], "datatype": "BYTES", "data": ["a"]}, "shape_mismatch"),
        ({"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}, "invalid_envelope"),
        ({"name": "image", "shape": [1], "datatype": "BYTES", "data": [{"x": 1}]}, "invalid_envelope"),
        ({"shape": [1], "datatype": "BYTES", "data": ["a"]}, "invalid_envelope"),
    ],
)
def test_v2_shape_and_types_must_match_the_data(tensor: dict, kind: str) -> None:
    with pytest.raises(RequestError) as refused:
        v2_request({"inputs": [tensor]}, {})
    assert refused.value.status == 400
    assert refused.value.kind == kind


def test_v2_answers_every_image_of_a_tensor(pipeline: CamPipeline, scenes) -> None:
    images = [encoded_scene(scene) for scene in scenes[:2]]
    request = v2_request({"id": "r1", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": images}]}, {})
    ((*answers,),) = pipeline.answer([request.rows])
    envelope = v2_answer(answers, request, "shapes", "1.0", "unused")
    (output,) = envelope.body["outputs"]
    assert envelope.body["id"] == "r1"
    assert output["shape"] == [2]
    assert len(output["data"]) == 2
    assert all("cam" in answer for answer in output["data"])
