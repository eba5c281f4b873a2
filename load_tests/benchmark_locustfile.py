"""The serving benchmark's client: N users, each posting pool images back to back, checking every answer cheaply.

Run by camserve_tools/bench/serving_benchmark.py, once per cell (variant x concurrency), as a subprocess:

    PYTHONPATH=. locust -f load_tests/benchmark_locustfile.py --headless -u 4 -r 4 -t 20s --reset-stats \
        --host http://127.0.0.1:8080 --path /predictions/shapes --answer map --header X-CAM-Method=gradcam \
        --server-pid 12345 --summary out.json

Unlike locustfile.py (the load test), users never wait: concurrency is exactly the number of users (a closed
loop), so throughput at 16 users is the server's saturated throughput. The checks are structural (status, JSON
shape, label present, heat map is base64 PNG) and cost the client microseconds: on a 2-core machine every client
cycle is taken from the server, and a full image decode per answer would tax map variants more than plain ones.
The full decode-and-compare checks live in the load test. Per answer the client does what any client does
(receive it, parse its JSON) and nothing more: no image is decoded. With --server-pid, the CPU time of the
server's process tree (frontend and workers) and of this client is read from /proc when the measured window
opens (users all started, statistics reset) and when it closes (the run's time is up), so that each answer's
server cost can be told from the client's (camserve_tools/bench/cpu_accounting.py). At the end the run's
figures go to --summary as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import constant, events, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import FastHttpUser, FastResponse
from locust.env import Environment
from locust.runners import WorkerRunner

from camserve_tools.bench.cpu_accounting import CpuWindow
from camserve_tools.bench.locust_posts import post_pool_image
from camserve_tools.data.image_pool import image_pool

PNG_BASE64_SIGNATURE = "iVBORw0KGgo"  # base64 of the 8-byte PNG signature
PERCENTILES = (0.5, 0.95, 0.99)


@events.init_command_line_parser.add_listener
def add_arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument("--path", default="/predictions/shapes", help="request path, e.g. /predictions/shapes")
    parser.add_argument("--header", action="append", default=[], help="extra request header NAME=VALUE (repeatable)")
    parser.add_argument("--answer", default="map", choices=sorted(CHECKS), help="what a correct answer looks like")
    parser.add_argument("--pool-size", type=int, default=32, help="generated images (default: 32)")
    parser.add_argument("--summary", default="", help="write the run's figures here as JSON")
    parser.add_argument("--server-pid", type=int, default=0, help="the server's root process: its tree's CPU time goes to --summary")


def run_options(environment: Environment) -> argparse.Namespace:
    """The command line's options: Locust parses them before it fires any event or starts any user."""
    if environment.parsed_options is None:
        raise RuntimeError("no parsed options: run this file with the locust command")
    return environment.parsed_options


class WrongAnswer(ValueError):
    """The server answered, but not what this variant promises."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise WrongAnswer(message)


def ok_json(response: FastResponse) -> Any:
    expect(response.status_code == 200, f"HTTP {response.status_code}: {' '.join((response.text or '').split())[:200]}")
    return response.json()


def check_builtin(response: FastResponse) -> None:
    """TorchServe's ImageClassifier: {label: probability, ...} for the top classes."""
    body = ok_json(response)
    expect(isinstance(body, dict) and len(body) > 0, "no {label: probability} object")
    expect(all(isinstance(value, float) for value in body.values()), "non-numeric probabilities")


def check_integrated_gradients(response: FastResponse) -> None:
    """TorchServe's VisionHandler explanation: the attributions as a nested list, channels x height x width."""
    body = ok_json(response)
    expect(
        isinstance(body, list) and len(body) == 3 and isinstance(body[0], list) and isinstance(body[0][0], list),
        "no 3 x H x W attribution list",
    )


def predictions(body: Any) -> list[dict[str, Any]]:
    expect(isinstance(body, dict), "the body is not a JSON object")
    found = body.get("predictions")
    expect(isinstance(found, list) and len(found) > 0 and isinstance(found[0].get("label"), str), "no predictions with labels")
    return found


def check_plain(response: FastResponse) -> None:
    body = ok_json(response)
    predictions(body)
    expect("cam" not in body, "a map was computed although X-CAM-Method: none")


