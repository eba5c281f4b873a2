"""CPU time of a process tree over a window, from /proc (psutil): what a server spends per answered request.

On a machine whose cores the server shares with its load generator (and here with other jobs), throughput says how
many answers came back, not where the time went: a client that parses bigger answers takes cores from the server,
and a neighbour's job takes them from both. CPU time per answer is charged to the process that spent it.

A snapshot sums, for every process of the tree under a root (a TorchServe launcher: the Java frontend, its Python
workers, anything the frontend runs such as its metrics collector), user + system time, plus the time of children
that ended and were reaped (psutil's children_user / children_system, from /proc/<pid>/stat). The difference of
two snapshots is what the tree spent in between, including processes that started or ended in the window: one
that ends moves from its own figure to its parent's reaped-children figure, so it is counted once.

The frontend's JIT compiler threads are told apart (/proc/<pid>/task/<tid>): over a benchmark's first minutes they
compile the JVM's request path, spending as much CPU as the request path itself, whichever variant happens to be
measured meanwhile. That is a warm-up cost a long-running server pays once, so it is reported as `jit`, outside
the server's total.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

WORKER_MARK = "model_service_worker"  # in a TorchServe Python worker's command line
FRONTEND_NAMES = ("java",)  # TorchServe's frontend is a JVM
JIT_THREADS = ("C1 CompilerThre", "C2 CompilerThre")  # HotSpot's compiler threads, as the kernel's 15-character names
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TreeCpu:
    """CPU seconds (user + system) of a process tree since each process started, by role, at one moment."""

    frontend: float  # the JVM (HTTP, batching, the worker sockets), its JIT compiler threads included
    jit: dict[tuple[int, int], float]  # (pid, tid) -> seconds of each JIT compiler thread of the frontend
    workers: float  # the model workers: decode, model, map, answer
    other: float  # the rest: the launcher, and reaped children (a metrics collector run, a worker that died)
    processes: int
    at: float = field(default_factory=time.monotonic)

    def minus(self, earlier: TreeCpu) -> dict[str, float]:
        """What the tree spent between `earlier` and this snapshot, in seconds, by role (frontend without its JIT
        threads; total: frontend + workers + other), and the wall time between.

        A JIT thread that ended in between is left out of `jit`: its time since `earlier` (a thread the JVM ends
        has been idle) stays in the frontend's."""
        jit = sum(seconds - earlier.jit.get(thread, 0.0) for thread, seconds in self.jit.items())
        spent = {
            "frontend": self.frontend - earlier.frontend - jit,
            "workers": self.workers - earlier.workers,
            "other": self.other - earlier.other,
        }
        return {**spent, "total": sum(spent.values()), "jit": jit, "wall": self.at - earlier.at}


def role(process: psutil.Process) -> str:
    """`frontend`, `worker` or `other`, from the process's name and command line."""
    if process.name() in FRONTEND_NAMES:
        return "frontend"
    return "worker" if WORKER_MARK in " ".join(process.cmdline()) else "other"


def jit_threads(pid: int) -> dict[tuple[int, int], float]:
    """(pid, tid) -> CPU seconds of each JIT compiler thread of process `pid` (/proc/<pid>/task/<tid>/stat)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if not (task / "comm").read_text().startswith(JIT_THREADS):
                continue
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the name, which may hold spaces: state is field 3
        threads[(pid, int(task.name))] = (int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND  # utime, stime
    return threads


def tree_cpu(root_pid: int) -> TreeCpu:
    """A snapshot of the tree under `root_pid` (the root included). Processes that end while it is read are left
    out: their time is in their parent's reaped-children figure by the next snapshot."""
    root = psutil.Process(root_pid)
    seconds = {"frontend": 0.0, "worker": 0.0, "other": 0.0}
    jit: dict[tuple[int, int], float] = {}
    count = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            with process.oneshot():
                times, kind = process.cpu_times(), role(process)
                seconds[kind] += times.user + times.system
                seconds["other"] += times.children_user + times.children_system
            if kind == "frontend":
                jit.update(jit_threads(process.pid))
            count += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, FileNotFoundError):
            continue
    return TreeCpu(seconds["frontend"], jit, seconds["worker"], seconds["other"], count)


def own_cpu() -> float:
    """This process's CPU seconds (user + system, all its threads), as /proc reads them."""
    times = psutil.Process(os.getpid()).cpu_times()
    return times.user + times.system


@dataclass
class CpuWindow:
    """A server tree's and this process's CPU time between open() and close(): the benchmark client's measured window."""

    server_pid: int
    start: TreeCpu | None = None
    client_start: float = 0.0
    spent: dict[str, float] | None = None

    def open(self) -> None:
        self.start, self.client_start = tree_cpu(self.server_pid), own_cpu()

    def close(self) -> None:
        if self.start is None or self.spent is not None:
            return
        server = tree_cpu(self.server_pid).minus(self.start)
        client = own_cpu() - self.client_start
        wall = server.pop("wall")
        self.spent = {**{f"server_{key}_s": value for key, value in server.items()}, "client_s": client, "window_s": wall}
