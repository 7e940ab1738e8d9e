"""Every error the gateway returns, mapped to a JSON response in one place.

Errors are `{"error": {"code", "message"}}` with the status in the design: 400 malformed,
401 unauthorised, 404 no such version, 413 too large, 415 unsupported media type, 422 out of
range, 429 overloaded (with Retry-After), 503 model unavailable (with Retry-After), 504 model
timeout. Never a stack trace.
"""

from __future__ import annotations

import logging

import grpc
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from serving.gateway import preprocess

log = logging.getLogger("scribe.gateway")
RETRY_AFTER_SECONDS = 5
INTERNAL_ERROR = "internal_error"


def code_of(reason: str) -> str:
    """An error code from an HTTP reason phrase: "Method Not Allowed" -> method_not_allowed."""
    return reason.lower().replace(" ", "_")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def out_of_range(message: str) -> ApiError:
    return ApiError(422, "out_of_range", message)


def model_unavailable(message: str) -> ApiError:
    return ApiError(503, "model_unavailable", message, {"Retry-After": str(RETRY_AFTER_SECONDS)})


def overloaded(message: str) -> ApiError:
    # A slot frees up as soon as one generation ends (about a second at most): retry soon.
    return ApiError(429, "overloaded", message, {"Retry-After": "1"})


PREPROCESS_ERRORS = {
    preprocess.InvalidImage: (400, "invalid_image"),
    preprocess.ImageTooLarge: (413, "image_too_large"),
    preprocess.NoInk: (422, "no_ink"),
    preprocess.PixelsOutOfRange: (422, "out_of_range"),
}


def check_unicode(text: str, name: str) -> None:
    """400 for a string with a lone surrogate (a JSON "\\ud800" escape): not encodable as the
    UTF-8 that the model server's protobuf needs."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise bad_request(f"'{name}' contains unpaired surrogates: not valid Unicode text")


def from_preprocess(error: ValueError, which: str = "") -> ApiError:
    status, code = PREPROCESS_ERRORS[type(error)]
    return ApiError(status, code, f"{which}{error}")


def from_grpc(error: grpc.RpcError, model: str, pinned: bool) -> ApiError:
    """Map a model server's gRPC status to the gateway's HTTP error."""
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, "model_timeout", f"the model server did not answer in time ({model})")
    if pinned and (code == grpc.StatusCode.NOT_FOUND or (
            code == grpc.StatusCode.INVALID_ARGUMENT and "version label" in error.details())):
        return ApiError(404, "version_not_found", f"{model}: {error.details()}")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
        return model_unavailable(f"model {model} is not available")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return out_of_range(f"{model} rejected the input: {error.details()}")
    log.error("model server error for %s: %s %s", model, code, error.details())
    return model_unavailable(f"model {model} failed to answer")


def register_error_handlers(app: Flask) -> None:
    def respond(status: int, code: str, message: str, headers: dict | None = None):
        response = jsonify(error={"code": code, "message": message})
        response.status_code = status
        response.headers.update(headers or {})
        return response

    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return respond(error.status, error.code, error.message, error.headers)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        code = code_of(error.name or "error")
        headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
        return respond(error.code or 500, code, error.description or error.name, headers)  # Allow

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unhandled error")
        return respond(500, INTERNAL_ERROR, "internal error; it has been logged")
