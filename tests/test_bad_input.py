"""Named bad (and odd but good) inputs: each gets a clear 4xx JSON error or a correct answer,
never a 5xx, and the service keeps answering.

Already specified elsewhere, so not repeated here: not-an-image bytes, a truncated PNG, an empty
raw body, PNGs whose header claims huge dimensions and a body over the limit (test_gateway.py);
an EXIF-rotated JPEG turned upright (test_preprocess.py); an empty prompt, a 4,000-character
prompt and one over the limit, a prompt with NUL and zero-width characters, an emoji sent as a
surrogate pair, a body with \\xff\\xfe bytes (test_text.py).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time

import numpy as np
import pytest
import requests
from conftest import predict
from drawings import chunked, draw_digit, padded_png, png_bytes
from PIL import Image


def predict_raw(gateway, data: bytes, content_type: str = "image/png") -> requests.Response:
    return predict(gateway, data=data, headers={"Content-Type": content_type})


def generate_raw(gateway, body: bytes, path: str = "/v1/text/generate") -> requests.Response:
    return requests.post(gateway.url + path, data=body, timeout=60,
                         headers={"Content-Type": "application/json"})


def digit_of(response: requests.Response) -> int:
    assert response.status_code == 200, response.text
    [prediction] = response.json()["predictions"]
    return prediction["digit"]


def assert_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in response.text


@pytest.fixture(autouse=True)
def keeps_answering(gateway):
    """After every bad input, the gateway still reads a drawing correctly."""
    yield
    assert requests.get(gateway.url + "/healthz", timeout=5).status_code == 200
    assert digit_of(predict_raw(gateway, png_bytes(draw_digit(2)))) == 2


# --- images: broken -----------------------------------------------------------------------------

def corrupt_png_data() -> bytes:
    """A real PNG whose compressed pixel data (IDAT) is overwritten, CRC fixed up: zlib fails."""
    import struct
    import zlib

    data = bytearray(png_bytes(draw_digit(5)))
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4:at])[0]
    garbage = (bytes(range(256)) * (length // 256 + 1))[:length - 20]
    data[at + 4 + 10:at + 4 + length - 10] = garbage
    data[at + 4 + length:at + 8 + length] = struct.pack(">I", zlib.crc32(data[at:at + 4 + length]))
    return bytes(data)


def png_with_wrong_crc() -> bytes:
    data = bytearray(png_bytes(draw_digit(5)))
    at = data.index(b"IDAT")
    data[at + 10] ^= 0xFF  # a flipped byte in the pixel data: the chunk's CRC no longer matches
    return bytes(data)


@pytest.mark.parametrize("data, content_type", [
    pytest.param(corrupt_png_data(), "image/png", id="png-garbage-pixel-data"),
    pytest.param(png_with_wrong_crc(), "image/png", id="png-wrong-crc"),
    pytest.param(png_bytes(draw_digit(5), format="JPEG")[:400], "image/jpeg", id="jpeg-truncated"),
    pytest.param(png_bytes(draw_digit(5).convert("P"), format="GIF")[:300], "image/gif", id="gif-truncated"),
    pytest.param(png_bytes(draw_digit(5), format="WEBP")[:200], "image/webp", id="webp-truncated"),
    pytest.param(b"\x89PNG\r\n\x1a\n", "image/png", id="png-signature-only"),
    pytest.param(b"GIF89a" + b"\xff" * 20, "image/gif", id="gif-header-garbage"),
])
def test_corrupt_or_truncated_image_is_400(gateway, data, content_type):
    assert_error(predict_raw(gateway, data, content_type), 400, "invalid_image")


@pytest.mark.parametrize("kwargs", [
    pytest.param({"files": {"image": ("empty.png", b"", "image/png")}}, id="multipart-empty-file"),
    pytest.param({"json": {"image": ""}}, id="json-empty-base64"),
    pytest.param({"json": {"image": "data:image/png;base64,"}}, id="json-empty-data-url"),
    pytest.param({"json": {"images": [base64.b64encode(png_bytes(draw_digit(1))).decode(), ""]}},
                 id="json-second-image-empty"),
])
def test_empty_image_in_any_form_is_400(gateway, kwargs):
    response = predict(gateway, **kwargs)
    assert_error(response, 400, "invalid_image")
    assert "empty" in response.json()["error"]["message"]


# --- images: unusual but valid ------------------------------------------------------------------

def animation(format: str, first: int, second: int) -> bytes:
    frames = [draw_digit(first), draw_digit(second)]
    if format == "GIF":
        frames = [frame.convert("P") for frame in frames]
    return png_bytes(frames[0], format=format, save_all=True, append_images=frames[1:], duration=200, loop=0)


@pytest.mark.parametrize("format", ["GIF", "PNG"], ids=["animated-gif", "apng"])
def test_animated_image_is_read_from_its_first_frame(gateway, format):
    """Decided and documented: an animation is read from its first frame, as a browser shows it
    before it plays. The second frame is a different digit, so the answer tells which was read."""
    data = animation(format, first=7, second=1)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert digit_of(predict_raw(gateway, data, f"image/{format.lower()}")) == 7


def test_16_bit_greyscale_png_is_read(gateway):
    grey = np.asarray(draw_digit(4).convert("L"), dtype=np.uint16) * 257  # 0..65535
    image = Image.fromarray(grey)
    data = png_bytes(image)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert digit_of(predict_raw(gateway, data)) == 4


def test_cmyk_jpeg_is_read(gateway):
    data = png_bytes(draw_digit(3).convert("CMYK"), format="JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert digit_of(predict_raw(gateway, data, "image/jpeg")) == 3


def test_palette_png_with_a_transparent_background_is_composited_over_white(gateway):
    """Index 0 is transparent *black*: read without its transparency the canvas is all black."""
    ink = np.asarray(draw_digit(6).convert("L")) < 128
    image = Image.fromarray(ink.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 0, 0, 0])  # both entries black; only the transparency tells them apart
    data = png_bytes(image, format="PNG", transparency=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and opened.info["transparency"] == 0
    assert digit_of(predict_raw(gateway, data)) == 6


def test_palette_png_with_partly_transparent_entries(gateway):
    """A tRNS chunk with one alpha per palette entry: ink opaque, paper fully transparent."""
    ink = np.asarray(draw_digit(9).convert("L")) < 128
    image = Image.fromarray(np.where(ink, 1, 0).astype(np.uint8), mode="P")
    image.putpalette([40, 40, 40, 20, 20, 20])
    data = png_bytes(image, format="PNG", transparency=bytes([0, 255]))
    assert digit_of(predict_raw(gateway, data)) == 9


# --- images: too big ----------------------------------------------------------------------------

def blank_png(width: int, height: int, mode: str = "1") -> bytes:
    return png_bytes(Image.new(mode, (width, height), 0), format="PNG", optimize=True)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A real decompression bomb: 6000x6000 pixels (36 million) in about 4 KB of PNG."""
    data = blank_png(6000, 6000)
    assert len(data) < 10_000
    return data


