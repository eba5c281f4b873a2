"""TorchServe handler: every prediction also returns a class activation map.

A thin adapter over TorchServe's BaseHandler contract (initialize / preprocess / inference / postprocess):
request decoding lives in camserve.protocol.requests/options, the maps in camserve.cam, response encoding in
camserve.protocol.responses. Each request in a batch succeeds or fails on its own: a bad one gets its own 4xx
and JSON error while the others are answered normally.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.service import Service
from ts.torch_handler.base_handler import BaseHandler

from camserve.cam import METHODS, CamExtractor, LayerError, MethodError
from camserve.model_spec import ModelSpec, load_labels, load_model
from camserve.preprocessing import whole_image_transform
from camserve.protocol.batch import Batch, Item
from camserve.protocol.options import OptionRules, Options, parse_options
from camserve.protocol.requests import RequestError, decode_request
from camserve.protocol.responses import encode_answer, json_bytes

logger = logging.getLogger(__name__)


def _called_by_torchserve_service() -> bool:
    """Whether TorchServe's Service called CamHandler.handle, so that our answers go to the client as they are.

    TorchServe writes a dict answer as indented JSON (ts.protocol.otf_message_handler: json.dumps(indent=2));
    bytes it sends as they are, so the handler sends compact JSON bytes. Under a KServe envelope
    (service_envelope=kserve|kservev2) the envelope calls handle instead and wraps the answers in its own dict:
    there they must stay dicts. TorchServe shows a handler no sign of the envelope but the caller.
    """
    return isinstance(sys._getframe(2).f_locals.get("self"), Service)


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
        )
        logger.info("camserve: %s, default method %s at layer(s) %s", self.spec.architecture, self.spec.method, self.extractor.default_layers)
        self.initialized = True

    # -- BaseHandler contract ---------------------------------------------------------------------------------

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        started = time.perf_counter()
        self.context = context
        batch = self.preprocess(data)
        if batch.live:
            self.inference(batch)
        responses = self.postprocess(batch)
        if _called_by_torchserve_service():
            responses = [json_bytes(r) if isinstance(r, (dict, list)) else r for r in responses]
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2), None, "ms")
        return responses

    def preprocess(self, data: list[dict[str, Any]]) -> Batch:
        items, tensors = [], []
        for index, row in enumerate(data):
            item = Item(index=index)
            items.append(item)
            try:
                headers = self._headers(index)
                # A JPEG decodes at reduced scale when the model input allows it: a large speed-up for photos.
                request = decode_request(row, headers, at_least=self.decode_at_least)
                accept = next((str(v) for k, v in headers.items() if isinstance(k, str) and k.lower() == "accept"), None)
                item.options = parse_options(request.options, self.option_rules, accept)
                item.size = request.size
                item.explain = str(headers.get("explain", "")).lower() == "true"
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
        """One forward per (method, layers) group of the batch; plain predictions share one inference-mode pass."""
        assert batch.inputs is not None
        groups: dict[tuple[str | None, tuple[str, ...]], list[int]] = {}
        for position, item in enumerate(batch.live):
            assert item.options is not None
            key = (item.options.method, item.options.layers) if item.options.wants_map else (None, ())
            groups.setdefault(key, []).append(position)
        for (method, layers), positions in groups.items():
            members = [batch.live[p] for p in positions]
            inputs = batch.inputs[positions]
            started = time.perf_counter()
            try:
                if method is None:
                    logits, maps, targets, used_layers = self.extractor.predict(inputs), None, None, ()
                else:
                    result = self.extractor(inputs, method=method, targets=self._targets(members), layers=layers or None)
                    logits, maps, targets, used_layers = result.logits, result.maps, result.targets, result.layers
            except (MethodError, LayerError) as error:
                for item in members:
                    item.error = RequestError(str(error), kind="invalid_option", option="method" if isinstance(error, MethodError) else "layer")
                continue
            # Map time per method (forward included): what a method costs, on /metrics as CamMapTime.
            elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
            self.context.metrics.add_time("CamMapTime", elapsed_ms, None, "ms", [Dimension("Method", method or "none")])
            probabilities = logits.softmax(dim=1)
            for row, item in enumerate(members):
                count = item.options.map_count(len(self.labels)) if maps is not None else 0
                item.response, item.content_type = encode_answer(
                    item.options, probabilities[row],
                    maps[row, :count] if maps is not None else torch.empty(0),
                    targets[row, :count] if targets is not None else torch.empty(0),
                    item.size, method, used_layers, self.labels, image=item.image, explain=item.explain, input_size=self.spec.input_size,
                )

    def postprocess(self, batch: Batch) -> list[Any]:
        responses = []
        metrics = self.context.metrics
        for item in batch.items:
            if item.error is not None:
                # One JSON line per rejection: why, and which option; never the image bytes.
                logger.warning("camserve rejected %s", json.dumps({"status": item.error.status, "type": item.error.kind, "option": item.error.option, "message": str(item.error)[:300]}))
                if self._is_http_request(item.index):
                    self.context.set_response_status(code=item.error.status, phrase=str(item.error)[:200], idx=item.index)
                item.response = item.error.to_json()
                metrics.add_counter("CamErrors", 1, None, [Dimension("Kind", item.error.kind)])
            else:
                assert item.options is not None
                method = item.options.method if item.options.wants_map else None
                metrics.add_counter("CamRequests", 1, None, [Dimension("Method", method or "none"), Dimension("Output", item.options.output)])
            if self._is_http_request(item.index):
                self.context.set_response_content_type(item.index, item.content_type)
            responses.append(item.response)
        return responses

    # -- helpers ----------------------------------------------------------------------------------------------

    # Under a KServe envelope (service_envelope=kserve|kservev2) the rows are the *instances* of one HTTP request:
    # they share its headers, and their errors travel inside the envelope's answer, not as HTTP statuses.
    def _is_http_request(self, index: int) -> bool:
        return index < len(self.context.request_processor or [])

    def _headers(self, index: int) -> dict[str, Any]:
        return self.context.get_all_request_header(index if self._is_http_request(index) else 0) or {}

    @staticmethod
    def _wanted_targets(options: Options, probabilities: torch.Tensor) -> list[int]:
        if options.targets is not None:
            return list(options.targets)
        return probabilities.topk(min(options.maps, probabilities.numel())).indices.tolist()

    def _targets(self, members: list[Item]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Class indices per request (B, T) chosen from the logits; None lets the extractor take each top-1."""
        if all(item.options.targets is None and item.options.maps == 1 for item in members):
            return None

        def choose(logits: torch.Tensor) -> torch.Tensor:
            wanted = [self._wanted_targets(item.options, row) for item, row in zip(members, logits)]
            width = max(len(w) for w in wanted)
            # Shorter lists repeat their last class; those extra maps are dropped when answering.
            return torch.tensor([w + [w[-1]] * (width - len(w)) for w in wanted], device=logits.device)

        return choose
