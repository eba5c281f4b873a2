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
import logging
import time
from typing import Any

import httpx
import kserve
import orjson
from kserve.model_repository import ModelRepository
from kserve.model_server import FASTAPI_APP_IMPORT_STRING, ModelServer
from kserve.model_server import app as kserve_app
from kserve.predictor_config import PredictorConfig
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferResponse
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from camserve_tools.kserve.bundle import ENVELOPES
from camserve_tools.kserve.front_protocol import (
    UpstreamError,
    as_infer_response,
    excerpt,
    forwarded_headers,
    handler_error,
    refusal,
    v1_body,
    v2_body,
)
from camserve_tools.kserve.front_server import FrontRESTServer, RequestGate, serve_grpc
from camserve_tools.servers import model_probe

logger = logging.getLogger("camserve.kserve.front")

# A model that answered is taken as ready this long: KServe asks before every request (endpoint, then dataplane).
PROOF_TTL_S = 10.0
# The readiness probe's prediction must come back within this; a model that cannot answer is not ready.
PROBE_TIMEOUT_S = 10.0


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
