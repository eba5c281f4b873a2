"""KServe's adapter: camserve.pipeline hosted in KServe's own model server, without TorchServe and without Java.

    python -m camserve.engines.kserve_model --archives model_store/shapes.mar,model_store/imagenet.mar \
        --listen-port 8080 --grpc-listen-port 8081
    python -m camserve.engines.kserve_model --model-store /mnt/models --listen-host 0.0.0.0   # in a KServe pod

One `CamModel` (a kserve.Model) per archive or model dir. It answers
- KServe v1 `:predict` and `:explain` and v2 `/infer` (REST and the v2 gRPC service) in the envelopes of
  camserve.pipeline.envelopes, the very bytes TorchServe's handler sends under the same envelope;
- camserve's own `POST /predictions/<model>` and `/explanations/<model>` (docs/protocol.md), as TorchServe does;
- readiness and metadata as KServe's server does.
Requests wait on the event loop while one thread runs the pipeline: those that arrive while a batch runs form the
next batch, up to the archive's `batchSize` requests, so the loop never blocks and no request runs beside another
on the same cores. Option names below avoid kserve's own flags: kserve.model_server parses sys.argv on import.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fastapi import Request as HTTPRequest
from fastapi import Response
from fastapi.exceptions import RequestValidationError
from grpc import aio
from kserve import Model
from kserve.errors import InvalidInput
from kserve.model_server import FASTAPI_APP_IMPORT_STRING, ModelServer
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from camserve.engines.body_limit import BodyLimit, Scope, body_too_large
from camserve.model_source import ModelSource, open_model_source
from camserve.pipeline import Answer, CamPipeline, RequestError, Row
from camserve.pipeline.envelopes import v1_answer, v1_rows, v2_answer, v2_request
from camserve.protocol.decoding import body_value
from camserve.protocol.limits import TORCHSERVE_MAX_REQUEST_SIZE

logger = logging.getLogger("camserve.engines.kserve")


# The pipeline's metrics on KServe's /metrics, beside KServe's own: its counts and the map time per method, by model.
# Each count: its Prometheus counter and the dimensions that become its labels after the model's name.
_COUNTS = {
    name: (Counter(name, text, ["model_name", *keys]), keys)
    for name, text, keys in (
        ("CamRequests", "answered requests, by method and output", ("Method", "Output")),
        ("CamErrors", "refused requests, by error type", ("Kind",)),
        ("CamInternalErrors", "requests failed by a fault of ours, by pipeline stage", ("Stage",)),
        ("CamFastPathFallbacks", "peak/box answers that left the compiled path, by reason", ("Reason",)),
    )
}
_MAP_TIME = Histogram(
    "CamMapTime", "forward pass and maps of one group, in ms", ["model_name", "Method"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
)


class PrometheusMetrics:
    """camserve.pipeline's Metrics as Prometheus series of one model."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    def add_time(self, name: str, milliseconds: float, dimensions: Mapping[str, str]) -> None:
        if name == "CamMapTime":
            _MAP_TIME.labels(self.model_name, dimensions.get("Method", "none")).observe(milliseconds)

    def add_count(self, name: str, dimensions: Mapping[str, str]) -> None:
        if name in _COUNTS:
            counter, keys = _COUNTS[name]
            counter.labels(self.model_name, *(dimensions.get(key, "") for key in keys)).inc()


