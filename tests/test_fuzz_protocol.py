"""Property-based fuzzing of request decoding and option parsing: any input ends in a result or a RequestError
with a 4xx status - never another exception (which would cost a batch its answers)."""

from __future__ import annotations

import base64
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from camserve.protocol.decoding import RequestError, decode_request
from camserve.protocol.options import OPTION_NAMES, OptionRules, parse_options

RULES = OptionRules(
    methods={"cam", "gradcam", "layercam"},
    layers={"features", "features.4", "fc"},
    labels=["circle", "square", "star"],
    default_method="gradcam",
    default_topk=3,
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 9), "blue").save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


def mutate(data: bytes, positions: list[int], values: list[int]) -> bytes:
    buffer = bytearray(data)
    # Hypothesis draws the two lists apart: the shorter one decides how many bytes change.
    for position, value in zip(positions, values, strict=False):
        buffer[position % len(buffer)] = value
    return bytes(buffer)


def decodes_or_refuses(row: dict, headers: dict | None = None) -> None:
    """An RGB image, or a RequestError with a 4xx status and a message: never any other exception."""
    try:
        request = decode_request(row, headers)
    except RequestError as error:
        refusal = error
    else:
        assert request.image.mode == "RGB"
        assert request.image.size[0] > 0
        return
    assert 400 <= refusal.status < 500
    assert str(refusal)


@SETTINGS
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(body: bytes) -> None:
    decodes_or_refuses({"body": body})


@SETTINGS
@given(st.lists(st.integers(0, 10_000), max_size=8), st.lists(st.integers(0, 255), max_size=8), st.integers(0, len(PNG)))
def test_mutated_and_truncated_png(positions: list[int], values: list[int], cut: int) -> None:
    decodes_or_refuses({"body": mutate(PNG, positions, values)[: max(cut, 1)]})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["data", *OPTION_NAMES, "x"]), json_values, max_size=6))
def test_arbitrary_json_objects(fields: dict) -> None:
    decodes_or_refuses({"body": fields})
    decodes_or_refuses({"body": json.dumps(fields).encode()})


@SETTINGS
@given(
    st.dictionaries(st.sampled_from([*OPTION_NAMES, "explain", "Colour"]), st.text(max_size=30), max_size=7),
    st.sampled_from([None, "*/*", "image/png", "image/jpeg", "text/html"]),
)
def test_arbitrary_options(raw: dict[str, str], accept: str | None) -> None:
    try:
        options = parse_options(raw, RULES, accept)
    except RequestError as error:
        refusal = error
    else:
        assert options.topk >= 1
        assert options.maps >= 1
        assert options.output in ("png", "grid", "overlay", "none")
        assert options.targets is None or all(0 <= t < len(RULES.labels) for t in options.targets)
        return
    assert refusal.status == 400
    assert refusal.option is not None


@SETTINGS
@given(st.text(max_size=60))
def test_arbitrary_base64_field(text: str) -> None:
    decodes_or_refuses({"body": {"data": text}})
    decodes_or_refuses({"body": {"data": base64.b64encode(text.encode()).decode()}})
