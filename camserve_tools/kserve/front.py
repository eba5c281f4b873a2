"""KServe's Python model server in front of TorchServe, as the kserve-torchserve pod runs it: for KServe's own client.

    python -m camserve_tools.kserve.front --models shapes --api v1 --port 8080 \
        --torchserve http://127.0.0.1:8085 --management http://127.0.0.1:8086 [--grpc-port 8081]

KServe's routes (`/v1/models/{name}:predict`, `:explain`, `/v2/models/{name}/infer`, readiness, metadata) are
served by the kserve SDK's own FastAPI app; each model is a `kserve.Model` whose predict and explain post the
request to TorchServe's KServe routes, where TorchServe's envelope (kserve / kservev2) unwraps it for our handler.
With `--api v2` and `--grpc-port`, KServe's gRPC server (the Open Inference Protocol's ModelInfer, as in the
runtime's grpc-v2 mode) answers too, each answer a BYTES element holding our JSON answer.

Readiness proves an answer: a model is ready while TorchServe lists a READY worker *and* it answered a prediction
lately (a client's, or the probe of camserve_tools.servers.model_probe, sent when none came). TorchServe 0.12 can lose a
worker for good while still listing it READY, and every request would then wait forever.

The front checks only what the protocols themselves get wrong (shape of the JSON, body size, datatypes, header
bytes, text that is not Unicode): the handler judges the images and options (output=overlay, which no envelope
carries, is refused per instance there), and its 4xx comes back with the same status
(on gRPC its code: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) and a JSON body naming it. Every refusal is logged on
one line, with at most a short escaped excerpt of what the client sent.
Option names below avoid kserve's own flags: kserve.model_server parses sys.argv when it is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import re
import time
from concurrent import futures
from typing import Any

import grpc
import httpx
import kserve
import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from kserve.model_repository import ModelRepository
from kserve.model_server import FASTAPI_APP_IMPORT_STRING, ModelServer
from kserve.model_server import app as kserve_app
from kserve.predictor_config import PredictorConfig
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from starlette.exceptions import HTTPException as StarletteHTTPException

from camserve.protocol.decoding import HEADER_PREFIX
from camserve_tools.kserve.bundle import ENVELOPES
from camserve_tools.servers import model_probe

logger = logging.getLogger("camserve.kserve.front")

# What the front forwards to TorchServe besides the body: identity and tracing (as KServe's own SDK does), and our
# per-request options (X-CAM-<Option>, docs/protocol.md). Accept is not forwarded: these protocols carry JSON.
IDENTITY_HEADERS = ("authorization", "x-request-id", "x-b3-traceid")
OPTION_HEADER_PREFIX = HEADER_PREFIX
# A model that answered is taken as ready this long: KServe asks before every request (endpoint, then dataplane).
PROOF_TTL_S = 10.0
# The readiness probe's prediction must come back within this; a model that cannot answer is not ready.
PROBE_TIMEOUT_S = 10.0
# What the front's error bodies and log lines may show of a client's text.
EXCERPT_CHARS = 120
# The binary data extension of the v2 protocol: the JSON part's length, the tensors' bytes after it.
BINARY_HEADER = "inference-header-content-length"
# TorchServe's and our statuses on gRPC: a client's mistake is never UNAVAILABLE, which clients retry.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Client text for an error message or a log line: cut short, every non-ASCII or control character escaped."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return ascii(shown)[1:-1]


def clean(value: Any) -> Any:
    """`value` with every string made valid Unicode: a lone surrogate (JSON allows "\\ud800", strict parsers refuse
    it in a document) is written out escaped instead."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {clean(key): clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clean(item) for item in value]
    return value


