"""Start, wait for and stop camserve on KServe's own model server (camserve.engines.kserve_model): no TorchServe, no Java.

    python -m camserve_tools.servers.kserve start --run-dir .run/serve --archives model_store/shapes.mar,model_store/imagenet.mar
    python -m camserve_tools.servers.kserve stop --run-dir .run/serve

The same run-dir discipline as camserve_tools.servers.torchserve's TorchServe: own TMPDIR and logs, a pid file, the whole
process session stopped by its pid, and ready only once every model answers a real prediction.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from camserve.protocol.limits import TORCHSERVE_MAX_REQUEST_SIZE
from camserve_tools.kserve.bundle import read_properties
from camserve_tools.servers.torchserve import free_port, sample_image_png

PID_FILE = "kserve.pid"


@dataclass
class KServeEngine:
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
        properties = read_properties(self.config) if self.config is not None else []
        return int(dict(properties).get("max_request_size", TORCHSERVE_MAX_REQUEST_SIZE))

    @classmethod
    def on_free_ports(cls, **fields: object) -> KServeEngine:
        return cls(inference_port=free_port(), grpc_port=free_port(), **fields)  # type: ignore[arg-type]

    @property
    def inference_url(self) -> str:
        return f"http://{self.host}:{self.inference_port}"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

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
        with open(self.log_dir / "kserve.log", "ab") as out:
            # cwd and TMPDIR in the run dir: nothing of the repository importable by accident, temp files its own.
            self.process = subprocess.Popen(
                command,
                env={**os.environ, "TMPDIR": str(tmp_dir)},
                cwd=self.run_dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(self.process.pid))
        self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float) -> None:
        """Until every model answers a real prediction."""
        deadline = time.monotonic() + timeout
        pending = set(self.model_names)
        last_error = "no answer yet"
        image = sample_image_png()
        while pending and time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise RuntimeError(f"the KServe model server exited with code {self.process.returncode}; see {self.log_dir}")
            for name in list(pending):
                try:
                    response = requests.post(f"{self.inference_url}/predictions/{name}", data=image, timeout=30)
                    if response.status_code == 200:
                        pending.discard(name)
                    else:
                        last_error = f"{name}: HTTP {response.status_code} {response.text[:200]}"
                except requests.RequestException as error:
                    last_error = f"{name}: {type(error).__name__}"
            if pending:
                time.sleep(1.0)
        if pending:
            self.stop()
            raise TimeoutError(f"model(s) {sorted(pending)} did not answer within {timeout:.0f} s ({last_error}); logs in {self.log_dir}")

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
        process = getattr(self, "process", None)
        pid = process.pid if process is not None else int(self.pid_file.read_text()) if self.pid_file.exists() else None
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for _ in range(60):
            if process is not None and process.poll() is not None:
                break
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            os.killpg(pid, signal.SIGKILL)
        if process is not None:
            process.wait()
        self.pid_file.unlink(missing_ok=True)


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
