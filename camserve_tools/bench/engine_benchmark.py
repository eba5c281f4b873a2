"""`make bench`'s engine dimension: the same archives served by TorchServe and by KServe's own model server.

Both servers run at once, each on its own free ports, serving only our archives (`<model>.mar`, built with the
run's settings), so that a whole-server figure holds nothing else: TorchServe's launcher, Java frontend and its
`workers` Python workers per model; KServe's model server, one Python process with one pipeline thread per model
(camserve.engines.kserve_model) whose torch uses every core. Engines and variants take turns round by round, as
the variants of the serving benchmark do. Each cell records, beside throughput, percentiles and CPU per request,
the resident memory of the server's whole process tree at the end of the cell (`server_rss_mib`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from camserve_tools.bench.bench_models import BenchModel
from camserve_tools.bench.benchmark_report import Cell, Settings
from camserve_tools.bench.load_runs import FRONTEND_WARMUP_S, ROOT, locust_run, merge, start_torchserve
from camserve_tools.servers.kserve import KServeEngine
from camserve_tools.servers.torchserve import sample_image_png

ENGINES = ("torchserve", "kserve")
ENGINE_METHODS = ("none", "gradcam")


def engine_variant(method: str, engine: str) -> str:
    """A cell's variant name in the engine section: the method and the engine that served it."""
    return f"{method} on {engine}"