class UpstreamError(GrpcException):
    """A request TorchServe (or the front) refused: its HTTP status, its gRPC code, and a JSON body naming the problem."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        code = GRPC_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL)
        # gRPC details travel in a trailer of a few KB: the error alone, without the other instances' answers.
        details = {key: value for key, value in body.items() if key not in ("predictions", "explanations", "outputs")}
        super().__init__(orjson.dumps(clean(details)).decode(), code)
        self.status = status
        self.body = body


def error_body(status: int, kind: str, message: str, **extra: Any) -> dict[str, Any]:
    # "error" is the key KServe's own client reads into its exception message.
    return {"error": f"{kind}: {message}", "code": status, "type": kind, "message": message, **extra}


def refusal(status: int, kind: str, message: str, **extra: Any) -> UpstreamError:
    return UpstreamError(status, error_body(status, kind, message, **extra))


def handler_error(status: int, answer: Any) -> dict[str, Any]:
    """The first error our handler put in an envelope's answer, or TorchServe's own error body."""
    candidates: list[Any] = [answer]
    if isinstance(answer, dict):
        for key in ("predictions", "explanations"):
            candidates += answer.get(key) or []
        for output in answer.get("outputs") or []:
            candidates += (output.get("data") or []) if isinstance(output, dict) else []
    # Under an envelope the first instance's error sets the status of the whole request; the other instances'
    # answers are kept beside the error, so that nothing the handler answered is lost.
    answers = {key: answer[key] for key in ("predictions", "explanations", "outputs") if isinstance(answer, dict) and key in answer}
    for item in candidates:
        if isinstance(item, dict) and "type" in item and "message" in item:
            extra = {"option": item["option"]} if item.get("option") else {}
            return error_body(status, str(item["type"]), str(item["message"]), **extra, **answers)
    return error_body(status, "torchserve_error", f"TorchServe answered HTTP {status}", **answers)


def forwarded_headers(headers: dict[str, str] | None) -> dict[bytes, bytes]:
    """The client's headers that go on to TorchServe. Option headers keep their bytes (the handler reads a UTF-8
    value as UTF-8, as on TorchServe directly); identity headers must be ASCII, or the request is refused."""
    forwarded = {b"content-type": b"application/json"}
    for key, value in (headers or {}).items():
        lowered = key.lower()
        if lowered in IDENTITY_HEADERS:
            if not value.isascii():
                raise refusal(400, "invalid_header", f"header '{excerpt(key, 40)}' must be ASCII text", header=excerpt(key, 40))
            forwarded[lowered.encode()] = value.encode()
        elif lowered.startswith(OPTION_HEADER_PREFIX) and lowered.isascii():
            # Starlette reads header bytes as Latin-1: encoding it back gives the bytes the client sent.
            forwarded[lowered.encode()] = value.encode("latin-1", "backslashreplace")
    return forwarded


class TorchServeModel(kserve.Model):
    """One TorchServe model behind KServe's model server; `grpc` answers v2 as InferResponses (BYTES elements)."""

    def __init__(self, name: str, inference_url: str, management_url: str, api: str, timeout: float = 120.0, grpc: bool = False) -> None:
        super().__init__(name)
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.api = api
        self.grpc = grpc
        self.client = httpx.AsyncClient(timeout=timeout)
        self._answered_until = 0.0
        self._probe_lock = asyncio.Lock()

    # -- readiness and metadata: TorchServe's, proved by an answer ------------------------------------------------

    def load(self) -> bool:
        # Called by KServe whenever healthy() said no; TorchServe loads the archive itself, so nothing to do here.
        return self.ready

    async def healthy(self) -> bool:
        if time.monotonic() < self._answered_until:
            return True
        async with self._probe_lock:  # one probe at a time; the callers waiting on it share its verdict
            if time.monotonic() < self._answered_until:
                return True
            self.ready = await self._has_ready_worker() and await self._answers_probe()
        return self.ready

    async def _has_ready_worker(self) -> bool:
        try:
            response = await self.client.get(f"{self.management_url}/models/{self.name}", timeout=5.0)
            versions = response.json() if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            return False
        workers = [w for v in versions if isinstance(v, dict) for w in v.get("workers", []) if isinstance(w, dict)]
        return any(worker.get("status") == "READY" for worker in workers)

    async def _answers_probe(self) -> bool:
        envelope = ENVELOPES[self.api]
        body, headers = model_probe.probe_request(envelope)
        try:
            response = await self.client.post(
                f"{self.inference_url}/predictions/{self.name}", content=body, headers=headers, timeout=PROBE_TIMEOUT_S
            )
            answered = response.status_code == 200 and model_probe.answer_problem(envelope, orjson.loads(response.content)) is None
        except (httpx.HTTPError, orjson.JSONDecodeError):
            answered = False
        if answered:
            self._answered_until = time.monotonic() + PROOF_TTL_S
        else:
            logger.warning("model %s is not ready: TorchServe gave no answer to a probe within %.0f s", self.name, PROBE_TIMEOUT_S)
        return answered

    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        # The envelope names each output after its input; each element is our JSON answer (docs/protocol.md).
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    # -- inference -----------------------------------------------------------------------------------------------

    async def predict(
        self, payload: Any, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None
    ) -> dict | InferResponse:
        if self.api == "v2":
            answer = await self._post(f"/v2/models/{self.name}/infer", v2_body(payload), headers)
            return as_infer_response(answer, self.name) if self.grpc else answer
        return await self._post(f"/v1/models/{self.name}:predict", v1_body(payload), headers)

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> dict:
        # KServe routes :explain on v1 only; TorchServe answers it with our maps (the handler's explain mode).
        if self.api != "v1":
            raise refusal(
                400,
                "unsupported_route",
                "this server speaks KServe v2, and :explain is a v1 route; send v2 requests to /v2/models/{name}/infer",
            )
        return await self._post(f"/v1/models/{self.name}:explain", v1_body(payload), headers)

    async def _post(self, path: str, body: dict, headers: dict[str, str] | None) -> dict:
        forwarded = forwarded_headers(headers)
        try:
            content = orjson.dumps(body)
        except TypeError:  # orjson refuses a lone surrogate, which Python's JSON parser lets through
            raise refusal(400, "invalid_request", "the request holds text that is not valid Unicode (a lone UTF-16 surrogate)") from None
        try:
            response = await self.client.post(f"{self.inference_url}{path}", content=content, headers=forwarded)
        except httpx.HTTPError as error:
            raise refusal(503, "torchserve_unreachable", f"{type(error).__name__} on {path}") from None
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        if not response.is_success:
            raise UpstreamError(response.status_code, handler_error(response.status_code, answer))
        if not isinstance(answer, dict):
            kind = response.headers.get("content-type", "no content type")
            raise refusal(502, "bad_upstream_answer", f"TorchServe answered {excerpt(kind, 60)}, not a JSON object")
        self._answered_until = time.monotonic() + PROOF_TTL_S
        return answer


