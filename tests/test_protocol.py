"""Request decoding, option parsing and response encoding, without a model or TorchServe."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image, ImageChops

from camserve.protocol.decoding import MAX_PIXELS, RequestError, decode_request
from camserve.protocol.options import OptionRules, parse_options
from camserve.protocol.responses import cam_json, decode_heatmap, encode_answer, heatmap_png_size, json_bytes

RULES = OptionRules(
    methods={"cam", "gradcam"}, layers={"features", "fc"}, labels=["circle", "square", "triangle"], default_method="gradcam", default_topk=3
)


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_raw_body_json_and_form_fields_decode_alike() -> None:
    payload = encoded(Image.new("RGB", (30, 20), "red"))
    as_body = decode_request({"body": payload})
    as_json = decode_request({"body": {"data": base64.b64encode(payload).decode(), "method": "cam"}})
    as_json_bytes = decode_request({"body": json.dumps({"data": base64.b64encode(payload).decode()}).encode()})
    as_form = decode_request({"file": payload, "topk": b"2"})
    assert as_body.image.size == as_json.image.size == as_json_bytes.image.size == as_form.image.size == (30, 20)
    assert as_json.options == {"method": "cam"}
    assert as_form.options == {"topk": "2"}


def test_header_options_and_body_fields_win_over_headers() -> None:
    headers = {"X-CAM-Method": "cam", "X-Cam-Topk": "2", "Accept": "*/*"}
    request = decode_request({"body": encoded(Image.new("RGB", (8, 8)))}, headers)
    assert request.options == {"method": "cam", "topk": "2"}
    payload = base64.b64encode(encoded(Image.new("RGB", (8, 8)))).decode()
    assert decode_request({"body": {"data": payload, "method": "layercam"}}, headers).options["method"] == "layercam"


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_request({"body": encoded(image, "JPEG", exif=exif)})
    assert decoded.image.size == decoded.size == (10, 40)


def test_a_large_jpeg_decodes_at_reduced_scale_but_keeps_its_full_size() -> None:
    photo = Image.radial_gradient("L").resize((1280, 960)).convert("RGB")
    reduced = decode_request({"body": encoded(photo, "JPEG")}, at_least=(224, 224))
    # The smallest DCT scale that still covers 224 x 224: a quarter.
    assert reduced.image.size == (320, 240)
    assert reduced.size == (1280, 960)
    full = decode_request({"body": encoded(photo, "JPEG")})
    assert full.image.size == full.size == (1280, 960)
    # Close to a resize of the full decode: what the model sees barely changes.
    difference = ImageChops.difference(reduced.image.resize((224, 224)), full.image.resize((224, 224)))
    assert max(high for _low, high in difference.getextrema()) <= 12
    # Turned by EXIF: the size as shown swaps; other formats are decoded in full.
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = decode_request({"body": encoded(photo, "JPEG", exif=exif)}, at_least=(224, 224))
    assert turned.image.size == (240, 320)
    assert turned.size == (960, 1280)
    png = decode_request({"body": encoded(photo, "PNG")}, at_least=(224, 224))
    assert png.image.size == png.size == (1280, 960)


def test_transparency_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_request({"body": encoded(image)}).image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("row", "kind"),
    [
        ({"body": b""}, "empty_body"),
        ({"body": b"hello, not an image"}, "invalid_image"),
        ({"body": encoded(Image.new("RGB", (50, 50)))[:60]}, "invalid_image"),
        ({"body": b"{not json"}, "invalid_json"),
        ({"body": {"image": "x"}}, "missing_image"),
        ({"body": {"data": "%%% not base64"}}, "invalid_base64"),
        ({}, "missing_image"),
    ],
)
def test_bad_requests_name_the_problem(row: dict, kind: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode_request(row)
    assert caught.value.kind == kind
    assert 400 <= caught.value.status < 500


def test_declared_size_over_the_pixel_limit_is_refused_before_decoding() -> None:
    side = int(MAX_PIXELS**0.5) + 10
    # A PNG header declaring side x side pixels; decoding it would need gigabytes.
    bomb = encoded(Image.new("1", (side, side)))
    with pytest.raises(RequestError) as caught:
        decode_request({"body": bomb})
    assert caught.value.status == 413


def test_options_defaults_and_validation() -> None:
    options = parse_options({}, RULES)
    assert (options.method, options.topk, options.output, options.maps, options.targets) == ("gradcam", 3, "png", 1, None)
    assert parse_options({"method": "none"}, RULES).method is None
    assert parse_options({"target": "square,0"}, RULES).targets == (1, 0)
    assert parse_options({}, RULES, accept="image/jpeg").output == "overlay"
    invalid = "method=magic target=9 target=dog layer=nope topk=0 output=svg colour=red"
    invalid += " heatmap_size=huge heatmap_size=7 heatmap_size=4097 heatmap_size=-64 heatmap_size=²"
    for option, value in (pair.split("=") for pair in invalid.split()):
        with pytest.raises(RequestError) as caught:
            parse_options({option: value}, RULES)
        assert caught.value.option == option
        assert caught.value.status == 400


def test_cam_json_box_and_peak_are_those_of_the_full_size_map() -> None:
    grid = torch.zeros(7, 7)
    grid[2, 4] = 1.0
    grid[5, 1] = 0.6
    cam = cam_json(grid, (320, 240), "gradcam", ("features",), 1, ["a", "b"])
    assert cam["size"] == [320, 240]
    assert cam["label"] == "b"
    assert cam["layer"] == "features"
    heatmap = decode_heatmap(cam["heatmap"])
    assert heatmap.shape == (240, 320)
    x, y = cam["peak"]
    assert heatmap[y, x] == heatmap.max()
    assert 4 * 320 / 7 <= x < 5 * 320 / 7
    assert 2 * 240 / 7 <= y < 3 * 240 / 7
    x0, y0, x1, y1 = cam["bbox"]
    assert x0 <= x < x1
    assert y0 <= y < y1
    assert x0 >= 3 * 320 / 7
    assert y1 <= 4 * 240 / 7


def test_heatmap_size_option_and_the_size_it_gives() -> None:
    assert parse_options({}, RULES).heatmap_size == "auto"
    assert parse_options({"heatmap_size": "Original"}, RULES).heatmap_size == "original"
    assert parse_options({"heatmap_size": " Input "}, RULES).heatmap_size == "input"
    assert parse_options({"heatmap_size": "8"}, RULES).heatmap_size == 8
    assert parse_options({"heatmap_size": "4096"}, RULES).heatmap_size == 4096
    # As a header: X-CAM-Heatmap-Size.
    request = decode_request({"body": encoded(Image.new("RGB", (8, 8)))}, {"X-CAM-Heatmap-Size": "256"})
    assert parse_options(request.options, RULES).heatmap_size == 256
    assert heatmap_png_size("original", (1280, 960), (128, 128)) == (1280, 960)
    assert heatmap_png_size("input", (1280, 960), (224, 200)) == (200, 224)  # input_size is (height, width)
    assert heatmap_png_size(320, (1280, 960), None) == (320, 240)
    assert heatmap_png_size(320, (960, 1280), None) == (240, 320)
    assert heatmap_png_size(320, (200, 100), None) == (200, 100)  # never enlarged
    assert heatmap_png_size(8, (4000, 10), None) == (8, 1)
    # auto: the model input's longest side, the image's aspect ratio, never enlarged.
    assert heatmap_png_size("auto", (640, 480), (224, 224)) == heatmap_png_size("auto", (1280, 960), (224, 224)) == (224, 168)
    assert heatmap_png_size("auto", (4000, 3000), (192, 192)) == (192, 144)
    assert heatmap_png_size("auto", (480, 640), (224, 200)) == (168, 224)
    assert heatmap_png_size("auto", (1, 20), (224, 224)) == (1, 20)  # a strip smaller than the input stays as it is
    assert heatmap_png_size("auto", (12, 240), (192, 192)) == (10, 192)
    assert heatmap_png_size("auto", (4000, 200), (224, 224)) == (224, 11)
    with pytest.raises(ValueError, match="input_size"):
        heatmap_png_size("auto", (640, 480), None)


def test_a_smaller_heatmap_keeps_size_peak_and_box_of_the_original() -> None:
    grid = torch.zeros(7, 7)
    grid[2, 4], grid[5, 1] = 1.0, 0.6
    probabilities = torch.tensor([0.1, 0.9])

    def answer(raw: dict[str, str]) -> dict:
        body, content_type = encode_answer(
            parse_options(raw, RULES), probabilities, grid[None], [1], (640, 480), ("features",), ["a", "b"], input_size=(224, 224)
        )
        assert content_type == "application/json"
        return body["cam"]

    cam, default, full = answer({"heatmap_size": "160"}), answer({}), answer({"heatmap_size": "original"})
    assert cam["size"] == default["size"] == full["size"] == [640, 480]
    assert cam["heatmap_size"] == [160, 120]
    assert decode_heatmap(cam["heatmap"]).shape == (120, 160)
    assert default["heatmap_size"] == [224, 168]
    assert decode_heatmap(default["heatmap"]).shape == (168, 224)
    assert full["heatmap_size"] == [640, 480]
    assert decode_heatmap(full["heatmap"]).shape == (480, 640)
    assert (cam["peak"], cam["bbox"]) == (default["peak"], default["bbox"]) == (full["peak"], full["bbox"])
    assert "empty" not in cam
    assert "empty" not in default
    assert "empty" not in full


EMPTY_MAPS = {
    "zero": torch.zeros(7, 7),
    "nan": torch.full((7, 7), float("nan")),
    "one nan": torch.where(torch.eye(7) > 0, torch.tensor(float("nan")), torch.rand(7, 7, generator=torch.Generator().manual_seed(0))),
    "infinite": torch.where(torch.eye(7) > 0, torch.tensor(float("inf")), torch.zeros(7, 7)),
    "negative": torch.full((7, 7), -0.25),
}


@pytest.mark.parametrize("name", list(EMPTY_MAPS))
@pytest.mark.parametrize("heatmap_size", ["auto", "original", "64"])
def test_an_empty_map_has_no_box_and_no_peak_and_says_so(name: str, heatmap_size: str) -> None:
    """A box around the whole image and a peak in its corner would claim what an empty map does not say."""
    grid = EMPTY_MAPS[name]
    options = parse_options({"heatmap_size": heatmap_size}, RULES)
    body, _ = encode_answer(
        options, torch.tensor([0.5, 0.5]), grid[None], [0], (640, 480), ("features",), ["a", "b"], input_size=(224, 224)
    )
    cam = body["cam"]
    assert (cam["bbox"], cam["peak"], cam["empty"]) == (None, None, True)
    assert list(cam)[-3:] == ["bbox", "peak", "empty"]
    width, height = cam["heatmap_size"]
    assert cam["size"] == [640, 480]
    assert (decode_heatmap(cam["heatmap"]) == 0).all()
    assert decode_heatmap(cam["heatmap"]).shape == (height, width)
    assert b"NaN" not in json_bytes(body)
    assert b"Infinity" not in json_bytes(body)

    grid_body, _ = encode_answer(
        parse_options({"output": "grid"}, RULES), torch.tensor([0.5, 0.5]), grid[None], [0], (640, 480), ("features",), ["a", "b"]
    )
    assert grid_body["cam"]["empty"] is True
    assert grid_body["cam"]["grid"] == [[0.0] * 7] * 7
    assert json.loads(json_bytes(grid_body)) == grid_body

    overlay, content_type = encode_answer(
        parse_options({}, RULES, accept="image/png"), torch.tensor([0.5, 0.5]), grid[None], [0], (64, 48), ("features",), ["a", "b"],
        image=Image.new("RGB", (64, 48), "green"),
    )  # fmt: skip
    assert content_type == "image/png"
    with Image.open(io.BytesIO(overlay)) as drawn:  # nothing drawn over the image
        assert ImageChops.difference(drawn.convert("RGB"), Image.new("RGB", (64, 48), "green")).getbbox() is None


def test_a_map_that_points_somewhere_is_not_empty() -> None:
    grid = torch.zeros(7, 7)
    grid[3, 3] = 1e-6  # faint, but a peak
    body, _ = encode_answer(
        parse_options({"output": "grid"}, RULES), torch.tensor([0.5, 0.5]), grid[None], [0], (640, 480), ("features",), ["a", "b"]
    )
    assert "empty" not in body["cam"]
    cam = cam_json(grid, (640, 480), "gradcam", ("features",), 0, ["a", "b"])
    assert "empty" not in cam
    assert cam["bbox"] is not None
    assert cam["peak"] is not None


def test_json_bytes_are_compact_json() -> None:
    body = {"predictions": [{"index": 1, "label": "é", "probability": 0.5}], "cam": {"bbox": [1, 2, 3, 4]}}
    assert json_bytes(body) == b'{"predictions":[{"index":1,"label":"\\u00e9","probability":0.5}],"cam":{"bbox":[1,2,3,4]}}'
    assert json.loads(json_bytes(body)) == body


def test_an_error_that_quotes_a_lone_surrogate_stays_strict_utf8() -> None:
    """A JSON body's "\\ud800" decodes to a lone surrogate; quoted back, it must not make the error invalid UTF-8."""
    rules = OptionRules(methods=["gradcam"], layers=["features"], labels=["a", "b"], default_method="gradcam", default_topk=1)
    with pytest.raises(RequestError) as refused:
        parse_options({"method": "\ud800x", "m\udfffethod": "y"}, rules)
    body = json_bytes(refused.value.to_json())
    assert json.loads(body.decode("utf-8", errors="strict"))["type"] in ("unknown_option", "invalid_option")
    assert "\\ud" in refused.value.to_json()["message"]
