"""A fault of ours is a 500, not the client's 400: the request it was serving answers `internal_error` alone, its
traceback is logged and it is counted; the rest of the batch is answered. And a peak-and-box answer that leaves the
compiled way is counted and logged once.

In-process through CamPipeline, with a stage made faulty by monkeypatching; and once through a real TorchServe whose
archive carries the same fault (its model module patches the worker's pipeline when the worker imports it).
"""

from __future__ import annotations

import json
import logging
import shutil
import textwrap
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image
from support import ROOT, png_bytes, start_server

from camserve.cam import localization
from camserve.pipeline import Answer, CamPipeline, Row
from camserve.pipeline import pipeline as pipeline_module
from camserve.protocol import decoding
from camserve.protocol.decoding import RequestError, decode_image

FAULTY_WIDTH = 37  # an image this wide meets the fault planted in a test
CLIENT_TEXT = "client-secret-7f3a"  # sent with the faulty request: must appear in neither its answer nor the log


class RecordedMetrics:
    """The pipeline's Metrics sink, kept: counts by (name, sorted dimensions)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()

    def add_time(self, name: str, milliseconds: float, dimensions: Mapping[str, str]) -> None:
        return None

    def add_count(self, name: str, dimensions: Mapping[str, str]) -> None:
        self.counts[(name, tuple(sorted(dimensions.items())))] += 1

    def count(self, name: str, **dimensions: str) -> int:
        return self.counts[(name, tuple(sorted(dimensions.items())))]


@pytest.fixture
def metrics() -> RecordedMetrics:
    return RecordedMetrics()


@pytest.fixture
def pipeline(metrics: RecordedMetrics) -> CamPipeline:
    """The default model as its archive serves it, reporting to `metrics`."""
    return CamPipeline.from_model_dir(ROOT / "models" / "shapes", metrics=metrics)


def image_bytes(width: int, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    return png_bytes(Image.new("RGB", (width, 60), colour))


def batch(pipeline: CamPipeline, requests: list[tuple[int, dict[str, str]]]) -> list[Answer]:
    """One batch of client requests: an image of each width, with its headers."""
    return [
        answer
        for (answer,) in pipeline.answer([[Row(fields={"body": image_bytes(width)}, headers=headers)] for width, headers in requests])
    ]


# The faulty request asks for another method than its neighbours, so that it is a group of its own in `predict`.
FAULTY_BATCH = [(50, {}), (FAULTY_WIDTH, {"x-cam-method": "layercam", "x-client-note": CLIENT_TEXT}), (70, {})]


def faulty(function: Callable[..., Any], when: Callable[..., bool]) -> Callable[..., Any]:
    """`function`, raising a KeyError (a fault of ours, not of the bytes) where `when` holds for its arguments."""

    def wrapped(*arguments: Any, **keywords: Any) -> Any:
        if when(*arguments, **keywords):
            raise KeyError("a fault planted by the test")
        return function(*arguments, **keywords)

    return wrapped


def _plant_in_decoding(monkeypatch: pytest.MonkeyPatch, pipeline: CamPipeline) -> None:
    # Inside decode_image, past the decoder: our own dimension check fails for the faulty image.
    monkeypatch.setattr(decoding, "check_dimensions", faulty(decoding.check_dimensions, lambda width, height: width == FAULTY_WIDTH))


def _plant_in_options(monkeypatch: pytest.MonkeyPatch, pipeline: CamPipeline) -> None:
    def is_faulty(row: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> bool:
        return headers is not None and "x-client-note" in headers

    monkeypatch.setattr(pipeline_module, "read_request", faulty(pipeline_module.read_request, is_faulty))


def _plant_in_resize(monkeypatch: pytest.MonkeyPatch, pipeline: CamPipeline) -> None:
    monkeypatch.setattr(pipeline, "transform", faulty(pipeline.transform, lambda image: image.width == FAULTY_WIDTH))


def _plant_in_maps(monkeypatch: pytest.MonkeyPatch, pipeline: CamPipeline) -> None:
    # The group of the faulty request's inputs: the only member of its (method, layers) group, see the test.
    monkeypatch.setattr(pipeline, "_run_group", faulty(pipeline._run_group, lambda members, *_: members[0].size[0] == FAULTY_WIDTH))


def _plant_in_encoding(monkeypatch: pytest.MonkeyPatch, pipeline: CamPipeline) -> None:
    def is_faulty(options: Any, probabilities: Any, maps: Any, targets: Any, size: tuple[int, int], *_: Any, **__: Any) -> bool:
        return size[0] == FAULTY_WIDTH

    monkeypatch.setattr(pipeline_module, "encode_answer", faulty(pipeline_module.encode_answer, is_faulty))


PLANTED = {
    "decode_image": (_plant_in_decoding, "read"),
    "read_request": (_plant_in_options, "read"),
    "transform": (_plant_in_resize, "read"),
    "maps": (_plant_in_maps, "compute"),
    "encode_answer": (_plant_in_encoding, "encode"),
}


def assert_internal_error(answer: Answer, stage: str) -> None:
    """A 500 with the protocol's error body, naming the stage and nothing the client sent."""
    assert answer.status == 500
    assert answer.content_type == "application/json"
    body = json.loads(answer.to_bytes())
    assert (body["code"], body["type"]) == (500, "internal_error"), body
    assert stage in body["message"], body
    assert CLIENT_TEXT not in answer.to_bytes().decode()


