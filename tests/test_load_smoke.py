"""A short Locust run against the real TorchServe: the load-test harness works and every kind of client is answered.

Locust runs as a child process: it monkey-patches the interpreter with gevent, which must not happen inside pytest.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from camserve_tools.servers.torchserve import TorchServe

pytestmark = [pytest.mark.server, pytest.mark.benchmark]

# The request name each user class of load_tests/locustfile.py reports under.
REQUEST_NAMES = {
    "PredictionUser": "predict (no map)",
    "MapUser": "predict + map",
    "ExplanationUser": "explanations",
    "OverlayUser": "overlay (png)",
}


def run_locust(server: TorchServe, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "load_tests" / "locustfile.py"),
        "--config",
        str(ROOT / "load_tests" / "locust.conf"),
        "--host",
        server.inference_url,
        "--csv",
        str(out / "smoke"),
        "--html",
        str(out / "smoke.html"),
        "--only-summary",
        *options,
        *REQUEST_NAMES,  # the user classes, by name
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    # cwd: the test's own dir, so that nothing lands in the repository's reports/.
    return subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=180)


def test_locust_smoke_run_passes_its_gates_with_every_user_class(shapes_server: TorchServe, tmp_path: Path) -> None:
    # One user per class; every answer must be right; latency gates sized for a shared 2-core CI machine.
    result = run_locust(
        shapes_server,
        tmp_path,
        "--run-time",
        "20s",
        "--users",
        "4",
        "--spawn-rate",
        "4",
        "--max-fail-ratio",
        "0",
        "--max-p95-ms",
        "10000",
        "--max-p99-ms",
        "20000",
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "camserve.loadtest: gates:" in log, log[-4000:]
    with open(tmp_path / "smoke_stats.csv", newline="") as file:
        rows = {row["Name"]: row for row in csv.DictReader(file)}
    failures = (tmp_path / "smoke_failures.csv").read_text()
    for user_class, name in REQUEST_NAMES.items():
        assert name in rows, f"{user_class} made no request ({sorted(rows)})"
        assert int(rows[name]["Request Count"]) > 0, f"{user_class}: {rows[name]}"
        assert int(rows[name]["Failure Count"]) == 0, f"{user_class}: {failures}"
    assert (tmp_path / "smoke.html").stat().st_size > 0
