"""Request decoding: a TorchServe request row -> the image and the per-request options. No model, no torch.

TorchServe hands each request to the handler as a dict: the raw body under "body" (or "data"), a decoded JSON
object when the client sent application/json, or one key per field of a multipart form.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression bombs: refuse images whose *declared* size exceeds these, before decoding any pixel. The side and
# aspect-ratio bounds matter as much as the pixel count: resizing a 1 x 40,000,000 image to the model input takes
# gigabytes in PIL's intermediate pass, and its full-size heat map is as long as the image.
MAX_PIXELS = 40_000_000
MAX_SIDE = 16_384
MAX_ASPECT_RATIO = 20
_IMAGE_FIELDS = ("data", "file", "body")
ORIENTATION_TAG = 0x0112  # EXIF Orientation
# What PIL raises on bytes it cannot decode: OSError (UnidentifiedImageError, "image file is truncated", a codec's
# error) and ValueError above all, but its format plugins also signal a broken file with SyntaxError, EOFError,
# struct.error or IndexError where a header or a table is cut short.
DECODER_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)


class RequestError(ValueError):
    """A request we refuse; `status` is the HTTP code, `kind` a stable machine-readable name, `option` what was wrong."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request", option: str | None = None) -> None:
        super().__init__(_strict_text(message))
        self.status = status
        self.kind = kind
        self.option = None if option is None else _strict_text(option)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.status, "type": self.kind, "message": str(self)}
        if self.option is not None:
            body["option"] = self.option
        return body

    def log_line(self) -> str:
        """One JSON line for the log: why, and which option; the message cut short, never the request's bytes."""
        return json.dumps({"status": self.status, "type": self.kind, "option": self.option, "message": str(self)[:300]})


def _strict_text(text: str) -> str:
    """`text` without lone surrogates (a JSON body's "\\ud800" decodes to one): written as a backslash escape, so that
    an error that quotes the client stays valid UTF-8 and valid JSON to strict parsers."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class DecodedRequest:
    image: Image.Image  # RGB, EXIF orientation applied; a JPEG may be decoded at reduced scale (see decode_image)
    options: dict[str, str]  # raw option values, validated later against the model
    size: tuple[int, int]  # (width, height) of the image as sent, EXIF orientation applied: what a heat map matches


def _as_bytes(value: Any, field: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"field {field!r} is a string but not valid base64", kind="invalid_base64", option=field) from None
    raise RequestError(f"field {field!r} must be image bytes or a base64 string, not {type(value).__name__}", option=field)


def decode_image(payload: bytes, at_least: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes of any format PIL reads -> (an RGB image as a viewer shows it, its full size as (width, height)).

    EXIF orientation is applied, and only the first frame is kept. With `at_least` (width, height), a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that still covers that size (PIL's `draft`): the model
    sees only a resize of it anyway, and a photo decodes in less than half the time. The full size is still
    returned, because the heat map must match the image as sent.

    What the decoder raises on bytes it cannot read is a RequestError (4xx); any other exception is a fault of
    this code and goes up as it is, for the caller to answer with a 500.
    """
    if not payload:
        raise RequestError("the request has no image: the body is empty", kind="empty_body")
    with _refused_if_undecodable():
        image: Image.Image = Image.open(io.BytesIO(payload))
    width, height = image.size
    check_dimensions(width, height)
    if image.format == "JPEG":
        _check_jpeg_length(len(payload), width, height)
    with _refused_if_undecodable():
        if image.format == "JPEG" and at_least is not None:
            image.draft("RGB", at_least)
        image.load()
        # Orientations 5-8 turn the image by 90 degrees: width and height swap.
        if image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):
            width, height = height, width
        # In place: a copy of a camera-sized image (what exif_transpose returns by default) costs about 2 ms.
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode != "RGB":
            image = _flatten_alpha(image) if "A" in image.getbands() or "transparency" in image.info else image.convert("RGB")
    return image, (width, height)


@contextmanager
def _refused_if_undecodable() -> Iterator[None]:
    """Around PIL's calls on the client's bytes (and only those): what its decoders raise on bytes they cannot read
    becomes the RequestError naming it."""
    try:
        with warnings.catch_warnings():
            # Our own bounds (check_dimensions) are tighter than PIL's global pixel limit, which stays as PIL sets it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except Image.DecompressionBombError:
        raise RequestError(
            f"the image is too large: at most {MAX_PIXELS} pixels are accepted", status=413, kind="image_too_large"
        ) from None
    except UnidentifiedImageError:
        raise RequestError(
            "the body is not an image in a format we can read (JPEG, PNG, WebP, BMP, GIF, TIFF)", kind="invalid_image"
        ) from None
    except MemoryError:
        raise RequestError("the image could not be decoded within this server's memory", status=413, kind="image_too_large") from None
    except DECODER_ERRORS as error:
        raise RequestError(f"the image could not be decoded: {str(error)[:200]}", kind="invalid_image") from None


