"""TorchServe's adapter: the archive's handler, a thin BaseHandler over camserve.pipeline.

- preprocess: each request of the batch -> its rows, read and decoded into network inputs (or its refusal);
- inference: the network's predictions and maps for every decoded row, in one pass per (method, layers) group;
- postprocess: each request's answer bytes, status and content type.

KServe's envelopes are camserve's own (camserve.pipeline.envelopes), chosen by CAMSERVE_ENVELOPE (`kserve` or
`kservev2`) in the server's environment and read once at start; TorchServe's `service_envelope` must stay unset,
since its envelopes would unwrap the body before us. Each request in a batch succeeds or fails on its own, and no
request can make the worker exit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.torch_handler.base_handler import BaseHandler

from camserve.model_spec import ModelSpec
from camserve.pipeline import Answer, CamPipeline, Prediction, Request, RequestError, Row
from camserve.pipeline.envelopes import ENVELOPES, KSERVE_V1, V2Request, v1_answer, v1_rows, v2_answer, v2_request
from camserve.protocol.limits import ENVELOPE_ALLOWANCE, TORCHSERVE_MAX_RESPONSE_SIZE

logger = logging.getLogger(__name__)


def configured_envelope() -> str | None:
    """The KServe envelope this server answers in (CAMSERVE_ENVELOPE), or None for camserve's own protocol."""
    envelope = os.environ.get("CAMSERVE_ENVELOPE", "").strip().lower() or None
    if envelope not in (None, *ENVELOPES):
        raise ValueError(f"CAMSERVE_ENVELOPE={envelope!r}: use one of {list(ENVELOPES)}, or leave it unset")
    return envelope


class _TorchServeMetrics:
    """The pipeline's times and counts as TorchServe model metrics (on /metrics with metrics_mode=prometheus)."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    def add_time(self, name: str, milliseconds: float, dimensions: Mapping[str, str]) -> None:
        self.metrics.add_time(name, milliseconds, None, "ms", [Dimension(k, v) for k, v in dimensions.items()])

    def add_count(self, name: str, dimensions: Mapping[str, str]) -> None:
        self.metrics.add_counter(name, 1, None, [Dimension(k, v) for k, v in dimensions.items()])


@dataclass
class _Received:
    """One HTTP request of the batch: its rows as read (or decoded), and what its answer wraps them in."""

    rows: list[Request | RequestError] = field(default_factory=list)
    refusal: RequestError | None = None  # the whole request, when its envelope cannot be read
    v2: V2Request | None = None
    explain: bool = False
    predictions: list[Prediction | RequestError] = field(default_factory=list)


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
            spec, Path(properties["model_dir"]), device, max_answer_bytes=limit, metrics=_TorchServeMetrics(context.metrics)
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

    def preprocess(self, data: list[dict[str, Any]]) -> list[_Received]:
        """Each request -> its rows read against the model and decoded into network inputs, or its refusal."""
        received = []
        for index, row in enumerate(data):
            headers = self._headers(index)
            item = _Received(explain=str(headers.get("explain", "")).lower() == "true")
            try:
                rows = self._rows(row, headers, item)
            except RequestError as error:
                item.refusal = error
            else:
                item.rows = self.pipeline.read(rows)
            received.append(item)
        return received

    def inference(self, received: list[_Received]) -> list[_Received]:
        """Predictions and maps for every decoded row of the batch."""
        for item, predictions in zip(received, self.pipeline.predict_each([item.rows for item in received]), strict=True):
            item.predictions = predictions
        return received

    def postprocess(self, received: list[_Received]) -> list[bytes]:
        """Each request's answer as bytes, with its status and content type set."""
        responses = []
        for index, item in enumerate(received):
            answer = self._answer(item, index)
            if answer.status != 200:
                # A fixed ASCII reason: TorchServe frames the phrase by its length in characters but writes UTF-8
                # bytes, so user text there (any non-ASCII character) would corrupt the frame and kill the worker.
                self.context.set_response_status(code=answer.status, phrase=HTTPStatus(answer.status).phrase, idx=index)
            self.context.set_response_content_type(index, answer.content_type)
            responses.append(answer.to_bytes())
        return responses

    # -- stages' parts ----------------------------------------------------------------------------------------

    def _rows(self, row: dict[str, Any], headers: dict[str, str], item: _Received) -> list[Row]:
        if self.envelope is None:
            return [Row(fields=row, headers=headers, explain=item.explain)]
        body = row.get("body") if row.get("body") is not None else row.get("data")
        if self.envelope == KSERVE_V1:
            return v1_rows(body, headers, explain=item.explain)
        item.v2 = v2_request(body, headers)
        return item.v2.rows

    def _answer(self, item: _Received, index: int) -> Answer:
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
