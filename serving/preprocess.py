"""Any drawing -> one 28x28 digit in MNIST form. The one preprocessing path for every entry point.

MNIST digits are white ink on black, size-normalised into a 20x20 box keeping their aspect
ratio, then centred by centre of mass in 28x28. Drawings are usually dark ink on a light or
transparent background, any size, anywhere on the canvas.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

BOX = 20  # MNIST's size-normalised box
FIELD = 28
INK_THRESHOLD = 0.25  # fraction of the strongest ink that counts as ink when cropping
NOISE_FLOOR = 0.1  # contrast below this is paper texture, sensor or JPEG noise, not ink
WORKING_SIDE = 140  # canvases are reduced to this first: 7x the 20-pixel box is detail enough
# The formats a drawing may come in. Not every format Pillow reads: ICO and ICNS decode the images
# they hold while they open, before the size check below can refuse a decompression bomb (a 16x16
# icon holding a 9000x9000 PNG), and rarer plugins are more attack surface for no user.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


class InvalidImage(ValueError):
    """The bytes are not a decodable image."""


class ImageTooLarge(ValueError):
    """The image's dimensions exceed the configured pixel limit (decompression bomb guard)."""


class NoInk(ValueError):
    """The image is blank: nothing to recognise."""


class PixelsOutOfRange(ValueError):
    """Pixel values outside MNIST's 0..1 range."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes, checking the dimensions in the header before decoding any pixels."""
    if not data:
        raise InvalidImage("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidImage("the data is not a supported image (PNG, JPEG, GIF, BMP, WebP or TIFF)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height}, more than {max_pixels} pixels")
    if width == 0 or height == 0:
        raise InvalidImage("the image has no pixels")
    try:
        image.seek(0)  # the first frame of an animation
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
        return image
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise InvalidImage("the image is truncated or corrupt") from None


def to_grey(image: Image.Image) -> np.ndarray:
    """Greyscale float32 in 0..1 (1 = white), transparent pixels composited over white, reduced
    so that the longer side is at most WORKING_SIDE."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        if image.mode not in ("I", "F"):
            image = image.convert("I")  # Pillow reduces 32-bit integers, not 16-bit ones
        shrink(image)
        values = np.asarray(image, dtype=np.float32)
        top = 1.0 if image.mode == "F" and values.max() <= 1 else (255.0 if values.max() <= 255 else 65535.0)
        return np.clip(values / top, 0, 1)
    # An alpha channel, or a colour that the file marks as transparent (PNG's tRNS chunk).
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        if image.mode not in ("RGBA", "LA"):  # Pillow converts La only to LA, RGBa only to RGBA
            image = image.convert("LA" if image.mode == "La" else "RGBA")
        shrink(image)  # first: compositing is then on few pixels
        # A canvas PNG's transparent pixels are black in RGB: composite them over white.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    # Grey first, then shrink: one channel to average instead of three.
    grey = image.convert("L") if image.mode in ("L", "RGB", "RGBA", "P", "1", "CMYK", "YCbCr") \
        else image.convert("RGB").convert("L")
    shrink(grey)
    return np.asarray(grey, dtype=np.float32) / 255.0


def shrink(image: Image.Image) -> None:
    """In place, to at most WORKING_SIDE on the longer side, by averaging (a box filter). The
    whole-number part of the factor goes through Image.reduce, an exact block average that costs
    a quarter of resampling (a 280x280 canvas: 0.1 ms instead of 0.4), and resampling does the
    rest (reducing_gap=1.0; thumbnail's default of 2.0 left a 2x reduction to resampling)."""
    if max(image.size) > WORKING_SIDE:
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.BOX, reducing_gap=1.0)


