"""Per-request options: raw strings (headers, form or JSON fields) -> validated `Options`, or a 4xx naming why.

Every option is bounded, so that no single request costs more than a documented multiple of a plain prediction:
repeated layers and classes are taken once, at most MAX_LAYERS layers and MAX_MAPS classes, and `request_cost`
(in forward passes of one image) must stay within the model's `max_request_cost`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from camserve.cam.methods import SCORECAM_MAX_CHANNELS
from camserve.protocol.decoding import RequestError

OUTPUTS = ("png", "grid", "overlay", "none")
OVERLAY_FORMATS = ("png", "jpeg")
MAX_MAPS = 10
MAX_LAYERS = 4
MAX_OPTION_LENGTH = 1024  # characters of one raw option value
# Parameters that TorchServe or KServe envelopes may add to a request row; not ours to judge.
_PASSTHROUGH = frozenset({"explain", "content-type", "accept", "id", "datatype", "shape", "name", "parameters", "b64"})
OPTION_NAMES = ("method", "layer", "target", "maps", "topk", "output", "format", "heatmap_size")
HEATMAP_SIZES = ("auto", "original", "input")  # or a maximum side in pixels, from MIN_HEATMAP_SIDE to MAX_HEATMAP_SIDE
DEFAULT_HEATMAP_SIZE = "auto"
MIN_HEATMAP_SIDE, MAX_HEATMAP_SIDE = 8, 4096
_CLASS_INDEX = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() also accepts '²', which int() refuses


@dataclass(frozen=True)
class Options:
    method: str | None  # None: plain prediction, no map
    layers: tuple[str, ...]  # empty: the model's default target layer(s); never repeated
    targets: tuple[int, ...] | None  # None: the top-`maps` classes; never repeated
    maps: int
    topk: int
    output: str
    image_format: str
    heatmap_size: str | int = DEFAULT_HEATMAP_SIZE  # see parse_heatmap_size

    @property
    def wants_map(self) -> bool:
        return self.method is not None and self.output != "none"

    @property
    def map_count(self) -> int:
        """How many maps are computed: the explicit targets, or the top-`maps` classes; overlay draws the first."""
        if not self.wants_map:
            return 0
        return 1 if self.output == "overlay" else len(self.targets) if self.targets is not None else self.maps

    def chosen_targets(self, probabilities: torch.Tensor) -> list[int]:
        """The classes to map for one image: the explicit targets, or the top-`map_count` predicted classes."""
        if self.targets is not None:
            return list(self.targets[: self.map_count])
        return probabilities.topk(min(self.map_count, probabilities.numel())).indices.tolist()


def default_request_cost_limit(scorecam_max_channels: int) -> int:
    """A model's limit of forward passes per request unless its config sets one: twice what one Score-CAM map
    costs (its forward passes plus the prediction), so the default Score-CAM request fits with room for a second
    class or layer, and every gradient method with all 10 maps at 4 layers (41) fits too."""
    return 2 * (1 + scorecam_max_channels)


@dataclass(frozen=True)
class OptionRules:
    """What a model accepts, and its defaults (from model-config.yaml)."""

    methods: Collection[str]
    layers: Collection[str]
    labels: Sequence[str]
    default_method: str
    default_topk: int
    default_layer_count: int = 1
    scorecam_max_channels: int = SCORECAM_MAX_CHANNELS
    max_request_cost: int = default_request_cost_limit(SCORECAM_MAX_CHANNELS)


def request_cost(options: Options, rules: OptionRules) -> int:
    """What a request costs, in forward passes of one image.

    The prediction is one. Each map (one class at one layer) adds at most one more: a backward pass from the layer
    costs less than the forward, and CAM, the closed form and Eigen-CAM cost less still. Score-CAM adds one forward
    pass per scored channel.
    """
    if not options.wants_map:
        return 1
    per_map = rules.scorecam_max_channels if options.method == "scorecam" else 1
    return 1 + (len(options.layers) or rules.default_layer_count) * options.map_count * per_map


def _shown(raw: str, limit: int = 60) -> str:
    """User text for an error message: quoted, and cut short."""
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")


def _positive_int(raw: str, option: str, upper: int) -> int:
    value = int(raw) if re.fullmatch(r"[0-9]{1,9}", raw) else 0
    if not 1 <= value <= upper:
        raise RequestError(
            f"option {option!r} must be an integer from 1 to {upper}, got {_shown(raw)}", kind="invalid_option", option=option
        )
    return value


def _class_index(raw: str, labels: Sequence[str]) -> int:
    raw = raw.strip()
    if _CLASS_INDEX.fullmatch(raw):
        index = int(raw)
        if index < len(labels):
            return index
        raise RequestError(
            f"option 'target': class index {index} is out of range 0..{len(labels) - 1}", kind="invalid_option", option="target"
        )
    lowered = {label.lower(): i for i, label in enumerate(labels)}
    if raw.lower() in lowered:
        return lowered[raw.lower()]
    shown = list(labels) if len(labels) <= 20 else [*labels[:20], "..."]
    raise RequestError(
        f"option 'target': unknown label {_shown(raw)}; use a class index or one of {shown}", kind="invalid_option", option="target"
    )


def _unique(values: Sequence[str] | Sequence[int]) -> tuple:
    return tuple(dict.fromkeys(values))


def _parse_output(raw: dict[str, str], accept: str | None, method: str | None) -> tuple[str, str]:
    """Options 'output' and 'format'; their defaults follow the Accept header: an image asked for is an overlay."""
    accept = (accept or "").lower()
    wants_image = "image/png" in accept or "image/jpeg" in accept
    output = raw.get("output", "overlay" if wants_image else "png").lower()
    if output not in OUTPUTS:
        raise RequestError(
            f"option 'output': unknown output {_shown(output)}; allowed: {list(OUTPUTS)}", kind="invalid_option", option="output"
        )
    image_format = raw.get("format", "jpeg" if "image/jpeg" in accept and "image/png" not in accept else "png").lower()
    if image_format == "jpg":
        image_format = "jpeg"
    if image_format not in OVERLAY_FORMATS:
        raise RequestError(
            f"option 'format': unknown format {_shown(image_format)}; allowed: {list(OVERLAY_FORMATS)}",
            kind="invalid_option",
            option="format",
        )
    if output == "overlay" and method is None:
        raise RequestError("option 'output': 'overlay' needs a map; method 'none' gives none", kind="invalid_option", option="output")
    return output, image_format


def parse_options(raw: dict[str, str], rules: OptionRules, accept: str | None = None) -> Options:
    unknown = sorted(k for k in raw if k.lower() not in OPTION_NAMES and k.lower() not in _PASSTHROUGH)
    if unknown:
        shown = [_shown(name, 40) for name in unknown[:5]]
        raise RequestError(
            f"unknown option(s) {', '.join(shown)}; allowed: {list(OPTION_NAMES)}", kind="unknown_option", option=unknown[0][:40]
        )
    raw = {k.lower(): v.strip() for k, v in raw.items() if k.lower() in OPTION_NAMES}
    for name, value in raw.items():
        if len(value) > MAX_OPTION_LENGTH:
            raise RequestError(
                f"option {name!r} is {len(value)} characters long; at most {MAX_OPTION_LENGTH}", kind="invalid_option", option=name
            )

    method = raw.get("method", rules.default_method).lower()
    if method == "none":
        method_or_none = None
    elif method in rules.methods:
        method_or_none = method
    else:
        raise RequestError(
            f"option 'method': unknown method {_shown(method)}; allowed: {[*sorted(rules.methods), 'none']}",
            kind="invalid_option",
            option="method",
        )

    layers: tuple[str, ...] = ()
    if raw.get("layer"):
        layers = _unique([name.strip() for name in raw["layer"].split(",")])
        bad = [_shown(name, 40) for name in layers if name not in rules.layers]
        if bad:
            raise RequestError(
                f"option 'layer': unknown layer(s) {', '.join(bad[:5])}; use module names of the model, e.g. {sorted(rules.layers)[-3:]}",
                kind="invalid_option",
                option="layer",
            )
        if len(layers) > MAX_LAYERS:
            raise RequestError(
                f"option 'layer': at most {MAX_LAYERS} different layers per request, got {len(layers)}",
                kind="invalid_option",
                option="layer",
            )

    targets = None
    if raw.get("target"):
        targets = _unique([_class_index(part, rules.labels) for part in raw["target"].split(",")])
        if len(targets) > MAX_MAPS:
            raise RequestError(f"option 'target': at most {MAX_MAPS} different classes per request", kind="invalid_option", option="target")
    maps = _positive_int(raw["maps"], "maps", min(MAX_MAPS, len(rules.labels))) if "maps" in raw else 1
    topk = _positive_int(raw["topk"], "topk", len(rules.labels)) if "topk" in raw else min(rules.default_topk, len(rules.labels))

    output, image_format = _parse_output(raw, accept, method_or_none)
    options = Options(
        method_or_none, layers, targets, maps, topk, output, image_format, parse_heatmap_size(raw.get("heatmap_size", DEFAULT_HEATMAP_SIZE))
    )
    if (cost := request_cost(options, rules)) > rules.max_request_cost:
        raise RequestError(
            f"this request would cost {cost} forward passes, over this model's limit of {rules.max_request_cost} "
            f"(a plain prediction costs 1, each map 1, each Score-CAM map {rules.scorecam_max_channels}); "
            f"ask for fewer classes, layers or another method",
            status=422,
            kind="request_too_costly",
        )
    return options


def parse_heatmap_size(raw: str) -> str | int:
    """`auto` (the default: the image's aspect ratio, its longest side the model input's longest side, never
    larger than the image), `original` (the image's size), `input` (the model input's size), or the heat map's
    longest side in pixels.

    A map upsampled from the layer's grid (7x7 for a 224-pixel ResNet) holds no more at the image's size than at
    the model input's: `auto` keeps the PNG, and the answer, small, and `original` serves clients that want the
    map pixel for pixel over the image. The bounds keep a side at least 8 pixels and the PNG no larger than
    4096 x 4096. Sizes come out of camserve.protocol.responses.heatmap_png_size.
    """
    value = raw.strip().lower()
    if value in HEATMAP_SIZES:
        return value
    if re.fullmatch(r"[0-9]{1,9}", value) and MIN_HEATMAP_SIDE <= int(value) <= MAX_HEATMAP_SIDE:
        return int(value)
    raise RequestError(
        f"option 'heatmap_size' must be one of {list(HEATMAP_SIZES)} or a side in pixels from {MIN_HEATMAP_SIDE} to {MAX_HEATMAP_SIDE}, "
        f"got {_shown(raw)}",
        kind="invalid_option",
        option="heatmap_size",
    )
