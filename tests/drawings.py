"""Digits drawn the way a person draws them: strokes on a canvas, rendered by the tests."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

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
               background=(255, 255, 255), mode: str = "RGB", box=None) -> Image.Image:
    """Render `digit` with strokes into an image; `box` = (left, top, side) on the canvas."""
    left, top, side = box or (size * 0.2, size * 0.15, size * 0.7)
    image = Image.new(mode, (size, size), background)
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
