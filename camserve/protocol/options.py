"""Per-request options: raw strings (query string, form or JSON fields) -> validated `Options`, or a 400 naming why."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from camserve.protocol.requests import RequestError

OUTPUTS = ("png", "grid", "overlay", "none")
OVERLAY_FORMATS = ("png", "jpeg")
MAX_MAPS = 10
# Parameters that TorchServe or KServe envelopes may add to a request row; not ours to judge.
_PASSTHROUGH = frozenset({"explain", "content-type", "accept", "id", "datatype", "shape", "name", "parameters", "b64"})
OPTION_NAMES = ("method", "layer", "target", "maps", "topk", "output", "format", "heatmap_size")
HEATMAP_SIZES = ("original", "input")  # or a maximum side in pixels, from MIN_HEATMAP_SIDE to MAX_HEATMAP_SIDE
MIN_HEATMAP_SIDE, MAX_HEATMAP_SIDE = 8, 4096


@dataclass(frozen=True)
class Options:
    method: str | None  # None: plain prediction, no map
    layers: tuple[str, ...]  # empty: the model's default target layer(s)
    targets: tuple[int, ...] | None  # None: the top-`maps` classes
    maps: int
    topk: int
    output: str
    image_format: str
    heatmap_size: str | int = "original"  # see parse_heatmap_size

    @property
    def wants_map(self) -> bool:
        return self.method is not None and self.output != "none"

    def map_count(self, num_classes: int) -> int:
        """How many maps this request asked for: its explicit targets, or the top-`maps` classes."""
        return len(self.targets) if self.targets is not None else min(self.maps, num_classes)


@dataclass(frozen=True)
class OptionRules:
    """What a model accepts, and its defaults (from model-config.yaml)."""

    methods: Collection[str]
    layers: Collection[str]
    labels: Sequence[str]
    default_method: str
    default_topk: int


def _positive_int(raw: str, option: str, upper: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= upper:
        raise RequestError(f"option {option!r} must be an integer from 1 to {upper}, got {raw!r}", kind="invalid_option", option=option)
    return value


def _class_index(raw: str, labels: Sequence[str]) -> int:
    raw = raw.strip()
    if raw.lstrip("-").isdigit():
        index = int(raw)
        if 0 <= index < len(labels):
            return index
        raise RequestError(f"option 'target': class index {index} is out of range 0..{len(labels) - 1}", kind="invalid_option", option="target")
    lowered = {label.lower(): i for i, label in enumerate(labels)}
    if raw.lower() in lowered:
        return lowered[raw.lower()]
    shown = list(labels) if len(labels) <= 20 else [*labels[:20], "..."]
    raise RequestError(f"option 'target': unknown label {raw!r}; use a class index or one of {shown}", kind="invalid_option", option="target")


def parse_options(raw: dict[str, str], rules: OptionRules, accept: str | None = None) -> Options:
    unknown = sorted(k for k in raw if k.lower() not in OPTION_NAMES and k.lower() not in _PASSTHROUGH)
    if unknown:
        raise RequestError(f"unknown option(s) {unknown}; allowed: {list(OPTION_NAMES)}", kind="unknown_option", option=unknown[0])
    raw = {k.lower(): v.strip() for k, v in raw.items() if k.lower() in OPTION_NAMES}

    method = raw.get("method", rules.default_method).lower()
    if method == "none":
        method_or_none = None
    elif method in rules.methods:
        method_or_none = method
    else:
        raise RequestError(f"option 'method': unknown method {method!r}; allowed: {[*sorted(rules.methods), 'none']}", kind="invalid_option", option="method")

    layers: tuple[str, ...] = ()
    if raw.get("layer"):
        layers = tuple(name.strip() for name in raw["layer"].split(","))
        bad = [name for name in layers if name not in rules.layers]
        if bad:
            raise RequestError(f"option 'layer': unknown layer(s) {bad}; use module names of the model, e.g. {sorted(rules.layers)[-3:]}", kind="invalid_option", option="layer")

    targets = None
    if raw.get("target"):
        targets = tuple(_class_index(part, rules.labels) for part in raw["target"].split(","))
        if len(targets) > MAX_MAPS:
            raise RequestError(f"option 'target': at most {MAX_MAPS} classes per request", kind="invalid_option", option="target")
    maps = _positive_int(raw["maps"], "maps", min(MAX_MAPS, len(rules.labels))) if "maps" in raw else 1
    topk = _positive_int(raw["topk"], "topk", len(rules.labels)) if "topk" in raw else min(rules.default_topk, len(rules.labels))

    accept = (accept or "").lower()
    wants_image = "image/png" in accept or "image/jpeg" in accept
    output = raw.get("output", "overlay" if wants_image else "png").lower()
    if output not in OUTPUTS:
        raise RequestError(f"option 'output': unknown output {output!r}; allowed: {list(OUTPUTS)}", kind="invalid_option", option="output")
    image_format = raw.get("format", "jpeg" if "image/jpeg" in accept and "image/png" not in accept else "png").lower()
    if image_format == "jpg":
        image_format = "jpeg"
    if image_format not in OVERLAY_FORMATS:
        raise RequestError(f"option 'format': unknown format {image_format!r}; allowed: {list(OVERLAY_FORMATS)}", kind="invalid_option", option="format")
    if output == "overlay" and method_or_none is None:
        raise RequestError("option 'output': 'overlay' needs a map; method 'none' gives none", kind="invalid_option", option="output")
    return Options(method_or_none, layers, targets, maps, topk, output, image_format, parse_heatmap_size(raw.get("heatmap_size", "original")))


def parse_heatmap_size(raw: str) -> str | int:
    """`original` (the image's size), `input` (the model input's size), or the heat map's longest side in pixels.

    For clients that scale the heat map themselves: a smaller PNG is cheaper to make, send and decode. The
    bounds keep a side at least 8 pixels and the PNG no larger than 4096 x 4096.
    """
    value = raw.strip().lower()
    if value in HEATMAP_SIZES:
        return value
    if value.isascii() and value.isdigit() and MIN_HEATMAP_SIDE <= int(value) <= MAX_HEATMAP_SIDE:
        return int(value)
    raise RequestError(
        f"option 'heatmap_size' must be one of {list(HEATMAP_SIZES)} or a side in pixels from {MIN_HEATMAP_SIDE} to {MAX_HEATMAP_SIDE}, got {raw!r}",
        kind="invalid_option",
        option="heatmap_size",
    )
