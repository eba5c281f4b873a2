"""Start, wait for and stop camserve on KServe's own model server (camserve.engines.kserve_model): no TorchServe, no Java.

    python -m camserve_tools.servers.kserve start --run-dir .run/serve --archives model_store/shapes.mar,model_store/imagenet.mar
    python -m camserve_tools.servers.kserve stop --run-dir .run/serve

The same run-dir discipline as camserve_tools.servers.torchserve's TorchServe: own TMPDIR and logs, a pid file, the whole
process session stopped by its pid, and ready only once every model answers a real prediction.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

from camserve.protocol.limits import TORCHSERVE_MAX_REQUEST_SIZE
from camserve_tools.kserve.bundle import body_limit
from camserve_tools.servers.endpoint import LocalEndpoint
from camserve_tools.servers.process_group import start_in_own_session, stop_recorded
from camserve_tools.servers.readiness import wait_for_answers
from camserve_tools.servers.torchserve import free_port, sample_image_png

PID_FILE = "kserve.pid"
# Seconds the model server gets to answer what it holds after SIGTERM, before it is killed.
STOP_GRACE_S = 30.0


@dataclass
class KServeEngine(LocalEndpoint):
    """One KServe model server hosting camserve's pipeline for `archives` (.mar files or model dirs)."""

    run_dir: Path
    archives: list[Path]
    host: str = "127.0.0.1"
    inference_port: int = 8080
    grpc_port: int = 0  # 0: no gRPC listener
    # TorchServe's config, when given, sets the same body limit (max_request_size) as on TorchServe.
    config: Path | None = None

    @property
    def max_body_bytes(self) -> int:
        return body_limit(self.config) if self.config is not None else TORCHSERVE_MAX_REQUEST_SIZE

    @classmethod
    def on_free_ports(cls, **fields: object) -> KServeEngine:
        return cls(inference_port=free_port(), grpc_port=free_port(), **fields)  # type: ignore[arg-type]

    @property
    def pid_file(self) -> Path:
        return self.run_dir / PID_FILE

    @property
    def model_names(self) -> list[str]:
        return [Path(archive).stem if Path(archive).suffix == ".mar" else Path(archive).name for archive in self.archives]

    def start(self, timeout: float = 180.0) -> None:
        tmp_dir = self.run_dir / "tmp"
        for directory in (tmp_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "camserve.engines.kserve_model",
            "--archives",
            ",".join(str(Path(archive).resolve()) for archive in self.archives),
            "--listen-host",
            self.host,
            "--listen-port",
            str(self.inference_port),
            "--grpc-listen-port",
            str(self.grpc_port),
            "--max-body-bytes",
            str(self.max_body_bytes),
        ]
        # cwd and TMPDIR in the run dir: nothing of the repository importable by accident, temp files its own.
        self.process = start_in_own_session(
            command, env={**os.environ, "TMPDIR": str(tmp_dir)}, cwd=self.run_dir, log=self.log_dir / "kserve.log", pid_file=self.pid_file
        )
        self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float) -> None:
        """Until every model answers a real prediction; stopped if it cannot."""
        image = sample_image_png()

        def send(name: str) -> requests.Response:
            return requests.post(f"{self.inference_url}/predictions/{name}", data=image, timeout=30)

        def check_alive() -> None:
            if self.process.poll() is not None:
                raise RuntimeError(f"the KServe model server exited with code {self.process.returncode}; see {self.log_dir}")

        try:
            wait_for_answers(send, self.model_names, timeout, self.log_dir, check_alive)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise

    def worker_pids(self) -> list[int]:
        """The one process that runs every model's pipeline."""
        return [self.process.pid]

    def auth_headers(self) -> dict[str, str]:
        return {}

    def inference_key(self) -> str | None:
        """No token: KServe's model server leaves authorization to what stands in front of it (an ingress, a mesh)."""
        return None

    @property
    def models(self) -> str:
        return ",".join(f"{name}={Path(archive).name}" for name, archive in zip(self.model_names, self.archives, strict=True))

    def stop(self) -> None:
        stop_recorded(getattr(self, "process", None), self.pid_file, grace=STOP_GRACE_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--archives", default="", help="comma list of .mar files or model dirs")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--config", type=Path, help="a TorchServe config whose max_request_size bounds the body")
    args = parser.parse_args(argv)
    engine = KServeEngine(
        run_dir=args.run_dir.resolve(),
        archives=[Path(a) for a in args.archives.split(",") if a],
        inference_port=args.port,
        grpc_port=args.grpc_port,
        config=args.config,
    )
    if args.action == "start":
        engine.start()
    else:
        engine.stop()


if __name__ == "__main__":
    main()