def test_decompression_bomb_is_413_before_it_is_decoded(gateway, bomb):
    started = time.perf_counter()
    response = predict_raw(gateway, bomb)
    assert_error(response, 413, "image_too_large")
    assert "6000x6000" in response.json()["error"]["message"]
    assert time.perf_counter() - started < 2  # decoding 36 megapixels first would take longer


def test_an_icon_holding_a_decompression_bomb_is_refused_before_it_is_decoded(gateway, bomb):
    """An ICO's directory says 16x16, but Pillow decodes the PNG it holds while it opens it:
    icons are not a format a drawing comes in, and are refused unread."""
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(bomb), 22)
    started = time.perf_counter()
    assert_error(predict_raw(gateway, icon + bomb, "image/x-icon"), 400, "invalid_image")
    assert time.perf_counter() - started < 2


def test_decompression_bomb_in_json_and_multipart_is_413(gateway, bomb):
    assert_error(predict(gateway, json={"image": base64.b64encode(bomb).decode()}), 413, "image_too_large")
    assert_error(predict(gateway, files={"image": ("bomb.png", bomb, "image/png")}), 413, "image_too_large")


def test_pixel_limit_is_exact(gateway):
    """4096x4096 is at the limit and is decoded (blank: no ink); one more column is over it."""
    side = int(gateway.settings.max_image_pixels ** 0.5)
    assert side * side == gateway.settings.max_image_pixels
    assert_error(predict_raw(gateway, blank_png(side, side, "L")), 422, "no_ink")
    assert_error(predict_raw(gateway, blank_png(side + 1, side, "L")), 413, "image_too_large")


