"""What the KServe front checks and rewrites of a request, and how it words a refusal (camserve_tools.kserve.front).

Only what the protocols themselves get wrong is checked here: the shape of the JSON, datatypes, header bytes, text
that is not Unicode, the binary data extension's lengths. Each refusal is an UpstreamError: its HTTP status, its
gRPC code and a JSON body naming the problem, with at most a short escaped excerpt of what the client sent.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import grpc
import numpy as np
import orjson
from grpc_interceptor.exceptions import GrpcException
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from camserve.protocol.decoding import HEADER_PREFIX

# What the front forwards to TorchServe besides the body: identity and tracing (as KServe's own SDK does), and our
# per-request options (X-CAM-<Option>, docs/protocol.md). Accept is not forwarded: these protocols carry JSON.
IDENTITY_HEADERS = ("authorization", "x-request-id", "x-b3-traceid")
OPTION_HEADER_PREFIX = HEADER_PREFIX
# What the front's error bodies and log lines may show of a client's text.
EXCERPT_CHARS = 120
# The binary data extension of the v2 protocol: the JSON part's length, the tensors' bytes after it.
BINARY_HEADER = "inference-header-content-length"
# TorchServe's and our statuses on gRPC: a client's mistake is never UNAVAILABLE, which clients retry.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Client text for an error message or a log line: cut short, every non-ASCII or control character escaped."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return ascii(shown)[1:-1]


def clean(value: Any) -> Any:
    """`value` with every string made valid Unicode: a lone surrogate (JSON allows "\\ud800", strict parsers refuse
    it in a document) is written out escaped instead."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {clean(key): clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clean(item) for item in value]
    return value


class UpstreamError(GrpcException):
    """A request TorchServe (or the front) refused: its HTTP status, its gRPC code, and a JSON body naming the problem."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        code = GRPC_CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL)
        # gRPC details travel in a trailer of a few KB: the error alone, without the other instances' answers.
        details = {key: value for key, value in body.items() if key not in ("predictions", "explanations", "outputs")}
        super().__init__(orjson.dumps(clean(details)).decode(), code)
        self.status = status
        self.body = body


def error_body(status: int, kind: str, message: str, **extra: Any) -> dict[str, Any]:
    # "error" is the key KServe's own client reads into its exception message.
    return {"error": f"{kind}: {message}", "code": status, "type": kind, "message": message, **extra}


def refusal(status: int, kind: str, message: str, **extra: Any) -> UpstreamError:
    return UpstreamError(status, error_body(status, kind, message, **extra))


def handler_error(status: int, answer: Any) -> dict[str, Any]:
    """The first error our handler put in an envelope's answer, or TorchServe's own error body."""
    candidates: list[Any] = [answer]
    if isinstance(answer, dict):
        for key in ("predictions", "explanations"):
            candidates += answer.get(key) or []
        for output in answer.get("outputs") or []:
            candidates += (output.get("data") or []) if isinstance(output, dict) else []
    # Under an envelope the first instance's error sets the status of the whole request; the other instances'
    # answers are kept beside the error, so that nothing the handler answered is lost.
    answers = {key: answer[key] for key in ("predictions", "explanations", "outputs") if isinstance(answer, dict) and key in answer}
    for item in candidates:
        if isinstance(item, dict) and "type" in item and "message" in item:
            extra = {"option": item["option"]} if item.get("option") else {}
            return error_body(status, str(item["type"]), str(item["message"]), **extra, **answers)
    return error_body(status, "torchserve_error", f"TorchServe answered HTTP {status}", **answers)


def forwarded_headers(headers: dict[str, str] | None) -> dict[bytes, bytes]:
    """The client's headers that go on to TorchServe. Option headers keep their bytes (the handler reads a UTF-8
    value as UTF-8, as on TorchServe directly); identity headers must be ASCII, or the request is refused."""
    forwarded = {b"content-type": b"application/json"}
    for key, value in (headers or {}).items():
        lowered = key.lower()
        if lowered in IDENTITY_HEADERS:
            if not value.isascii():
                raise refusal(400, "invalid_header", f"header '{excerpt(key, 40)}' must be ASCII text", header=excerpt(key, 40))
            forwarded[lowered.encode()] = value.encode()
        elif lowered.startswith(OPTION_HEADER_PREFIX) and lowered.isascii():
            # Starlette reads header bytes as Latin-1: encoding it back gives the bytes the client sent.
            forwarded[lowered.encode()] = value.encode("latin-1", "backslashreplace")
    return forwarded


def as_infer_response(answer: dict, model_name: str) -> InferResponse:
    """TorchServe's v2 answer as gRPC carries it: each output a BYTES tensor, each element our JSON answer."""
    outputs = []
    for output in answer.get("outputs") or []:
        data = (output.get("data") or []) if isinstance(output, dict) else []
        elements = [item.encode() if isinstance(item, str) else orjson.dumps(item) for item in data]
        outputs.append(InferOutput(name=str(output.get("name", "image")), shape=[len(elements)], datatype="BYTES", data=elements))
    return InferResponse(
        response_id=str(answer.get("id") or ""), model_name=model_name, infer_outputs=outputs, model_version=answer.get("model_version")
    )


