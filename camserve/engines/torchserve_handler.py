"""TorchServe's adapter: the archive's handler, a thin BaseHandler over camserve.pipeline.

- preprocess: each request of the batch -> its rows, read and decoded into network inputs (or its refusal);
- inference: the network's predictions and maps for every decoded row, in one pass per (method, layers) group;
- postprocess: each request's answer bytes, status and content type.

KServe's envelopes are camserve's own (camserve.pipeline.envelopes): TorchServe's would unwrap the body before us,
drop every request of a batch but the first, and answer a malformed envelope with a 503. The envelope is read once,
at start, from TS_SERVICE_ENVELOPE (`kserve` or `kservev2`: KServe's TorchServe runtime sets it from the
InferenceService's protocol, and `camserve serve` from the config's `service_envelope`), while TorchServe itself must
not apply it: the config has no `service_envelope` and `enable_envvars_config` off. Each request in a batch
succeeds or fails on its own, and no request can make the worker exit.
"""

from __future__ import annotations

import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from camserve.engines.torchserve_parts import ReceivedRequest, TorchServeMetrics
from camserve.model_spec import ModelSpec
from camserve.pipeline import Answer, CamPipeline, RequestError, Row
from camserve.pipeline.envelopes import ENVELOPES, KSERVE_V1, v1_answer, v1_rows, v2_answer, v2_request
from camserve.protocol.limits import ENVELOPE_ALLOWANCE, TORCHSERVE_MAX_RESPONSE_SIZE

logger = logging.getLogger(__name__)


def configured_envelope() -> str | None:
    """The KServe envelope this server answers in (TS_SERVICE_ENVELOPE), or None for camserve's own protocol."""
    envelope = os.environ.get("TS_SERVICE_ENVELOPE", "").strip().lower() or None
    if envelope not in (None, *ENVELOPES):
        raise ValueError(f"TS_SERVICE_ENVELOPE={envelope!r}: use one of {list(ENVELOPES)}, or leave it unset")
    return envelope


class CamHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        spec = ModelSpec.from_dict((getattr(context, "model_yaml_config", None) or {}).get("handler", {}))
        self.envelope = configured_envelope()
        # TS_MAX_RESPONSE_SIZE (which TorchServe reads too, with enable_envvars_config) tells the worker the
        # frontend's limit: an answer over it would make the frontend drop the worker's connection.
        limit = int(os.environ.get("TS_MAX_RESPONSE_SIZE", TORCHSERVE_MAX_RESPONSE_SIZE)) - ENVELOPE_ALLOWANCE
        self.pipeline = CamPipeline.from_spec(
            spec, Path(properties["model_dir"]), device, max_answer_bytes=limit, metrics=TorchServeMetrics(context.metrics)
        )
        self.model = self.pipeline.model
        self.manifest = context.manifest
        logger.info("camserve: %s; envelope %s", self.pipeline.describe(), self.envelope or "none")
        self.initialized = True

    # -- BaseHandler contract ---------------------------------------------------------------------------------

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        started = time.perf_counter()
        self.context = context
        received = self.inference(self.preprocess(data))
        responses = self.postprocess(received)
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        return responses

    def preprocess(self, data: list[dict[str, Any]]) -> list[ReceivedRequest]:
        """Each request -> its rows read against the model and decoded into network inputs, or its refusal."""
        received = []
        for index, row in enumerate(data):
            headers = self._headers(index)
            # TorchServe hands a gRPC request to the worker with no headers at all; every HTTP request has some.
            item = ReceivedRequest(explain=str(headers.get("explain", "")).lower() == "true", grpc=not headers)
            try:
                rows = self._rows(row, headers, item)
            except RequestError as error:
                item.refusal = error
            else:
                item.rows = self.pipeline.read(rows)
            received.append(item)
        return received

    def inference(self, received: list[ReceivedRequest]) -> list[ReceivedRequest]:
        """Predictions and maps for every decoded row of the batch."""
        for item, predictions in zip(received, self.pipeline.predict_each([item.rows for item in received]), strict=True):
            item.predictions = predictions
        return received

    def postprocess(self, received: list[ReceivedRequest]) -> list[bytes]:
        """Each request's answer as bytes, with its status and content type set."""
        responses = []
        for index, item in enumerate(received):
            answer = self._answer(item, index)
            if item.grpc:
                # The answer is whole: TorchServe's gRPC StreamPredictions reads this header and drops the worker
                # without it. Never on HTTP, where it would make TorchServe send the answer as a chunked stream.
                self.context.set_response_header(index, "ts_stream_next", "false")
                if answer.status != 200 and len(received) == 1:
                    # TorchServe drops a per-request status on gRPC, answering OK; an exception's code it maps to
                    # the call's status (400: INVALID_ARGUMENT, 413: RESOURCE_EXHAUSTED; 422 would read as
                    # FAILED_PRECONDITION). Only for a batch of one: the exception fails the whole batch.
                    raise PredictionException(answer.to_bytes().decode("utf-8"), 400 if answer.status == 422 else answer.status)
            if answer.status != 200:
                # A fixed ASCII reason: TorchServe frames the phrase by its length in characters but writes UTF-8
                # bytes, so user text there (any non-ASCII character) would corrupt the frame and kill the worker.
                self.context.set_response_status(code=answer.status, phrase=HTTPStatus(answer.status).phrase, idx=index)
            self.context.set_response_content_type(index, answer.content_type)
            responses.append(answer.to_bytes())
        return responses

    # -- stages' parts ----------------------------------------------------------------------------------------

    def _rows(self, row: dict[str, Any], headers: dict[str, str], item: ReceivedRequest) -> list[Row]:
        if self.envelope is None:
            return [Row(fields=row, headers=headers, explain=item.explain)]
        body = row.get("body") if row.get("body") is not None else row.get("data")
        if self.envelope == KSERVE_V1:
            return v1_rows(body, headers, explain=item.explain)
        item.v2 = v2_request(body, headers)
        return item.v2.rows

    def _answer(self, item: ReceivedRequest, index: int) -> Answer:
        if item.refusal is not None:
            return self.pipeline.refuse(item.refusal)
        answers = self.pipeline.respond(item.rows, item.predictions)
        if self.envelope is None:
            return answers[0]
        if item.v2 is None:
            return v1_answer(answers, explain=item.explain)
        model = self.manifest.get("model", {})
        return v2_answer(answers, item.v2, model.get("modelName", ""), model.get("modelVersion"), self.context.get_request_id(index))

    def _headers(self, index: int) -> dict[str, str]:
        """The request's headers, names lower-cased (HTTP header names are case-insensitive)."""
        headers = self.context.get_all_request_header(index) or {}
        return {key.lower(): value for key, value in headers.items() if isinstance(key, str) and isinstance(value, str)}
