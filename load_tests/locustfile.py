"""Load test of a camserve model: four kinds of clients, every answer checked, SLO gates on the exit code.

    python -m camserve_tools.bench.run_loadtest                      # `make loadtest`: starts a server if none answers
    PYTHONPATH=. locust -f load_tests/locustfile.py --config load_tests/locust.conf
    PYTHONPATH=. locust -f load_tests/locustfile.py --config load_tests/locust.conf MapUser OverlayUser
    PYTHONPATH=. locust -f load_tests/locustfile.py --config load_tests/locust.conf --shape spike --users 8

User classes (pick some by name at the end of the command line; weights via --equal-weights or --config-users):

| class | request |
|---|---|
| `PredictionUser` | `POST /predictions/{model}` with `X-CAM-Method: none`: the plain prediction, the baseline |
| `MapUser` | `POST /predictions/{model}`: predictions + map, the default answer |
| `ExplanationUser` | `POST /explanations/{model}`: the map alone |
| `OverlayUser` | `POST /predictions/{model}` with `Accept: image/png`: the heat map drawn over the image |

A wrong answer (bad status, malformed JSON, a heat map or overlay of another size than the image) counts as a
failure, so "fast but broken" cannot pass. At the end the run is gated: failure ratio, p95 and p99 over all
requests against --max-fail-ratio, --max-p95-ms, --max-p99-ms (exit code 1 on a breach), and a run during which
Locust's own CPU was saturated is invalid (exit code 2): its latencies measure the load generator, not the server.

Load shapes (--shape): `steady` (--users for --run-time), `step` (a quarter of --users more every quarter of the
run: where latency bends), `spike` (a quarter of --users, then all of them at once for the middle fifth of the
run, then back: does the queue drain?).
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import LoadTestShape, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import FastHttpUser, FastResponse
from locust.env import Environment
from locust.runners import CPU_WARNING_THRESHOLD, WorkerRunner
from PIL import Image

from camserve_tools.bench.locust_posts import post_pool_image
from camserve_tools.data.image_pool import Sample, image_pool

logger = logging.getLogger("camserve.loadtest")

STEPS = 4


# --- options ---------------------------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def add_arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument("--model", default="shapes", env_var="LOCUST_MODEL", help="model name in the URL (default: shapes)")
    parser.add_argument(
        "--token-file",
        default="",
        env_var="LOCUST_TOKEN_FILE",
        help="TorchServe's key_file.json: its inference key is sent as a Bearer token (default: no Authorization header)",
    )
    parser.add_argument("--pool-size", type=int, default=32, env_var="LOCUST_POOL_SIZE", help="generated images per process (default: 32)")
    parser.add_argument(
        "--shape", choices=("steady", "step", "spike"), default="steady", env_var="LOCUST_SHAPE", help="load shape (default: steady)"
    )
    parser.add_argument(
        "--max-fail-ratio", type=float, default=0.01, env_var="LOCUST_MAX_FAIL_RATIO", help="gate: failed / all requests (default: 0.01)"
    )
    parser.add_argument(
        "--max-p95-ms", type=float, default=2000.0, env_var="LOCUST_MAX_P95_MS", help="gate: 95th percentile latency (default: 2000)"
    )
    parser.add_argument(
        "--max-p99-ms", type=float, default=4000.0, env_var="LOCUST_MAX_P99_MS", help="gate: 99th percentile latency (default: 4000)"
    )


def run_options(environment: Environment) -> argparse.Namespace:
    """The command line's options: Locust parses them before it fires any event or starts any user."""
    if environment.parsed_options is None:
        raise RuntimeError("no parsed options: run this file with the locust command")
    return environment.parsed_options


@functools.lru_cache(maxsize=1)
def auth_headers(token_file: str) -> dict[str, str]:
    """With token authorization on, every inference call needs the key TorchServe wrote at start."""
    if not token_file:
        return {}
    key = json.loads(Path(token_file).read_text())["inference"]["key"]
    return {"Authorization": f"Bearer {key}"}


# --- the image pool (camserve_tools/data/image_pool.py) ---------------------------------------------------------------


@events.init.add_listener
def prepare(environment: Environment, **_kwargs: Any) -> None:
    """Before any user starts: refuse a shape without a duration, build the pool, read the token (a bad file
    stops the run here, not as a failure on every request)."""
    options = run_options(environment)
    if options.shape != "steady" and not options.run_time:
        raise SystemExit(f"--shape {options.shape} is laid out over the run: give --run-time")
    image_pool(options.pool_size)
    auth_headers(options.token_file)


# --- answer checks ---------------------------------------------------------------------------------------------


