"""A local Ray cluster of N nodes on loopback serving camserve's Ray Serve application (camserve.engines.ray_deployment).

    python -m camserve_tools.servers.ray_cluster start --run-dir .run/serve --nodes 2 --models shapes=shapes.mar,imagenet=imagenet.mar
    python -m camserve_tools.servers.ray_cluster stop --run-dir .run/serve

Each node is one `ray start --block` in its own session, on 127.0.0.1, with explicit CPUs, memory and object store
(a node would otherwise claim the whole machine), a free port for every listener, no dashboard and no Ray client
server. The nodes share one short temp dir, made fresh under /tmp and recorded in the run dir: Ray's Unix sockets live
there, and a socket path holds at most 107 bytes. Every process of a node, Serve's replicas included, carries
CAMSERVE_RAY_NODE=<temp dir>:<node> in its environment: `stop` and `kill_node` signal exactly those, by pid, never
by name (`ray stop` would stop every Ray cluster on the machine).

The application is deploy/ray/serve-config.yaml with this run's port, archives, body limit and a replica per node at
least, deployed by Ray's own `serve run`; ready once every application runs and every model answers a prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

from camserve.protocol.limits import TORCHSERVE_MAX_REQUEST_SIZE
from camserve_tools.kserve.bundle import body_limit
from camserve_tools.servers.endpoint import LocalEndpoint
from camserve_tools.servers.process_group import signal_processes, start_in_own_session
from camserve_tools.servers.ray_application import SERVE_CONFIG, ApplicationSettings, application_config, parse_models
from camserve_tools.servers.readiness import wait_for_answers
from camserve_tools.servers.short_paths import is_private_dir, short_private_dir
from camserve_tools.servers.torchserve import DEFAULT_MODELS, ROOT, free_port, sample_image_png
from camserve_tools.shared_fields import shared_fields

RECORD = "ray-cluster.json"  # in the run dir: the temp dir, the ports, each node's `ray start` pid
NODE_MARKER = "CAMSERVE_RAY_NODE"
TEMP_PREFIX = "cs-ray-"
# The longest socket path Ray makes under its temp dir (a session dir named by date and pid, then sockets/...).
RAY_SOCKET_EXAMPLE = "/session_2000-01-01_00-00-00_000000_4194304/sockets/plasma_store.99"
GIB = 1024**3
# Ray's own command lines, with a loopback address kept loopback (camserve_tools/servers/ray_loopback.py).
LOOPBACK_CLI = [sys.executable, "-m", "camserve_tools.servers.ray_loopback"]


class AlreadyRunning(RuntimeError):
    """The run dir records a Ray cluster already (or one that was not stopped)."""


def short_temp_dir() -> Path:
    """A fresh private dir for Ray's sessions, short enough for the Unix sockets Ray makes inside it."""
    return short_private_dir(TEMP_PREFIX, RAY_SOCKET_EXAMPLE)


def processes_marked(cluster: str, node: str | None = None) -> list[psutil.Process]:
    """The processes whose environment carries CAMSERVE_RAY_NODE=<cluster>:<node> (any node when `node` is None).

    Read from /proc/<pid>/environ as it is: a Ray process that retitles itself (`ray::ServeReplica:...`) zeroes the
    start of that area, where a parser that stops at the first empty entry (psutil's) finds nothing."""
    wanted = f"{NODE_MARKER}={cluster}:{node or ''}".encode()
    found = []
    for process in psutil.process_iter():
        try:
            entries = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(entry == wanted or (node is None and entry.startswith(wanted)) for entry in entries):
            found.append(process)
    return found


