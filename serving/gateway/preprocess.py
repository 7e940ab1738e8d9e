"""Any drawing -> one 28x28 digit in MNIST form. The one preprocessing path for every entry point.

MNIST digits are white ink on black, size-normalised into a 20x20 box keeping their aspect
ratio, then centred by centre of mass in 28x28, with strokes about a tenth of the digit wide.
Drawings are usually dark ink on a light or transparent background, any size, anywhere on the
canvas. Photos of a digit written on paper add what the camera saw: a lamp's light falling off
across the sheet, dark corners, ruled or squared lines, pencil grain, JPEG noise, and pen
strokes a few hundredths of the digit wide. OpenCV's headless build does the image work that
numpy would do slowly: resizing, a median, morphology, connected pieces.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

BOX = 20  # MNIST's size-normalised box
FIELD = 28
INK_THRESHOLD = 0.25  # fraction of the strongest ink that counts as a stroke...
FAINT_INK = 0.12  # ...and as a faint stretch of one, where it joins a stroke
MNIST_STROKE = 0.12  # MNIST's strokes: a median of 0.11 to 0.12 of the digit's size (2.3 of 20 pixels)
NOISE_FLOOR = 0.1  # contrast below this is paper texture, sensor or JPEG noise, not ink
STANDS_OUT = 0.15  # a pixel this much darker (or lighter) than the paper around it is ink
EVEN_LIGHT = 0.05  # paper whose edges all lie this close to one colour (but for 5%) is a canvas
PAPER_SPREAD = 0.06  # paper grain and noise: how far below the fitted light paper still lies
LINE_SPAN = 0.75  # a straight run of ink across this much of the image is a ruled line...
LINE_INK = 0.02  # (any ink above the noise, or fainter than a stroke: printed lines are faint)
LINE_THICK = 4  # ...if it is thinner than this many pixels (at the working size)
LINE_UNDER_STROKE = 1.6  # ink this many times a line's is a stroke crossing the line
PIECE_SHARE = 0.08  # a piece of ink with less than this share of the biggest piece's is a speck
SOFT_EDGE = np.ones((3, 3), np.uint8)  # a stroke's antialiased edge is kept around its pixels
WORKING_SIDE = 140  # canvases are reduced to this first: 7x the 20-pixel box is detail enough
# Photos (images over twice that) to this: a digit written small on a sheet keeps its pen strokes.
PHOTO_WORKING_SIDE = 280
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
    so that the longer side is at most WORKING_SIDE (PHOTO_WORKING_SIDE for photos)."""
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
        # A canvas PNG's transparent pixels are black in RGB: composite them over white, in
        # OpenCV's saturating 8-bit arithmetic (grey x alpha / 255 + white x (1 - alpha)).
        alpha = np.asarray(image.getchannel("A"))
        grey = cv2.add(cv2.multiply(np.asarray(image.convert("L")), alpha, scale=1 / 255), 255 - alpha)
        return reduced(grey).astype(np.float32) * (1 / 255)
    # Grey first, then reduce: one channel to average instead of three.
    grey = np.asarray(image.convert("L") if image.mode in ("L", "RGB", "RGBA", "P", "1", "CMYK", "YCbCr")
                      else image.convert("RGB").convert("L"))
    return reduced(grey).astype(np.float32) * (1 / 255)


def reduced(values: np.ndarray) -> np.ndarray:
    """`values` averaged down so that the longer side is at most working_side(it): OpenCV's area
    reduction, the same block average as Pillow's thumbnail in a third of the time."""
    height, width = values.shape
    side = working_side(max(height, width))
    if max(height, width) <= side:
        return values
    scale = side / max(height, width)
    return cv2.resize(values, (max(1, round(width * scale)), max(1, round(height * scale))),
                      interpolation=cv2.INTER_AREA)


def shrink(image: Image.Image) -> None:
    """In place, to at most WORKING_SIDE on the longer side (PHOTO_WORKING_SIDE for an image over
    twice that), by averaging (a box filter). The whole-number part of the factor goes through
    Image.reduce, an exact block average far cheaper than resampling, and resampling does the rest
    (reducing_gap=1.0; thumbnail's default of 2.0 left a 2x reduction to resampling)."""
    side = working_side(max(image.size))
    if max(image.size) > side:
        image.thumbnail((side, side), Image.Resampling.BOX, reducing_gap=1.0)


