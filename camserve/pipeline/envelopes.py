"""KServe's v1 and v2 (Open Inference Protocol) bodies <-> the pipeline's rows and answers, engine-free.

Every engine unwraps and wraps these envelopes with this module, so the same request gets the same bytes whichever
engine serves it:

    v1  {"instances": [{"data": "<base64 image>", "method": "cam", ...}, ...]}
        -> {"predictions": [<answer>, ...]}   (/explanations and :explain: {"explanations": [...]})
    v2  {"id": "...", "inputs": [{"name": "image", "shape": [n], "datatype": "BYTES", "data": [<image>, ...n]}]}
        -> {"id", "model_name", "model_version", "outputs": [{"name", "datatype": "BYTES", "data": [<answer>, ...], "shape": [n]}]}

Each image is answered or refused: a v2 tensor may hold several, and its `shape` must say how many. A refused
instance's JSON error stands in its place, and the request's status stays 200 while any instance was answered;
when none was, the status is the first error's. An envelope that cannot be read is refused whole, with a 4xx.
v1 options travel in each instance beside `data`, v2 options in `X-CAM-*` headers; both carry JSON, so
`output=overlay` is refused and `Accept` is not read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from camserve.pipeline.types import Answer, Row
from camserve.protocol.decoding import RequestError
from camserve.protocol.limits import MAX_INSTANCES

KSERVE_V1, KSERVE_V2 = "kserve", "kservev2"
ENVELOPES = (KSERVE_V1, KSERVE_V2)


def _envelope_error(message: str, status: int = 400, kind: str = "invalid_envelope") -> RequestError:
    return RequestError(message, status=status, kind=kind)


def _json_object(body: Any, protocol: str) -> dict[str, Any]:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = json.loads(body)
        except RecursionError:
            raise _envelope_error("the JSON body is nested too deeply", kind="invalid_json") from None
        except ValueError as error:
            raise _envelope_error(f"the body is not valid JSON: {str(error)[:200]}", kind="invalid_json") from None
    if not isinstance(body, dict):
        raise _envelope_error(f"a {protocol} request is a JSON object; see docs/protocol.md")
    return body


def _bounded(count: int) -> None:
    if count > MAX_INSTANCES:
        raise _envelope_error(
            f"the request holds {count} images, over this server's limit of {MAX_INSTANCES} per request; send them in several requests",
            status=413,
            kind="too_many_instances",
        )


def _envelope_headers(headers: Mapping[str, str]) -> dict[str, str]:
    # Envelopes answer JSON whatever the client accepts.
    return {key: value for key, value in headers.items() if key != "accept"}


# -- v1 ---------------------------------------------------------------------------------------------------------------


def v1_rows(body: Any, headers: Mapping[str, str], explain: bool = False) -> list[Row]:
    """A v1 body (bytes or parsed JSON) -> one row per instance; an instance may be an object or a base64 string."""
    instances = _json_object(body, "KServe v1").get("instances")
    if not isinstance(instances, list) or not instances:
        raise _envelope_error("'instances' must be a non-empty list of objects with the base64 image under 'data'")
    _bounded(len(instances))
    plain = _envelope_headers(headers)
    rows = []
    for index, instance in enumerate(instances):
        if isinstance(instance, str):
            instance = {"data": instance}
        if not isinstance(instance, dict):
            raise _envelope_error(f"instances[{index}] must be an object with the base64 image under 'data', or a base64 string")
        rows.append(Row(fields=instance, headers=plain, explain=explain, in_envelope=True))
    return rows


def v1_answer(answers: Sequence[Answer], explain: bool = False) -> Answer:
    """The instances' answers in one v1 body."""
    key = "explanations" if explain else "predictions"
    return Answer(body={key: [_instance_body(answer) for answer in answers]}, status=_status(answers))


# -- v2 ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class V2Request:
    """A v2 body's rows and what its answer repeats: the request id and each input's name and image count."""

    id: str | None
    inputs: tuple[tuple[str, int], ...]
    rows: list[Row]


def v2_request(body: Any, headers: Mapping[str, str]) -> V2Request:
    """A v2 body (bytes, parsed JSON, or its inputs with raw bytes from the binary extension) -> one row per image."""
    request = _json_object(body, "KServe v2")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _envelope_error("'inputs' must be a non-empty list of tensors {name, shape, datatype: BYTES, data}")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _envelope_error("'id' must be a string")
    plain = _envelope_headers(headers)
    rows: list[Row] = []
    names: list[tuple[str, int]] = []
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise _envelope_error(f"inputs[{index}] must be a tensor object {{name, shape, datatype, data}}")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise _envelope_error(f"inputs[{index}] needs a 'name' string")
        shown = repr(name[:40])
        if tensor.get("datatype") != "BYTES":
            raise _envelope_error(f"input {shown}: datatype must be BYTES (the encoded image), not {str(tensor.get('datatype'))[:20]!r}")
        data = tensor.get("data")
        if not isinstance(data, list) or not data:
            raise _envelope_error(f"input {shown}: 'data' must be a non-empty list of images")
        _check_shape(tensor.get("shape"), len(data), shown)
        _bounded(len(rows) + len(data))
        for element in data:
            if not isinstance(element, (str, bytes, bytearray)):
                raise _envelope_error(f"input {shown}: each element of 'data' must be an image as base64 text or bytes")
            rows.append(Row(fields={"data": element}, headers=plain, in_envelope=True))
        names.append((name, len(data)))
    return V2Request(id=request_id, inputs=tuple(names), rows=rows)


def _check_shape(shape: Any, count: int, shown: str) -> None:
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise _envelope_error(f"input {shown}: 'shape' must be a list of integers, e.g. [{count}]")
    if any(d < 0 for d in shape) or math.prod(shape) != count:
        raise _envelope_error(
            f"input {shown}: 'shape' {str(shape)[:60]} does not match the {count} image(s) in 'data'", kind="shape_mismatch"
        )


def v2_answer(answers: Sequence[Answer], request: V2Request, model_name: str, model_version: str | None, request_id: str) -> Answer:
    """The images' answers in one v2 body, an output per input, in the inputs' order.

    `request_id` answers for a request that named no `id` (the engine's own request id).
    """
    outputs, start = [], 0
    for name, count in request.inputs:
        part = answers[start : start + count]
        start += count
        outputs.append({"name": name, "datatype": "BYTES", "data": [_instance_body(a) for a in part], "shape": [count]})
    body = {"id": request.id or request_id, "model_name": model_name, "model_version": model_version, "outputs": outputs}
    return Answer(body=body, status=_status(answers))


# -- shared -----------------------------------------------------------------------------------------------------------


def _instance_body(answer: Answer) -> dict[str, Any]:
    assert isinstance(answer.body, dict), "envelope rows answer JSON"
    return answer.body


def _status(answers: Sequence[Answer]) -> int:
    """200 while any instance was answered; otherwise the first refusal's status."""
    if any(answer.ok for answer in answers) or not answers:
        return 200
    return answers[0].status
