"""KServe's Python model server in front of TorchServe, as the kserve-torchserve pod runs it: for KServe's own client.

    python -m camserve_tools.kserve.front --models shapes --api v1 --port 8080 \
        --torchserve http://127.0.0.1:8085 --management http://127.0.0.1:8086

KServe's routes (`/v1/models/{name}:predict`, `:explain`, `/v2/models/{name}/infer`, readiness, metadata) are
served by the kserve SDK's own FastAPI app; each model is a `kserve.Model` whose predict and explain post the
request to TorchServe's KServe routes, where TorchServe's envelope (kserve / kservev2) unwraps it for our handler.
Readiness is TorchServe's: a model is ready while one of its workers is READY, that is once its handler loaded.

The front checks only what TorchServe's envelopes would choke on (shape of the JSON, body size, datatypes): the
handler judges the images and options, and its 4xx comes back with the same status and a JSON body naming it.
Option names below avoid kserve's own flags: kserve.model_server parses sys.argv when it is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import time
from typing import Any

import httpx
import kserve
import numpy as np
import orjson
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput
from kserve.model_server import FASTAPI_APP_IMPORT_STRING, ModelServer
from kserve.model_server import app as kserve_app
from kserve.predictor_config import PredictorConfig
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.server import RESTServer
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("camserve.kserve.front")

# What the front forwards to TorchServe besides the body: identity and tracing (as KServe's own SDK does), and our
# per-request options (X-CAM-<Option>, docs/protocol.md). Accept is not forwarded: these protocols carry JSON.
FORWARDED_HEADERS = ("authorization", "x-request-id", "x-b3-traceid")
OPTION_HEADER_PREFIX = "x-cam-"
# A positive readiness answer is reused this long: KServe asks for it twice per request (endpoint, then dataplane).
READY_CACHE_S = 1.0


class UpstreamError(Exception):
    """A request TorchServe (or the front) refused: its status and a JSON body naming the problem."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", ""))
        self.status = status
        self.body = body


def error_body(status: int, kind: str, message: str, **extra: Any) -> dict[str, Any]:
    # "error" is the key KServe's own client reads into its exception message.
    return {"error": f"{kind}: {message}", "code": status, "type": kind, "message": message, **extra}


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


class TorchServeModel(kserve.Model):
    """One TorchServe model behind KServe's model server."""

    def __init__(self, name: str, inference_url: str, management_url: str, api: str, timeout: float = 120.0) -> None:
        super().__init__(name)
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.api = api
        self.client = httpx.AsyncClient(timeout=timeout)
        self._ready_until = 0.0

    # -- readiness and metadata: TorchServe's --------------------------------------------------------------------

    def load(self) -> bool:
        # Called by KServe whenever healthy() said no; TorchServe loads the archive itself, so nothing to do here.
        return self.ready

    async def healthy(self) -> bool:
        if time.monotonic() < self._ready_until:
            return True
        try:
            response = await self.client.get(f"{self.management_url}/models/{self.name}", timeout=5.0)
            versions = response.json() if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            versions = []
        workers = [w for v in versions if isinstance(v, dict) for w in v.get("workers", []) if isinstance(w, dict)]
        self.ready = any(worker.get("status") == "READY" for worker in workers)
        if self.ready:
            self._ready_until = time.monotonic() + READY_CACHE_S
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        # The envelope names each output after its input; each element is our JSON answer (docs/protocol.md).
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    # -- inference -----------------------------------------------------------------------------------------------

    async def predict(self, payload: Any, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None) -> dict:
        if self.api == "v2":
            return await self._post(f"/v2/models/{self.name}/infer", v2_body(payload), headers)
        return await self._post(f"/v1/models/{self.name}:predict", v1_body(payload), headers)

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> dict:
        # KServe routes :explain on v1 only; TorchServe answers it with our maps (the handler's explain mode).
        if self.api != "v1":
            raise UpstreamError(
                400,
                error_body(
                    400,
                    "unsupported_route",
                    "this server speaks KServe v2, and :explain is a v1 route; send v2 requests to /v2/models/{name}/infer",
                ),
            )
        return await self._post(f"/v1/models/{self.name}:explain", v1_body(payload), headers)

    async def _post(self, path: str, body: dict, headers: dict[str, str] | None) -> dict:
        forwarded = {"content-type": "application/json"}
        for key, value in (headers or {}).items():
            lowered = key.lower()
            if lowered in FORWARDED_HEADERS or lowered.startswith(OPTION_HEADER_PREFIX):
                forwarded[lowered] = value
        if str(forwarded.get("x-cam-output", "")).strip().lower() == "overlay":
            raise UpstreamError(
                400,
                error_body(400, "invalid_option", "output 'overlay' answers with an image; KServe's protocols carry JSON", option="output"),
            )
        try:
            response = await self.client.post(f"{self.inference_url}{path}", content=orjson.dumps(body), headers=forwarded)
        except httpx.HTTPError as error:
            raise UpstreamError(503, error_body(503, "torchserve_unreachable", f"{type(error).__name__} on {path}")) from None
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        if not response.is_success:
            raise UpstreamError(response.status_code, handler_error(response.status_code, answer))
        if not isinstance(answer, dict):
            raise UpstreamError(
                502,
                error_body(
                    502,
                    "bad_upstream_answer",
                    f"TorchServe answered {response.headers.get('content-type', 'no content type')}, not a JSON object",
                ),
            )
        return answer


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
        if str(instance.get("output", "")).strip().lower() == "overlay":
            raise UpstreamError(
                400,
                error_body(
                    400,
                    "invalid_option",
                    f"instances[{index}]: output 'overlay' answers with an image; KServe's protocols carry JSON",
                    option="output",
                ),
            )
    return {"instances": instances}