def preprocess_drawing(image: Image.Image) -> np.ndarray:
    """A drawing of one digit -> float32 [28, 28] in MNIST form (white ink on black, 0..1)."""
    grey = to_grey(image)
    background = border_median(grey)
    ink = 1.0 - grey if background > 0.5 else grey  # ink is bright from here on
    floor = min(background, 1.0 - background) + NOISE_FLOOR
    # In place on a fresh array: this runs for every request, and numpy's per-call overhead on
    # arrays this small is most of its cost (np.clip alone costs more than the arithmetic).
    ink = ink - floor
    ink *= 1.0 / max(1e-6, 1.0 - floor)
    np.minimum(ink, 1.0, out=ink)
    np.maximum(ink, 0.0, out=ink)
    strongest = float(ink.max())
    if not strongest > 0:
        raise NoInk("the image contains no drawing (no ink found)")
    mask = ink > INK_THRESHOLD * strongest
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return centre_by_mass(scale_into_box(crop))


def border_median(grey: np.ndarray) -> float:
    """The median of the outermost pixels: the paper's colour."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    middle = len(border) // 2
    if len(border) % 2:
        return float(np.partition(border, middle)[middle])
    low, high = np.partition(border, (middle - 1, middle))[middle - 1:middle + 1]
    return float((low + high) / 2)


def sample_drawing(mode: str = "RGB") -> bytes:
    """A 7 drawn on a white canvas the size of the page's (280x280), as a PNG in `mode` (the page
    sends RGBA). The warm-up reads it, and the benchmarks post it."""
    canvas = Image.new(mode, (10 * FIELD, 10 * FIELD), "white")
    ImageDraw.Draw(canvas).line([(70, 50), (210, 50), (120, 240)], fill="black", width=18)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def warm_up() -> None:
    """Pay the one-time costs of reading a drawing at start-up rather than in the first user's
    request. Pillow imports its image format plugins on first use (16 ms for the first PNG here,
    more for a format outside its five most common), and the first pass of each kind of image
    through the preprocessing costs about twice a later one. The drawings read here are the
    page's kind (RGBA) and the benchmarks' (RGB)."""
    Image.init()
    for mode in ("RGBA", "RGB"):
        preprocess_drawing(decode_image(sample_drawing(mode), (10 * FIELD) ** 2))


def preprocess_pixels(pixels) -> np.ndarray:
    """A JSON 28x28 array already in MNIST form -> float32 [28, 28], validated."""
    try:
        array = np.asarray(pixels, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidImage("pixels must be a 28x28 array of numbers") from None
    except OverflowError:  # a JSON integer too big for a float, such as 10**400
        raise PixelsOutOfRange("pixels must be numbers between 0 and 1 (white ink on black)") from None
    if array.shape != (FIELD, FIELD):
        raise InvalidImage(f"pixels must be 28x28, got shape {list(array.shape)}")
    if not all(type(value) in (int, float) for row in pixels for value in row):
        raise InvalidImage("pixels must be a 28x28 array of numbers (not strings or booleans)")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise PixelsOutOfRange("pixels must be numbers between 0 and 1 (white ink on black)")
    if not array.max() > 0:
        raise NoInk("the pixels are all 0: nothing is drawn")
    return array


def scale_into_box(crop: np.ndarray) -> np.ndarray:
    """Resize so the longer side is BOX pixels, keeping the aspect ratio; peak ink = 1."""
    height, width = crop.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Float ("F") images keep faint, thin strokes of big canvases from rounding to zero.
    resized = Image.fromarray(crop.astype(np.float32), mode="F").resize(
        size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    box = np.maximum(np.asarray(resized, dtype=np.float32), 0.0)  # Lanczos rings below zero
    peak = box.max()
    if not peak > 0:
        raise NoInk("the drawing is too faint or too sparse to read")
    box *= 1.0 / peak
    return box


def centre_by_mass(box: np.ndarray) -> np.ndarray:
    """Place `box` in a 28x28 field so that its centre of mass lands on MNIST's (14, 14)."""
    height, width = box.shape
    total = box.sum()
    cy = float(box.sum(axis=1) @ np.arange(height)) / total
    cx = float(box.sum(axis=0) @ np.arange(width)) / total
    top = int(np.clip(round(FIELD / 2 - cy), 0, FIELD - height))
    left = int(np.clip(round(FIELD / 2 - cx), 0, FIELD - width))
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    field[top:top + height, left:left + width] = box
    return field
