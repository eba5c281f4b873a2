"""What a Ray driver process asks a running cluster: replica counts, whether every application runs.

These run in a process of their own that connects to the cluster (`python -m camserve_tools.servers.ray_cluster
wait|status|watch`), never in the caller's (a test, `camserve serve`), which stays apart from Ray.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from types import FrameType
from typing import Any


def replica_counts() -> dict[str, dict[str, int]]:
    """Each deployment's replicas by state, over every application of the connected cluster."""
    from ray import serve

    counts: dict[str, dict[str, int]] = {}
    for application in serve.status().applications.values():
        for name, deployment in application.deployments.items():
            counts[name] = {getattr(state, "value", state): count for state, count in deployment.replica_states.items()}
    return counts


def wait_until_running(timeout: float) -> None:
    """Until every application of the connected cluster runs (each deployment at its target replica count)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout
    while True:
        applications = serve.status().applications
        waiting = {name: app for name, app in applications.items() if app.status != ApplicationStatus.RUNNING}
        if applications and not waiting:
            return
        failed = {name: app.message for name, app in waiting.items() if app.status == ApplicationStatus.DEPLOY_FAILED}
        if failed:
            raise RuntimeError(f"Serve application(s) failed to deploy: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve application(s) {sorted(waiting)} not running after {timeout:.0f} s")
        time.sleep(1.0)


def watch(interval: float, duration: float) -> None:
    """One JSON line per `interval` seconds, for `duration` seconds (0: until killed): time and replica counts.
    SIGINT ends it at once."""
    signal.signal(signal.SIGINT, _end_watch_now)
    started = time.monotonic()
    while duration <= 0 or time.monotonic() - started < duration:
        try:
            line: dict[str, Any] = {"t": round(time.monotonic() - started, 2), "replicas": replica_counts()}
        except Exception as error:  # noqa: BLE001 - a controller that restarts (a lost node) must not end the watch
            line = {"t": round(time.monotonic() - started, 2), "error": type(error).__name__}
        print(json.dumps(line), flush=True)
        time.sleep(interval)


def _end_watch_now(_signum: int, _frame: FrameType | None) -> None:
    """A watch only reads, so it ends without Ray's driver teardown: while the cluster is busy or losing a node, that
    teardown can outlast the caller's patience, and the cluster drops a vanished driver's job by itself."""
    sys.stdout.flush()
    os._exit(0)
