"""Ray Serve's adapter: camserve.pipeline hosted in Ray Serve, one deployment per model, on one node or many.

    serve run --address <head>:6379 --non-blocking deploy/ray/serve-config.yaml
    make serve ENGINE=ray RAY_NODES=2    # a local cluster on loopback, that config deployed (camserve_tools/servers/ray_cluster.py)

The Serve application (deploy/ray/serve-config.yaml) is one Serve application per model plus one router:
- each model's application (`model_app`) is a single deployment named after the model, on route
  `/predictions/<model>`: every replica holds one CamPipeline loaded from a .mar or model dir as a TorchServe
  worker loads it, reads the body exactly as TorchServe's frontend hands it to a worker (`body_value` for raw
  bodies, a multipart form's fields as str / bytes), bounds it (`max_body_bytes`, TorchServe's max_request_size)
  and answers with the pipeline's bytes, status and content type: the same bytes as TorchServe's for the same
  request. Requests that arrive while a batch runs form the next one (`@serve.batch`, its size and wait set
  through the deployment's `user_config`), run on one thread beside the replica's event loop;
- the router (`router_app`, route `/`) answers `/explanations/<model>` through that model's deployment and refuses
  any other path with camserve's JSON 404. It imports neither torch nor the pipeline: a light process.
Every answer names where it was computed: `X-CAM-Node` (the Ray node's name) and `X-CAM-Replica` (the replica).

Only this module of camserve imports ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import ray
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from camserve.engines.body_limit import body_too_large, declared_too_large
from camserve.protocol.decoding import RequestError, body_value
from camserve.protocol.limits import TORCHSERVE_MAX_REQUEST_SIZE

if TYPE_CHECKING:
    from ray.serve import Application, Deployment

    from camserve.pipeline import Answer, Row

logger = logging.getLogger("ray.serve")

# The batch a replica runs at most, and how long its first request waits for others: chosen by measurement
# (docs/deploy.md, "Ray Serve"); a deployment's user_config overrides them.
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.005
NODE_HEADER, REPLICA_HEADER = "X-CAM-Node", "X-CAM-Replica"


class WireAnswer(NamedTuple):
    """An answer as one replica hands it to another (the router): the bytes as sent, and where they were computed."""

    status: int
    content_type: str
    body: bytes
    node: str
    replica: str

    def response(self) -> Response:
        headers = {NODE_HEADER: self.node, REPLICA_HEADER: self.replica}
        return Response(content=self.body, status_code=self.status, media_type=self.content_type, headers=headers)


def refusal(error: RequestError, headers: Mapping[str, str] | None = None) -> Response:
    """A request refused before any pipeline saw it, with camserve's JSON error body."""
    body = json.dumps(error.to_json(), separators=(",", ":")).encode("utf-8")
    return Response(content=body, status_code=error.status, media_type="application/json", headers=dict(headers or {}))


class ReadRequest(NamedTuple):
    """A camserve request's fields as TorchServe's frontend hands them to a worker, and its headers (lower-case)."""

    fields: dict[str, Any]
    headers: dict[str, str]


async def read_request(request: HTTPRequest, max_body_bytes: int) -> ReadRequest | Response:
    """The body bounded by `max_body_bytes` (refused by its declared length before any of it is read), then read
    as TorchServe's frontend hands it to a worker: a multipart form's fields (files as bytes, fields as text), or
    the body itself through `body_value`. A refusal comes back as the response to send."""
    if request.method not in ("POST", "PUT"):
        return refusal(RequestError(f"{request.method} is not allowed here; POST the image", status=405, kind="method_not_allowed"))
    headers = {key.lower(): value for key, value in request.headers.items()}
    if declared_too_large(headers.get("content-length"), max_body_bytes):
        return refusal(body_too_large(max_body_bytes), {"connection": "close"})
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_body_bytes:
            return refusal(body_too_large(max_body_bytes), {"connection": "close"})
        chunks.append(chunk)
    body = b"".join(chunks)
    if not headers.get("content-type", "").startswith("multipart/form-data"):
        return ReadRequest({"body": body_value(body, headers.get("content-type"))}, headers)

    async def whole_body() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        # starlette's parser with starlette's default bounds (files, fields, 1 MB per text field), as on KServe.
        form = await MultiPartParser(request.headers, whole_body()).parse()
    except MultiPartException as error:
        return refusal(RequestError(error.message[:200], kind="http_error"))
    try:
        fields = {key: (await value.read()) if hasattr(value, "read") else value for key, value in form.multi_items()}
    finally:
        await form.close()
    return ReadRequest(fields, headers)


