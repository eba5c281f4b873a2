"""`make bench` in miniature: the real benchmark driver, real servers, real Locust runs, a real report.

The figures of so short a run mean nothing (and are never asserted); what is checked is that every variant is
served and answered correctly through both handlers, and that the report, its data and its plots are written.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image
from support import ROOT, png_bytes, start_server

from camserve_tools.data.scenes import make_scene

VARIANTS = ("built-in plain", "none", "gradcam", "built-in IG", "pytorch-grad-cam")


@pytest.mark.server
@pytest.mark.benchmark
def test_benchmark_serves_every_variant_and_writes_its_report(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "camserve_tools.bench.serving_benchmark",
        "--models",
        "shapes",
        "--variants",
        ",".join(VARIANTS),
        "--concurrency",
        "2",
        "--batch-sizes",
        "1",
        "--duration",
        "8",
        "--rounds",
        "2",
        "--engine-models",
        "shapes",
        "--engine-concurrency",
        "2",
        "--out",
        str(tmp_path / "docs"),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]

    data = json.loads((tmp_path / "docs" / "serving-benchmark.json").read_text())
    cells = {cell["variant"]: cell["figures"] for cell in data["cells"]}
    assert set(cells) == set(VARIANTS)
    for variant, figures in cells.items():
        assert figures["requests"] > 0, (variant, figures["errors"])
        assert figures["failures"] == 0, (variant, figures["errors"])
        assert figures["rounds"] == 2
        assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
        # The server's CPU per answer, from /proc over the measured windows: workers and frontend both spend some.
        assert figures["server_workers_cpu_ms"] > 0, variant
        assert figures["server_frontend_cpu_ms"] > 0, variant
        assert figures["client_cpu_ms"] > 0, variant
        parts = figures["server_frontend_cpu_ms"] + figures["server_workers_cpu_ms"] + figures["server_other_cpu_ms"]
        assert figures["server_total_cpu_ms"] == pytest.approx(parts)
        # No more CPU than the machine's cores give over the window.
        assert figures["cpu_seconds"]["server_total"] <= (os.cpu_count() or 1) * figures["cpu_seconds"]["window"] * 1.05, variant
    # A map makes the answer larger; Integrated Gradients answers with a float per input value (3 x 128 x 128).
    assert cells["gradcam"]["response_bytes"] > cells["none"]["response_bytes"]
    assert cells["built-in IG"]["response_bytes"] > 3 * 128 * 128
    assert data["forward"][0]["images_per_s"] > 0

    # The engine section: the same archive on TorchServe and on KServe's model server, side by side.
    engines = {cell["variant"]: cell["figures"] for cell in data["engine_cells"]}
    assert set(engines) == {f"{method} on {engine}" for method in ("none", "gradcam") for engine in ("torchserve", "kserve")}
    for variant, figures in engines.items():
        assert figures["requests"] > 0, variant
        assert figures["failures"] == 0, (variant, figures["errors"])
        assert figures["server_total_cpu_ms"] > 0, variant
        assert figures["server_rss_mib"] > 0, variant
    # One Python process against a JVM and its workers.
    assert engines["gradcam on kserve"]["server_rss_mib"] < engines["gradcam on torchserve"]["server_rss_mib"]

    report = (tmp_path / "docs" / "serving-benchmark.md").read_text()
    assert "## Engines: TorchServe against KServe's own model server" in report
    assert "| shapes | 2×1, b1 | gradcam on kserve | 2 |" in report
    for variant in VARIANTS:
        assert f"| shapes | 2×1, b1 | {variant} | 2 |" in report
    expected = (
        "gradcam throughput ≥ 0.95× built-in plain",
        "| shapes | 2×1, b1 | gradcam server CPU per request ≤ 1.00× built-in plain |",
        "| shapes | 2×1, b1 | gradcam server CPU per request ≤ 1.08× our none |",
        "## Throughput against CPU at saturation",
        "server CPU ms/req",
        "| shapes | 2×1, b1 | reference: pytorch-grad-cam throughput ÷ built-in plain |",
        "| shapes | 2×1, b1 | reference: gradcam throughput ÷ pytorch-grad-cam |",
    )
    assert [line for line in expected if line not in report] == []
    for plot in ("serving-benchmark-throughput.png", "serving-benchmark-latency.png"):
        assert (tmp_path / "docs" / plot).read_bytes().startswith(b"\x89PNG")


@pytest.mark.server
def test_pytorch_grad_cam_peer_answers_each_request_of_a_batch_with_a_heat_map_of_its_image_size(tmp_path: Path) -> None:
    """The peer variant's archive, as the benchmark builds it, through a real TorchServe: two images of different
    sizes sent at once (batch size 2, so that they can share a batch), each answered with its label and a PNG of
    its own size."""
    from camserve_tools.bench.bench_models import prepare_models
    from camserve_tools.bench.benchmark_report import Settings
    from camserve_tools.bench.serving_benchmark import build_archives

    (model,) = prepare_models(["shapes"], tmp_path)
    store = tmp_path / "store"
    staging = tmp_path / "staging"
    staging.mkdir()
    build_archives(model, Settings(workers=1, threads=1, batch_size=2, max_batch_delay_ms=500), store, staging)
    labels = json.loads((model.model_dir / "index_to_name.json").read_text())
    images = [make_scene(7).image, make_scene(8).image.resize((301, 173))]
    server = start_server(tmp_path / "server", {"peer": store / "shapes_pytorch_grad_cam.mar"})
    try:

        def post(image: Image.Image) -> requests.Response:
            body = png_bytes(image)
            return requests.post(f"{server.inference_url}/predictions/peer", data=body, headers={"Content-Type": "image/png"}, timeout=120)

        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(post, images))
    finally:
        server.stop()
    for image, response in zip(images, responses, strict=True):
        assert response.status_code == 200, response.text[:500]
        answer = response.json()
        assert answer["label"] == labels[str(answer["index"])]
        assert 0 < answer["probability"] <= 1
        heatmap = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"])))
        assert heatmap.format == "PNG"
        assert heatmap.mode == "L"
        assert heatmap.size == image.size
        assert heatmap.getextrema()[1] > 0  # a map, not a blank image


def test_rounds_merge_by_histogram_as_locust_computes_percentiles() -> None:
    from camserve_tools.bench.serving_benchmark import merge

    # 150 requests of 10 ms in 2 s, then 50 of 30 ms in 3 s: the merged p50 is 10 ms, p95 and p99 30 ms.
    rounds = [
        {
            "requests": 150,
            "failures": 0,
            "window_s": 2.0,
            "response_bytes_total": 1000,
            "client_cpu_saturated": False,
            "errors": [],
            "response_times_ms": {"10": 150},
        },
        {
            "requests": 50,
            "failures": 1,
            "window_s": 3.0,
            "response_bytes_total": 3000,
            "client_cpu_saturated": False,
            "errors": ["1 x HTTP 503"],
            "response_times_ms": {"30": 50},
        },
    ]
    merged = merge(rounds)
    assert merged["throughput_rps"] == 40.0
    assert merged["requests"] == 200
    assert merged["failures"] == 1
    assert merged["response_bytes"] == 20.0
    assert merged["errors"] == ["1 x HTTP 503"]
    assert (merged["p50_ms"], merged["p95_ms"], merged["p99_ms"]) == (10, 30, 30)