def test_enormous_chunked_body_without_a_length_is_413(gateway):
    """No Content-Length to refuse up front: the limit is enforced while the body is read."""
    mib = 1024 * 1024
    body = chunked(b"\0" * (gateway.settings.max_body_bytes // mib + 2) * mib, mib)
    response = predict(gateway, data=body, headers={"Content-Type": "image/png"})
    assert_error(response, 413, "request_entity_too_large")


def test_a_chunked_body_of_exactly_the_limit_is_read_whole(gateway):
    """A drawing padded after its PNG end to exactly the limit is served; one byte more is 413."""
    padded = padded_png(3, gateway.settings.max_body_bytes)
    response = predict(gateway, data=chunked(padded), headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["digit"] == 3
    assert_error(predict(gateway, data=chunked(padded + b"\0"), headers={"Content-Type": "image/png"}),
                 413, "request_entity_too_large")


# --- text ---------------------------------------------------------------------------------------

def test_a_huge_prompt_is_413_at_once(gateway):
    started = time.perf_counter()
    response = generate_raw(gateway, json.dumps({"prompt": "x" * 5_000_000}).encode())
    assert_error(response, 413, "prompt_too_long")
    assert time.perf_counter() - started < 5


def test_the_prompt_limit_counts_characters_not_bytes(gateway):
    prompt = "🎭" * gateway.settings.max_prompt_chars  # 16,000 bytes of UTF-8
    response = generate_raw(gateway, json.dumps({"prompt": prompt, "max_chars": 5, "seed": 1},
                                                ensure_ascii=False).encode())
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == prompt and len(response.json()["text"]) == 5


def test_every_control_character_in_a_prompt_is_read_and_echoed_exactly(gateway):
    controls = "".join(map(chr, [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0xFEFF]))
    response = generate_raw(gateway, json.dumps({"prompt": "A" + controls + "B", "max_chars": 10,
                                                 "seed": 1}).encode())
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == "A" + controls + "B"
    assert len(response.json()["text"]) == 10


@pytest.mark.parametrize("raw", [
    pytest.param(b"\xc0\xaf", id="overlong-slash"),
    pytest.param(b"\xed\xa0\x80", id="utf8-encoded-surrogate"),
    pytest.param(b"\xe2\x82", id="truncated-sequence"),
    pytest.param(b"\xf8\x88\x80\x80\x80", id="five-byte-sequence"),
    pytest.param(b"\x80", id="lone-continuation-byte"),
])
def test_invalid_utf8_in_the_body_is_400(gateway, raw):
    assert_error(generate_raw(gateway, b'{"prompt": "A' + raw + b'B"}'), 400, "bad_request")


@pytest.mark.parametrize("escaped, text", [
    (r"\ud83c\udfad", "🎭"),
    (r"\uD83D\uDE00 ok", "😀 ok"),
    (r"\ud800\udc00", "\U00010000"),  # the lowest pair
    (r"\udbff\udfff", "\U0010ffff"),  # the highest pair
])
def test_surrogate_pairs_as_json_escapes_are_one_character(gateway, escaped, text):
    response = generate_raw(gateway, b'{"prompt": "' + escaped.encode() + b'", "max_chars": 5, "seed": 1}')
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == text


@pytest.mark.parametrize("escaped", [
    r"\ud800", r"\udc00", r"A\ud83c", r"\udfadA", r"\udc00\ud800", r"\ud800\ud800", r"\ud800a\udc00",
])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_lone_surrogates_as_json_escapes_are_400(gateway, escaped, stream):
    body = b'{"prompt": "' + escaped.encode() + b'", "stream": ' + json.dumps(stream).encode() + b"}"
    response = generate_raw(gateway, body)
    assert_error(response, 400, "bad_request")
    assert "surrogate" in response.json()["error"]["message"]


def test_lone_surrogate_in_a_version_label_is_400_not_a_crash(gateway):
    """The label goes to the model server as protobuf UTF-8, which cannot hold a lone surrogate."""
    pixels = json.dumps([[0.5] * 28] * 28).encode()
    for url in ("/v1/text/generate", "/v1/digits/predict"):
        body = b'{"prompt": "A", "pixels": ' + pixels + b', "label": "\\ud800"}'
        assert_error(generate_raw(gateway, body, url), 400, "bad_request")


# --- JSON itself --------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["/v1/text/generate", "/v1/digits/predict"])
def test_json_nested_too_deeply_to_parse_is_400(gateway, url):
    """Python's parser gives up on 100,000 nested arrays with a RecursionError, not a ValueError."""
    body = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_error(generate_raw(gateway, body, url), 400, "bad_request")


def test_pixels_with_a_number_too_big_for_a_float_are_422(gateway):
    body = b'{"pixels": [' + b",".join([b"[" + b",".join([b"1" + b"0" * 400] * 28) + b"]"] * 28) + b"]}"
    response = predict(gateway, data=body, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "out_of_range")