class RayMetrics:
    """camserve.pipeline's Metrics as Ray metrics of one model (exported by each node's metrics agent, with the
    application, deployment and replica as tags)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        # Each count: its Ray counter and the dimensions that become its tags beside the model's name.
        self.counts = {
            name: (Counter(name, text, tag_keys=("model_name", *keys)), keys)
            for name, text, keys in (
                ("CamRequests", "answered requests, by method and output", ("Method", "Output")),
                ("CamErrors", "refused requests, by error type", ("Kind",)),
                ("CamInternalErrors", "requests failed by a fault of ours, by pipeline stage", ("Stage",)),
                ("CamFastPathFallbacks", "peak/box answers that left the compiled path, by reason", ("Reason",)),
            )
        }
        self.map_time = Histogram(
            "CamMapTime",
            "forward pass and maps of one group, in ms",
            boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
            tag_keys=("model_name", "Method"),  # type: ignore[arg-type]
        )

    def add_time(self, name: str, milliseconds: float, dimensions: Mapping[str, str]) -> None:
        if name == "CamMapTime":
            self.map_time.observe(milliseconds, {"model_name": self.model_name, "Method": dimensions.get("Method", "none")})

    def add_count(self, name: str, dimensions: Mapping[str, str]) -> None:
        if name in self.counts:
            counter, keys = self.counts[name]
            counter.inc(1, {"model_name": self.model_name, **{key: dimensions.get(key, "") for key in keys}})


def keep_replica_server_on_loopback() -> None:
    """Ray Serve starts every replica's inter-deployment gRPC server on [::] whatever the node's address; on a node
    whose address is loopback (a local cluster, where every other Ray listener is on 127.0.0.1) bind it there too.
    Elsewhere Ray's binding stays. Called in a replica's constructor, before Serve starts that server."""
    from ray._common.network_utils import is_localhost
    from ray.serve._private import replica

    node_ip = ray.util.get_node_ip_address()
    add_port = replica.add_port_to_grpc_server
    if not is_localhost(node_ip) or getattr(add_port, "keeps_loopback", False):
        return

    def add_port_on_node(server: Any, address: str) -> int:
        return add_port(server, f"{node_ip}:0" if address == "[::]:0" else address)

    add_port_on_node.keeps_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port_on_node


def node_name() -> str:
    """This process's Ray node as the cluster names it (`ray start --node-name`; the node's address by default)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return str(node.get("NodeName") or node.get("NodeManagerAddress"))
    return node_id[:16]