def working_side(longest: int) -> int:
    """The longest side an image of `longest` pixels is reduced to: a canvas to WORKING_SIDE,
    a photo (an image over twice that) to PHOTO_WORKING_SIDE."""
    return WORKING_SIDE if longest <= 2 * WORKING_SIDE else PHOTO_WORKING_SIDE


def preprocess_drawing(image: Image.Image) -> np.ndarray:
    """A drawing or a photo of one digit -> float32 [28, 28] in MNIST form (white ink on black,
    0..1): the paper's light removed, ruled and grid lines dropped, cropped to the digit's own
    strokes, scaled into MNIST's 20x20 box and centred by mass."""
    ink = ink_on_paper(to_grey(image))
    ink -= NOISE_FLOOR  # paper texture, sensor and JPEG noise
    ink *= 1.0 / (1.0 - NOISE_FLOOR)
    np.maximum(ink, 0.0, out=ink)
    strongest = float(ink.max())
    if not strongest > 0:
        raise NoInk("the image contains no drawing (no ink found)")
    strokes = ink > FAINT_INK * strongest
    strokes &= ~ruled_lines(ink, min(LINE_INK, FAINT_INK * strongest))
    digit = digit_strokes(strokes, ink, ink > INK_THRESHOLD * strongest)
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    digit = digit[top:bottom, left:right].view(np.uint8)
    crop = ink[top:bottom, left:right]
    # Only the digit's strokes and their soft edges: specks and line ends inside the box go.
    crop *= cv2.dilate(digit, SOFT_EDGE)
    # Strokes as solid as MNIST's, whether pencil or marker: the 90th percentile of their ink
    # becomes full ink.
    values = crop[digit > 0]
    k = int(0.9 * (len(values) - 1))
    crop *= 1.0 / max(float(np.partition(values, k)[k]), 1e-6)
    np.minimum(crop, 1.0, out=crop)
    return centre_by_mass(scale_into_box(as_thick_as_mnist(crop)))


def as_thick_as_mnist(crop: np.ndarray) -> np.ndarray:
    """`crop` with its strokes widened to MNIST_STROKE of the digit's size, if they are thinner
    (a pen on a sheet of paper: a few hundredths of the digit). Never thinned."""
    core = (crop > 0.5).view(np.uint8)  # strokes at half their strength: their width, not their blur
    area = int(np.count_nonzero(core))
    edge = area - int(np.count_nonzero(cv2.erode(core, SOFT_EDGE, borderType=cv2.BORDER_CONSTANT,
                                                 borderValue=0)))
    width = 2.0 * area / max(edge, 1)  # area / half the outline: a stroke's width
    missing = round(MNIST_STROKE * max(crop.shape) - width)
    if missing < 2:
        return crop
    pen = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (missing | 1, missing | 1))
    return cv2.dilate(crop, pen)


