"""Single requests that once killed a worker or took the model offline (issue: one request must never kill a
worker), each with its neighbours, against a real TorchServe. After every one, a normal request is answered at
once by the same worker process, and the worker's peak memory over the whole module stays bounded.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image
from support import encoded, png_bytes, png_declaring

pytestmark = pytest.mark.server

PEAK_RSS_BOUND_MB = 2048  # documented in docs/endurance.md


def real_png(width: int, height: int) -> bytes:
    """A complete, decodable greyscale PNG: a real bomb is small because flat pixels compress 1000:1."""
    return encoded(Image.new("L", (width, height), 90), "PNG")


def truncated_jpeg_with_end_marker(side: int = 6324, kept: int = 20) -> bytes:
    """A camera-sized JPEG cut a few bytes into its scan and closed with EOI: libjpeg pads it with grey silently."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (side // 10, side // 10, 3), dtype=np.uint8))
    data = encoded(small.resize((side, side)), "JPEG", quality=90)
    scan = data.index(b"\xff\xda")
    return data[: scan + kept] + b"\xff\xd9"


def noise_jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(1)
    return encoded(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)), "JPEG", quality=75)


def small_png() -> bytes:
    return encoded(Image.new("RGB", (160, 120), (200, 30, 30)), "PNG")


def json_body(**fields) -> bytes:
    return json.dumps({"data": base64.b64encode(small_png()).decode(), **fields}).encode()


JSON = {"Content-Type": "application/json"}

# name -> (body, headers, expected status, expected error type or None for an answer)
CASES = {
    # 1. non-ASCII option text: once a garbled status line and a dead worker
    "utf-8 header target": (small_png, {"X-CAM-Target": "café".encode()}, 400, "invalid_option"),
    "latin-1 header target": (small_png, {"X-CAM-Target": "caf\xe9"}, 400, "invalid_option"),
    "json target café": (lambda: json_body(target="café"), JSON, 400, "invalid_option"),
    "json maps superscript two": (lambda: json_body(maps="²"), JSON, 400, "invalid_option"),
    "header target superscript two": (small_png, {"X-CAM-Target": "²".encode()}, 400, "invalid_option"),
    "json method emoji": (lambda: json_body(method="🔥"), JSON, 400, "invalid_option"),
    "json layer with zero-width space": (lambda: json_body(layer="features\u200b"), JSON, 400, "invalid_option"),
    "json target right-to-left": (lambda: json_body(target="\u202edlrow"), JSON, 400, "invalid_option"),
    "json target CJK": (lambda: json_body(target="圆形"), JSON, 400, "invalid_option"),
    "json option name non-ASCII": (lambda: json_body(**{"méthode": "cam"}), JSON, 400, "unknown_option"),
    "header option name of 300 characters": (small_png, {"X-CAM-" + "m" * 300: "cam"}, 400, "unknown_option"),
    "script in target": (small_png, {"X-CAM-Target": "<script>alert(1)</script>"}, 400, "invalid_option"),
    "form target café": ("form", {"target": "café"}, 400, "invalid_option"),
    # 2. memory bombs: the side and the aspect ratio are bounded, not only the pixel count
    "1 x 40,000,000 declared": (lambda: png_declaring(1, 40_000_000), {}, 413, "image_too_large"),
    "40,000,000 x 1 declared": (lambda: png_declaring(40_000_000, 1), {}, 413, "image_too_large"),
    "1 x 1,000,000 real png": (lambda: real_png(1, 1_000_000), {}, 413, "image_too_large"),
    "16,385 x 100 declared": (lambda: png_declaring(16_385, 100), {}, 413, "image_too_large"),
    "4,000 x 150 real png (aspect 27)": (lambda: real_png(4000, 150), {}, 422, "image_aspect_ratio"),
    "100 x 2,100 real png (aspect 21)": (lambda: real_png(100, 2100), {}, 422, "image_aspect_ratio"),
    "3,000 x 160 real png (aspect 19): answered": (lambda: real_png(3000, 160), {}, 200, None),
    "6,400 x 6,400 declared": (lambda: png_declaring(6400, 6400), {}, 413, "image_too_large"),
    # 3. cost: repeated layers and classes count once; the rest is capped at a multiple of a prediction
    "60 copies of one layer": (small_png, {"X-CAM-Layer": ",".join(["features.5"] * 60)}, 200, None),
    "5 different layers": (small_png, {"X-CAM-Layer": "features.1,features.2,features.3,features.4,features.5"}, 400, "invalid_option"),
    "4 layers x 6 maps, gradcam": (small_png, {"X-CAM-Layer": "features.2,features.3,features.4,features.5", "X-CAM-Maps": "6"}, 200, None),
    "scorecam, one class 30 times": (small_png, {"X-CAM-Method": "scorecam", "X-CAM-Target": ",".join(["0"] * 30)}, 200, None),
    "scorecam, 2 classes": (small_png, {"X-CAM-Method": "scorecam", "X-CAM-Target": "0,1"}, 200, None),
    "scorecam, 3 classes": (small_png, {"X-CAM-Method": "scorecam", "X-CAM-Target": "0,1,2"}, 422, "request_too_costly"),
    "scorecam, 6 maps": (small_png, {"X-CAM-Method": "scorecam", "X-CAM-Maps": "6"}, 422, "request_too_costly"),
    "scorecam, 2 layers x 2 classes": (
        small_png,
        {"X-CAM-Method": "scorecam", "X-CAM-Layer": "features.4,features.5", "X-CAM-Target": "0,1"},
        422,
        "request_too_costly",
    ),
    "option value of 2,000 characters": (small_png, {"X-CAM-Layer": "x" * 2000}, 400, "invalid_option"),
    # 4. answers are sized against max_response_size; truncated images are refused, not padded
    "noise photo as PNG overlay": (lambda: noise_jpeg(4800, 3600), {"Accept": "image/png"}, 413, "answer_too_large"),
    "noise photo as JPEG overlay: answered": (lambda: noise_jpeg(2400, 1800), {"Accept": "image/jpeg"}, 200, None),
    "6 full-size maps of 36 MP": (lambda: real_png(6000, 6000), {"X-CAM-Maps": "6"}, 413, "answer_too_large"),
    "truncated jpeg closed with EOI": (truncated_jpeg_with_end_marker, {}, 400, "invalid_image"),
    "truncated progressive-size jpeg": (lambda: truncated_jpeg_with_end_marker(2000, 200), {}, 400, "invalid_image"),
    # 5. what surfaced as 503
    "same layer twice, gradcam": (small_png, {"X-CAM-Layer": "features,features"}, 200, None),
    "scorecam on two layers": (small_png, {"X-CAM-Method": "scorecam", "X-CAM-Layer": "features.4,features"}, 200, None),
    "json nested 10,000 deep": (lambda: ('{"data":' + "[" * 10_000 + "]" * 10_000 + "}").encode(), JSON, 400, "invalid_json"),
    "json nested 500 deep in an option": (lambda: json_body(method=json.loads("[" * 500 + "]" * 500)), JSON, 400, "invalid_option"),
    "json object as an option": (lambda: json_body(target={"class": 1}), JSON, 400, "invalid_option"),
    "5,000-digit integer": (
        lambda: b'{"data": "' + base64.b64encode(small_png()) + b'", "maps": ' + b"9" * 5000 + b"}",
        JSON,
        400,
        "invalid_json",
    ),
    "target --1": (small_png, {"X-CAM-Target": "--1"}, 400, "invalid_option"),
    "target -1": (small_png, {"X-CAM-Target": "-1"}, 400, "invalid_option"),
    "maps 1e3": (small_png, {"X-CAM-Maps": "1e3"}, 400, "invalid_option"),
    "json maps NaN": (lambda: b'{"data": "' + base64.b64encode(small_png()) + b'", "maps": NaN}', JSON, 400, "invalid_option"),
    "layer that is not spatial": (small_png, {"X-CAM-Layer": "fc"}, 400, "invalid_option"),
}