class CamModelDeployment:
    """One model: a CamPipeline per replica, answering camserve's protocol on `/predictions/<model>`."""

    def __init__(self, name: str, source: str, max_body_bytes: int = TORCHSERVE_MAX_REQUEST_SIZE) -> None:
        # The pipeline (and torch) only where a model runs: the router never imports them.
        from camserve.model_source import open_model_source
        from camserve.pipeline import CamPipeline

        keep_replica_server_on_loopback()
        self.name = name
        self.max_body_bytes = max_body_bytes
        self.source = open_model_source(source)
        self.pipeline = CamPipeline.from_model_dir(self.source.model_dir, metrics=RayMetrics(name))
        # One thread runs the pipeline beside the event loop, which keeps taking requests into the next batch.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve-pipeline")
        self.node = node_name()
        self.replica = f"{name}#{serve.get_replica_context().replica_id.unique_id}"
        logger.info("camserve: %s from %s on node %s: %s", name, source, self.node, self.pipeline.describe())

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """The deployment's user_config: `max_batch_size` and `batch_wait_timeout_s` of its dynamic batching."""
        unknown = set(config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"unknown user_config key(s) {sorted(unknown)}; known: max_batch_size, batch_wait_timeout_s")
        batching: Any = self._answer_batch  # serve.batch's setters, on the wrapped method
        batching.set_max_batch_size(int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        batching.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S)))

    async def __call__(self, request: HTTPRequest) -> Response:
        read = await read_request(request, self.max_body_bytes)
        if isinstance(read, Response):
            return read
        return (await self.answer(read.fields, read.headers, explain=False)).response()

    async def answer(self, fields: dict[str, Any], headers: dict[str, str], explain: bool) -> WireAnswer:
        """One request's answer, computed in whichever batch it joins (the router calls this for /explanations)."""
        from camserve.pipeline import Row

        answer = await self._answer_batch(Row(fields=fields, headers=headers, explain=explain))
        return WireAnswer(answer.status, answer.content_type, answer.to_bytes(), self.node, self.replica)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _answer_batch(self, rows: list[Row]) -> list[Answer]:
        answers = await asyncio.get_running_loop().run_in_executor(self.executor, self.pipeline.answer, [[row] for row in rows])
        return [request_answers[0] for request_answers in answers]

    def __del__(self) -> None:
        source = getattr(self, "source", None)
        if source is not None:
            source.close()


class CamRouter:
    """Route `/`: `/explanations/<model>` through the model's deployment; any other path a JSON 404."""

    def __init__(self, models: list[str], max_body_bytes: int = TORCHSERVE_MAX_REQUEST_SIZE) -> None:
        keep_replica_server_on_loopback()
        self.models = list(models)
        self.max_body_bytes = max_body_bytes
        self.handles: dict[str, Any] = {}

    async def __call__(self, request: HTTPRequest) -> Response:
        parts = request.url.path.strip("/").split("/")
        if len(parts) < 2 or parts[0] not in ("predictions", "explanations"):
            return refusal(RequestError(f"no route {request.url.path[:80]!r}; POST to /predictions/<model>", status=404, kind="not_found"))
        name = parts[1]
        if name not in self.models:
            return refusal(RequestError(f"no model named {name[:60]!r}; models: {sorted(self.models)}", status=404, kind="model_not_found"))
        read = await read_request(request, self.max_body_bytes)
        if isinstance(read, Response):
            return read
        if name not in self.handles:
            self.handles[name] = serve.get_deployment_handle(name, app_name=name)
        # /predictions/<model> reaches the router only while that model's own route is not up (a redeploy).
        answer: WireAnswer = await self.handles[name].answer.remote(read.fields, read.headers, parts[0] == "explanations")
        return answer.response()


# The deployments; serve-config.yaml's `deployments:` override these options.
MODEL_DEPLOYMENT: Deployment = serve.deployment(
    # Room for a full batch queued behind the one running; beyond it, requests wait in the proxy for a replica.
    max_ongoing_requests=2 * DEFAULT_MAX_BATCH_SIZE,
    graceful_shutdown_timeout_s=5,
    ray_actor_options={"num_cpus": 1},
)(CamModelDeployment)
ROUTER_DEPLOYMENT: Deployment = serve.deployment(
    name="CamRouter", max_ongoing_requests=256, graceful_shutdown_timeout_s=5, ray_actor_options={"num_cpus": 0}
)(CamRouter)


def model_app(args: Mapping[str, Any]) -> Application:
    """One model's application: `name`, `source` (a .mar or model dir; relative to `model_store` if given),
    `max_body_bytes`. Its one deployment is named after the model (serve-config.yaml's `deployments:` override it)."""
    name = str(args["name"])
    source = Path(str(args.get("model_store", "."))) / str(args["source"])
    max_body = int(args.get("max_body_bytes", TORCHSERVE_MAX_REQUEST_SIZE))
    return MODEL_DEPLOYMENT.options(name=name).bind(name, str(source), max_body)


def router_app(args: Mapping[str, Any]) -> Application:
    """The router's application: `models` (the served models' names), `max_body_bytes`."""
    return ROUTER_DEPLOYMENT.bind([str(name) for name in args["models"]], int(args.get("max_body_bytes", TORCHSERVE_MAX_REQUEST_SIZE)))
