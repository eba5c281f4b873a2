"""The requests of one TorchServe batch on their way through the handler, each with its own fate.

Kept out of the handler module: TorchServe requires that module to define exactly one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from camserve.protocol.decoding import RequestError
from camserve.protocol.options import Options


@dataclass
class Item:
    """One request of a batch: what preprocess decoded, what inference computed, what postprocess answers."""

    index: int
    size: tuple[int, int] = (0, 0)  # original (width, height)
    options: Options | None = None
    explain: bool = False  # the /explanations route: the map payload alone
    image: Image.Image | None = None  # the original, kept only for output=overlay
    error: RequestError | None = None
    # inference
    probabilities: torch.Tensor | None = None  # (classes,)
    maps: torch.Tensor | None = None  # (T, h, w) in [0, 1], one per class in `targets`
    targets: list[int] = field(default_factory=list)
    layers: tuple[str, ...] = ()
    # postprocess
    response: Any = None
    content_type: str = "application/json"


@dataclass
class Batch:
    items: list[Item]
    inputs: torch.Tensor | None = None  # stacked network inputs of the items without error, in order
    # The items decoded without error, row i of `inputs` each. Fixed at preprocessing (not derived from the
    # items' errors), because a group that fails later must not shift the other items' rows.
    live: list[Item] = field(default_factory=list)
