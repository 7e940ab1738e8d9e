"""Digits drawn the way a person draws them: strokes on a canvas, rendered by the tests."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Strokes per digit in a 100x100 box; each stroke is a polyline of (x, y) points.


def _arc(cx, cy, rx, ry, start, end, n=24):
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in (start + (end - start) * i / n for i in range(n + 1))]


STROKES = {
    0: [_arc(50, 50, 26, 42, 0, 360)],
    1: [[(42, 20), (55, 8), (55, 92)]],
    2: [_arc(50, 32, 24, 22, 200, 360) + [(72, 40), (28, 92), (76, 92)]],
    3: [_arc(48, 30, 22, 20, 210, 450), _arc(48, 70, 25, 22, 270, 510)],
    4: [[(62, 8), (22, 64), (80, 64)], [(62, 30), (62, 94)]],
    5: [[(72, 10), (34, 10), (30, 46)] + _arc(48, 66, 26, 26, 230, 480)],
    6: [[(68, 10), (40, 40), (26, 66)] + _arc(50, 70, 24, 22, 180, 540)],
    7: [[(24, 12), (76, 12), (40, 94)]],
    8: [_arc(50, 30, 20, 20, 90, 450), _arc(50, 70, 25, 23, 270, 630)],
    9: [_arc(50, 32, 22, 22, 0, 360), [(72, 32), (68, 94)]],
}


def draw_digit(digit: int, size: int = 280, width: int | None = None, ink=(0, 0, 0),
               background=(255, 255, 255), mode: str = "RGB", box=None, canvas=None) -> Image.Image:
    """Render `digit` with strokes into a `size` square (or a `canvas` = (width, height)) image;
    `box` = (left, top, side) on the canvas."""
    left, top, side = box or (size * 0.2, size * 0.15, size * 0.7)
    image = Image.new(mode, canvas or (size, size), background)
    pen = ImageDraw.Draw(image)
    width = width or max(1, round(side * 0.09))
    for stroke in STROKES[digit]:
        points = [(left + x * side / 100, top + y * side / 100) for x, y in stroke]
        pen.line(points, fill=ink, width=width, joint="curve")
        for x, y in (points[0], points[-1]):
            pen.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=ink)
    return image


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save_args.pop("format", "PNG"), **save_args)
    return buffer.getvalue()


def padded_png(digit: int, size: int) -> bytes:
    """A PNG drawing of `digit` padded with zeros to `size` bytes, after its end chunk (which
    decoders ignore): a valid image body of an exact size."""
    png = png_bytes(draw_digit(digit))
    return png + b"\0" * (size - len(png))


def chunked(body: bytes, size: int = 65536):
    """`body` as a generator, which requests sends with Transfer-Encoding: chunked."""
    yield from (body[i:i + size] for i in range(0, len(body), size))


PAPERS = ("plain", "ruled", "squared")
INKS = {"pencil": (0.42, 0.42, 0.45), "blue": (0.12, 0.2, 0.62), "black": (0.1, 0.1, 0.12)}
LIGHTS = ("gradient", "vignette", "lamp")


def photo_of_digit(digit: int, paper: str = "ruled", ink: str = "blue", light: str = "lamp",
                   size: tuple[int, int] = (800, 600), seed: int = 0, quality: int = 60) -> bytes:
    """A JPEG as a phone takes it of `digit` written on paper under a lamp: the same strokes as
    clean_strokes(digit, ...) draws, on off-white paper (ruled or squared with thin blue-grey
    lines, or plain), in grey pencil (grainy) or ink, lit unevenly ("gradient": light falling off
    across the sheet to half; "vignette": dark corners; "lamp": both, and a warm cast), slightly
    out of focus, with sensor noise, saved at JPEG quality `quality`."""
    rng = np.random.default_rng(seed)
    width, height = size
    reflectance = np.ones((height, width, 3), np.float32) * np.array([0.93, 0.92, 0.88], np.float32)
    reflectance *= 1 + rng.normal(0, 0.012, (height, width, 1)).astype(np.float32)  # paper grain
    line = np.array([0.62, 0.72, 0.86], np.float32)  # light blue-grey print
    spacing = round(height / 14)
    if paper in ("ruled", "squared"):
        for y in range(int(rng.integers(0, spacing)), height, spacing):
            reflectance[y:y + 2] = line
    if paper == "squared":
        for x in range(int(rng.integers(0, spacing)), width, spacing):
            reflectance[:, x:x + 2] = line
    strokes = stroke_mask(digit, size, seed)
    if ink == "pencil":  # graphite leaves grainy, uneven grey
        strokes *= np.clip(rng.normal(0.85, 0.2, strokes.shape), 0.3, 1).astype(np.float32)
    strokes = strokes[..., None]
    reflectance = reflectance * (1 - strokes) + np.array(INKS[ink], np.float32) * strokes
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    along = (np.cos(angle) * (xs / width - 0.5) + np.sin(angle) * (ys / height - 0.5)) / 1.2 + 0.5
    gradient = 1.0 - 0.5 * np.clip(along, 0, 1)  # from full light down to half across the sheet
    radius = np.hypot(xs / width - 0.5, ys / height - 0.5) / math.hypot(0.5, 0.5)
    vignette = 1.0 - 0.45 * radius ** 2
    illumination = {"gradient": gradient, "vignette": vignette, "lamp": gradient * vignette}[light]
    cast = np.array([1.0, 0.95, 0.82] if light == "lamp" else [1.0, 1.0, 1.0], np.float32)
    photo = reflectance * illumination[..., None] * cast
    photo += rng.normal(0, 0.015, photo.shape).astype(np.float32)  # sensor noise
    image = Image.fromarray((np.clip(photo, 0, 1) * 255).astype(np.uint8), "RGB")
    image = image.filter(ImageFilter.GaussianBlur(1.0))  # not quite in focus
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def stroke_mask(digit: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Float [height, width] coverage of `digit`'s strokes written with a pen: a third of the
    sheet's height, somewhere off centre, strokes 2.5% of the digit's height wide, antialiased."""
    rng = np.random.default_rng(seed + 1)
    width, height = size
    side = height * rng.uniform(0.3, 0.4)
    left = rng.uniform(0.15 * width, width - side - 0.15 * width)
    top = rng.uniform(0.1 * height, height - side - 0.1 * height)
    scale = 2  # drawn at twice the size, then reduced: antialiased edges
    mask = draw_digit(digit, size=1, width=max(1, round(side * 0.025 * scale)), ink=255, background=0,
                      mode="L", box=(left * scale, top * scale, side * scale),
                      canvas=(width * scale, height * scale))
    return np.asarray(mask.resize(size, Image.Resampling.BOX), np.float32) / 255.0


def clean_strokes(digit: int, seed: int = 0, size: tuple[int, int] = (800, 600)) -> bytes:
    """The strokes of photo_of_digit(digit, seed=seed), drawn black on white as a canvas PNG."""
    mask = stroke_mask(digit, size, seed)
    return png_bytes(Image.fromarray(((1 - mask) * 255).astype(np.uint8), "L"))