@dataclass
class RayCluster(LocalEndpoint):
    """`nodes` Ray nodes on loopback (a head and nodes-1 workers) serving `archives` (name -> .mar or model dir)."""

    run_dir: Path
    archives: dict[str, Path]
    nodes: int = 1
    host: str = "127.0.0.1"
    inference_port: int = 8080
    # Logical resources per node: Ray schedules replicas on these, not on the machine's cores and memory.
    cpus_per_node: int = 4
    memory_per_node: int = 6 * GIB
    object_store_per_node: int = GIB // 4
    max_body_bytes: int = TORCHSERVE_MAX_REQUEST_SIZE
    # Per deployment (model name or CamRouter): options merged over serve-config.yaml's (autoscaling, user_config, ...)
    deployment_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    serve_config: Path = SERVE_CONFIG
    # More environment for every Ray process of the cluster (Ray's and Serve's RAY_* settings).
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def on_free_ports(cls, **fields: Any) -> RayCluster:
        return cls(inference_port=free_port(), **fields)

    @property
    def record_file(self) -> Path:
        return self.run_dir / RECORD

    @property
    def model_names(self) -> list[str]:
        return list(self.archives)

    @property
    def models(self) -> str:
        """TorchServe's `name=archive,...` of what this cluster serves."""
        return ",".join(f"{name}={Path(archive).name}" for name, archive in self.archives.items())

    def record(self) -> dict[str, Any]:
        return json.loads(self.record_file.read_text()) if self.record_file.exists() else {}

    @property
    def address(self) -> str:
        """The head's GCS address, what `ray.init` and `serve run` connect to."""
        return f"127.0.0.1:{self.record()['gcs_port']}"

    @property
    def node_names(self) -> list[str]:
        return ["head"] + [f"worker-{index}" for index in range(1, self.nodes)]

    # -- start ------------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 600.0) -> None:
        if self.record_file.exists():
            raise AlreadyRunning(f"a Ray cluster of {self.run_dir} seems to run already ({self.record_file} present)")
        for directory in (self.run_dir / "tmp", self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        temp_dir = short_temp_dir()
        gcs_port = free_port()
        # Written first: a start that fails half-way is stopped from the same record.
        self._write_record({"temp_dir": str(temp_dir), "gcs_port": gcs_port, "inference_port": self.inference_port, "nodes": {}})
        deadline = time.monotonic() + timeout
        try:
            for name in self.node_names:
                self._start_node(name, temp_dir, gcs_port, deadline)
            self.deploy(deadline - time.monotonic())
            self.wait_until_ready(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise

    def _node_command(self, name: str, temp_dir: Path, gcs_port: int, metrics_port: int) -> list[str]:
        # Ray starts its client server wherever grpcio is installed, and refuses port 0: on loopback, then.
        role = ["--head", f"--port={gcs_port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}", "--no-monitor"]
        if name != "head":
            role = [f"--address=127.0.0.1:{gcs_port}"]
        return [
            *LOOPBACK_CLI,
            "ray",
            "start",
            "--block",
            *role,
            "--node-ip-address=127.0.0.1",
            f"--node-name={name}",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--memory={self.memory_per_node}",
            f"--object-store-memory={self.object_store_per_node}",
            f"--resources={json.dumps({f'camserve_{name}': 1})}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--metrics-export-port={metrics_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            # Workers (replicas among them) each take a port the OS picks.
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
            "--log-style=record",
        ]

    def _environment(self, marker: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                NODE_MARKER: marker,
                # Models unpack into the run dir; the replicas import camserve from this checkout.
                "TMPDIR": str(self.run_dir / "tmp"),
                "PYTHONPATH": str(ROOT),
                "RAY_USAGE_STATS_ENABLED": "0",
                # The one proxy (on the head) spreads requests over every node's replicas; by default it keeps them
                # on its own node's while those have room, and a second node would idle.
                "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
            }
        )
        env.pop("RAY_ADDRESS", None)
        env.update(self.env)
        return env

    def _start_node(self, name: str, temp_dir: Path, gcs_port: int, deadline: float) -> None:
        log = self.log_dir / f"ray-{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        metrics_port = free_port()
        # Ray's dashboard process (started even without the dashboard) takes a fixed port for its own metrics.
        env = {**self._environment(f"{temp_dir}:{name}"), "DASHBOARD_METRIC_PORT": str(free_port())}
        process = start_in_own_session(self._node_command(name, temp_dir, gcs_port, metrics_port), env=env, cwd=self.run_dir, log=log)
        record = self.record()
        record["nodes"][name] = {"pid": process.pid, "metrics_port": metrics_port}
        self._write_record(record)
        # `ray start` says so once its node has registered with the head.
        while "Ray runtime started." not in log.read_bytes()[offset:].decode(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(f"Ray node {name} exited with code {process.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray node {name} did not start in time; see {log}")
            time.sleep(0.5)

    def _write_record(self, record: dict[str, Any]) -> None:
        self.record_file.write_text(json.dumps(record, indent=2) + "\n")

    # -- the application --------------------------------------------------------------------------------------------

    def application_config(self) -> dict[str, Any]:
        """serve-config.yaml made this run's (camserve_tools/servers/ray_application.py)."""
        settings = ApplicationSettings(**shared_fields(self, ApplicationSettings, port=self.inference_port))
        return application_config(self.serve_config, settings)

    def deploy(self, timeout: float) -> None:
        """The application through Ray's own `serve run` (as a user deploys the config), then until it runs."""
        config_file = self.run_dir / "serve-config.yaml"
        config_file.write_text(yaml.safe_dump(self.application_config(), sort_keys=False))
        with open(self.log_dir / "serve-run.log", "ab") as out:
            subprocess.run(
                [*LOOPBACK_CLI, "serve", "run", "--address", self.address, "--non-blocking", str(config_file)],
                env=self._driver_environment(),
                cwd=self.run_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=max(timeout, 1),
            )
        self._driver("wait", "--timeout", str(int(max(timeout, 1))), timeout=max(timeout, 1) + 60)

    def _driver_environment(self) -> dict[str, str]:
        return self._environment(f"{self.record()['temp_dir']}:driver")

    def _driver_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "camserve_tools.servers.ray_cluster", *args, "--run-dir", str(self.run_dir)]

    def _driver(self, *args: str, timeout: float) -> str:
        """One of this module's driver commands (`wait`, `status`) against this cluster, in a process of its own:
        a Ray driver process stays apart from the caller (a test, `camserve serve`)."""
        result = subprocess.run(
            self._driver_command(*args), env=self._driver_environment(), cwd=self.run_dir, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} on the Ray cluster failed: {result.stderr.strip()[-800:]}")
        return result.stdout

    def replica_counts(self) -> dict[str, dict[str, int]]:
        """Each deployment's replicas by state (RUNNING, STARTING, ...), as Serve reports them now."""
        return json.loads(self._driver("status", timeout=120))

    def watch(self, interval: float = 1.0, duration: float = 0.0) -> subprocess.Popen:
        """A process printing every deployment's replica counts, one JSON line per `interval` seconds, on its stdout."""
        command = self._driver_command("watch", "--interval", str(interval), "--duration", str(duration))
        return subprocess.Popen(command, env=self._driver_environment(), cwd=self.run_dir, stdout=subprocess.PIPE, text=True)

    def wait_until_ready(self, timeout: float) -> None:
        """Until every model answers a real prediction on its route, and the router an explanation."""
        image = sample_image_png()
        paths = [f"predictions/{name}" for name in self.model_names] + [f"explanations/{self.model_names[0]}"]
        wait_for_answers(lambda path: requests.post(f"{self.inference_url}/{path}", data=image, timeout=60), paths, timeout, self.log_dir)

    # -- processes --------------------------------------------------------------------------------------------------

    def processes(self, node: str | None = None) -> list[psutil.Process]:
        """This cluster's processes (or one node's), found by the marker in their environment."""
        temp_dir = self.record().get("temp_dir")
        if not temp_dir:
            return []
        return processes_marked(temp_dir, node)

    def worker_pids(self, model: str = "shapes") -> list[int]:
        """The processes of `model`'s replicas (Ray titles each `ray::ServeReplica:<app>:<deployment>`)."""
        title = f"ServeReplica:{model}:{model}"
        pids = []
        for process in self.processes():
            try:
                if title in " ".join(process.cmdline()):
                    pids.append(process.pid)
            except psutil.NoSuchProcess:
                continue
        return sorted(pids)

    def metrics_urls(self) -> dict[str, str]:
        """Each node's Prometheus endpoint: Ray's metrics, and camserve's as ray_camrequests_total, ray_camerrors_total,
        ray_cammaptime, tagged with the model, application, deployment and replica."""
        return {name: f"http://127.0.0.1:{node['metrics_port']}/metrics" for name, node in self.record().get("nodes", {}).items()}

    def auth_headers(self) -> dict[str, str]:
        return {}

    def inference_key(self) -> str | None:
        """No token: Ray Serve's proxy leaves authorization to what stands in front of it."""
        return None

    def kill_node(self, node: str) -> list[int]:
        """Lose `node` at once: SIGKILL to each of its processes (raylet, agents, replicas), by pid. Their pids."""
        if node == "head":
            raise ValueError("losing the head loses the cluster: kill a worker node")
        processes = self.processes(node)
        signal_processes(processes, signal.SIGKILL, 10)
        return [process.pid for process in processes]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every process of this cluster, SIGKILL to any left after `grace` seconds (Ray's agents ignore
        SIGTERM); then the temp dir (its Ray logs kept in the run dir's logs/ray) and the record go."""
        record = self.record()
        if not record:
            return
        signal_processes(self.processes(), signal.SIGTERM, grace)
        # Twice: a process a node was starting while we signalled carries the marker too.
        for _ in range(2):
            signal_processes(self.processes(), signal.SIGKILL, 10)
        self._keep_logs_and_remove(Path(record["temp_dir"]))
        self.record_file.unlink(missing_ok=True)

    def _keep_logs_and_remove(self, temp_dir: Path) -> None:
        """Ray's logs into the run dir; then the temp dir, only if it is one that short_temp_dir made."""
        if not is_private_dir(temp_dir, TEMP_PREFIX):
            return
        kept = self.log_dir / "ray"
        shutil.rmtree(kept, ignore_errors=True)
        for session in sorted(temp_dir.glob("session_2*")):
            if (session / "logs").is_dir():
                shutil.copytree(session / "logs", kept, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "wait", "status", "watch"))
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="name=archive.mar[,...] (default: %(default)s)")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--config", type=Path, help="a TorchServe config whose max_request_size bounds the body")
    parser.add_argument("--timeout", type=float, default=600.0, help="start, wait: seconds")
    parser.add_argument("--interval", type=float, default=1.0, help="watch: seconds between lines")
    parser.add_argument("--duration", type=float, default=0.0, help="watch: seconds (0: until stopped)")
    args = parser.parse_args(argv)
    cluster = RayCluster(
        run_dir=args.run_dir.resolve(),
        archives=parse_models(args.models, args.model_store),
        nodes=args.nodes,
        inference_port=args.port,
        max_body_bytes=body_limit(args.config) if args.config else TORCHSERVE_MAX_REQUEST_SIZE,
    )
    if args.action == "start":
        cluster.start(args.timeout)
        print(f"Ray Serve is up on {cluster.inference_url} ({cluster.nodes} node(s), cluster {cluster.address})")
    elif args.action == "stop":
        cluster.stop()
    else:
        from camserve_tools.servers import ray_driver
        from camserve_tools.servers.ray_loopback import connect

        connect(cluster.address)
        try:
            if args.action == "wait":
                ray_driver.wait_until_running(args.timeout)
            elif args.action == "status":
                print(json.dumps(ray_driver.replica_counts()))
            else:
                ray_driver.watch(args.interval, args.duration)
        except (RuntimeError, TimeoutError) as error:
            sys.exit(f"camserve: {error}")
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