def ink_on_paper(grey: np.ndarray) -> np.ndarray:
    """How much the ink stands out from the paper under it at each pixel, 0..1: dark ink on
    light paper, or light ink on a dark ground. Dividing by the paper's light evens out a
    lamp's fall-off, a vignette, a warm cast; a canvas (an image whose edges are one colour)
    has one light, and only its colour is taken away."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    level = border_median(border)
    if np.count_nonzero(np.abs(border - level) > EVEN_LIGHT) <= 0.05 * len(border):
        if level < 0.5:  # light ink on a dark ground: make the ink dark
            grey, level = 1.0 - grey, 1.0 - level
        ink = grey * (-1.0 / max(level, 1e-3))
        ink += 1.0
        return ink
    height, width = grey.shape
    # The light varies slowly: it is measured on a quarter-size copy, a sixteenth of the work.
    small = cv2.resize(grey, (max(1, width // 4), max(1, height // 4)), interpolation=cv2.INTER_AREA)
    # A first look: a median over a window a quarter of the image wide sees through strokes,
    # which cover less than half of any such window. Whether the strokes are darker or lighter
    # than the paper around them: the more numerous.
    window = max(3, (max(small.shape) // 4) | 1)
    around = cv2.medianBlur((small * 255).astype(np.uint8), window).astype(np.float32) * (1 / 255)
    deviation = small - around
    if np.count_nonzero(deviation > STANDS_OUT) > np.count_nonzero(deviation < -STANDS_OUT):
        grey, small, around = 1.0 - grey, 1.0 - small, 1.0 - around  # light ink: make it dark
    light = paper_light(small, small > around - STANDS_OUT, (height, width))
    np.maximum(light, grey, out=light)  # the paper is never darker than what lies on it
    np.maximum(light, 1e-3, out=light)
    ink = grey / light
    np.subtract(1.0, ink, out=ink)
    return ink


def paper_light(small: np.ndarray, paper: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The light falling on the paper, at `shape`: a smooth surface (a cubic in x and y: a
    lamp's fall-off times a lens's vignette) fitted to the pixels of `small` that are paper,
    fitted again without those that still lie well below it (strokes the first mask missed).
    Strokes never pull it down, however thick, and it follows the light into the corners."""
    height, width = small.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    basis = cubic_terms(xs / max(width - 1, 1) - 0.5, ys / max(height - 1, 1) - 0.5)
    values = small.ravel()
    for _ in range(2):
        if np.count_nonzero(paper) < basis.shape[1] * 2:  # hardly any paper: an even light
            level = float(np.median(values[paper.ravel()])) if paper.any() else float(values.max())
            return np.full(shape, level, np.float32)
        known = basis[paper.ravel()]  # least squares by the normal equations: 10 unknowns
        coefficients = np.linalg.solve(known.T @ known + 1e-6 * np.eye(known.shape[1]),
                                       known.T @ values[paper.ravel()])
        fitted = (basis @ coefficients).reshape(height, width)
        paper = small > fitted - PAPER_SPREAD
    return cv2.resize(fitted.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def cubic_terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[pixels, 10]: 1, x, y, x², xy, y², x³, x²y, xy², y³."""
    x, y = x.ravel(), y.ravel()
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y, x * x * x, x * x * y, x * y * y,
                     y * y * y], axis=1)


def ruled_lines(ink: np.ndarray, faintest: float) -> np.ndarray:
    """The pixels of thin straight lines across the image (ruled or squared paper), where no
    stroke crosses them: runs of ink above `faintest` over LINE_SPAN of the width (or height), gaps of a
    few pixels bridged, at most LINE_THICK pixels thick, at least two of them (a sheet's
    lines come in numbers; one alone is a stroke). Where a stroke lies on a line, the ink is
    darker than the line's own: those pixels stay the stroke's."""
    height, width = ink.shape
    faint = ink > faintest
    lines = np.zeros(ink.shape, bool)
    least = LINE_SPAN * 0.8  # a line may have gaps; most drawings have no row with this much ink
    if not (np.count_nonzero(faint, axis=1).max() >= least * width
            or np.count_nonzero(faint, axis=0).max() >= least * height):
        return lines
    mask = faint.view(np.uint8)
    for axis, span, bridge, thick in ((1, (max(3, int(width * LINE_SPAN)), 1), (7, 1), (1, LINE_THICK)),
                                      (0, (1, max(3, int(height * LINE_SPAN))), (1, 7), (LINE_THICK, 1))):
        bridged = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, bridge))
        long_runs = cv2.morphologyEx(bridged, cv2.MORPH_OPEN,
                                     cv2.getStructuringElement(cv2.MORPH_RECT, span))
        if not long_runs.any():
            continue
        # A stroke as long, but thicker, is a digit's: kept. (Beyond the image is no ink: a line
        # along its edge is no thicker for it.)
        thick_runs = cv2.morphologyEx(long_runs, cv2.MORPH_OPEN,
                                      cv2.getStructuringElement(cv2.MORPH_RECT, thick),
                                      borderType=cv2.BORDER_CONSTANT, borderValue=0)
        found = (long_runs & ~thick_runs & mask).view(bool)
        across = found.any(axis=axis)  # the rows (columns) that hold a line
        if np.count_nonzero(across[1:] & ~across[:-1]) + int(across[0]) < 2:
            continue  # one long thin stroke alone is a digit's (a 1 written the photo's height)
        # Each line's own ink, row by row (column by column): the light may differ along the sheet.
        level = marked_median(ink, found, axis)
        lines |= found & (ink < LINE_UNDER_STROKE * level)
    return lines


def marked_median(values: np.ndarray, marked: np.ndarray, axis: int) -> np.ndarray:
    """The median of the `marked` values of each row (axis 1) or column (axis 0), kept as a
    dimension of one; infinite where none is marked."""
    ordered = np.sort(np.where(marked, values, np.inf), axis=axis)
    middle = (np.count_nonzero(marked, axis=axis, keepdims=True) - 1) // 2
    return np.take_along_axis(ordered, np.maximum(middle, 0), axis=axis)


def digit_strokes(strokes: np.ndarray, ink: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The pieces of ink that make up the digit. A piece is ink joined within a pixel (pencil
    leaves grainy, broken strokes) that holds some strong ink, so a stroke's faint stretches
    stay with it while faint marks on their own go; the digit is every piece holding at least
    PIECE_SHARE of the biggest piece's ink (a 4 or a 5 may be written in two strokes). Specks
    of dust and noise, and what is left of lines, stay out."""
    joined = cv2.dilate(strokes.view(np.uint8), SOFT_EDGE)
    count, labels = cv2.connectedComponents(joined, connectivity=8)
    if count == 2:  # one piece, which holds the strongest ink
        return strokes
    mass = np.bincount(labels[strokes], weights=ink[strokes], minlength=count)
    mass[np.bincount(labels[strong], minlength=count) == 0] = 0  # no strong ink: not a stroke
    if not mass.max() > 0:
        raise NoInk("the image contains no drawing (no ink found)")
    keep = mass >= PIECE_SHARE * mass.max()
    keep[0] = False
    digit = keep[labels]
    digit &= strokes
    return digit


def border_median(border: np.ndarray) -> float:
    """The median of an image's outermost pixels: the paper's colour."""
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


def sample_photo() -> bytes:
    """A 7 written with a pen on ruled paper lit from one side, as a 400x300 JPEG: what a phone
    sends, in small. The warm-up reads it."""
    light = np.linspace(1.0, 0.55, 400, dtype=np.float32)[None, :, None]
    paper = np.full((300, 400, 3), (235, 232, 222), np.float32) * light
    sheet = Image.fromarray(paper.astype(np.uint8), "RGB")
    pen = ImageDraw.Draw(sheet)
    for y in range(20, 300, 24):
        pen.line([(0, y), (400, y)], fill=(150, 170, 200), width=1)
    pen.line([(160, 90), (240, 90), (185, 210)], fill=(30, 40, 120), width=3)
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=60)
    return buffer.getvalue()


