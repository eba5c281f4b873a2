"""The KServe front's server side: the body gate before KServe's app, and KServe's error answers made ours.

KServe's own handlers log a traceback for every 400 and quote the request's text (an image, for a v2 binary
request) in the answer and the log. Here every refusal is one log line and a JSON body naming the problem, and a
fault of the front is a 500 that quotes nothing of the request.
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Any

import grpc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from starlette.exceptions import HTTPException as StarletteHTTPException

from camserve.engines.body_limit import BodyLimit, Message, Receive, Scope, Send, replayed
from camserve_tools.kserve.front_protocol import BINARY_HEADER, UpstreamError, binary_request_as_json, clean, error_body, excerpt, refusal

logger = logging.getLogger("camserve.kserve.front")


def log_refusal(method: str, path: str, status: int, body: dict[str, Any]) -> None:
    """One line per refused request: route, status, kind and the (escaped, cut short) message."""
    logger.info("%s %s -> %s %s: %s", method, excerpt(path, 80), status, body.get("type"), excerpt(str(body.get("message", ""))))


def refusal_response(scope: Scope, error: UpstreamError) -> JSONResponse:
    """A refusal before KServe's app saw the request, logged; the client may still be sending, so the connection closes."""
    log_refusal(scope.get("method", ""), scope["path"], error.status, error.body)
    return JSONResponse(clean(error.body), status_code=error.status, headers={"connection": "close"})


def body_too_large(scope: Scope, limit: int) -> JSONResponse:
    return refusal_response(scope, refusal(413, "request_too_large", f"the body is over {limit} bytes"))


def with_json_headers(scope: Scope, length: int) -> Scope:
    """`scope` of a request whose body became plain JSON of `length` bytes: the binary extension's header gone."""
    replaced = {BINARY_HEADER.encode(), b"content-length", b"content-type"}
    headers = [(key, value) for key, value in scope["headers"] if key.lower() not in replaced]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", str(length).encode())]}


class RequestGate(BodyLimit):
    """ASGI middleware in front of KServe's app. The body bound of camserve's engines (a body over `limit` bytes is
    refused with 413 before any of it is parsed; KServe sets no limit); besides, a v2 request in the binary data
    extension becomes plain JSON, and whatever fault escapes the app is a 500 on one log line, never a traceback
    quoting the request."""

    def __init__(self, app: Any, limit: int) -> None:
        super().__init__(app, limit, refusal=body_too_large)

    async def forward(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or [])
        if BINARY_HEADER.encode() in headers and scope["path"].startswith("/v2/") and scope["path"].endswith("/infer"):
            try:
                body = binary_request_as_json(body, headers[BINARY_HEADER.encode()].decode("latin-1"))
            except UpstreamError as error:
                await refusal_response(scope, error)(scope, receive, send)
                return
            scope = with_json_headers(scope, len(body))
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replayed(body, receive), tracked_send)
        except Exception as error:  # noqa: BLE001 - a fault of ours: one line, a 500, nothing of the request
            logger.error("%s %s -> 500 %s: %s", scope.get("method"), excerpt(scope["path"]), type(error).__name__, excerpt(str(error)))
            if not started:
                answer = error_body(500, "internal_error", f"the front failed ({type(error).__name__}); the error is logged")
                await JSONResponse(answer, 500)(scope, receive, send)


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
