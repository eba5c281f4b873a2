"""The container's entry point (camserve_tools/container/entrypoint.py) outside the image, on a real TorchServe: the
effective config, the engine choice, the probe with the run dir's key, and SIGTERM while requests are in flight
(every one answered, then a clean exit). make image-test repeats the last inside the container."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from support import ROOT

from camserve_tools.container.entrypoint import CONTAINER_DEFAULTS, ConfigConflict, effective_config, read_properties
from camserve_tools.servers.torchserve import free_port, sample_image_png


def entrypoint(env: dict[str, str], *args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "camserve_tools.container.entrypoint", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        **popen,  # type: ignore[arg-type]
    )


def test_effective_config_keeps_the_given_keys_and_fills_the_rest(tmp_path: Path) -> None:
    given = tmp_path / "given.properties"
    given.write_text("# a comment\ninference_address=http://127.0.0.1:9999\ndisable_token_authorization=false\nservice_envelope=kserve\n")
    path, envelope = effective_config(given, tmp_path, {"TS_DISABLE_TOKEN_AUTHORIZATION": "true", "TS_DEFAULT_WORKERS_PER_MODEL": "2"})
    effective = read_properties(path.read_text())
    assert effective["inference_address"] == "http://127.0.0.1:9999"
    assert effective["disable_token_authorization"] == "true", "TS_* win"
    assert effective["default_workers_per_model"] == "2", "TS_* win"
    for key, value in CONTAINER_DEFAULTS.items():
        if key != "inference_address":
            assert effective[key] == value, key
    # The envelope is camserve's handler's (TS_SERVICE_ENVELOPE), never TorchServe's own.
    assert envelope == "kserve"
    assert "service_envelope" not in effective
    assert effective_config(given, tmp_path, {"TS_SERVICE_ENVELOPE": "kservev2"})[1] == "kservev2"
    with pytest.raises(ConfigConflict, match="enable_envvars_config"):
        effective_config(given, tmp_path, {"TS_ENABLE_ENVVARS_CONFIG": "true"})


def test_an_engine_the_image_lacks_is_refused_with_a_message() -> None:
    process = entrypoint({"CAMSERVE_ENGINE": "triton"}, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "CAMSERVE_ENGINE='triton' is not available in this image (available: kserve, torchserve)" in stderr
    usage = entrypoint({}, "torchserve", "--start", stderr=subprocess.PIPE, text=True)
    assert usage.communicate(timeout=60)[1].startswith("usage: entrypoint [serve]")
    assert usage.returncode == 2


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """The entry point on the production config (tokens on), the shapes archive, free loopback ports."""
    port = free_port()
    config = tmp_path / "production.properties"
    config.write_text(
        (ROOT / "config" / "production.properties").read_text()
        + f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:{free_port()}\n"
        + f"metrics_address=http://127.0.0.1:{free_port()}\ngrpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
        + f"model_store={ROOT / 'model_store'}\nload_models=shapes.mar\n"
    )
    run_dir = tmp_path / "run"
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "entrypoint.log").open("wb") as log:
        process = entrypoint({"CAMSERVE_CONFIG": str(config), "CAMSERVE_RUN_DIR": str(run_dir)}, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not (run_dir / "key_file.json").exists() or probe(url, run_dir).returncode != 0:
                assert process.poll() is None, (tmp_path / "entrypoint.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "entrypoint.log").read_text()[-3000:]
                time.sleep(1)
            yield process, url, run_dir
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def probe(url: str, run_dir: Path, *models: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAMSERVE_PROBE_URL": url, "CAMSERVE_RUN_DIR": str(run_dir)}
    return subprocess.run(
        [sys.executable, "-m", "camserve_tools.container.probe", *models], env=env, cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.server
def test_sigterm_answers_every_request_in_flight(served: tuple[subprocess.Popen, str, Path]) -> None:
    process, url, run_dir = served
    assert probe(url, run_dir, "shapes").returncode == 0, "the probe reads the key from the run dir"
    assert probe(url, run_dir, "absent").stdout.startswith("not ready: absent")
    key = json.loads((run_dir / "key_file.json").read_text())["inference"]["key"]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png", "X-CAM-Method": "scorecam"}
    signalled = threading.Event()
    outcomes: list[tuple[float, float, object]] = []

    def user() -> None:
        session = requests.Session()
        while not signalled.is_set():
            sent = time.monotonic()
            try:
                status: object = session.post(f"{url}/predictions/shapes", data=sample_image_png(), headers=headers, timeout=90).status_code
            except requests.RequestException as error:
                status = type(error).__name__
            outcomes.append((sent, time.monotonic(), status))

    threads = [threading.Thread(target=user) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(4)
    signalled.set()
    signal_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    for thread in threads:
        thread.join(timeout=30)
    in_flight = [status for sent, done, status in outcomes if sent < signal_at < done]
    assert in_flight, "no request was in flight at the signal"
    assert in_flight == [200] * len(in_flight)
    assert code == 0  # a clean exit once the last answer went out (process.wait's timeout bounds a hang)
