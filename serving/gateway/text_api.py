"""POST /v1/text/generate: a prompt -> Shakespeare, in one response or streamed as it is written.

Generation runs inside the SavedModel. One gRPC call to `serving_default` returns a whole
continuation; a stream makes one call per chunk, passing the model's state to the `continue`
signature. Sampling is seeded per character position, so the chunks join into exactly the text
that one call gives for the same seed and parameters.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import weakref

import numpy as np
from flask import Blueprint, Response, jsonify, request, stream_with_context

from serving.gateway import errors
from serving.gateway.model_pin import read_pin
from serving.gateway.state import Gateway, gateway

text = Blueprint("text", __name__)

MAX_CHARS = (1, 2000)
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1000
MAX_SEED = 2**63 - 1  # what the model's int64 seed holds
# Random seeds stay within what every JSON client holds exactly: JavaScript's numbers are exact
# integers up to 2**53 - 1 only, and a page that showed a rounded seed could not reproduce its text.
MAX_RANDOM_SEED = 2**53 - 1
DEFAULTS = {"max_chars": 300, "temperature": 0.8, "top_k": 0}


def take_slot(gateway: Gateway):
    """A slot for one generation (admission control: at most SCRIBE_MAX_GENERATIONS in flight in
    this process), taken without waiting, or 429 with Retry-After at once.

    Returns its release function, which frees the slot at most once however often it is called."""
    slots, in_flight = gateway.generation_slots, gateway.metrics.generations_in_flight
    if not slots.acquire(blocking=False):
        gateway.metrics.generation_rejections.inc()
        raise errors.overloaded("too many generations in progress; retry after the Retry-After seconds")
    in_flight.inc()
    released = threading.Lock()

    def release() -> None:
        if released.acquire(blocking=False):
            in_flight.dec()
            slots.release()
    return release


@text.post("/v1/text/generate")
def generate():
    params = read_params(gateway().settings.max_prompt_chars)
    version, label = read_pin()
    release = take_slot(gateway())
    try:
        response = generation(gateway(), params, version, label)
    except BaseException:
        release()
        raise
    if not response.is_streamed:
        release()
        return response
    # A stream holds its slot until it ends: the WSGI server closes the response when the last
    # event is written or a write to a client that went away fails. Should the response be
    # dropped without being closed (an error after this view), its garbage collection frees it.
    response.call_on_close(weakref.finalize(response, release))
    return response


def generation(gateway: Gateway, params: dict, version, label) -> Response:
    """The continuation as one JSON response, or a stream of server-sent events."""
    model = gateway.settings.text_model
    wants_stream = params.pop("stream") or (
        request.accept_mimetypes.best == "text/event-stream")
    if not wants_stream:
        outputs, served = call(gateway, "serving_default", {
            "prompt": np.array([params["prompt"].encode("utf-8")]),
            **per_prompt(params["max_chars"], params)}, version, label)
        return jsonify(model={"name": model, "version": served}, prompt=params["prompt"],
                       text=outputs["text"][0].decode("utf-8", errors="replace"), seed=params["seed"])
    # Fail before the stream starts when the model cannot answer: the first chunk is the check.
    chunk = gateway.settings.stream_chunk_chars
    first, served = call(gateway, "serving_default", {
        "prompt": np.array([params["prompt"].encode("utf-8")]),
        **per_prompt(min(chunk, params["max_chars"]), params)}, version, label)
    pinned = version is not None or label is not None
    return Response(stream_with_context(events(gateway, params, first, served, chunk, pinned)),
                    mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def events(gateway: Gateway, params: dict, first: dict, served: int, chunk: int, pinned: bool):
    """Server-sent events: `chunk` events as text is written, then `done` (or `error`).

    Each chunk continues from the previous chunk's state on the version that started the stream.
    If a rollout unloads that version mid-stream (and the request did not pin one), the stream
    carries on with the new version, which first reads the prompt and the text so far."""
    chunks = gateway.metrics.generation_chunks
    written, outputs = 0, first
    pieces, versions = [], [served]
    while True:
        piece = outputs["text"][0].decode("utf-8", errors="replace")
        pieces.append(piece)
        written += len(piece)
        chunks.inc()
        yield sse("chunk", {"text": piece})  # a client that went away ends the generator here
        if written >= params["max_chars"] or not piece:
            break
        size = per_prompt(min(chunk, params["max_chars"] - written), params)
        try:
            try:
                outputs, _ = call(gateway, "continue", {
                    "state": outputs["state"], "position": np.array([written], np.int32), **size},
                    versions[-1], None)
            except errors.ApiError as error:
                if pinned or error.status != 404:
                    raise
                so_far = (params["prompt"] + "".join(pieces)).encode("utf-8")
                outputs, now = call(gateway, "serving_default",
                                    {"prompt": np.array([so_far]), **size}, None, None)
                versions.append(now)
        except errors.ApiError as error:
            yield sse("error", {"error": {"code": error.code, "message": error.message}})
            return
    yield sse("done", {"model": {"name": gateway.settings.text_model, "version": versions[-1]},
                       "versions": versions, "prompt": params["prompt"], "text": "".join(pieces),
                       "seed": params["seed"]})


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def per_prompt(max_chars: int, params: dict) -> dict:
    """The generation parameters, one value per prompt (the signatures take [batch] tensors)."""
    return {"max_chars": np.array([max_chars], np.int32),
            "temperature": np.array([params["temperature"]], np.float32),
            "top_k": np.array([params["top_k"]], np.int32), "seed": np.array([params["seed"]], np.int64)}


def call(gateway: Gateway, signature: str, inputs: dict, version, label) -> tuple[dict, int]:
    return gateway.predict(gateway.settings.text_model, inputs, version, label, signature)


def read_params(max_prompt_chars: int) -> dict:
    """The JSON body, validated: 400 for wrong types, 413 for a prompt over the limit, 422 out of range."""
    if request.mimetype != "application/json":
        raise errors.ApiError(415, "unsupported_media_type", "send a JSON body")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise errors.bad_request("the body is not a JSON object (or not valid UTF-8 JSON)")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise errors.bad_request("'prompt' is required and must be a string")
    if len(prompt) > max_prompt_chars:
        raise errors.ApiError(413, "prompt_too_long",
                              f"the prompt has {len(prompt)} characters; the limit is {max_prompt_chars}")
    errors.check_unicode(prompt, "prompt")
    params = {"prompt": prompt}
    params["max_chars"] = integer(body, "max_chars", DEFAULTS["max_chars"], *MAX_CHARS)
    params["top_k"] = integer(body, "top_k", DEFAULTS["top_k"], 0, MAX_TOP_K)
    params["seed"] = integer(body, "seed", None, 0, MAX_SEED)
    if params["seed"] is None:
        params["seed"] = secrets.randbelow(MAX_RANDOM_SEED + 1)
    temperature = body.get("temperature", DEFAULTS["temperature"])
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise errors.bad_request("'temperature' must be a number")
    try:
        temperature = float(temperature)
    except OverflowError:
        raise errors.out_of_range(f"'temperature' must be above 0 and at most {MAX_TEMPERATURE}") from None
    if not (math.isfinite(temperature) and 0 < temperature <= MAX_TEMPERATURE):
        raise errors.out_of_range(f"'temperature' must be above 0 and at most {MAX_TEMPERATURE}")
    params["temperature"] = float(temperature)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise errors.bad_request("'stream' must be true or false")
    params["stream"] = stream
    return params


def integer(body: dict, key: str, default, low: int, high: int):
    value = body.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.bad_request(f"'{key}' must be an integer")
    if not low <= value <= high:
        raise errors.out_of_range(f"'{key}' must be between {low} and {high}")
    return value
