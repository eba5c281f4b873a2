"""Headless Locust runs against a server, and the figures of a cell from its runs: what every serving benchmark shares.

Locust runs as a subprocess (load_tests/benchmark_locustfile.py): imported here it would monkey-patch the interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from camserve_tools.servers.torchserve import TorchServe

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "load_tests" / "benchmark_locustfile.py"
# The frontend's request path runs interpreted, at a higher CPU cost per request, until its JIT has compiled it:
# every server is loaded this long before its first measured run.
FRONTEND_WARMUP_S = 10.0


def start_torchserve(store: Path, models: str, threads: int | None, run_dir: Path, timeout: float = 600) -> TorchServe:
    """TorchServe on free ports serving `models` (name=archive,...) of `store`, `threads` torch threads per worker
    (None: torch's own default), in a fresh `run_dir`; stopped again if it does not come up."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    server = TorchServe.on_free_ports(
        run_dir=run_dir,
        config=ROOT / "config" / "dev.properties",
        model_store=store,
        models=models,
        env={} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
    )
    try:
        server.start(timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server


def locust_run(
    url: str, path: str, answer: str, headers: list[str], users: int, seconds: float, work_dir: Path, extra: tuple[str, ...] = ()
) -> dict:
    """One headless run of benchmark_locustfile.py against `url` + `path` (`extra`: more of Locust's arguments);
    its summary."""
    summary = work_dir / "cell.json"
    summary.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--host",
        url,
        "-u",
        str(users),
        "-r",
        str(4 * users),
        "-t",
        f"{max(1, round(seconds))}s",
        "--reset-stats",
        "--path",
        path,
        "--answer",
        answer,
        "--summary",
        str(summary),
        *extra,
    ]
    for header in headers:
        command += ["--header", header]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if not summary.exists():
        raise RuntimeError(f"Locust wrote no summary (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(summary.read_text())


CPU_PARTS = ("server_frontend", "server_workers", "server_other", "server_total", "server_jit", "client")


def merge(rounds: list[dict]) -> dict:
    """One cell's figures from its rounds: requests, bytes and CPU seconds add up, percentiles from the merged
    histogram; CPU per request is the rounds' CPU seconds over their requests."""
    histogram: dict[float, int] = {}
    for figures in rounds:
        for ms, count in figures["response_times_ms"].items():
            histogram[float(ms)] = histogram.get(float(ms), 0) + count
    requests_made = sum(f["requests"] for f in rounds)
    window = sum(f["window_s"] for f in rounds)
    return {
        "requests": requests_made,
        "failures": sum(f["failures"] for f in rounds),
        "throughput_rps": requests_made / window if window > 0 else 0.0,
        "response_bytes": sum(f["response_bytes_total"] for f in rounds) / requests_made if requests_made else 0.0,
        "client_cpu_saturated": any(f["client_cpu_saturated"] for f in rounds),
        "errors": [error for f in rounds for error in f["errors"]][:5],
        "rounds": len(rounds),
        **{f"p{round(q * 100)}_ms": percentile(histogram, q) for q in (0.5, 0.95, 0.99)},
        **cpu_per_request(rounds, requests_made),
    }


def cpu_per_request(rounds: list[dict], requests_made: int) -> dict:
    """CPU ms per answered request over the rounds' measured windows, by part (server_total: frontend + workers +
    other; server_jit, the frontend's JIT compilation, apart), and the seconds behind them; nothing where a round
    has no CPU figures (a run without --server-pid)."""
    if not requests_made or not all(f.get("cpu") for f in rounds):
        return {}
    seconds = {part: sum(f["cpu"][f"{part}_s"] for f in rounds) for part in CPU_PARTS}
    return {
        **{f"{part}_cpu_ms": 1000 * value / requests_made for part, value in seconds.items()},
        "cpu_seconds": {**seconds, "window": sum(f["cpu"]["window_s"] for f in rounds)},
        # Each round's own figure: how far rounds of one cell spread.
        "server_total_cpu_ms_by_round": [1000 * f["cpu"]["server_total_s"] / f["requests"] if f["requests"] else None for f in rounds],
    }


def percentile(histogram: dict[float, int], fraction: float) -> float:
    """Locust's rule (locust.stats.calculate_response_time_percentile): the smallest recorded time with at most
    (1 - fraction) of all requests slower. Locust is not imported here: it monkey-patches the interpreter."""
    total = sum(histogram.values())
    allowed_slower, slower = total - int(total * fraction), 0
    for ms in sorted(histogram, reverse=True):
        slower += histogram[ms]
        if slower >= allowed_slower:
            return ms
    return 0