@pytest.mark.parametrize("where", list(PLANTED))
def test_a_fault_of_ours_is_a_500_for_its_request_alone(
    where: str, pipeline: CamPipeline, metrics: RecordedMetrics, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plant, stage = PLANTED[where]
    plant(monkeypatch, pipeline)
    with caplog.at_level(logging.ERROR, logger="camserve.pipeline.pipeline"):
        answers = batch(pipeline, FAULTY_BATCH)
    assert_internal_error(answers[1], stage)
    assert [answer.status for answer in answers] == [200, 500, 200]
    assert all(isinstance(answer.body, dict) and "cam" in answer.body for answer in (answers[0], answers[2]))
    # Logged once with its traceback, counted by stage and as a refusal of kind internal_error.
    (record,) = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError
    assert stage in record.getMessage()
    assert CLIENT_TEXT not in caplog.text
    assert metrics.count("CamInternalErrors", Stage=stage) == 1
    assert metrics.count("CamErrors", Kind="internal_error") == 1
    # The pipeline goes on: the same image, the fault removed, is answered.
    monkeypatch.undo()
    ((answer,),) = pipeline.answer([[Row(fields={"body": image_bytes(FAULTY_WIDTH)})]])
    assert answer.status == 200


def test_what_the_decoder_raises_on_bad_bytes_is_still_the_clients_400(pipeline: CamPipeline, metrics: RecordedMetrics) -> None:
    png = bytearray(image_bytes(50))
    idat = png.index(b"IDAT")
    png[idat + 8 : idat + 40] = b"\xff" * 32  # scrambled compressed data: zlib's error, through PIL
    for body in (b"not an image at all", bytes(png), image_bytes(50)[:60]):
        ((answer,),) = pipeline.answer([[Row(fields={"body": body})]])
        assert answer.status == 400, answer.body
        assert answer.error is not None
        assert answer.error.kind == "invalid_image", answer.body
    assert metrics.count("CamInternalErrors", Stage="read") == 0


def test_decode_image_lets_a_fault_of_ours_go_up_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the decoder's own exceptions become invalid_image: a fault in our checks is not the bytes' fault."""
    monkeypatch.setattr(decoding, "check_dimensions", faulty(decoding.check_dimensions, lambda width, height: True))
    with pytest.raises(KeyError):
        decode_image(image_bytes(50))
    monkeypatch.undo()
    with pytest.raises(RequestError) as refused:
        decode_image(b"GIF89a" + b"\x00" * 20)
    assert refused.value.status == 400
    assert refused.value.kind == "invalid_image"


# -- the compiled peak-and-box way, and what happens when it is left -------------------------------------------


@pytest.fixture
def fresh_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """No fallback counted or warned about yet in this process, as in a fresh worker."""
    localization.take_fast_path_fallbacks()
    monkeypatch.setattr(localization, "_fallbacks_warned", set())


def _full_size(grid: np.ndarray, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]] | None:
    heatmap = localization.upsample_map(torch.from_numpy(grid), size)
    box = localization.bounding_box(heatmap)
    return None if box is None else (localization.peak(heatmap), box)


@pytest.mark.usefixtures("fresh_fallbacks")
@pytest.mark.parametrize(
    ("reason", "plant"),
    [
        ("torch_rounding", lambda monkeypatch: monkeypatch.setattr(localization, "_torch_fuses", lambda: None)),
        ("runs_overflow", lambda monkeypatch: monkeypatch.setattr(localization, "grid_peak_and_box", lambda *_: (-1,) * 6)),
        ("empty_mask", lambda monkeypatch: monkeypatch.setattr(localization, "grid_peak_and_box", lambda *_: (-3,) * 6)),
        ("outside_unit_range", None),
    ],
)
def test_a_fallback_is_counted_and_logged_once_and_answers_the_same(
    reason: str, plant: Callable[[pytest.MonkeyPatch], None] | None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    grid = np.random.default_rng(0).random((6, 6), dtype=np.float32)
    if plant is None:
        grid[2, 3] = 1.5  # a grid no normalised map is
    else:
        plant(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="camserve.cam.localization"):
        found = [localization.peak_and_box(grid, (320, 240)) for _ in range(3)]
    assert found == [_full_size(grid, (320, 240))] * 3
    assert localization.take_fast_path_fallbacks() == {reason: 3}
    assert localization.take_fast_path_fallbacks() == {}
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert localization.FALLBACK_REASONS[reason] in warning.getMessage()


@pytest.mark.usefixtures("fresh_fallbacks")
def test_the_compiled_way_counts_nothing() -> None:
    grid = np.random.default_rng(1).random((6, 6), dtype=np.float32)
    assert localization.peak_and_box(grid, (320, 240)) == _full_size(grid, (320, 240))
    assert localization.take_fast_path_fallbacks() == {}


@pytest.mark.usefixtures("fresh_fallbacks")
def test_the_pipeline_reports_fallbacks_through_its_metrics(
    pipeline: CamPipeline, metrics: RecordedMetrics, monkeypatch: pytest.MonkeyPatch, scenes
) -> None:
    monkeypatch.setattr(localization, "_torch_fuses", lambda: None)
    rows = [[Row(fields={"body": png_bytes(scene.image)}, headers={"x-cam-maps": "2"})] for scene in scenes[:2]]
    answers = [answer for (answer,) in pipeline.answer(rows)]
    assert [answer.status for answer in answers] == [200, 200]
    # Every map that has a peak took the full-size way (an empty map has neither peak nor box to find).
    peaks = [cam["peak"] for answer in answers if isinstance(answer.body, dict) for cam in answer.body["cam"]]
    assert any(peaks)
    assert metrics.count("CamFastPathFallbacks", Reason="torch_rounding") == sum(peak is not None for peak in peaks)


# -- through a real TorchServe ----------------------------------------------------------------------------------

# The model module of the faulty archive: importing it (as the worker does, to build the model) plants the fault in
# the worker's pipeline, for images FAULTY_WIDTH pixels wide.
FAULTY_MODEL_MODULE = textwrap.dedent(
    f'''
    """ShapesNet, with a fault planted in the worker's read stage for images {FAULTY_WIDTH} pixels wide."""

    import logging

    from camserve.models.shapes_net import ShapesNet
    from camserve.pipeline import pipeline

    _decode_image = pipeline.decode_image
    _predict_each = pipeline.CamPipeline.predict_each


    def _faulty_decode_image(payload, at_least=None):
        image, size = _decode_image(payload, at_least)
        if size[0] == {FAULTY_WIDTH}:
            raise KeyError("a fault planted by the test")
        return image, size


    def _predict_each_logged(self, read):
        logging.getLogger("camserve.test").warning("faulty_shapes: a batch of %d requests", len(read))
        return _predict_each(self, read)


    pipeline.decode_image = _faulty_decode_image
    pipeline.CamPipeline.predict_each = _predict_each_logged


    class FaultyShapesNet(ShapesNet):
        pass
    '''
)


@pytest.mark.server
def test_torchserve_answers_a_fault_of_ours_with_a_500_and_the_rest_of_the_batch(tmp_path: Path) -> None:
    from camserve_tools.archive.packing import build_archive

    model_dir = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "shapes", model_dir)
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    config.update(batchSize=3, maxBatchDelay=2000)  # the three concurrent requests below share a batch
    config["handler"]["architecture"] = "faulty_shapes:FaultyShapesNet"
    (model_dir / "model-config.yaml").write_text(yaml.safe_dump(config))
    module = tmp_path / "faulty_shapes.py"
    module.write_text(FAULTY_MODEL_MODULE)
    mar = build_archive("faulty", model_dir, tmp_path / "store", extra_files=(module,))
    server = start_server(tmp_path / "server", {"faulty": mar})
    try:
        url, auth = f"{server.inference_url}/predictions/faulty", server.auth_headers()

        def post(width: int) -> requests.Response:
            headers = {**auth, "X-Client-Note": CLIENT_TEXT} if width == FAULTY_WIDTH else auth
            return requests.post(url, data=image_bytes(width), headers=headers, timeout=60)

        with ThreadPoolExecutor(3) as pool:
            responses = list(pool.map(post, [50, FAULTY_WIDTH, 70]))
        assert [response.status_code for response in responses] == [200, 500, 200], [r.text[:200] for r in responses]
        error = responses[1].json()
        assert error["code"] == 500
        assert error["type"] == "internal_error"
        assert CLIENT_TEXT not in responses[1].text
        assert all("cam" in response.json() for response in (responses[0], responses[2]))
        # The worker lives on and answers; the fault is logged with its traceback and counted.
        pids = server.worker_pids()
        assert post(60).status_code == 200
        assert server.worker_pids() == pids
        log = (server.log_dir / "model_log.log").read_text()
        assert "Backend worker process died" not in log
        assert "faulty_shapes: a batch of 3 requests" in log
        assert "camserve: the read stage failed" in log
        assert "KeyError: 'a fault planted by the test'" in log
        metrics = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
        assert "CamInternalErrors{" in metrics
        assert 'Stage="read"' in metrics
        assert 'Kind="internal_error"' in metrics
    finally:
        server.stop()