def tree_rss_mib(root_pid: int) -> float:
    """Resident memory of the process tree under `root_pid`, the root included, in MiB."""
    root = psutil.Process(root_pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return total / 2**20


@dataclass(frozen=True)
class _Served:
    """One running engine as the benchmark addresses it: base URL, the root pid of its tree, how it stops."""

    name: str
    url: str
    pid: int
    stop: Callable[[], None]


def _start_engines(models: list[BenchModel], settings: Settings, store: Path, work_dir: Path) -> list[_Served]:
    entries = ",".join(f"{model.name}={model.name}.mar" for model in models)
    started: list[_Served] = []
    try:
        torchserve = start_torchserve(store, entries, settings.threads, work_dir / f"engine-torchserve-{settings.slug}")
        started.append(_Served("torchserve", torchserve.inference_url, torchserve.process.pid, torchserve.stop))
        kserve_dir = work_dir / f"engine-kserve-{settings.slug}"
        shutil.rmtree(kserve_dir, ignore_errors=True)
        kserve = KServeEngine.on_free_ports(
            run_dir=kserve_dir, archives=[store / f"{model.name}.mar" for model in models], config=ROOT / "config" / "dev.properties"
        )
        kserve.start(timeout=600)
        started.append(_Served("kserve", kserve.inference_url, kserve.process.pid, kserve.stop))
    except BaseException:
        for served in started:
            served.stop()
        raise
    return started


def _drain(served: _Served, model: str) -> None:
    """Until the requests a run left in flight are answered: a plain request queued behind them returns last."""
    for _ in range(2):
        requests.post(
            f"{served.url}/predictions/{model}", data=sample_image_png(), headers={"X-CAM-Method": "none"}, timeout=900
        ).raise_for_status()


def _run(served: _Served, path: str, method: str, users: int, seconds: float, work_dir: Path) -> dict:
    """One Locust run with `method`, again with 4x the time while no request completed in its window."""
    answer = "plain" if method == "none" else "map"
    for attempt in range(3):
        figures = locust_run(
            served.url, path, answer, [f"X-CAM-Method={method}"], users, seconds * 4**attempt, work_dir, ("--server-pid", str(served.pid))
        )
        if figures["requests"] > 0:
            break
    return figures


def measure_engines(
    models: list[BenchModel], settings: Settings, concurrency: list[int], seconds: float, rounds: int, store: Path, work_dir: Path
) -> list[Cell]:
    """Every (model, method, engine, users) cell, `rounds` interleaved rounds of seconds / rounds each, from the
    archives already in `store`."""
    cells = []
    engines = _start_engines(models, settings, store, work_dir)
    try:
        for model in models:
            path = f"/predictions/{model.name}"
            pairs = [(served, method) for method in ENGINE_METHODS for served in engines]
            for served in engines:  # warm-up: the JVM's request path, first calls, caches
                locust_run(served.url, path, "plain", ["X-CAM-Method=none"], max(concurrency), FRONTEND_WARMUP_S, work_dir)
                _drain(served, model.name)
            for users in concurrency:
                results: dict[tuple[str, str], list[dict]] = {(s.name, m): [] for s, m in pairs}
                for round_ in range(rounds):
                    for served, method in pairs if round_ % 2 == 0 else pairs[::-1]:
                        figures = _run(served, path, method, users, seconds / rounds, work_dir)
                        _drain(served, model.name)
                        figures["server_rss_mib"] = tree_rss_mib(served.pid)
                        results[(served.name, method)].append(figures)
                for served, method in pairs:
                    figures = merge(results[(served.name, method)])
                    figures["server_rss_mib"] = max(f["server_rss_mib"] for f in results[(served.name, method)])
                    cells.append(Cell(model.name, settings, engine_variant(method, served.name), users, figures))
                    print(
                        f"  {model.name:9} {engine_variant(method, served.name):22} users {users:3}: "
                        f"{figures['throughput_rps']:7.2f} req/s  p95 {figures['p95_ms']:6.0f} ms  "
                        f"server CPU {figures.get('server_total_cpu_ms', float('nan')):6.1f} ms/req  "
                        f"RSS {figures['server_rss_mib']:6.0f} MiB",
                        flush=True,
                    )
    finally:
        for served in engines:
            served.stop()
    return cells


def engine_table(cells: list[Cell]) -> list[str]:
    """The engine section of the report: each cell beside TorchServe's for the same model, method and users, and
    the verdicts against the goals (KServe-native throughput ≥ 1.0× TorchServe's, whole-server RSS ≤ 0.6×)."""
    engine_cells = [cell for cell in cells if " on " in cell.variant]
    if not engine_cells:
        return []

    def twin(cell: Cell) -> dict | None:
        method = cell.variant.split(" on ")[0]
        return next(
            (
                c.figures
                for c in engine_cells
                if (c.model, c.users, c.settings, c.variant)
                == (cell.model, cell.users, cell.settings, engine_variant(method, "torchserve"))
            ),
            None,
        )

    lines = [
        "| model | settings | variant | users | req/s | ÷ TorchServe | p95 ms | ÷ TorchServe "
        "| server CPU ms/req | ÷ TorchServe | server RSS MiB | ÷ TorchServe |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for cell in engine_cells:
        figures, reference = cell.figures, twin(cell)

        def versus(key: str, figures: dict = figures, reference: dict | None = reference) -> str:
            value, base = figures.get(key), (reference or {}).get(key)
            return f"×{value / base:.2f}" if value is not None and base else ""

        lines.append(
            f"| {cell.model} | {cell.settings.short} | {cell.variant} | {cell.users} "
            f"| {figures['throughput_rps']:.1f} | {versus('throughput_rps')} "
            f"| {figures['p95_ms']:.0f} | {versus('p95_ms')} | {figures.get('server_total_cpu_ms', float('nan')):.1f} "
            f"| {versus('server_total_cpu_ms')} | {figures['server_rss_mib']:.0f} | {versus('server_rss_mib')} |"
        )
        if cell.variant.endswith("on kserve") and reference:
            throughput = figures["throughput_rps"] / reference["throughput_rps"] if reference["throughput_rps"] else 0.0
            rss = figures["server_rss_mib"] / reference["server_rss_mib"]
            verdicts.append(
                f"- {cell.model}, {cell.variant}, {cell.users} user(s): throughput ×{throughput:.2f} "
                f"({'met' if throughput >= 1.0 else 'missed'}: ≥ 1.0), RSS ×{rss:.2f} ({'met' if rss <= 0.6 else 'missed'}: ≤ 0.6)"
            )
    return [*lines, "", "Goals, KServe-native against TorchServe:", "", *verdicts]


def engine_section(engine_cells: list[Cell]) -> list[str]:
    """TorchServe against KServe's own model server, serving the same archives (camserve_tools/bench/engine_benchmark.py)."""
    return [
        "## Engines: TorchServe against KServe's own model server",
        "",
        "The same `<model>.mar` (our handler, the run's batch size) on both servers at once, each serving only our "
        "archives: TorchServe (launcher, Java frontend, its workers per model) and camserve on KServe's model server "
        "(one Python process, one pipeline thread per model, torch on every core). Methods and engines take turns "
        "round by round. Server RSS: the resident memory of the server's whole process tree after each run, the "
        "largest of the cell's rounds. The answers are byte-identical on both engines (tests/test_engines.py).",
        "",
        *engine_table(engine_cells),
        "",
    ]
