"""CamPipeline: requests -> labels and class activation maps -> answers, in plain Python and torch.

Engine-free: TorchServe's handler, KServe's model and the Ray deployment (camserve.engines) are thin adapters that
turn their requests into `Row`s and the `Answer`s back into their responses; the offline commands, the profile and
the tests call the pipeline directly. Each stage does what its name says and can be called alone:

- `read`: one client request's rows -> `Request`s, or the RequestError each row gets. The request is bounded as a
  whole before any image is decoded: at most MAX_INSTANCES rows, and the summed cost of their options within the
  model's limit (camserve.protocol.options.request_cost).
- `predict`: requests -> `Prediction`s (probabilities, maps as tensors), one forward pass per (method, layers)
  group; a group that fails fails alone.
- `encode`: a request and its prediction -> an `Answer` (JSON object or image bytes), bounded in bytes.
- `answer`: the three in turn for a batch of client requests, as a server runs them.

A fault of ours in any stage (an exception other than a RequestError) fails the request it was serving alone: it
answers 500 `internal_error`, its traceback is logged and it is counted (CamInternalErrors, by stage); the rest of
the batch is answered and the worker lives on.

Stage times and counts go to a `Metrics` sink, as TorchServe's `@timed` reports a handler's stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from camserve.cam import METHODS, CamExtractor, LayerError, MethodError
from camserve.cam.localization import compile_peak_and_box, take_fast_path_fallbacks
from camserve.model_spec import ModelSpec, load_labels, load_model
from camserve.pipeline.types import Answer, Metrics, NoMetrics, Prediction, Request, Row
from camserve.preprocessing import whole_image_transform
from camserve.protocol.decoding import MAX_PIXELS, RequestError, decode_image, read_request
from camserve.protocol.limits import DEFAULT_MAX_ANSWER_BYTES, MAX_INSTANCES
from camserve.protocol.options import OptionRules, Options, parse_options, request_cost
from camserve.protocol.responses import answer_size, encode_answer

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class CamPipeline:
    """One served model: its spec, network, labels and the rules its requests are held to."""

    def __init__(
        self,
        spec: ModelSpec,
        model: nn.Module,
        labels: list[str],
        device: torch.device | str = "cpu",
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        self.spec = spec
        self.model = model
        self.labels = labels
        self.device = torch.device(device)
        self.max_answer_bytes = max_answer_bytes
        self.metrics: Metrics = metrics or NoMetrics()
        self.transform = whole_image_transform(spec.input_size, spec.mean, spec.std)
        # Square, so that it covers the model input whichever way EXIF turns the stored image.
        side = max(spec.input_size)
        self.decode_at_least = (side, side)
        self.extractor = CamExtractor(model, spec.input_size, spec.target_layers, spec.scorecam_max_channels)
        self.rules = OptionRules(
            methods=METHODS.keys(),
            layers={name for name, _ in model.named_modules() if name},
            labels=labels,
            default_method=spec.method,
            default_topk=spec.topk,
            default_layer_count=len(self.extractor.default_layers),
            scorecam_max_channels=spec.scorecam_max_channels,
            max_request_cost=spec.request_cost_limit,
        )
        # The peak-and-box loops compile here, at start, so that no request pays for it.
        compile_peak_and_box()

    @classmethod
    def from_model_dir(
        cls,
        model_dir: Path | str,
        device: torch.device | str = "cpu",
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        metrics: Metrics | None = None,
    ) -> CamPipeline:
        """The model described by `model_dir/model-config.yaml`, as an archive unpacks it."""
        model_dir = Path(model_dir)
        return cls.from_spec(ModelSpec.from_model_dir(model_dir), model_dir, device, max_answer_bytes, metrics)

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        model_dir: Path,
        device: torch.device | str = "cpu",
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        metrics: Metrics | None = None,
    ) -> CamPipeline:
        """The model `spec` describes, its weights and labels read from `model_dir`."""
        model = load_model(spec, model_dir, device)
        return cls(spec, model, load_labels(spec, model_dir), device, max_answer_bytes, metrics)

    def describe(self) -> str:
        return f"{self.spec.architecture}, default method {self.spec.method} at layer(s) {self.extractor.default_layers}"

    # -- the stages -----------------------------------------------------------------------------------------------

    def read(self, rows: Sequence[Row]) -> list[Request | RequestError]:
        """One client request's rows -> each row's Request or error; the request is bounded as a whole first."""
        if len(rows) > MAX_INSTANCES:
            error = RequestError(
                f"the request holds {len(rows)} images, over this server's limit of {MAX_INSTANCES} per request; "
                "send them in several requests",
                status=413,
                kind="too_many_instances",
            )
            return [error] * len(rows)
        with self._timed("CamDecodeTime"):
            raw = [self._guarded("read", self._read_options, row) for row in rows]
        parsed = [item for item in raw if not isinstance(item, RequestError)]
        refused = self._guarded("read", self._check_request_cost, parsed, len(rows))
        if refused is not None:
            return [refused] * len(rows)
        decoded: list[Request | RequestError] = []
        for row, item in zip(rows, raw, strict=True):
            decoded.append(self._guarded("read", self._decode, row, *item) if isinstance(item, tuple) else item)
        return decoded

    def decode(self, row: Row) -> Request:
        """One row alone -> its Request (raises RequestError)."""
        (request,) = self.read([row])
        if isinstance(request, RequestError):
            raise request
        return request

    def predict(self, requests: Sequence[Request]) -> list[Prediction | RequestError]:
        """Predictions and maps, one forward pass per (method, layers) group of the batch; plain ones share one."""
        results: dict[int, Prediction | RequestError] = {}
        groups: dict[tuple[str | None, tuple[str, ...]], list[int]] = {}
        for position, request in enumerate(requests):
            key = (request.options.method, request.options.layers) if request.options.wants_map else (None, ())
            groups.setdefault(key, []).append(position)
        for (method, layers), positions in groups.items():
            members = [requests[p] for p in positions]
            started = time.perf_counter()
            predictions: list[Prediction | RequestError]
            try:
                inputs = torch.stack([member.inputs for member in members]).to(self.device)
                predictions = self._run_group(members, inputs, method, layers)
            except (MethodError, LayerError) as error:
                option = "method" if isinstance(error, MethodError) else "layer"
                predictions = [RequestError(str(error), kind="invalid_option", option=option)] * len(members)
            except Exception:  # noqa: BLE001 - a fault of ours fails this group alone, never the batch or the worker
                predictions = [self._internal_error("compute", f"method {method}, layers {layers}")] * len(members)
            else:
                # Map time per method (forward included): what a method costs.
                self.metrics.add_time("CamMapTime", _ms_since(started), {"Method": method or "none"})
            results.update(zip(positions, predictions, strict=True))
        return [results[position] for position in range(len(requests))]

    def encode(self, request: Request, prediction: Prediction) -> Answer:
        """One request's answer; over the byte limit it becomes a 413 naming the limit."""
        with self._timed("CamEncodeTime"):
            try:
                body, content_type = encode_answer(
                    request.options,
                    prediction.probabilities,
                    prediction.maps,
                    prediction.targets,
                    request.size,
                    prediction.layers,
                    self.labels,
                    image=request.image,
                    explain=request.explain,
                    input_size=self.spec.input_size,
                )
            except Exception:  # noqa: BLE001 - a fault of ours fails this answer alone, never the batch or the worker
                return self.refuse(self._internal_error("encode"))
        self._report_fallbacks()
        size = answer_size(body)
        if size > self.max_answer_bytes:
            return self.refuse(
                RequestError(
                    f"the answer would be {size} bytes, over this server's limit of {self.max_answer_bytes}; "
                    "ask for fewer maps, output=grid, format=jpeg or a smaller image",
                    status=413,
                    kind="answer_too_large",
                )
            )
        options = request.options
        method = options.method if options.wants_map else None
        self.metrics.add_count("CamRequests", {"Method": method or "none", "Output": options.output})
        return Answer(body=body, content_type=content_type)

    def refuse(self, error: RequestError) -> Answer:
        """The answer a refused request gets; one log line names why, never the request's bytes."""
        logger.warning("camserve rejected %s", error.log_line())
        self.metrics.add_count("CamErrors", {"Kind": error.kind})
        return Answer.refusal(error)

    def predict_each(self, read: Sequence[Sequence[Request | RequestError]]) -> list[list[Prediction | RequestError]]:
        """`predict` over every decoded row of several client requests at once; a refused row keeps its error."""
        live = [row for rows in read for row in rows if isinstance(row, Request)]
        predictions = iter(self.predict(live))
        return [[next(predictions) if isinstance(row, Request) else row for row in rows] for rows in read]

    def respond(self, rows: Sequence[Request | RequestError], predictions: Sequence[Prediction | RequestError]) -> list[Answer]:
        """One client request's answers, row by row: encoded, or refused."""
        return [
            self.encode(row, prediction) if isinstance(row, Request) and isinstance(prediction, Prediction) else self.refuse(prediction)  # type: ignore[arg-type]
            for row, prediction in zip(rows, predictions, strict=True)
        ]

    def answer(self, requests: Sequence[Sequence[Row]]) -> list[list[Answer]]:
        """A batch of client requests, each of one or more rows: read, predicted and answered in one batch."""
        read = [self.read(rows) for rows in requests]
        return [self.respond(rows, predictions) for rows, predictions in zip(read, self.predict_each(read), strict=True)]

    # -- the stages' parts ----------------------------------------------------------------------------------------

    def _guarded(self, stage: str, part: Callable[..., _T], *arguments: Any) -> _T | RequestError:
        """`part(*arguments)`, or the RequestError it raises, or a 500 where it fails any other way (a fault of ours):
        the request it reads fails alone, never the rest of the batch or the worker."""
        try:
            return part(*arguments)
        except RequestError as error:
            return error
        except Exception:  # noqa: BLE001 - the boundary between one request and the rest of the batch
            return self._internal_error(stage)

    def _internal_error(self, stage: str, what: str = "") -> RequestError:
        """The 500 a request gets for the exception being handled, which is logged with its traceback and counted
        by stage. The answer names the stage only: nothing of the exception, nothing of the request."""
        logger.exception("camserve: the %s stage failed%s", stage, f" ({what})" if what else "")
        self.metrics.add_count("CamInternalErrors", {"Stage": stage})
        return RequestError(f"the server failed to {stage} this request; the error is logged", status=500, kind="internal_error")

    def _report_fallbacks(self) -> None:
        """Peak-and-box answers that took the full-size way where the compiled one was meant to serve them."""
        for reason, count in take_fast_path_fallbacks().items():
            for _ in range(count):
                self.metrics.add_count("CamFastPathFallbacks", {"Reason": reason})

    def _check_request_cost(self, parsed: list[tuple[bytes, Options]], row_count: int) -> RequestError | None:
        """A request of several images within the model's limit of forward passes together, or the 422 saying why
        not (one image alone is bounded by parse_options)."""
        total = sum(request_cost(options, self.rules) for _, options in parsed)
        if row_count < 2 or total <= self.rules.max_request_cost:
            return None
        return RequestError(
            f"this request's {row_count} images would cost {total} forward passes together, over this model's limit of "
            f"{self.rules.max_request_cost} per request; send fewer images per request, or ask for fewer maps",
            status=422,
            kind="request_too_costly",
        )

    def _read_options(self, row: Row) -> tuple[bytes, Options] | RequestError:
        raw = read_request(row.fields, row.headers)
        options = parse_options(raw.options, self.rules, row.headers.get("accept"))
        if row.in_envelope and options.output == "overlay":
            return RequestError(
                "option 'output': 'overlay' answers with an image, and KServe's protocols carry JSON",
                kind="invalid_option",
                option="output",
            )
        return raw.payload, options

    def _decode(self, row: Row, payload: bytes, options: Options) -> Request:
        with self._timed("CamDecodeTime"):
            # A JPEG decodes at reduced scale when the model input allows it: a large speed-up for photos.
            image, size = decode_image(payload, at_least=self.decode_at_least)
            if options.map_count * size[0] * size[1] > MAX_PIXELS:
                raise RequestError(
                    f"{options.map_count} full-size heat maps of a {size[0]}x{size[1]} image exceed {MAX_PIXELS} pixels per "
                    "request; ask for fewer maps, or output=grid",
                    status=413,
                    kind="answer_too_large",
                )
        with self._timed("CamResizeTime"):
            inputs = self.transform(image)
        kept = None
        if options.output == "overlay":
            # Kept only when the answer is drawn on it, and then at full size: decoded again if reduced.
            kept = image if image.size == size else decode_image(payload)[0]
        return Request(options=options, size=size, inputs=inputs, explain=row.explain, image=kept)

    def _run_group(
        self, members: list[Request], inputs: torch.Tensor, method: str | None, layers: tuple[str, ...]
    ) -> list[Prediction | RequestError]:
        if method is None:
            probabilities = self.extractor.predict(inputs).softmax(dim=1).cpu()
            return [Prediction(probabilities=row) for row in probabilities]

        # Each request's classes come from its own logits; shorter lists repeat their last class, and those extra
        # maps are dropped below.
        def choose(logits: torch.Tensor) -> torch.Tensor:
            wanted = [request.options.chosen_targets(row) for request, row in zip(members, logits, strict=True)]
            width = max(len(w) for w in wanted)
            return torch.tensor([w + [w[-1]] * (width - len(w)) for w in wanted], device=logits.device)

        result = self.extractor(inputs, method=method, targets=choose, layers=layers or None)
        probabilities = result.logits.softmax(dim=1).cpu()
        predictions: list[Prediction | RequestError] = []
        for row, request in enumerate(members):
            count = request.options.map_count
            predictions.append(
                Prediction(
                    probabilities=probabilities[row],
                    maps=result.maps[row, :count],
                    targets=result.targets[row, :count].tolist(),
                    layers=result.layers,
                )
            )
        return predictions

    @contextmanager
    def _timed(self, name: str, dimensions: Mapping[str, str] | None = None) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.add_time(name, _ms_since(started), dimensions or {})


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
