"""The TorchServe handler's parts, kept out of its module: TorchServe requires that module to define one class."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ts.metrics.dimension import Dimension

from camserve.pipeline import Prediction, Request, RequestError
from camserve.pipeline.envelopes import V2Request


class TorchServeMetrics:
    """The pipeline's times and counts as TorchServe model metrics (on /metrics with metrics_mode=prometheus)."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics

    def add_time(self, name: str, milliseconds: float, dimensions: Mapping[str, str]) -> None:
        self.metrics.add_time(name, milliseconds, None, "ms", [Dimension(k, v) for k, v in dimensions.items()])

    def add_count(self, name: str, dimensions: Mapping[str, str]) -> None:
        self.metrics.add_counter(name, 1, None, [Dimension(k, v) for k, v in dimensions.items()])


@dataclass
class ReceivedRequest:
    """One HTTP request of the batch: its rows as read (or decoded), and what its answer wraps them in."""

    rows: list[Request | RequestError] = field(default_factory=list)
    refusal: RequestError | None = None  # the whole request, when its envelope cannot be read
    v2: V2Request | None = None
    explain: bool = False
    grpc: bool = False  # a gRPC call: its refusal is raised, for TorchServe to turn into the call's status
    predictions: list[Prediction | RequestError] = field(default_factory=list)