def check_dimensions(width: int, height: int) -> None:
    """Refuse a declared size that would cost far more than a photo of the same bytes (413 or 422)."""
    if width < 1 or height < 1:
        raise RequestError(f"the image declares an empty size {width}x{height}", kind="invalid_image")
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE:
        raise RequestError(
            f"the image is too large: {width}x{height}; at most {MAX_PIXELS} pixels and {MAX_SIDE} pixels a side are accepted",
            status=413,
            kind="image_too_large",
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise RequestError(
            f"the image is {width}x{height}, more than {MAX_ASPECT_RATIO} times as long as it is wide; crop it first",
            status=422,
            kind="image_aspect_ratio",
        )


def _check_jpeg_length(length: int, width: int, height: int) -> None:
    """A JPEG cut short and closed with an end marker decodes as grey padding without an error: refuse it.

    Huffman coding spends at least one bit on every 8x8 block of every component (a flat grey image at quality 1
    takes six), so a file with fewer bits than the luma blocks alone cannot hold the whole image.
    """
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    if length * 8 < blocks:
        raise RequestError(
            f"the JPEG is truncated: {length} bytes cannot hold a {width}x{height} image (at least {blocks // 8} are needed)",
            kind="invalid_image",
        )


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels over white, as a browser shows them."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# Options travel as X-CAM-<Option> headers (docs/protocol.md); header names compared lower-cased.
HEADER_PREFIX = "x-cam-"


def options_from_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    """Options sent as `X-CAM-<Option>` headers (TorchServe 0.12 does not pass the query string to handlers).

    Header names take hyphens where option names take underscores: `X-CAM-Heatmap-Size` is `heatmap_size`.
    """
    return {
        key[len(HEADER_PREFIX) :].lower().replace("-", "_"): _header_text(str(value))
        for key, value in headers.items()
        if isinstance(key, str) and key.lower().startswith(HEADER_PREFIX)
    }


def _header_text(value: str) -> str:
    """A header value as the client wrote it: TorchServe's frontend reads header bytes as Latin-1, so a UTF-8
    value such as 'café' arrives as 'cafÃ©'; read it again as UTF-8 where it is valid UTF-8."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def body_value(payload: bytes, content_type: str | None) -> Any:
    """A request body as TorchServe's frontend hands it to a worker, so that every engine reads it alike: parsed
    JSON for `application/json`, text for `text/*`, the bytes as they are otherwise or where that fails."""
    content_type = (content_type or "").split(";")[0].strip().lower()
    try:
        if content_type == "application/json":
            return json.loads(payload.decode("utf-8"))
        if content_type.startswith("text"):
            return payload.decode("utf-8")
    except (ValueError, RecursionError):
        pass
    return payload


@dataclass
class RawRequest:
    """A request row before its image is decoded: the raw options and the image's bytes."""

    options: dict[str, str]  # raw option values, validated later against the model
    payload: bytes
    field: str  # where the image came from


def read_request(row: Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> RawRequest:
    """One request row (and its HTTP headers) -> raw options + the image's bytes, without decoding the image.

    Options come from `X-CAM-<Option>` headers, from form fields beside the image, or from JSON fields beside
    `data`; a field in the body wins over a header of the same name.
    """
    options = options_from_headers(headers or {})
    options.update({str(k): _option_text(str(k), v) for k, v in row.items() if k not in _IMAGE_FIELDS})
    image_field = next((name for name in _IMAGE_FIELDS if row.get(name) is not None), None)
    if image_field is None:
        raise RequestError(
            "no image: send it as the body, as form field 'data' or 'file', or base64 in JSON field 'data'",
            kind="missing_image",
            option="data",
        )
    payload = row[image_field]
    if isinstance(payload, (bytes, bytearray)) and payload.lstrip()[:1] == b"{":
        try:
            payload = json.loads(payload)
        except RecursionError:
            raise RequestError("the JSON body is nested too deeply", kind="invalid_json") from None
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise RequestError(f"the body starts like JSON but is not valid JSON: {str(error)[:200]}", kind="invalid_json") from None
    if isinstance(payload, dict):  # a JSON object (TorchServe parses application/json bodies itself)
        options.update({str(k): _option_text(str(k), v) for k, v in payload.items() if k != "data"})
        if payload.get("data") is None:
            raise RequestError("the JSON body has no 'data' field with the base64 image", kind="missing_image", option="data")
        image_field, payload = "data", payload["data"]
    elif not isinstance(payload, (bytes, bytearray, str)):
        raise RequestError("a JSON body must be an object with the base64 image under 'data'", kind="invalid_json", option="data")
    return RawRequest(options=options, payload=_as_bytes(payload, image_field), field=image_field)


def decode_request(
    row: Mapping[str, Any], headers: Mapping[str, Any] | None = None, at_least: tuple[int, int] | None = None
) -> DecodedRequest:
    """One request row (and its HTTP headers) -> image + raw options (`at_least`: see decode_image)."""
    raw = read_request(row, headers)
    image, size = decode_image(raw.payload, at_least)
    return DecodedRequest(image=image, options=raw.options, size=size)


_SCALARS = (str, int, float, bool)


def _option_text(name: str, value: Any) -> str:
    """An option's raw text: a string or number as sent, a list of them comma-joined (form fields arrive as bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, _SCALARS):
        return str(value)
    raise RequestError(f"option {name[:40]!r} must be a string, a number or a list of them", kind="invalid_option", option=name[:40])