class WrongAnswer(ValueError):
    """The server answered, but not what the protocol promises."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise WrongAnswer(message)


def excerpt(response: FastResponse) -> str:
    """The start of an error body on one line, so that the failures CSV groups equal errors."""
    return " ".join((response.text or "").split())[:200]


def content_type(response: FastResponse) -> str:
    """The Content-Type header ("" without one; a repeated header's values joined, which no check accepts)."""
    value = response.headers.get("content-type", "") if response.headers is not None else ""
    return value if isinstance(value, str) else ", ".join(value)


def json_body(response: FastResponse) -> dict[str, Any]:
    expect(response.status_code == 200, f"HTTP {response.status_code}: {excerpt(response)}")
    kind = content_type(response)
    expect(kind.startswith("application/json"), f"content type {kind!r}, not JSON")
    body = response.json()
    if not isinstance(body, dict):
        raise WrongAnswer("the body is not a JSON object")
    return body


def check_predictions(body: dict[str, Any]) -> list[dict[str, Any]]:
    predictions = body.get("predictions")
    if not isinstance(predictions, list) or not predictions:
        raise WrongAnswer("no predictions list")
    for prediction in predictions:
        expect(isinstance(prediction, dict), f"malformed prediction {prediction!r}")
        expect(isinstance(prediction.get("label"), str) and isinstance(prediction.get("index"), int), f"malformed prediction {prediction}")
        expect(0.0 <= prediction.get("probability", -1.0) <= 1.0, f"probability out of [0, 1] in {prediction}")
    return predictions


def decoded_size(data: bytes) -> tuple[tuple[int, int], str]:
    """Size and mode of an image after a full decode (a truncated image fails here, not at the client)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size, image.mode


def check_cam(body: dict[str, Any], sample: Sample) -> dict[str, Any]:
    cam = body.get("cam")
    if not isinstance(cam, dict):
        raise WrongAnswer(f"no single map in 'cam' ({type(cam).__name__})")
    expect(cam.get("size") == list(sample.size), f"map size {cam.get('size')}, image {list(sample.size)}")
    width, height = cam["heatmap_size"]
    expect(0 < width <= sample.size[0] and 0 < height <= sample.size[1], f"heatmap_size {cam['heatmap_size']}, image {sample.size}")
    size, mode = decoded_size(base64.b64decode(cam["heatmap"], validate=True))
    expect(size == (width, height) and mode == "L", f"heat map {size} {mode}, expected {(width, height)} L")
    if cam.get("empty") is True:  # an empty map: no box, no peak
        expect(cam["bbox"] is None and cam["peak"] is None, f"an empty map with bbox {cam['bbox']}, peak {cam['peak']}")
        return cam
    x0, y0, x1, y1 = cam["bbox"]
    expect(0 <= x0 < x1 <= sample.size[0] and 0 <= y0 < y1 <= sample.size[1], f"bbox {cam['bbox']} outside the image")
    x, y = cam["peak"]
    expect(0 <= x < sample.size[0] and 0 <= y < sample.size[1], f"peak {cam['peak']} outside the image")
    return cam


def check_overlay(response: FastResponse, sample: Sample) -> None:
    expect(response.status_code == 200, f"HTTP {response.status_code}: {excerpt(response)}")
    kind = content_type(response)
    expect(kind == "image/png", f"content type {kind!r}, not image/png")
    size, _mode = decoded_size(response.content or b"")
    expect(size == sample.size, f"overlay {size}, image {sample.size}")


# --- users -----------------------------------------------------------------------------------------------------


class CamUser(FastHttpUser):
    """One kind of client: posts a random pool image and checks the answer; subclasses say what and how."""

    abstract = True
    wait_time = between(0.1, 0.5)
    route = "predictions"
    request_name = ""
    extra_headers: dict[str, str] = {}

    def check(self, response: FastResponse, sample: Sample) -> None:
        raise NotImplementedError

    @task
    def post_image(self) -> None:
        options = run_options(self.environment)
        post_pool_image(
            self.client,
            options.pool_size,
            f"/{self.route}/{options.model}",
            self.request_name,
            {**auth_headers(options.token_file), **self.extra_headers},
            self.check,
            # A wrong answer: WrongAnswer, bad JSON or base64 (ValueError), a missing field, an undecodable image.
            (ValueError, KeyError, TypeError, OSError),
        )


class PredictionUser(CamUser):
    request_name = "predict (no map)"
    extra_headers = {"X-CAM-Method": "none"}

    def check(self, response: FastResponse, sample: Sample) -> None:
        body = json_body(response)
        check_predictions(body)
        expect("cam" not in body, "a map was computed although X-CAM-Method: none")


class MapUser(CamUser):
    request_name = "predict + map"

    def check(self, response: FastResponse, sample: Sample) -> None:
        body = json_body(response)
        top = check_predictions(body)[0]
        cam = check_cam(body, sample)
        expect(cam.get("index") == top["index"], f"map of class {cam.get('index')}, top-1 is {top['index']}")


class ExplanationUser(CamUser):
    route = "explanations"
    request_name = "explanations"

    def check(self, response: FastResponse, sample: Sample) -> None:
        body = json_body(response)
        expect("predictions" not in body, "/explanations answered predictions")
        check_cam(body, sample)


class OverlayUser(CamUser):
    request_name = "overlay (png)"
    extra_headers = {"Accept": "image/png"}

    def check(self, response: FastResponse, sample: Sample) -> None:
        check_overlay(response, sample)


# --- load shapes -----------------------------------------------------------------------------------------------

Stage = tuple[int, float]


def steady(elapsed: float, duration: float, users: int, rate: float) -> Stage:
    """The capacity question: does the server hold --users for the whole run?"""
    return users, rate


def step(elapsed: float, duration: float, users: int, rate: float) -> Stage:
    """Users rise in STEPS stages: the stage where latency bends is the server's knee."""
    stage = min(int(elapsed / duration * STEPS), STEPS - 1)
    return max(1, math.ceil(users * (stage + 1) / STEPS)), rate


def spike(elapsed: float, duration: float, users: int, rate: float) -> Stage:
    """A quarter of the users, all of them for the middle fifth, then back: does the queue drain afterwards?
    They arrive and leave within a second (the spawn rate is at least --users): a spike, not a ramp."""
    if 0.4 <= elapsed / duration < 0.6:
        return users, float(max(users, rate))
    return max(1, users // 4), float(max(users, rate))


PROFILES: dict[str, Callable[[float, float, int, float], Stage]] = {"steady": steady, "step": step, "spike": spike}


class CamLoadShape(LoadTestShape):
    """Locust takes the first shape of a locustfile, so this one dispatches on --shape. It reads --users,
    --spawn-rate and --run-time (use_common_options), so one set of options drives all three shapes."""

    use_common_options = True

    def tick(self) -> Stage | None:
        if self.runner is None:
            raise RuntimeError("a load shape ticks only once Locust has given it its runner")
        options = run_options(self.runner.environment)
        elapsed = self.get_run_time()
        if options.run_time and elapsed >= options.run_time:
            return None
        # Without --run-time only `steady` runs (prepare() refuses the others), and it ignores the duration.
        return PROFILES[options.shape](elapsed, float(options.run_time or 1), options.num_users, options.spawn_rate)


# --- gates -----------------------------------------------------------------------------------------------------


def latency_breaches(environment: Environment) -> list[str]:
    options, total = run_options(environment), environment.stats.total
    gates = ((0.95, options.max_p95_ms), (0.99, options.max_p99_ms))
    return [
        f"p{round(q * 100)} {total.get_response_time_percentile(q):.0f} ms > {limit:.0f} ms"
        for q, limit in gates
        if total.get_response_time_percentile(q) > limit
    ]


def answer_breaches(environment: Environment) -> list[str]:
    options, total = run_options(environment), environment.stats.total
    if total.num_requests == 0:
        return ["no request was made"]
    if total.fail_ratio > options.max_fail_ratio:
        return [f"failure ratio {total.fail_ratio:.4f} ({total.num_failures}/{total.num_requests}) > {options.max_fail_ratio}"]
    return []


@events.quitting.add_listener
def apply_gates(environment: Environment, **_kwargs: Any) -> None:
    """The run's verdict as the exit code: 0 pass, 1 SLO breach, 2 invalid run.

    A saturated load generator distorts latencies, not answers: wrong answers fail the run (1) even then, while
    latency breaches of a saturated run only make it invalid (2). A pass sets 0 explicitly, so failures within
    --max-fail-ratio do not trip Locust's own exit-on-any-error; exceptions in this file still do.
    """
    runner = environment.runner
    if runner is None or isinstance(runner, WorkerRunner):
        return  # no run, or a worker: the master (or the local runner) holds the whole run's stats
    options, total = run_options(environment), environment.stats.total
    logger.info(
        "gates: %d requests, failure ratio %.4f (max %s), p50 %.0f ms, p95 %.0f ms (max %.0f), p99 %.0f ms (max %.0f)",
        total.num_requests,
        total.fail_ratio,
        options.max_fail_ratio,
        total.get_response_time_percentile(0.5),
        total.get_response_time_percentile(0.95),
        options.max_p95_ms,
        total.get_response_time_percentile(0.99),
        options.max_p99_ms,
    )
    wrong, slow = answer_breaches(environment), latency_breaches(environment)
    saturated = runner.cpu_warning_emitted or runner.worker_cpu_warning_emitted
    for breach in wrong + slow:
        logger.error("SLO breach: %s", breach)
    if saturated:
        logger.error("run invalid: Locust's own CPU went over %d %%, so its latencies are not the server's", CPU_WARNING_THRESHOLD)
    if wrong:
        environment.process_exit_code = 1
    elif saturated:
        environment.process_exit_code = 2
    elif slow:
        environment.process_exit_code = 1
    elif not runner.exceptions:
        environment.process_exit_code = 0
