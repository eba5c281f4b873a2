"""`make kserve-local`: the kserve-torchserve pod on loopback, for KServe's own client.

    python -m camserve_tools.kserve.local start [--api v1|v2] [--port 8080] [--bundle DIR | --archives a.mar,b.mar]
    python -m camserve_tools.kserve.local stop

As in the pod: TorchServe starts from the bundle's own config/config.properties and model-store/ (its
model_snapshot picks the archives), on 8085, with the environment the InferenceServices in deploy/kserve/ give it
(TS_SERVICE_ENVELOPE from the protocol, token authorization off: docs/deploy.md says why); KServe's model server
(camserve_tools.kserve.front) answers on 127.0.0.1:8080 in front of it. Each process gets its own session in
`--run-dir`, and `stop` ends exactly those two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from camserve_tools.kserve.bundle import (
    ENVELOPES,
    FRONT_GRPC_PORT,
    GRPC_INFERENCE_PORT,
    GRPC_MANAGEMENT_PORT,
    INFERENCE_PORT,
    MANAGEMENT_PORT,
    METRICS_PORT,
    body_limit,
    read_properties,
    write_bundle,
)
from camserve_tools.servers.process_group import start_in_own_session, stop_recorded
from camserve_tools.servers.torchserve import TorchServe, free_port
from camserve_tools.shared_fields import shared_fields

ROOT = Path(__file__).resolve().parents[2]
# Seconds the front gets to finish what it holds after SIGTERM, before it is killed.
FRONT_STOP_GRACE_S = 10.0
# The listeners of a KServeLocal: the front's and TorchServe's.
PORT_FIELDS = (
    "port",
    "inference_port",
    "management_port",
    "metrics_port",
    "grpc_inference_port",
    "grpc_management_port",
    "front_grpc_port",
)


def pod_environment(api: str) -> dict[str, str]:
    """What the InferenceServices of deploy/kserve/ set on the kserve-container (the runtime adds the envelope)."""
    return {"TS_SERVICE_ENVELOPE": ENVELOPES[api], "TS_DISABLE_TOKEN_AUTHORIZATION": "true"}


@dataclass
class KServeLocal:
    run_dir: Path
    bundle: Path
    api: str = "v1"
    host: str = "127.0.0.1"
    port: int = 8080
    inference_port: int = INFERENCE_PORT
    management_port: int = MANAGEMENT_PORT
    metrics_port: int = METRICS_PORT
    grpc_inference_port: int = GRPC_INFERENCE_PORT
    grpc_management_port: int = GRPC_MANAGEMENT_PORT
    # KServe's gRPC (v2 only), where the runtime's wrapper serves it.
    front_grpc_port: int = FRONT_GRPC_PORT
    torchserve: TorchServe = field(init=False)

    def __post_init__(self) -> None:
        config = self.bundle / "config" / "config.properties"
        properties = dict(read_properties(config))
        self.models = list(json.loads(properties["model_snapshot"])["models"])
        self.max_body_bytes = body_limit(config)
        # TorchServe listens on this pod's host and ports of the same names.
        self.torchserve = TorchServe(
            **shared_fields(
                self,
                TorchServe,
                run_dir=self.run_dir / "torchserve",
                config=config,
                model_store=self.bundle / "model-store",
                # The snapshot in the config decides what loads; the names only tell the start-up probe what to ask.
                models=",".join(f"{name}={name}.mar" for name in self.models),
                env=pod_environment(self.api),
            )
        )

    @classmethod
    def on_free_ports(cls, **settings: Any) -> KServeLocal:
        """A pod on ports nobody else uses (tests, measurements): never in the way of `make kserve-local`."""
        ports: dict[str, Any] = {name: free_port() for name in PORT_FIELDS}
        return cls(**ports, **settings)

    @property
    def url(self) -> str:
        """KServe's model server, the pod's one port for clients (TorchServe behind it is the runtime's own)."""
        return f"http://{self.host}:{self.port}"

    @property
    def front_pid_file(self) -> Path:
        """Where the running front's pid is kept, so that `make kserve-local-stop` stops that process and no other."""
        return self.run_dir / "front.pid"

    def start(self, timeout: float = 240.0) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.torchserve.start(timeout)
        try:
            self._start_front(timeout=60.0)
        except Exception:
            self.stop()
            raise

    def _start_front(self, timeout: float) -> None:
        command = [
            sys.executable,
            "-m",
            "camserve_tools.kserve.front",
            "--models",
            ",".join(self.models),
            "--api",
            self.api,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-body-bytes",
            str(self.max_body_bytes),
            "--torchserve",
            self.torchserve.inference_url,
            "--management",
            self.torchserve.management_url,
        ]
        if self.api == "v2":
            command += ["--grpc-port", str(self.front_grpc_port)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.front = start_in_own_session(command, env=env, cwd=self.run_dir, log=self.run_dir / "front.log", pid_file=self.front_pid_file)
        deadline = time.monotonic() + timeout
        ready_path = f"/v2/models/{self.models[0]}/ready" if self.api == "v2" else f"/v1/models/{self.models[0]}"
        while time.monotonic() < deadline:
            if self.front.poll() is not None:
                raise RuntimeError(f"the KServe front exited with code {self.front.returncode}; see {self.run_dir / 'front.log'}")
            try:
                if requests.get(self.url + ready_path, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"the KServe front did not report {self.models[0]} ready within {timeout:.0f} s; see {self.run_dir / 'front.log'}"
        )

    def stop(self) -> None:
        stop_recorded(getattr(self, "front", None), self.front_pid_file, grace=FRONT_STOP_GRACE_S)
        self.torchserve.stop()  # returns once the frontend and its workers are all gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run" / "kserve-local")
    parser.add_argument("--bundle", type=Path, help="a bundle from `make kserve-bundle`; default: one written into the run dir")
    parser.add_argument("--archives", default=str(ROOT / "model_store" / "shapes.mar"), help="comma list of .mar files, when no --bundle")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "production.properties", help="base settings, when no --bundle")
    parser.add_argument("--api", choices=sorted(ENVELOPES), default="v1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("KSERVE_PORT", 8080)))
    parser.add_argument("--inference-port", type=int, default=INFERENCE_PORT)
    parser.add_argument("--management-port", type=int, default=MANAGEMENT_PORT)
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    parser.add_argument("--grpc-inference-port", type=int, default=GRPC_INFERENCE_PORT)
    parser.add_argument("--grpc-management-port", type=int, default=GRPC_MANAGEMENT_PORT)
    parser.add_argument("--front-grpc-port", type=int, default=FRONT_GRPC_PORT, help="KServe's gRPC (v2 only)")
    parser.add_argument("--free-ports", action="store_true", help="any free ports instead of the pod's")
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    if args.free_ports:
        for name in PORT_FIELDS:
            setattr(args, name, free_port())
    bundle = args.bundle.resolve() if args.bundle else run_dir / "bundle"
    if args.action == "start":
        if (run_dir / "front.pid").exists() or (run_dir / "torchserve" / "torchserve.pid").exists():
            sys.exit(f"a kserve-local of {run_dir} seems to run already (pid file present); `make kserve-local-stop` first")
        if not args.bundle:
            write_bundle(bundle, [Path(p) for p in args.archives.split(",") if p], args.config, args.api)
    elif not (bundle / "config" / "config.properties").exists():
        print(f"nothing to stop in {run_dir}")
        return
    local = KServeLocal(**shared_fields(args, KServeLocal, run_dir=run_dir, bundle=bundle))
    if args.action == "stop":
        local.stop()
        print(f"stopped the KServe front and TorchServe of {run_dir}")
        return
    local.start()
    model = local.models[0]
    print(
        f"KServe ({args.api}) on {local.url} -> TorchServe {local.torchserve.inference_url}; metrics {local.torchserve.metrics_url}/metrics"
    )
    print("Try it:")
    print("  .venv/bin/python -c \"from camserve_tools.data.scenes import make_scene; make_scene(7).image.save('scene.png')\"")
    if args.api == "v1":
        print(f"  curl -s {local.url}/v1/models/{model}:predict -H 'Content-Type: application/json' \\")
        print('    -d "{\\"instances\\": [{\\"data\\": \\"$(base64 -w0 scene.png)\\"}]}" | head -c 400; echo')
    else:
        print(f"  curl -s {local.url}/v2/models/{model}/infer -H 'Content-Type: application/json' \\")
        print(
            '    -d "{\\"inputs\\": [{\\"name\\": \\"image\\", \\"shape\\": [1], \\"datatype\\": \\"BYTES\\", \\"data\\": '
            '[\\"$(base64 -w0 scene.png)\\"]}]}" | head -c 400; echo'
        )


if __name__ == "__main__":
    main()
