"""`make loadtest`: run the Locust load test against a server, starting one for the run if none answers.

    make loadtest                                                       # 60 s steady, defaults of locust.conf
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.run_loadtest --shape step --users 8 --run-time 120s
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.run_loadtest --host http://10.0.0.5:8080 --token-file key_file.json
    PYTHONPATH=. .venv/bin/python -m camserve_tools.bench.run_loadtest --max-p95-ms 500 MapUser   # anything else goes to Locust

A server already answering at --host (`make serve`) is used as it is. Otherwise a TorchServe serving
model_store/shapes.mar starts in .run/loadtest on free ports, and is stopped when Locust is done, whatever
happened. Locust runs as a child process (it monkey-patches the interpreter with gevent), writes its CSV and HTML
reports under reports/ (see locust.conf), and its exit code is this script's: 0 pass, 1 SLO breach, 2 invalid run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import requests

from camserve_tools.servers.torchserve import TorchServe

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".run" / "loadtest"
LOCUSTFILE = ROOT / "load_tests" / "locustfile.py"
LOCUST_CONF = ROOT / "load_tests" / "locust.conf"


def answers(host: str) -> bool:
    """Whether a TorchServe is up at `host` (its /ping is healthy)."""
    try:
        return requests.get(f"{host}/ping", timeout=3).status_code == 200
    except requests.RequestException:
        return False


def start_server() -> TorchServe:
    """A TorchServe of model_store/ in RUN_DIR, on free ports so that it never collides with `make serve`."""
    server = TorchServe.on_free_ports(
        run_dir=RUN_DIR,
        config=ROOT / "config" / "dev.properties",
        model_store=ROOT / "model_store",
    )
    if (RUN_DIR / "torchserve.pid").exists():
        sys.exit(
            f"a server of {RUN_DIR} seems to run already (pid file present); stop it: python -m camserve_tools.servers.torchserve stop "
            f"--run-dir {RUN_DIR}"
        )
    shutil.rmtree(server.tmp_dir, ignore_errors=True)
    try:
        server.start()
    except BaseException:
        server.stop()  # start() leaves the pid file behind when the server dies while starting
        raise
    return server


def locust_command(host: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--config", str(LOCUST_CONF), "--host", host]
    for flag, value in (("--run-time", args.run_time), ("--users", args.users), ("--shape", args.shape), ("--token-file", args.token_file)):
        if value is not None:
            command += [flag, str(value)]
    return command + extra


def run_locust(command: list[str]) -> int:
    """Locust's exit code. Ctrl-C reaches Locust too: wait while it writes its reports rather than kill it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return process.wait()


def main() -> None:
    # No abbreviations: an unknown option is Locust's, even when it starts like one of ours.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument(
        "--host",
        default=f"http://127.0.0.1:{os.environ.get('INFERENCE_PORT', 8080)}",
        help="inference address to test (default: make serve's)",
    )
    parser.add_argument("--run-time", help="e.g. 60s, 5m (default: locust.conf's)")
    parser.add_argument("--users", type=int, help="peak concurrent users (default: locust.conf's)")
    parser.add_argument("--shape", choices=("steady", "step", "spike"), help="load shape (default: steady)")
    parser.add_argument("--token-file", help="TorchServe's key_file.json, when token authorization is on")
    args, extra = parser.parse_known_args()
    server = None if answers(args.host) else start_server()
    host = server.inference_url if server else args.host
    print(f"load test of {host}" + (f" (a TorchServe started for it, logs in {server.log_dir})" if server else ""), flush=True)
    try:
        code = run_locust(locust_command(host, args, extra))
    finally:
        if server:
            server.stop()
    sys.exit(code)


if __name__ == "__main__":
    main()