class AnswerError(Exception):
    """A refused request's answer, sent as it is (status, JSON body) by the app's exception handler."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


def _response(answer: Answer) -> Response:
    return Response(content=answer.to_bytes(), status_code=answer.status, media_type=answer.content_type)


@dataclass
class _Waiting:
    requests: list[list[Row]]
    done: asyncio.Future = field(repr=False)


class Batcher:
    """Client requests -> pipeline batches of at most `max_batch` requests, on one thread beside the event loop."""

    def __init__(self, pipeline: CamPipeline, max_batch: int = 1) -> None:
        self.pipeline = pipeline
        self.max_batch = max(1, max_batch)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camserve-pipeline")
        self.queue: asyncio.Queue[_Waiting] | None = None

    async def answer(self, rows: list[Row]) -> list[Answer]:
        """One client request's answers, computed in whichever batch it joins."""
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._run(self.queue))
        done = asyncio.get_running_loop().create_future()
        await self.queue.put(_Waiting([rows], done))
        return await done

    async def _run(self, queue: asyncio.Queue[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            requests = [rows for waiting in batch for rows in waiting.requests]
            try:
                answers = await loop.run_in_executor(self.executor, self.pipeline.answer, requests)
            except Exception as error:  # the pipeline contains its own faults; this is the last guard, and it logs
                logger.exception("camserve: a batch failed")
                for waiting in batch:
                    waiting.done.set_exception(error)
                continue
            for waiting, answer in zip(batch, answers, strict=True):
                waiting.done.set_result(answer)


class CamModel(Model):
    """One served model: camserve's pipeline behind KServe's protocols."""

    def __init__(self, source: ModelSource, pipeline: CamPipeline, max_batch: int = 1) -> None:
        super().__init__(source.name, return_response_headers=True)
        self.source = source
        self.pipeline = pipeline
        self.batcher = Batcher(pipeline, max_batch)
        self.ready = True

    @classmethod
    def load_from(cls, path: Path | str) -> CamModel:
        """A .mar or model dir, loaded as a TorchServe worker would load it; batching as its model-config.yaml says."""
        source = open_model_source(path)
        try:
            config = yaml.safe_load((source.model_dir / "model-config.yaml").read_text()) or {}
            pipeline = CamPipeline.from_model_dir(source.model_dir, metrics=PrometheusMetrics(source.name))
            return cls(source, pipeline, int(config.get("batchSize", 1)))
        except BaseException:
            source.close()
            raise

    def load(self) -> bool:
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    # -- KServe's verbs ---------------------------------------------------------------------------------------------

    async def predict(self, payload: Any, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None) -> Any:
        plain = _lowered(headers)
        if isinstance(payload, InferRequest):
            return await self._v2(payload, plain)
        if response_headers is not None:
            response_headers["content-type"] = "application/json"
        return await self._v1(payload, plain, explain=False)

    async def explain(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        return await self._v1(payload, _lowered(headers), explain=True)

    async def answer_plain(self, row: Row) -> Answer:
        """camserve's own protocol (/predictions, /explanations): one image per request."""
        (answer,) = await self.batcher.answer([row])
        return answer

    # -- envelopes ----------------------------------------------------------------------------------------------------

    async def _v1(self, payload: Any, headers: Mapping[str, str], explain: bool) -> bytes:
        try:
            rows = v1_rows(payload, headers, explain=explain)
        except RequestError as error:
            raise AnswerError(self.pipeline.refuse(error)) from None
        answer = v1_answer(await self.batcher.answer(rows), explain=explain)
        if answer.status != 200:
            raise AnswerError(answer)
        return answer.to_bytes()

    async def _v2(self, payload: InferRequest, headers: Mapping[str, str]) -> Any:
        grpc = bool(getattr(payload, "from_grpc", False))
        try:
            request = v2_request(_v2_body(payload), headers)
        except RequestError as error:
            if grpc:
                raise InvalidInput(str(error)) from None
            raise AnswerError(self.pipeline.refuse(error)) from None
        answers = await self.batcher.answer(request.rows)
        answer = v2_answer(answers, request, self.name, self.source.version, payload.id or str(uuid.uuid4()))
        if grpc:
            return _grpc_response(answer, self.name, self.source.version)
        if answer.status != 200:
            raise AnswerError(answer)
        return answer.to_bytes()


def _lowered(headers: Mapping[str, str] | None) -> dict[str, str]:
    return {key.lower(): value for key, value in (headers or {}).items()}


def _v2_body(payload: InferRequest) -> dict[str, Any]:
    """KServe's parsed v2 request as the JSON object camserve.pipeline.envelopes reads (raw bytes kept as bytes)."""
    inputs = []
    for tensor in payload.inputs:
        data = tensor.data.tolist() if hasattr(tensor.data, "tolist") else list(tensor.data or [])
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype, "data": data})
    return {"id": payload.id, "inputs": inputs}


def _grpc_response(answer: Answer, model_name: str, version: str | None) -> InferResponse:
    """The v2 answer over gRPC: one BYTES output per input, each element an image's JSON answer."""
    body = answer.body
    assert isinstance(body, dict)
    if answer.status != 200:
        first = body["outputs"][0]["data"][0]
        raise InvalidInput(f"{first.get('type')}: {first.get('message')}")
    outputs = [
        InferOutput(name=output["name"], shape=output["shape"], datatype="BYTES", data=[Answer(body=d).to_bytes() for d in output["data"]])
        for output in body["outputs"]
    ]
    return InferResponse(response_id=body["id"], model_name=model_name, model_version=version, infer_outputs=outputs)


# -- the app ----------------------------------------------------------------------------------------------------------


async def _plain(request: HTTPRequest, model_name: str, explain: bool) -> Response:
    model = _models.get(model_name)
    if model is None:
        error = RequestError(f"no model named {model_name[:60]!r}; models: {sorted(_models)}", status=404, kind="model_not_found")
        return _response(Answer.refusal(error))
    headers = _lowered(dict(request.headers))
    fields: dict[str, Any]
    if headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        fields = {key: (await value.read()) if hasattr(value, "read") else value for key, value in form.multi_items()}
    else:
        fields = {"body": body_value(await request.body(), headers.get("content-type"))}
    return _response(await model.answer_plain(Row(fields=fields, headers=headers, explain=explain)))


async def predictions(request: HTTPRequest, model_name: str) -> Response:
    return await _plain(request, model_name, explain=False)


async def explanations(request: HTTPRequest, model_name: str) -> Response:
    return await _plain(request, model_name, explain=True)


async def _answer_error(_request: Any, error: AnswerError) -> Response:
    return _response(error.answer)


async def _invalid(_request: Any, error: Exception) -> Response:
    # KServe's own decoding refused the body (not JSON, not an inference request): a 400 naming why, never the body.
    message = str(error.errors()[0].get("msg", "invalid")) if isinstance(error, RequestValidationError) else str(error)[:200]
    return _response(Answer.refusal(RequestError(f"the request body cannot be read: {message}", kind="invalid_request")))


async def _http_error(_request: Any, error: StarletteHTTPException) -> Response:
    refusal = Answer.refusal(RequestError(str(error.detail)[:200], status=error.status_code, kind="http_error"))
    return _response(refusal)


def _body_too_large(_scope: Scope, limit: int) -> Response:
    """A body over this server's limit, in camserve's error body; the client may still be sending, so the
    connection closes."""
    response = _response(Answer.refusal(body_too_large(limit)))
    response.headers["connection"] = "close"
    return response


class JsonByDefault:
    """ASGI middleware: an answer without a content type is JSON (KServe drops ours from v2 answers sent as bytes)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        async def typed(message: dict) -> None:
            if message["type"] == "http.response.start" and not any(name == b"content-type" for name, _ in message.get("headers", [])):
                message = {**message, "headers": [*message.get("headers", []), (b"content-type", b"application/json")]}
            await send(message)

        await self.app(scope, receive, typed if scope["type"] == "http" else send)


class _CamRESTServer(RESTServer):
    """KServe's REST server with camserve's routes, bounds and error bodies, bound where it is told."""

    def __init__(self, host: str, max_body_bytes: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # KServe's RESTServer binds every interface.
        self.config.host = host
        self.max_body_bytes = max_body_bytes

    def _register_endpoints(self, app: Any) -> None:
        app.add_api_route("/predictions/{model_name}", predictions, methods=["POST", "PUT"])
        app.add_api_route("/explanations/{model_name}", explanations, methods=["POST", "PUT"])
        super()._register_endpoints(app)

    def _add_middlewares(self, app: Any) -> None:
        super()._add_middlewares(app)
        app.add_middleware(JsonByDefault)
        app.add_middleware(BodyLimit, limit=self.max_body_bytes, refusal=_body_too_large)

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(AnswerError, _answer_error)
        app.add_exception_handler(InvalidInput, _invalid)
        app.add_exception_handler(RequestValidationError, _invalid)
        app.add_exception_handler(StarletteHTTPException, _http_error)


_models: dict[str, CamModel] = {}


class _LoopbackGRPCServer(GRPCServer):
    """KServe's v2 gRPC service on a chosen address: KServe's own binds every interface."""

    def __init__(self, host: str, max_message_bytes: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host = host
        self._max_message_bytes = max_message_bytes

    async def start(self, max_workers: int) -> None:
        self._server = aio.server(
            interceptors=(ExceptionToStatusInterceptor(),), options=[("grpc.max_receive_message_length", self._max_message_bytes)]
        )
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(f"{self._host}:{self._port}")
        await self._server.start()
        await self._server.wait_for_termination()


def serve(sources: list[str], host: str, port: int, grpc_port: int | None, max_body_bytes: int) -> None:
    server = ModelServer(http_port=port, enable_grpc=False)
    for source in sources:
        model = CamModel.load_from(source)
        logger.info("camserve: %s from %s: %s", model.name, source, model.pipeline.describe())
        server.register_model(model)
        _models[model.name] = model
    rest = _CamRESTServer(host, max_body_bytes, FASTAPI_APP_IMPORT_STRING, server.dataplane, server.model_repository_extension, port)
    servers = [rest.start()]
    if grpc_port:
        grpc = _LoopbackGRPCServer(host, max_body_bytes, grpc_port, server.dataplane, server.model_repository_extension, kwargs={})
        servers.append(grpc.start(1))
    logger.info("camserve on KServe's model server: %s on %s:%s (gRPC %s)", sorted(_models), host, port, grpc_port or "off")

    async def run() -> None:
        await asyncio.gather(*servers)

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--archives", help="comma list of .mar files or model dirs")
    sources.add_argument("--model-store", type=Path, help="serve every .mar of this folder (KServe mounts storageUri at /mnt/models)")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=8080)
    parser.add_argument("--grpc-listen-port", type=int, default=0, help="v2 gRPC port (0: off)")
    parser.add_argument("--max-body-bytes", type=int, default=TORCHSERVE_MAX_REQUEST_SIZE)
    args, _ = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    archives = [s for s in args.archives.split(",") if s] if args.archives else [str(p) for p in sorted(args.model_store.glob("*.mar"))]
    if not archives:
        parser.error(f"no .mar in {args.model_store}")
    serve(archives, args.listen_host, args.listen_port, args.grpc_listen_port, args.max_body_bytes)


if __name__ == "__main__":
    main()