def as_infer_response(answer: dict, model_name: str) -> InferResponse:
    """TorchServe's v2 answer as gRPC carries it: each output a BYTES tensor, each element our JSON answer."""
    outputs = []
    for output in answer.get("outputs") or []:
        data = (output.get("data") or []) if isinstance(output, dict) else []
        elements = [item.encode() if isinstance(item, str) else orjson.dumps(item) for item in data]
        outputs.append(InferOutput(name=str(output.get("name", "image")), shape=[len(elements)], datatype="BYTES", data=elements))
    return InferResponse(
        response_id=str(answer.get("id") or ""), model_name=model_name, infer_outputs=outputs, model_version=answer.get("model_version")
    )


def v1_body(payload: Any) -> dict:
    """The v1 request as TorchServe's kserve envelope needs it: {"instances": [{"data": <base64>, ...options}, ...]}."""
    if not isinstance(payload, dict):
        raise InvalidInput('a v1 request is a JSON object {"instances": [{"data": "<base64 image>"}, ...]}')
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty list of objects")
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InvalidInput(f"instances[{index}] must be an object with the base64 image under 'data'")
    return {"instances": instances}


def v2_body(payload: Any) -> dict:
    """The v2 request as camserve's kservev2 envelope reads it: BYTES inputs of base64 images, each with its shape (the
    handler checks that the shape matches the images, and answers or refuses each image)."""
    if not isinstance(payload, InferRequest):
        raise InvalidInput('a v2 request is an inference request {"inputs": [{"name", "shape", "datatype": "BYTES", "data"}]}')
    if not payload.inputs:
        raise InvalidInput("'inputs' must hold at least one input")
    inputs = []
    for tensor in payload.inputs:
        name = excerpt(str(tensor.name), 40)
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input '{name}': datatype must be BYTES (the image), not {excerpt(str(tensor.datatype), 20)}")
        data = tensor.data.tolist() if isinstance(tensor.data, np.ndarray) else tensor.data
        elements = []
        for element in _flattened(data):
            if isinstance(element, (bytes, bytearray)):  # the binary extension or gRPC: raw bytes, sent on as base64
                element = base64.b64encode(bytes(element)).decode("ascii")
            if not isinstance(element, str):
                raise InvalidInput(f"input '{name}': each element of data must be an image as a base64 string")
            elements.append(element)
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": "BYTES", "data": elements})
    body: dict[str, Any] = {"inputs": inputs}
    if payload.id:
        body["id"] = payload.id
    return body


