"""POST /v1/digits/predict: drawings in any accepted form -> digits with their probabilities."""

from __future__ import annotations

import base64
import binascii

import numpy as np
from flask import Blueprint, jsonify, request

from serving.gateway import errors
from serving.gateway.model_pin import read_model, read_pin
from serving.gateway.preprocess import decode_image, preprocess_drawing, preprocess_pixels
from serving.gateway.state import gateway

digits = Blueprint("digits", __name__)


@digits.post("/v1/digits/predict")
def predict():
    settings = gateway().settings
    images = read_images(settings.max_images, settings.max_image_pixels)
    version, label = read_pin()
    model = read_model(gateway().digits_ladder) or settings.digits_model
    outputs, served = gateway().predict_digits(images, version, label, model)
    probabilities = outputs["probabilities"]
    return jsonify(model={"name": model, "version": served}, predictions=[
        {"digit": int(digit), "confidence": round(float(p[digit]), 6),
         "probabilities": [round(float(x), 6) for x in p]}
        for digit, p in zip(outputs["digit"], probabilities, strict=True)])


def read_images(max_images: int, max_pixels: int) -> np.ndarray:
    """The request's drawings as a float32 [n, 28, 28] batch in MNIST form."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        files = request.files.getlist("image")
        if not files and "image" in request.form:  # curl -F 'image=<file' sends it as text
            raise errors.bad_request("the multipart 'image' field must be a file upload (with a "
                                     "filename), as curl -F 'image=@drawing.png' sends it")
        if not files:
            raise errors.bad_request("the multipart body has no 'image' field")
        blobs = [f.read() for f in files]
    elif mimetype.startswith("image/"):
        blobs = [request.get_data()]
    elif mimetype == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise errors.bad_request("the body is not a JSON object")
        if "pixels" in body:
            return read_pixels(body["pixels"], max_images)
        if "image" in body:
            blobs = [decode_base64(body["image"], "image")]
        elif "images" in body:
            if not isinstance(body["images"], list) or not body["images"]:
                raise errors.bad_request("'images' must be a non-empty list of base64 images")
            check_count(len(body["images"]), max_images)
            blobs = [decode_base64(item, f"images[{i}]") for i, item in enumerate(body["images"])]
        else:
            raise errors.bad_request("the JSON body needs 'image', 'images' or 'pixels'")
    else:
        raise errors.ApiError(415, "unsupported_media_type",
                              "send multipart/form-data with 'image', an image/* body, or JSON")
    check_count(len(blobs), max_images)
    batch = []
    for i, blob in enumerate(blobs):
        which = f"image {i + 1}: " if len(blobs) > 1 else ""
        try:
            batch.append(preprocess_drawing(decode_image(blob, max_pixels)))
        except tuple(errors.PREPROCESS_ERRORS) as error:
            raise errors.from_preprocess(error, which) from None
    return np.stack(batch)


def read_pixels(pixels, max_images: int) -> np.ndarray:
    """{"pixels": 28x28} or a list of them, already in MNIST form."""
    many = isinstance(pixels, list) and pixels and isinstance(pixels[0], list) \
        and pixels[0] and isinstance(pixels[0][0], list)
    items = pixels if many else [pixels]
    check_count(len(items), max_images)
    batch = []
    for i, item in enumerate(items):
        try:
            batch.append(preprocess_pixels(item))
        except tuple(errors.PREPROCESS_ERRORS) as error:
            raise errors.from_preprocess(error, f"pixels {i + 1}: " if many else "") from None
    return np.stack(batch)


def decode_base64(value, name: str) -> bytes:
    if not isinstance(value, str):
        raise errors.bad_request(f"'{name}' must be a base64 string or a data URL")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise errors.bad_request(f"'{name}': only base64 data URLs are accepted")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise errors.bad_request(f"'{name}' is not valid base64") from None


def check_count(count: int, max_images: int) -> None:
    if count > max_images:
        raise errors.ApiError(413, "too_many_images",
                              f"{count} images in one request; the limit is {max_images}")
