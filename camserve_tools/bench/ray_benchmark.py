"""Ray Serve on one node and on two against TorchServe, side by side in one run on this machine: throughput and p95 at
16 users, the server's CPU time per answered request, and the memory of each model process.

    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.ray_benchmark --duration 40 --rounds 2
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.ray_benchmark --batching --duration 30   # Ray's batch settings

Every engine serves the default `shapes` model (gradcam, the default request) with the same worker settings: two
model processes of one torch thread each, batches of up to 8 requests that wait at most 5 ms for one another
(TorchServe: minWorkers 2, batchSize 8, maxBatchDelay 5, its best setting in docs/lab/serving-tuning.md; Ray: two
replicas, max_batch_size 8, batch_wait_timeout_s 0.005). The three run at once, so that the engines take turns round
by round (the order reversed every other round) and a slow minute of this shared machine falls on all of them;
the idle ones cost the measured one what their background work costs (measured too: `idle CPU`).

Per engine: throughput and p95 from headless Locust runs (load_tests/benchmark_locustfile.py, 16 users back to
back); `CPU ms / request`: the CPU time (user + system) of every process of the server (TorchServe: the frontend
and its workers; Ray: every process of the cluster, GCS, raylets, agents, controller, proxy, replicas) over Locust's
measured window, divided by the requests answered in it; `RSS / USS per model process`: each worker's or replica's
resident and unique memory after the runs, and the whole server's.

`--batching` measures Ray's @serve.batch settings instead, on a one-node cluster (two replicas): each setting is
applied in place through the deployment's user_config (no replica restarts), settings taking turns round by round.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from camserve_tools.archive.packing import build_archive
from camserve_tools.bench.bench_models import prepare_models
from camserve_tools.bench.benchmark_report import Settings
from camserve_tools.bench.serving_benchmark import drain, locust_run, merge, model_config, start_torchserve
from camserve_tools.servers.ray_cluster import RayCluster, body_limit
from camserve_tools.servers.torchserve import TorchServe

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".run" / "ray-bench"
CONFIG = ROOT / "config" / "dev.properties"
SETTINGS = Settings(workers=2, threads=1, batch_size=8, max_batch_delay_ms=5)
# Ray's batch settings measured by --batching: (max_batch_size, batch_wait_timeout_s).
BATCHING = ((1, 0.0), (4, 0.005), (8, 0.005), (8, 0.02))
MIB = 1024**2


class CpuSampler:
    """The summed CPU time of a fixed set of processes, sampled four times a second in the background."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes
        self.samples: list[tuple[float, float]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _total(self) -> float:
        total = 0.0
        for process in self.processes:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append((time.time(), self._total()))
            time.sleep(0.25)

    def at(self, when: float) -> float:
        """CPU seconds at `when`, interpolated between the samples around it."""
        before = max((s for s in self.samples if s[0] <= when), default=self.samples[0])
        after = min((s for s in self.samples if s[0] >= when), default=self.samples[-1])
        if after[0] == before[0]:
            return before[1]
        return before[1] + (after[1] - before[1]) * (when - before[0]) / (after[0] - before[0])

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


@dataclass
class Engine:
    """One server under measurement: how to reach it, its processes and its model processes."""

    name: str
    server: TorchServe | RayCluster
    processes: list[psutil.Process] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    def find_processes(self) -> None:
        if isinstance(self.server, RayCluster):
            self.processes = self.server.processes()
            self.workers = self.server.worker_pids("shapes")
        else:
            frontend = psutil.Process(self.server.process.pid)
            self.processes = [frontend, *frontend.children(recursive=True)]
            self.workers = self.server.worker_pids()


def torchserve(work_dir: Path) -> TorchServe:
    """TorchServe serving `shapes` with SETTINGS (two workers, one torch thread each, batch 8, 5 ms)."""
    (model,) = prepare_models(["shapes"], work_dir)
    store = work_dir / "store"
    with tempfile.TemporaryDirectory(prefix="camserve-ray-bench-") as staging:
        model_dir = Path(staging) / "shapes"
        shutil.copytree(model.model_dir, model_dir)
        (model_dir / "model-config.yaml").write_text(yaml.safe_dump(model_config(model, SETTINGS), sort_keys=False))
        build_archive("shapes", model_dir, store, model_file=model.ours_model_file())
    return start_torchserve(store, "shapes=shapes.mar", SETTINGS.threads, work_dir / "torchserve")


def ray(work_dir: Path, nodes: int, batching: tuple[int, float] = (SETTINGS.batch_size, SETTINGS.max_batch_delay_ms / 1000)) -> RayCluster:
    """A local Ray cluster of `nodes` serving `shapes` with two replicas (one torch thread each) batching as asked."""
    run_dir = work_dir / f"ray-{nodes}-node"
    shutil.rmtree(run_dir, ignore_errors=True)
    cluster = RayCluster.on_free_ports(
        run_dir=run_dir,
        archives={"shapes": ROOT / "model_store" / "shapes.mar"},
        nodes=nodes,
        max_body_bytes=body_limit(CONFIG),
        deployment_options={"shapes": {"num_replicas": SETTINGS.workers, "user_config": batch_config(batching)}},
    )
    cluster.start()
    return cluster


def batch_config(batching: tuple[int, float]) -> dict:
    return {"max_batch_size": batching[0], "batch_wait_timeout_s": batching[1]}


def measure_round(engine: Engine, users: int, seconds: float, work_dir: Path) -> dict:
    """One Locust run against the engine, with its server's CPU time over Locust's measured window."""
    sampler = CpuSampler(engine.processes)
    try:
        figures = locust_run(engine.server.inference_url, "/predictions/shapes", "map", [], users, seconds, work_dir)
    finally:
        sampler.stop()
    cpu = sampler.at(figures["window_end"]) - sampler.at(figures["window_start"])
    figures["cpu_ms_per_request"] = 1000 * cpu / figures["requests"] if figures["requests"] else float("nan")
    drain(engine.server, "shapes", ours=True)  # type: ignore[arg-type]
    return figures


def idle_cpu_percent(engine: Engine, seconds: float = 10.0) -> float:
    """The server's own CPU use with no request, in % of one core."""
    sampler = CpuSampler(engine.processes)
    time.sleep(seconds)
    sampler.stop()
    (start, cpu_start), (end, cpu_end) = sampler.samples[0], sampler.samples[-1]
    return 100 * (cpu_end - cpu_start) / (end - start)


def memory(engine: Engine) -> dict[str, float]:
    """RSS and USS (MiB) of each model process, and of the whole server."""
    workers = [psutil.Process(pid).memory_full_info() for pid in engine.workers]
    every = []
    for process in engine.processes:
        try:
            every.append(process.memory_full_info())
        except psutil.NoSuchProcess:
            continue
    return {
        "worker_rss_mib": sum(m.rss for m in workers) / len(workers) / MIB,
        "worker_uss_mib": sum(m.uss for m in workers) / len(workers) / MIB,
        "server_rss_mib": sum(m.rss for m in every) / MIB,
        "server_uss_mib": sum(m.uss for m in every) / MIB,
        "processes": len(every),
    }


def interleaved(engines: list[Engine], users: int, seconds: float, rounds: int, work_dir: Path, prepare=None) -> None:
    """Every engine's rounds, the engines taking turns (reversed every other round); a warm-up run each first."""
    for engine in engines:
        if prepare:
            prepare(engine)
        measure_round(engine, 4, 3.0, work_dir)
    for round_ in range(rounds):
        for engine in engines if round_ % 2 == 0 else engines[::-1]:
            if prepare:
                prepare(engine)
            engine.rounds.append(measure_round(engine, users, seconds / rounds, work_dir))
            figures = engine.rounds[-1]
            print(
                f"  round {round_ + 1} {engine.name:24} {figures['throughput_rps']:6.1f} req/s  p95 {figures['p95_ms']:5.0f} ms  "
                f"CPU {figures['cpu_ms_per_request']:5.1f} ms/req  failures {figures['failures']}/{figures['requests']}",
                flush=True,
            )


def combined(engine: Engine) -> dict:
    figures = merge(engine.rounds)
    cpu = [r["cpu_ms_per_request"] * r["requests"] for r in engine.rounds]
    figures["cpu_ms_per_request"] = sum(cpu) / figures["requests"] if figures["requests"] else float("nan")
    return figures


def compare_engines(args: argparse.Namespace, work_dir: Path) -> None:
    engines: list[Engine] = []
    try:
        print("starting TorchServe, Ray on one node, Ray on two nodes ...", flush=True)
        engines.append(Engine("TorchServe", torchserve(work_dir)))
        engines.append(Engine("Ray Serve, 1 node", ray(work_dir, 1)))
        engines.append(Engine("Ray Serve, 2 nodes", ray(work_dir, 2)))
        for engine in engines:
            engine.find_processes()
        idle = {engine.name: idle_cpu_percent(engine) for engine in engines}
        interleaved(engines, args.users, args.duration, args.rounds, work_dir)
        rows = []
        for engine in engines:
            figures, memory_figures = combined(engine), memory(engine)
            rows.append(
                f"| {engine.name} | {figures['throughput_rps']:.1f} | {figures['p95_ms']:.0f} | {figures['cpu_ms_per_request']:.1f} | "
                f"{memory_figures['worker_rss_mib']:.0f} / {memory_figures['worker_uss_mib']:.0f} | "
                f"{memory_figures['server_rss_mib']:.0f} / {memory_figures['server_uss_mib']:.0f} ({memory_figures['processes']}) | "
                f"{idle[engine.name]:.1f} | {figures['failures']}/{figures['requests']} |"
            )
        print(f"\n{args.users} users, {args.rounds} rounds of {args.duration / args.rounds:.0f} s per engine; {SETTINGS.label}\n")
        print(
            "| engine | req/s | p95 ms | CPU ms / request | RSS / USS per model process, MiB | server RSS / USS, MiB (processes) "
            "| idle CPU % | failures |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    finally:
        for engine in engines:
            engine.server.stop()


def compare_batching(args: argparse.Namespace, work_dir: Path) -> None:
    cluster = ray(work_dir, 1)
    try:
        engine_of = {setting: Engine(f"batch {setting[0]}, wait {setting[1] * 1000:.0f} ms", cluster) for setting in BATCHING}
        for engine in engine_of.values():
            engine.find_processes()

        def apply(engine: Engine) -> None:
            setting = next(s for s, e in engine_of.items() if e is engine)
            cluster.deployment_options["shapes"]["user_config"] = batch_config(setting)
            cluster.deploy(300)

        interleaved(list(engine_of.values()), args.users, args.duration, args.rounds, work_dir, prepare=apply)
        rounds = f"{args.rounds} rounds of {args.duration / args.rounds:.0f} s per setting"
        print(f"\nRay Serve, 1 node, 2 replicas, {args.users} users, {rounds}\n")
        print("| @serve.batch | req/s | p50 ms | p95 ms | CPU ms / request | failures |")
        print("|---|---|---|---|---|---|")
        for engine in engine_of.values():
            figures = combined(engine)
            print(
                f"| {engine.name} | {figures['throughput_rps']:.1f} | {figures['p50_ms']:.0f} | {figures['p95_ms']:.0f} | "
                f"{figures['cpu_ms_per_request']:.1f} | {figures['failures']}/{figures['requests']} |"
            )
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of Locust runs per engine, all rounds together")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batching", action="store_true", help="measure Ray's @serve.batch settings instead")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    args = parser.parse_args()
    work_dir = args.run_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    (compare_batching if args.batching else compare_engines)(args, work_dir)


if __name__ == "__main__":
    main()