def v1_body(payload: Any) -> dict:
    """The v1 request as TorchServe's kserve envelope needs it: {"instances": [{"data": <base64>, ...options}, ...]}."""
    if not isinstance(payload, dict):
        raise InvalidInput('a v1 request is a JSON object {"instances": [{"data": "<base64 image>"}, ...]}')
    instances = payload.get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty list of objects")
    for index, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise InvalidInput(f"instances[{index}] must be an object with the base64 image under 'data'")
    return {"instances": instances}


def v2_body(payload: Any) -> dict:
    """The v2 request as camserve's kservev2 envelope reads it: BYTES inputs of base64 images, each with its shape (the
    handler checks that the shape matches the images, and answers or refuses each image)."""
    if not isinstance(payload, InferRequest):
        raise InvalidInput('a v2 request is an inference request {"inputs": [{"name", "shape", "datatype": "BYTES", "data"}]}')
    if not payload.inputs:
        raise InvalidInput("'inputs' must hold at least one input")
    inputs = []
    for tensor in payload.inputs:
        name = excerpt(str(tensor.name), 40)
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input '{name}': datatype must be BYTES (the image), not {excerpt(str(tensor.datatype), 20)}")
        data = tensor.data.tolist() if isinstance(tensor.data, np.ndarray) else tensor.data
        elements = []
        for element in _flattened(data):
            if isinstance(element, (bytes, bytearray)):  # the binary extension or gRPC: raw bytes, sent on as base64
                element = base64.b64encode(bytes(element)).decode("ascii")
            if not isinstance(element, str):
                raise InvalidInput(f"input '{name}': each element of data must be an image as a base64 string")
            elements.append(element)
        inputs.append({"name": tensor.name, "shape": list(tensor.shape), "datatype": "BYTES", "data": elements})
    body: dict[str, Any] = {"inputs": inputs}
    if payload.id:
        body["id"] = payload.id
    return body


def _flattened(data: Any) -> list[Any]:
    """A tensor's elements in row-major order, however deeply its data nests them (no recursion: any depth)."""
    elements, pending = [], [data]
    while pending:
        item = pending.pop()
        if isinstance(item, (list, tuple)):
            pending.extend(reversed(item))
        else:
            elements.append(item)
    return elements


def binary_request_as_json(body: bytes, json_length: str) -> bytes:
    """A v2 request in the binary data extension (a JSON part of `json_length` bytes, then each BYTES input's
    elements as 4-byte little-endian lengths and bytes) -> the same request in plain JSON, images in base64.

    KServe's own decoder would quote the whole image in its error (and its log line) for the slightest mistake,
    and cannot hand on image bytes anyway; here every mistake is a 400 that names it, quoting nothing."""

    def refuse(message: str) -> UpstreamError:
        return refusal(400, "invalid_binary_request", message)

    if not re.fullmatch(r"[0-9]{1,12}", json_length) or int(json_length) > len(body):
        raise refuse(f"header Inference-Header-Content-Length must be the byte length of the JSON part (0 to {len(body)})")
    split = int(json_length)
    try:
        request = orjson.loads(body[:split])
    except orjson.JSONDecodeError:
        raise refuse(f"the first {split} bytes (Inference-Header-Content-Length) are not a JSON object") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise refuse('the JSON part must be an object with an "inputs" list')
    offset = split
    for index, tensor in enumerate(request["inputs"]):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue  # this input's data is in the JSON part
        size = parameters.pop("binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(body) - offset:
            raise refuse(f"inputs[{index}]: binary_data_size must be a byte count within the {len(body) - offset} bytes left")
        if tensor.get("datatype") != "BYTES":
            raise refuse(f"inputs[{index}]: only BYTES inputs (images) are accepted, in binary form or in JSON")
        tensor["data"] = [base64.b64encode(element).decode("ascii") for element in _bytes_elements(body[offset : offset + size], index)]
        offset += size
    if offset != len(body):
        raise refuse(f"{len(body) - offset} bytes follow the last binary input: binary_data_size must account for every byte")
    return orjson.dumps(request)


def _bytes_elements(section: bytes, index: int) -> list[bytes]:
    """A BYTES tensor's binary form: each element as its 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    position = 0
    while position < len(section):
        length = int.from_bytes(section[position : position + 4], "little") if position + 4 <= len(section) else -1
        if length < 0 or position + 4 + length > len(section):
            raise refusal(
                400,
                "invalid_binary_request",
                f"inputs[{index}]: element {len(elements)} does not fit its binary_data_size "
                "(each BYTES element is a 4-byte little-endian length, then that many bytes)",
            )
        elements.append(section[position + 4 : position + 4 + length])
        position += 4 + length
    return elements