def check_map(response: FastResponse) -> None:
    body = ok_json(response)
    top = predictions(body)[0]
    cam = body.get("cam")
    expect(isinstance(cam, dict), "no map in 'cam'")
    expect(isinstance(cam.get("heatmap"), str) and cam["heatmap"].startswith(PNG_BASE64_SIGNATURE), "the heat map is not a base64 PNG")
    expect(cam.get("index") == top["index"], f"map of class {cam.get('index')}, top-1 is {top['index']}")


def check_pytorch_grad_cam(response: FastResponse) -> None:
    """The peer handler (camserve_tools/bench/pytorch_grad_cam_handler.py): top-1 label and its heat map."""
    body = ok_json(response)
    expect(isinstance(body, dict) and isinstance(body.get("label"), str), "no label")
    expect(isinstance(body.get("heatmap"), str) and body["heatmap"].startswith(PNG_BASE64_SIGNATURE), "the heat map is not a base64 PNG")


CHECKS: dict[str, Callable[[FastResponse], None]] = {
    "builtin": check_builtin,
    "integrated-gradients": check_integrated_gradients,
    "plain": check_plain,
    "map": check_map,
    "pytorch-grad-cam": check_pytorch_grad_cam,
}


@functools.lru_cache(maxsize=1)
def extra_headers(pairs: tuple[str, ...]) -> dict[str, str]:
    """--header NAME=VALUE pairs as a dict: parsed once (prepare() calls it first), not on every request."""
    headers = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator:
            raise SystemExit(f"--header {pair!r}: expected NAME=VALUE")
        headers[name] = value
    return headers


CPU_WINDOW: list[CpuWindow] = []  # the run's window, once --server-pid names a server


@events.init.add_listener
def prepare(environment: Environment, **_kwargs: Any) -> None:
    # Before any user starts: no request pays for them, and a malformed --header stops the run here.
    options = run_options(environment)
    image_pool(options.pool_size)
    extra_headers(tuple(options.header))
    if options.server_pid:
        CPU_WINDOW.append(CpuWindow(options.server_pid))


@events.spawning_complete.add_listener
def open_cpu_window(**_kwargs: Any) -> None:
    """When every user runs: where --reset-stats starts the statistics (registered before Locust's own reset)."""
    for window in CPU_WINDOW:
        window.open()


@events.test_stopping.add_listener
def close_cpu_window(**_kwargs: Any) -> None:
    """When the run's time is up, before the users are stopped: the statistics' window ends here too."""
    for window in CPU_WINDOW:
        window.close()


class BenchmarkUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def post_image(self) -> None:
        options = run_options(self.environment)
        headers, check = extra_headers(tuple(options.header)), CHECKS[options.answer]
        wrong_answers = (ValueError, KeyError, TypeError, AttributeError, IndexError)
        post_pool_image(self.client, options.pool_size, options.path, options.path, headers, lambda answer, _: check(answer), wrong_answers)


@events.quitting.add_listener
def write_summary(environment: Environment, **_kwargs: Any) -> None:
    """Figures of the measured window (--reset-stats drops the ramp-up): what serving_benchmark.py merges over
    rounds and tabulates."""
    runner, options = environment.runner, run_options(environment)
    if runner is None or isinstance(runner, WorkerRunner) or not options.summary:
        return  # no run, a worker (the master writes the whole run's figures), or no --summary
    total = environment.stats.total
    summary = {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "throughput_rps": total.total_rps,
        "mean_ms": total.avg_response_time,
        "response_bytes": total.avg_content_length,
        "client_cpu_saturated": bool(runner.cpu_warning_emitted),
        "errors": [f"{error.occurrences} x {error.error}" for error in environment.stats.errors.values()][:5],
        # What the driver needs to merge rounds: the window, and Locust's histogram of (rounded) response times.
        "window_s": (total.last_request_timestamp or 0) - total.start_time if total.num_requests else 0.0,
        # The window in Unix time, for what the driver measures on the server meanwhile (its CPU time).
        "window_start": total.start_time,
        "window_end": total.last_request_timestamp or total.start_time,
        "response_bytes_total": total.total_content_length,
        "response_times_ms": {str(ms): count for ms, count in total.response_times.items()},
        **{f"p{round(q * 100)}_ms": total.get_response_time_percentile(q) for q in PERCENTILES},
        # CPU seconds over the window: server_{frontend,workers,other,total,jit}_s, client_s, window_s; {} without --server-pid.
        "cpu": (CPU_WINDOW[0].spent or {}) if CPU_WINDOW else {},
    }
    Path(options.summary).write_text(json.dumps(summary, indent=1) + "\n")
    environment.process_exit_code = 0  # failures are figures here, not a verdict: the driver reports them
