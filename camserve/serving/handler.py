"""TorchServe handler: every prediction also returns a class activation map.

A thin adapter over TorchServe's BaseHandler contract, each stage doing what its name says:
- preprocess decodes each request (camserve.protocol.decoding, .options) into a network input;
- inference runs the model and the maps (camserve.cam), one pass per (method, layers) group of the batch;
- postprocess encodes each answer (camserve.protocol.responses), checks its size and sets its status.
Each request in a batch succeeds or fails on its own: a bad one gets its own 4xx and JSON error while the others
are answered normally, and no request can make the worker exit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler

from camserve.cam import METHODS, CamExtractor, LayerError, MethodError
from camserve.cam.localization import compile_peak_and_box
from camserve.model_spec import ModelSpec, load_labels, load_model
from camserve.preprocessing import whole_image_transform
from camserve.protocol.decoding import MAX_PIXELS, RequestError, decode_request
from camserve.protocol.options import OptionRules, Options, parse_options
from camserve.protocol.responses import answer_size, encode_answer, json_bytes
from camserve.serving.batch import Batch, Item

logger = logging.getLogger(__name__)

# TorchServe's own default for max_response_size; TS_MAX_RESPONSE_SIZE (which TorchServe reads too, with
# enable_envvars_config) tells the worker the frontend's limit. An answer over it would make the frontend drop
# the worker's connection, so it is refused here instead.
DEFAULT_MAX_RESPONSE_SIZE = 6_553_500
_ENVELOPE_ALLOWANCE = 65_536  # TorchServe's framing, indentation and a KServe envelope around our bytes


def _called_by_torchserve_service() -> bool:
    """Whether TorchServe's Service called CamHandler.handle, so that our answers go to the client as they are.

    TorchServe writes a dict answer as indented JSON (ts.protocol.otf_message_handler: json.dumps(indent=2));
    bytes it sends as they are, so the handler sends compact JSON bytes. Under a KServe envelope
    (service_envelope=kserve|kservev2) the envelope calls handle instead and wraps the answers in its own dict:
    there they must stay dicts. TorchServe shows a handler no sign of the envelope but the caller.
    """
    return isinstance(sys._getframe(2).f_locals.get("self"), Service)


def _options(item: Item) -> Options:
    """The options of a request that preprocess decoded (every request that reaches inference)."""
    assert item.options is not None
    return item.options


class CamHandler(BaseHandler):
    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        self.manifest = context.manifest
        self.spec = ModelSpec.from_dict((getattr(context, "model_yaml_config", None) or {}).get("handler", {}))
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        self.model = load_model(self.spec, model_dir, self.device)
        self.labels = load_labels(self.spec, model_dir)
        self.transform = whole_image_transform(self.spec.input_size, self.spec.mean, self.spec.std)
        # Square, so that it covers the model input whichever way EXIF turns the stored image.
        side = max(self.spec.input_size)
        self.decode_at_least = (side, side)
        self.extractor = CamExtractor(self.model, self.spec.input_size, self.spec.target_layers, self.spec.scorecam_max_channels)
        self.option_rules = OptionRules(
            methods=METHODS.keys(),
            layers={name for name, _ in self.model.named_modules() if name},
            labels=self.labels,
            default_method=self.spec.method,
            default_topk=self.spec.topk,
            default_layer_count=len(self.extractor.default_layers),
            scorecam_max_channels=self.spec.scorecam_max_channels,
            max_request_cost=self.spec.request_cost_limit,
        )
        self.max_answer_bytes = int(os.environ.get("TS_MAX_RESPONSE_SIZE", DEFAULT_MAX_RESPONSE_SIZE)) - _ENVELOPE_ALLOWANCE
        compile_peak_and_box()
        logger.info(
            "camserve: %s, default method %s at layer(s) %s", self.spec.architecture, self.spec.method, self.extractor.default_layers
        )
        self.initialized = True

    # -- BaseHandler contract ---------------------------------------------------------------------------------

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        started = time.perf_counter()
        self.context = context
        self._rows_are_requests = len(data) == len(context.request_processor or [])
        self._answers_as_json_bytes = _called_by_torchserve_service()
        batch = self.preprocess(data)
        if batch.live:
            self.inference(batch)
        responses = self.postprocess(batch)
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        return responses

    def preprocess(self, data: list[dict[str, Any]]) -> Batch:
        """Each request -> its options and network input; a request that cannot be read gets its error."""
        items, tensors = [], []
        for index, row in enumerate(data):
            item = Item(index=index)
            items.append(item)
            try:
                headers = self._headers(index)
                # A JPEG decodes at reduced scale when the model input allows it: a large speed-up for photos.
                request = decode_request(row, headers, at_least=self.decode_at_least)
                item.options = parse_options(request.options, self.option_rules, headers.get("accept"))
                item.size = request.size
                item.explain = str(headers.get("explain", "")).lower() == "true"
                if item.options.map_count * request.size[0] * request.size[1] > MAX_PIXELS:
                    raise RequestError(
                        f"{item.options.map_count} full-size heat maps of a {request.size[0]}x{request.size[1]} image "
                        f"exceed {MAX_PIXELS} pixels per request; ask for fewer maps, or output=grid",
                        status=413,
                        kind="answer_too_large",
                    )
                if item.options.output == "overlay":
                    # Kept only when the answer is drawn on it, and then at full size: decoded again if reduced.
                    item.image = request.image if request.image.size == request.size else decode_request(row, headers).image
                tensors.append(self.transform(request.image))
            except RequestError as error:
                item.error = error
        live = [item for item in items if item.error is None]
        inputs = torch.stack(tensors).to(self.device) if tensors else None
        return Batch(items=items, inputs=inputs, live=live)

    def inference(self, batch: Batch) -> None:
        """Predictions and maps, one forward per (method, layers) group of the batch; plain ones share one pass."""
        assert batch.inputs is not None
        groups: dict[tuple[str | None, tuple[str, ...]], list[int]] = {}
        for position, item in enumerate(batch.live):
            assert item.options is not None
            key = (item.options.method, item.options.layers) if item.options.wants_map else (None, ())
            groups.setdefault(key, []).append(position)
        for (method, layers), positions in groups.items():
            members = [batch.live[p] for p in positions]
            started = time.perf_counter()
            try:
                self._run_group(members, batch.inputs[positions], method, layers)
            except (MethodError, LayerError) as error:
                option = "method" if isinstance(error, MethodError) else "layer"
                for item in members:
                    item.error = RequestError(str(error), kind="invalid_option", option=option)
                continue
            except Exception:  # noqa: BLE001 - a fault of ours fails this group alone, never the worker
                logger.exception("camserve: maps failed for method %s, layers %s", method, layers)
                for item in members:
                    item.error = RequestError(
                        "the server failed to compute this answer; the error is logged", status=500, kind="internal_error"
                    )
                continue
            # Map time per method (forward included): what a method costs, on /metrics as CamMapTime.
            elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
            self.context.metrics.add_time("CamMapTime", elapsed_ms, None, "ms", [Dimension("Method", method or "none")])

    def postprocess(self, batch: Batch) -> list[Any]:
        """Each request's answer, its status and content type; an answer over the size limit becomes a 413."""
        responses = []
        for item in batch.items:
            if item.error is None:
                self._encode(item)
            if item.error is not None:
                self._refuse(item)
            else:
                assert item.options is not None
                method = item.options.method if item.options.wants_map else None
                self.context.metrics.add_counter(
                    "CamRequests", 1, None, [Dimension("Method", method or "none"), Dimension("Output", item.options.output)]
                )
            if self._is_http_request(item.index):
                self.context.set_response_content_type(item.index, item.content_type)
            responses.append(item.response)
        return responses

    # -- stages' parts ----------------------------------------------------------------------------------------

    def _run_group(self, members: list[Item], inputs: torch.Tensor, method: str | None, layers: tuple[str, ...]) -> None:
        if method is None:
            logits = self.extractor.predict(inputs)
        else:
            # Each request's classes come from its own logits; shorter lists repeat their last class, and those
            # extra maps are dropped below.
            def choose(logits: torch.Tensor) -> torch.Tensor:
                wanted = [_options(item).chosen_targets(row) for item, row in zip(members, logits)]
                width = max(len(w) for w in wanted)
                return torch.tensor([w + [w[-1]] * (width - len(w)) for w in wanted], device=logits.device)

            result = self.extractor(inputs, method=method, targets=choose, layers=layers or None)
            logits = result.logits
        probabilities = logits.softmax(dim=1).cpu()
        for row, item in enumerate(members):
            item.probabilities = probabilities[row]
            if method is not None:
                count = _options(item).map_count
                item.maps = result.maps[row, :count]
                item.targets = result.targets[row, :count].tolist()
                item.layers = result.layers

    def _encode(self, item: Item) -> None:
        assert item.options is not None and item.probabilities is not None
        try:
            item.response, item.content_type = encode_answer(
                item.options,
                item.probabilities,
                item.maps,
                item.targets,
                item.size,
                item.layers,
                self.labels,
                image=item.image,
                explain=item.explain,
                input_size=self.spec.input_size,
            )
            if self._answers_as_json_bytes and isinstance(item.response, dict):
                item.response = json_bytes(item.response)
        except Exception:  # noqa: BLE001
            logger.exception("camserve: encoding an answer failed")
            item.error = RequestError("the server failed to encode this answer; the error is logged", status=500, kind="internal_error")
            return
        size = answer_size(item.response)
        if size > self.max_answer_bytes:
            item.error = RequestError(
                f"the answer would be {size} bytes, over this server's limit of {self.max_answer_bytes} "
                f"(max_response_size less {_ENVELOPE_ALLOWANCE} for framing); ask for fewer maps, output=grid, "
                f"format=jpeg or a smaller image",
                status=413,
                kind="answer_too_large",
            )

    def _refuse(self, item: Item) -> None:
        error = item.error
        assert error is not None
        # One JSON line per rejection: why, and which option; never the image bytes.
        logger.warning(
            "camserve rejected %s",
            json.dumps({"status": error.status, "type": error.kind, "option": error.option, "message": str(error)[:300]}),
        )
        if self._is_http_request(item.index):
            # A fixed ASCII reason: TorchServe frames the phrase by its length in characters but writes UTF-8
            # bytes, so user text there (any non-ASCII character) would corrupt the frame and kill the worker.
            self.context.set_response_status(code=error.status, phrase=HTTPStatus(error.status).phrase, idx=item.index)
        body = error.to_json()
        item.response, item.content_type = (json_bytes(body) if self._answers_as_json_bytes else body), "application/json"
        self.context.metrics.add_counter("CamErrors", 1, None, [Dimension("Kind", error.kind)])

    # Under a KServe envelope (service_envelope=kserve|kservev2) the rows are the *instances* of the HTTP requests.
    # Where each request carries one, row and request still match. Otherwise the instances share their request's
    # headers and their errors travel inside the envelope's answer: a status set for one row would answer for
    # instances that succeeded.
    def _is_http_request(self, index: int) -> bool:
        return self._rows_are_requests and index < len(self.context.request_processor or [])

    def _headers(self, index: int) -> dict[str, Any]:
        """The request's headers, names lower-cased (HTTP header names are case-insensitive)."""
        headers = self.context.get_all_request_header(index if self._is_http_request(index) else 0) or {}
        return {key.lower(): value for key, value in headers.items() if isinstance(key, str) and isinstance(value, str)}
