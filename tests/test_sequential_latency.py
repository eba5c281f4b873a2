"""The sequential-latency benchmark in miniature: a handful of requests through the session's TorchServe.

What is checked is the structure (every method measured on every photo at both sizes, every answer checked, the
table), never the figures: the timing goals live in docs/benchmarks.md.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from camserve_tools.bench.sequential_latency import (
    METHODS,
    PHOTOS,
    SIZES,
    WrongAnswer,
    check_answer,
    jpeg_photo_pool,
    markdown_table,
    measure,
    target_lines,
)


@pytest.mark.server
@pytest.mark.benchmark
def test_every_method_is_measured_on_every_photo_at_both_sizes(shapes_server) -> None:
    names = PHOTOS[:2]
    cells = [
        measure(
            shapes_server.inference_url,
            "shapes",
            jpeg_photo_pool(size, names),
            rounds=2,
            warmup_rounds=1,
            headers=shapes_server.auth_headers(),
        )
        for size in SIZES
    ]
    for cell, size in zip(cells, SIZES, strict=True):
        assert (cell.model, cell.size) == ("shapes", size)
        assert cell.requests_per_method == 2 * len(names)
        assert set(cell.latencies_ms) == set(cell.answer_bytes) == set(METHODS)
        for method in METHODS:
            assert len(cell.latencies_ms[method]) == len(cell.answer_bytes[method]) == 2 * len(names)
            assert 0 < min(cell.latencies_ms[method]) <= cell.median_ms(method) <= cell.p90_ms(method) <= max(cell.latencies_ms[method])
        # A map answer carries a heat map PNG (the model input's side); the plain one only labels.
        assert min(cell.answer_bytes["gradcam"]) > max(cell.answer_bytes["none"])
        assert cell.ratio("gradcam") == cell.median_ms("gradcam") / cell.median_ms("none")

    table = markdown_table(cells).splitlines()
    assert table[0].startswith("| model | image | requests per method | none median / p90 |")
    assert "gradcam ÷ none" in table[0]
    assert [row.split(" | ")[:3] for row in table[2:]] == [["| shapes", "640×480", "4"], ["| shapes", "1280×960", "4"]]
    assert all(len(row.split("|")) == len(table[0].split("|")) for row in table)
    assert len(target_lines(cells).splitlines()) == 2


def test_the_pool_is_jpeg_photos_at_the_size_asked_for() -> None:
    pool = jpeg_photo_pool((640, 480), PHOTOS[:3])
    assert list(pool) == list(PHOTOS[:3])
    for sample in pool.values():
        image = Image.open(io.BytesIO(sample.body))
        assert (image.format, image.size, sample.size, sample.content_type) == ("JPEG", (640, 480), (640, 480), "image/jpeg")


def test_a_wrong_answer_stops_the_run() -> None:
    sample = jpeg_photo_pool((640, 480), PHOTOS[:1])[PHOTOS[0]]
    plain = json.dumps({"predictions": [{"index": 0, "label": "a", "probability": 1.0}]}).encode()
    check_answer(200, plain, "none", sample)
    with pytest.raises(WrongAnswer, match="no map"):
        check_answer(200, plain, "gradcam", sample)
    with pytest.raises(WrongAnswer, match="HTTP 503"):
        check_answer(503, b"busy", "none", sample)

    def mapped(heatmap_size: list[int], **fields: object) -> bytes:
        png = io.BytesIO()
        Image.new("L", tuple(heatmap_size)).save(png, format="PNG")
        cam = {
            "method": "gradcam",
            "index": 0,
            "size": [640, 480],
            "heatmap_size": heatmap_size,
            "heatmap": base64.b64encode(png.getvalue()).decode(),
        }
        return json.dumps({"predictions": [{"index": 0, "label": "a", "probability": 1.0}], "cam": {**cam, **fields}}).encode()

    check_answer(200, mapped([224, 168], bbox=[1, 2, 3, 4], peak=[1, 2]), "gradcam", sample)
    check_answer(200, mapped([224, 168], bbox=None, peak=None, empty=True), "gradcam", sample)  # an empty map says so
    with pytest.raises(WrongAnswer, match="no bbox"):
        check_answer(200, mapped([224, 168], bbox=None, peak=None), "gradcam", sample)
    with pytest.raises(WrongAnswer, match="heatmap_size"):
        check_answer(200, mapped([1280, 960], bbox=[1, 2, 3, 4], peak=[1, 2]), "gradcam", sample)
