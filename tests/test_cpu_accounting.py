"""The serving benchmark's CPU accounting: /proc deltas of a real process tree doing known work, and the report's
CPU figures and verdicts from them."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from camserve_tools.bench.benchmark_report import BASELINE, Cell, Settings, disagreement_lines, results_table, target_lines
from camserve_tools.bench.cpu_accounting import WORKER_MARK, CpuWindow, tree_cpu
from camserve_tools.bench.serving_benchmark import merge

# A process that burns CPU when told to, and has a child burn some and end (reaped: its time moves to the parent's
# children figures). It reports its own CPU time before and after, and its child's, as the kernel counts them.
WORKER = """
import subprocess, sys, time

def burn(seconds):
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass

GRANDCHILD = "import time\\nstart = time.process_time()\\nwhile time.process_time() - start < 0.3:\\n    pass\\nprint(time.process_time())"
print(time.process_time(), flush=True)
sys.stdin.readline()
child = subprocess.run([sys.executable, "-c", GRANDCHILD], capture_output=True, text=True, check=True)
burn(0.4)
print(time.process_time(), child.stdout.strip(), flush=True)
sys.stdin.readline()
"""
TICK = 0.02  # /proc counts CPU time in clock ticks (10 ms): two of them of slack per figure


def test_a_tree_delta_is_the_cpu_its_processes_report_with_ended_children_counted_once() -> None:
    # The marker in its command line makes the process a worker, as TorchServe's model_service_worker.py.
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, WORKER_MARK], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        own_before = float(process.stdout.readline())
        before = tree_cpu(process.pid)
        process.stdin.write("go\n")
        own_after, grandchild = (float(v) for v in process.stdout.readline().split())
        after = tree_cpu(process.pid)
        process.stdin.write("done\n")
    finally:
        process.wait(timeout=60)
    spent = after.minus(before)
    assert spent["workers"] == pytest.approx(own_after - own_before, abs=2 * TICK)
    assert own_after - own_before >= 0.4
    assert spent["other"] == pytest.approx(grandchild, abs=2 * TICK)
    assert grandchild >= 0.3
    assert spent["frontend"] == 0
    assert spent["total"] == pytest.approx(spent["workers"] + spent["other"])
    assert (before.processes, after.processes) == (1, 1)  # the grandchild ran and ended between the snapshots
    assert spent["wall"] > 0


# A frontend look-alike: its process is named `java`, one of its threads is named as HotSpot's C2 compiler thread.
# The main thread burns 0.2 s, the "compiler" 0.3 s (and lives on); the JIT's time is told apart from the frontend's.
FRONTEND = """
import ctypes, sys, threading, time

def name(text):
    ctypes.CDLL(None).prctl(15, text.encode(), 0, 0, 0)  # PR_SET_NAME: this thread's name in /proc

def burn(seconds):
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass

name("java")
named, go, burnt, done = (threading.Event() for _ in range(4))
compiler = threading.Thread(target=lambda: (name("C2 CompilerThread0"), named.set(), go.wait(), burn(0.3), burnt.set(), done.wait()))
compiler.start()
named.wait()
print("ready", flush=True)
sys.stdin.readline()
go.set()
burn(0.2)
burnt.wait()
print(time.process_time(), flush=True)
sys.stdin.readline()
done.set()
"""


def test_the_frontends_jit_compiler_threads_are_told_apart() -> None:
    process = subprocess.Popen([sys.executable, "-c", FRONTEND], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        before = tree_cpu(process.pid)
        assert len(before.jit) == 1
        process.stdin.write("go\n")
        float(process.stdout.readline())
        after = tree_cpu(process.pid)
        process.stdin.write("done\n")
    finally:
        process.wait(timeout=60)
    spent = after.minus(before)
    assert spent["jit"] == pytest.approx(0.3, abs=2 * TICK)
    assert spent["frontend"] == pytest.approx(0.2, abs=3 * TICK)  # the main thread's burn, and a little glue
    assert spent["total"] == pytest.approx(spent["frontend"] + spent["workers"] + spent["other"])
    assert spent["workers"] == 0
    # A compiler thread that ended in between (absent from the later snapshot) adds nothing to `jit`.
    assert after.minus(type(before)(before.frontend, {(0, 0): 5.0, **before.jit}, 0.0, 0.0, 1))["jit"] == pytest.approx(spent["jit"])


def test_a_window_charges_the_client_its_own_work() -> None:
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    try:
        window = CpuWindow(idle.pid)
        window.open()
        start = time.process_time()
        while time.process_time() - start < 0.3:
            pass
        window.close()
    finally:
        idle.communicate(b"\n", timeout=60)
    assert window.spent is not None
    assert 0.3 - TICK <= window.spent["client_s"] <= 0.3 + 0.1
    assert window.spent["server_total_s"] <= 2 * TICK  # the server (an idle process) spent nothing meanwhile
    assert window.spent["window_s"] >= 0.3 * 0.9


def figures(requests: int, window: float, server: float, client: float, throughput: float | None = None) -> dict:
    """One round's summary as benchmark_locustfile.py writes it; CPU in seconds over the window."""
    return {
        "requests": requests,
        "failures": 0,
        "window_s": window,
        "response_bytes_total": 100 * requests,
        "client_cpu_saturated": False,
        "errors": [],
        "response_times_ms": {"10": requests},
        "cpu": {
            "server_frontend_s": server * 0.25,
            "server_workers_s": server * 0.75,
            "server_other_s": 0.0,
            "server_total_s": server,
            "server_jit_s": 0.1,
            "client_s": client,
            "window_s": window,
        },
    }