def _flattened(data: Any) -> list[Any]:
    """A tensor's elements in row-major order, however deeply its data nests them (no recursion: any depth)."""
    elements, pending = [], [data]
    while pending:
        item = pending.pop()
        if isinstance(item, (list, tuple)):
            pending.extend(reversed(item))
        else:
            elements.append(item)
    return elements


def binary_request_as_json(body: bytes, json_length: str) -> bytes:
    """A v2 request in the binary data extension (a JSON part of `json_length` bytes, then each BYTES input's
    elements as 4-byte little-endian lengths and bytes) -> the same request in plain JSON, images in base64.

    KServe's own decoder would quote the whole image in its error (and its log line) for the slightest mistake,
    and cannot hand on image bytes anyway; here every mistake is a 400 that names it, quoting nothing."""

    def refuse(message: str) -> UpstreamError:
        return refusal(400, "invalid_binary_request", message)

    if not re.fullmatch(r"[0-9]{1,12}", json_length) or int(json_length) > len(body):
        raise refuse(f"header Inference-Header-Content-Length must be the byte length of the JSON part (0 to {len(body)})")
    split = int(json_length)
    try:
        request = orjson.loads(body[:split])
    except orjson.JSONDecodeError:
        raise refuse(f"the first {split} bytes (Inference-Header-Content-Length) are not a JSON object") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise refuse('the JSON part must be an object with an "inputs" list')
    offset = split
    for index, tensor in enumerate(request["inputs"]):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue  # this input's data is in the JSON part
        size = parameters.pop("binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(body) - offset:
            raise refuse(f"inputs[{index}]: binary_data_size must be a byte count within the {len(body) - offset} bytes left")
        if tensor.get("datatype") != "BYTES":
            raise refuse(f"inputs[{index}]: only BYTES inputs (images) are accepted, in binary form or in JSON")
        tensor["data"] = [base64.b64encode(element).decode("ascii") for element in _bytes_elements(body[offset : offset + size], index)]
        offset += size
    if offset != len(body):
        raise refuse(f"{len(body) - offset} bytes follow the last binary input: binary_data_size must account for every byte")
    return orjson.dumps(request)


def _bytes_elements(section: bytes, index: int) -> list[bytes]:
    """A BYTES tensor's binary form: each element as its 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    position = 0
    while position < len(section):
        length = int.from_bytes(section[position : position + 4], "little") if position + 4 <= len(section) else -1
        if length < 0 or position + 4 + length > len(section):
            raise refusal(
                400,
                "invalid_binary_request",
                f"inputs[{index}]: element {len(elements)} does not fit its binary_data_size "
                "(each BYTES element is a 4-byte little-endian length, then that many bytes)",
            )
        elements.append(section[position + 4 : position + 4 + length])
        position += 4 + length
    return elements


class RequestGate:
    """ASGI middleware in front of KServe's app. It refuses a body over `limit` bytes with 413 before any of it is
    parsed (KServe sets no limit); turns a v2 request in the binary data extension into plain JSON; and answers
    whatever fault escapes the app with a 500 on one log line, never a traceback quoting the request."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self._answer(scope, receive, send, refusal(413, "request_too_large", f"the body is over {self.limit} bytes"))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._answer(scope, receive, send, refusal(413, "request_too_large", f"the body is over {self.limit} bytes"))
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if BINARY_HEADER.encode() in headers and scope["path"].startswith("/v2/") and scope["path"].endswith("/infer"):
            try:
                body = binary_request_as_json(body, headers[BINARY_HEADER.encode()].decode("latin-1"))
            except UpstreamError as error:
                await self._answer(scope, receive, send, error)
                return
            replaced = {BINARY_HEADER.encode(), b"content-length", b"content-type"}
            scope = {
                **scope,
                "headers": [
                    *((key, value) for key, value in scope["headers"] if key.lower() not in replaced),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        replayed = False
        started = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked_send)
        except Exception as error:  # noqa: BLE001 - a fault of ours: one line, a 500, nothing of the request
            logger.error("%s %s -> 500 %s: %s", scope.get("method"), excerpt(scope["path"]), type(error).__name__, excerpt(str(error)))
            if not started:
                answer = error_body(500, "internal_error", f"the front failed ({type(error).__name__}); the error is logged")
                await JSONResponse(answer, 500)(scope, replay, send)

    async def _answer(self, scope: dict, receive: Any, send: Any, error: UpstreamError) -> None:
        log_refusal(scope.get("method", ""), scope["path"], error.status, error.body)
        response = JSONResponse(clean(error.body), status_code=error.status, headers={"connection": "close"})
        await response(scope, receive, send)


def log_refusal(method: str, path: str, status: int, body: dict[str, Any]) -> None:
    """One line per refused request: route, status, kind and the (escaped, cut short) message."""
    logger.info("%s %s -> %s %s: %s", method, excerpt(path, 80), status, body.get("type"), excerpt(str(body.get("message", ""))))


def _answer(request: Any, status: int, body: dict[str, Any]) -> JSONResponse:
    log_refusal(request.method, request.url.path, status, body)
    return JSONResponse(clean(body), status_code=status)


async def _upstream_error(request: Any, error: UpstreamError) -> JSONResponse:
    return _answer(request, error.status, error.body)


async def _validation_error(request: Any, error: RequestValidationError) -> JSONResponse:
    # FastAPI's default answer echoes the whole input back (an image, here): name the first problem instead.
    first = (error.errors() or [{}])[0]
    where = ".".join(excerpt(str(part), 40) for part in first.get("loc", ()) if part != "body")
    return _answer(request, 400, error_body(400, "invalid_request", f"{where or 'body'}: {excerpt(str(first.get('msg', 'invalid')))}"))


async def _http_error(request: Any, error: StarletteHTTPException) -> JSONResponse:
    response = _answer(request, error.status_code, error_body(error.status_code, "http_error", excerpt(str(error.detail))))
    response.headers.update(getattr(error, "headers", None) or {})
    return response


def _kserve_error(status: int, kind: str):
    """An answer for one of KServe's own exceptions, in our error body: no traceback, no echo of the request."""

    async def answer(request: Any, error: Exception) -> JSONResponse:
        return _answer(request, status, error_body(status, kind, excerpt(str(error), 300)))

    return answer


class FrontRESTServer(RESTServer):
    """KServe's REST server with our error answers in place of KServe's, which log a traceback for every 400 and
    quote the request's text (an image, for a v2 binary request) in the answer and the log."""

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        for exception, status, kind in (
            (InvalidInput, 400, "invalid_request"),
            (InferenceError, 400, "invalid_request"),  # raised by KServe's decoding of the client's tensors
            (ModelNotFound, 404, "model_not_found"),
            (ModelNotReady, 503, "model_not_ready"),
            (NotImplementedError, 501, "not_implemented"),
        ):
            app.add_exception_handler(exception, _kserve_error(status, kind))
        app.add_exception_handler(UpstreamError, _upstream_error)
        app.add_exception_handler(RequestValidationError, _validation_error)
        app.add_exception_handler(StarletteHTTPException, _http_error)


class QuietExceptionToStatus(ExceptionToStatusInterceptor):
    """KServe's gRPC error mapping with one log line per refusal (KServe logs a traceback quoting the request)."""

    CODES = (
        (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
        (InferenceError, grpc.StatusCode.INVALID_ARGUMENT),  # raised by KServe's decoding of the client's tensors
        (ModelNotFound, grpc.StatusCode.NOT_FOUND),
        (ModelNotReady, grpc.StatusCode.UNAVAILABLE),
        (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    )

    async def handle_exception(self, ex: Exception, request_or_iterator: Any, context: Any, method_name: str) -> None:
        if isinstance(ex, UpstreamError):
            log_refusal("gRPC", method_name, ex.status, ex.body)
            await context.abort(ex.status_code, ex.details)
        elif isinstance(ex, GrpcException):
            await super().handle_exception(ex, request_or_iterator, context, method_name)
        else:
            code = next((code for kind, code in self.CODES if isinstance(ex, kind)), grpc.StatusCode.INTERNAL)
            logger.info("gRPC %s -> %s %s: %s", method_name, code.name, type(ex).__name__, excerpt(str(ex)))
            await context.abort(code, excerpt(str(ex), 300) if code != grpc.StatusCode.INTERNAL else "internal error; it is logged")


async def serve_grpc(port: int, host: str, dataplane: DataPlane, extension: ModelRepositoryExtension, max_message_bytes: int) -> None:
    """KServe's gRPC inference service (ModelInfer, ModelReady, ...), as the runtime's grpc-v2 mode serves it.
    A message over `max_message_bytes` is refused with RESOURCE_EXHAUSTED by gRPC itself."""
    server = grpc.aio.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=(QuietExceptionToStatus(),),
        options=[("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)],
    )
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane, extension), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


def serve(
    models: list[str],
    api: str,
    host: str,
    port: int,
    inference_url: str,
    management_url: str,
    max_body_bytes: int,
    grpc_port: int | None = None,
) -> None:
    predictor = PredictorConfig(predictor_host=inference_url.split("//", 1)[-1], predictor_protocol=api)
    server = ModelServer(http_port=port, enable_grpc=False, predictor_config=predictor)
    for name in models:
        server.register_model(TorchServeModel(name, inference_url, management_url, api))
    kserve_app.add_middleware(RequestGate, limit=max_body_bytes)
    rest = FrontRESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port)
    # KServe's RESTServer always binds 0.0.0.0; in the pod that is right, here the front stays on loopback.
    rest.config.host = host
    servers = [rest.start()]
    if grpc_port is not None and api == "v2":
        # gRPC answers are InferResponses, REST ones TorchServe's JSON: each protocol gets its own model objects.
        registry = ModelRepository()
        for name in models:
            registry.update(TorchServeModel(name, inference_url, management_url, api, grpc=True))
        servers.append(serve_grpc(grpc_port, host, DataPlane(registry), ModelRepositoryExtension(registry), max_body_bytes))
    logger.info("KServe front for %s (%s) on %s:%s (gRPC %s) -> %s", models, api, host, port, grpc_port, inference_url)

    async def run() -> None:
        await asyncio.gather(*servers)

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes", help="comma list of TorchServe model names")
    parser.add_argument("--api", choices=("v1", "v2"), default="v1", help="KServe protocol")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, help="KServe's gRPC (Open Inference Protocol) on this port; v2 only")
    parser.add_argument("--torchserve", default="http://127.0.0.1:8085", help="TorchServe's inference address")
    parser.add_argument("--management", default="http://127.0.0.1:8086", help="TorchServe's management address")
    parser.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(
        [m for m in args.models.split(",") if m],
        args.api,
        args.host,
        args.port,
        args.torchserve,
        args.management,
        args.max_body_bytes,
        args.grpc_port,
    )


if __name__ == "__main__":
    main()