@pytest.fixture(scope="module")
def worker(engine_server) -> int:
    (pid,) = engine_server.worker_pids()
    return pid


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_request_gets_a_4xx_and_the_same_worker_answers_next(engine_server, predict, scenes, worker, name: str) -> None:
    body, headers, status, kind = CASES[name]
    if body == "form":
        response = predict(files={"data": ("scene.png", small_png(), "image/png")}, data=headers)
    else:
        response = predict(body() if callable(body) else body, headers=headers)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    if status != 200:
        assert response.reason == {400: "Bad Request", 413: "Request Entity Too Large", 422: "Unprocessable Entity"}[status]
        error = response.json()
        assert error["code"] == status, error
        assert error["type"] == kind, error
        assert error["message"], error
    good = predict(png_bytes(scenes[0].image), timeout=10)
    assert good.status_code == 200
    assert engine_server.worker_pids() == [worker], "the worker was restarted"


def test_worker_never_restarted_and_its_peak_memory_is_bounded(engine_server, worker) -> None:
    """Run after the cases above: one worker process all along, its peak RSS (VmHWM) under the documented bound."""
    assert engine_server.worker_pids() == [worker]
    status = Path(f"/proc/{worker}/status").read_text()
    peak_mb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    print(f"worker {worker}: peak RSS {peak_mb:.0f} MiB")
    assert peak_mb < PEAK_RSS_BOUND_MB
    torchserve_log = engine_server.log_dir / "model_log.log"  # KServe's engine has no separate worker to die
    assert not torchserve_log.exists() or "Backend worker process died" not in torchserve_log.read_text()


LONE_SURROGATES = {
    # Python's JSON parser reads "\ud800" into a lone surrogate; echoed back, it is JSON that strict parsers refuse.
    "unknown option named by a lone surrogate": (b'"\\ud800": "x"', "unknown_option"),
    "option value of the wrong kind, named by a lone surrogate": (b'"\\udfffm": {"a": 1}', "invalid_option"),
}


@pytest.mark.parametrize("name", list(LONE_SURROGATES))
def test_an_error_echoing_a_lone_surrogate_is_still_strict_json(engine_server, predict, scenes, worker, name: str) -> None:
    field, kind = LONE_SURROGATES[name]
    body = b'{"data": "' + base64.b64encode(small_png()) + b'", ' + field + b"}"
    response = predict(body, headers=JSON)
    assert response.status_code == 400
    error = orjson.loads(response.content)  # strict, as browsers' and most languages' parsers are
    assert error["type"] == kind, error
    assert error["option"], error
    assert predict(png_bytes(scenes[0].image), timeout=10).status_code == 200
    assert engine_server.worker_pids() == [worker]
