"""What `make image-test` drives its containers with: podman, one container of the image, the report of checks.

Every container runs on loopback and free ports under a name of its own, and is removed by that name.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from camserve_tools.container.build import ROOT, container_environment
from camserve_tools.servers.torchserve import free_port, sample_image_png

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
