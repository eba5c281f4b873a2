"""What travels through the pipeline: a request's row, its decoded form, the model's result and the answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image
from torch import Tensor

from camserve.protocol.decoding import RequestError
from camserve.protocol.options import Options
from camserve.protocol.responses import json_bytes


@dataclass(frozen=True)
class Row:
    """One image to answer, as an engine received it.

    `fields`: the image under "body", "data" or "file" (bytes, base64 text, or a JSON object with "data") and any
    option fields beside it (a form's fields, a JSON body's or an envelope instance's keys). `headers`: the HTTP
    request's headers, names lower-cased; the `X-CAM-<Option>` ones are options too. `explain`: the explanation
    route, which answers the map payload alone. `in_envelope`: an instance of a KServe envelope, whose answer is
    JSON inside the envelope's (so an overlay image is refused).
    """

    fields: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    explain: bool = False
    in_envelope: bool = False


@dataclass
class Request:
    """A row decoded and validated against the model, ready for the network."""

    options: Options
    size: tuple[int, int]  # the image's (width, height) as sent, EXIF orientation applied
    inputs: Tensor  # (3, H, W), the model's input
    explain: bool = False
    image: Image.Image | None = None  # the original, kept only for output=overlay


@dataclass
class Prediction:
    """What the model said about one request: class probabilities and, where asked for, maps."""

    probabilities: Tensor  # (classes,)
    maps: Tensor | None = None  # (T, h, w) in [0, 1], one per class in `targets`, at the target layer's resolution
    targets: list[int] = field(default_factory=list)
    layers: tuple[str, ...] = ()


@dataclass
class Answer:
    """One request's answer: a JSON object or image bytes, its content type and HTTP status."""

    body: dict[str, Any] | bytes
    content_type: str = "application/json"
    status: int = 200
    error: RequestError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_bytes(self) -> bytes:
        """The body as sent: image bytes as they are, a JSON object as compact UTF-8."""
        return self.body if isinstance(self.body, bytes) else json_bytes(self.body)

    @classmethod
    def refusal(cls, error: RequestError) -> Answer:
        return cls(body=error.to_json(), status=error.status, error=error)


class Metrics(Protocol):
    """Where the pipeline reports its stage times and counts; each engine adapter maps it onto its own metrics."""

    def add_time(self, name: str, milliseconds: float, dimensions: Mapping[str, str]) -> None: ...

    def add_count(self, name: str, dimensions: Mapping[str, str]) -> None: ...


class NoMetrics:
    """Metrics that go nowhere: for callers that need none."""

    def add_time(self, name: str, milliseconds: float, dimensions: Mapping[str, str]) -> None:
        return None

    def add_count(self, name: str, dimensions: Mapping[str, str]) -> None:
        return None