def v2_body(payload: Any) -> dict:
    """The v2 request as TorchServe's kservev2 envelope needs it: BYTES inputs, one base64 image each."""
    if not isinstance(payload, InferRequest):
        raise InvalidInput('a v2 request is an inference request {"inputs": [{"name", "shape", "datatype": "BYTES", "data"}]}')
    if not payload.inputs:
        raise InvalidInput("'inputs' must hold at least one input")
    inputs = []
    for tensor in payload.inputs:
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input {tensor.name!r}: datatype must be BYTES (the image), not {tensor.datatype}")
        data = tensor.data.tolist() if isinstance(tensor.data, np.ndarray) else list(tensor.data or [])
        # The envelope reads one image per input (data[0]); more would be dropped silently, so refuse them.
        if len(data) != 1:
            raise InvalidInput(f"input {tensor.name!r}: data must hold exactly one image (send several images as several inputs)")
        element = data[0]
        if isinstance(element, (bytes, bytearray)):  # the binary extension: raw bytes, sent on as base64
            element = base64.b64encode(bytes(element)).decode("ascii")
        if not isinstance(element, str):
            raise InvalidInput(f"input {tensor.name!r}: data[0] must be the image as a base64 string")
        inputs.append({"name": tensor.name, "shape": [1], "datatype": "BYTES", "data": [element]})
    body: dict[str, Any] = {"inputs": inputs}
    if payload.id:
        body["id"] = payload.id
    return body


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413 before any of it is parsed (KServe sets no limit)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = JSONResponse(
            error_body(413, "request_too_large", f"the body is over {self.limit} bytes"), status_code=413, headers={"connection": "close"}
        )
        await response(scope, receive, send)


async def _upstream_error(_request: Any, error: UpstreamError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status)


async def _validation_error(_request: Any, error: RequestValidationError) -> JSONResponse:
    # FastAPI's default answer echoes the whole input back (an image, here): name the first problem instead.
    first = (error.errors() or [{}])[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return JSONResponse(error_body(400, "invalid_request", f"{where or 'body'}: {first.get('msg', 'invalid')}"), status_code=400)


async def _http_error(_request: Any, error: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        error_body(error.status_code, "http_error", str(error.detail)),
        status_code=error.status_code,
        headers=getattr(error, "headers", None),
    )


def serve(models: list[str], api: str, host: str, port: int, inference_url: str, management_url: str, max_body_bytes: int) -> None:
    predictor = PredictorConfig(predictor_host=inference_url.split("//", 1)[-1], predictor_protocol=api)
    server = ModelServer(http_port=port, enable_grpc=False, predictor_config=predictor)
    for name in models:
        model = TorchServeModel(name, inference_url, management_url, api)
        server.register_model(model)
    kserve_app.add_exception_handler(UpstreamError, _upstream_error)
    kserve_app.add_exception_handler(RequestValidationError, _validation_error)
    kserve_app.add_exception_handler(StarletteHTTPException, _http_error)
    kserve_app.add_middleware(BodyLimit, limit=max_body_bytes)
    rest = RESTServer(FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port)
    # KServe's RESTServer always binds 0.0.0.0; in the pod that is right, here the front stays on loopback.
    rest.config.host = host
    logger.info("KServe front for %s (%s) on %s:%s -> %s", models, api, host, port, inference_url)
    asyncio.run(rest.start())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes", help="comma list of TorchServe model names")
    parser.add_argument("--api", choices=("v1", "v2"), default="v1", help="KServe protocol")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--torchserve", default="http://127.0.0.1:8085", help="TorchServe's inference address")
    parser.add_argument("--management", default="http://127.0.0.1:8086", help="TorchServe's management address")
    parser.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve([m for m in args.models.split(",") if m], args.api, args.host, args.port, args.torchserve, args.management, args.max_body_bytes)


if __name__ == "__main__":
    main()