def test_rounds_merge_into_cpu_ms_per_answered_request() -> None:
    merged = merge([figures(100, 2.0, 1.0, 0.2), figures(300, 6.0, 3.0, 0.6)])
    assert merged["server_total_cpu_ms"] == pytest.approx(10.0)
    assert merged["client_cpu_ms"] == pytest.approx(2.0)
    assert merged["server_frontend_cpu_ms"] == pytest.approx(2.5)
    assert merged["server_workers_cpu_ms"] == pytest.approx(7.5)
    assert merged["cpu_seconds"]["window"] == 8.0
    assert merged["server_jit_cpu_ms"] == pytest.approx(0.5)
    assert merged["server_total_cpu_ms_by_round"] == pytest.approx([10.0, 10.0])
    no_cpu = figures(10, 1.0, 0.1, 0.1)
    del no_cpu["cpu"]
    assert "server_total_cpu_ms" not in merge([no_cpu, figures(10, 1.0, 0.1, 0.1)])  # a round without figures: none


def test_cpu_targets_and_their_verdicts_in_the_report() -> None:
    settings = Settings(2, 1, 1, 0)

    def cell(variant: str, requests: int, server: float, client: float) -> Cell:
        return Cell("shapes", settings, variant, 16, merge([figures(requests, 10.0, server, client)]))

    # Per 1,000 answers in 10 s: built-in 9 ms server + 2 client; none 8.6; gradcam 8.9 ms (×0.99, ×1.03) with a
    # client that parses larger answers (3 ms), served at ×0.92 the throughput; cam 9.5 ms (×1.06, ×1.10).
    cells = [
        cell(BASELINE, 1000, 9.0, 2.0),
        cell("none", 1000, 8.6, 2.0),
        cell("gradcam", 920, 8.9 * 0.92, 3.0 * 0.92),
        cell("cam", 1000, 9.5, 2.0),
    ]
    lines = "\n".join(target_lines(cells, {}))
    assert "| shapes | 2×1, b1 | gradcam server CPU per request ≤ 1.00× built-in plain | 0.99 | met |" in lines
    assert "| shapes | 2×1, b1 | gradcam server CPU per request ≤ 1.08× our none | 1.03 | met |" in lines
    assert "| shapes | 2×1, b1 | gradcam throughput ≥ 0.95× built-in plain | 0.92 | **missed** |" in lines
    assert "| shapes | 2×1, b1 | cam server CPU per request ≤ 1.00× built-in plain | 1.06 | **missed** |" in lines
    assert "| shapes | 2×1, b1 | cam server CPU per request ≤ 1.08× our none | 1.10 | **missed** |" in lines
    table = results_table(cells)
    assert all(len(row.split("|")) == len(table[0].split("|")) for row in table)
    assert "| 8.9 | 0.99 | 1.03 | 2.2 / 6.7 | 3.0 |" in table[4]
    # gradcam: the server spends less per answer; the client's extra millisecond explains the throughput.
    why = {row.split(" | ")[2]: row for row in disagreement_lines(cells)[2:]}
    assert "the client spends 1.0 ms more per answer" in why["gradcam"]
    assert "| 0.92 | 0.99 | 3.0 / 2.0 | 0.92 |" in why["gradcam"]
    assert "the server spends more CPU per answer, but throughput was not bound by it" in why["cam"]  # CPU decides: missed