def warm_up() -> None:
    """Pay the one-time costs of reading a drawing at start-up rather than in the first user's
    request. Pillow imports its image format plugins on first use, and the first pass of each
    kind of image through the preprocessing costs several times a later one.
    The drawings read here are the page's kind (RGBA), the benchmarks' (RGB) and a photo."""
    Image.init()
    for mode in ("RGBA", "RGB"):
        preprocess_drawing(decode_image(sample_drawing(mode), (10 * FIELD) ** 2))
    preprocess_drawing(decode_image(sample_photo(), 400 * 300))


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
    # In floats, so that faint, thin strokes of big canvases do not round to zero. Reduced by
    # averaging the pixels each box pixel covers (OpenCV's area interpolation: antialiased, as
    # MNIST's own reduction was); a crop smaller than the box (a tiny canvas) is enlarged cubically.
    shrinking = size[0] < width or size[1] < height
    box = cv2.resize(np.ascontiguousarray(crop, dtype=np.float32), size,
                     interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    np.maximum(box, 0.0, out=box)  # cubic interpolation rings below zero
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
    top = min(max(round(FIELD / 2 - cy), 0), FIELD - height)
    left = min(max(round(FIELD / 2 - cx), 0), FIELD - width)
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    field[top:top + height, left:left + width] = box
    return field
