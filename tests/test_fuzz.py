"""Schema-driven fuzzing of the live gateway against its own description, serving/gateway/openapi.json.

For every operation in the description, Hypothesis generates at least 500 requests from the
operation's documented parameters and request bodies: values valid by the schema, and the same
values broken on purpose (wrong types, out-of-range and huge numbers, NaN, unpaired surrogates,
missing fields), malformed JSON, invalid UTF-8, random bytes and broken images as image bodies,
broken multipart bodies, and content types the operation does not take. Every answer must be a
status the description documents for that operation, never a 5xx it does not document, within a
time limit; errors are JSON `{"error": {"code", "message"}}` matching the documented response,
and successful bodies match their documented schema too.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import requests
from conftest import ROOT
from drawings import draw_digit, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from reliability import record

SPEC = json.loads((ROOT / "serving" / "gateway" / "openapi.json").read_text())
OPERATIONS = [(path, method) for path, item in SPEC["paths"].items() for method in item]
REQUESTS_PER_ENDPOINT = 500
REQUEST_TIMEOUT = (5, 30)  # connect, read: a request that takes longer is a hang
HANG_SECONDS = 30


# --- the description, read as data ------------------------------------------------------------

def resolve(node: dict) -> dict:
    """Follow a local $ref such as #/components/schemas/Error."""
    while "$ref" in node:
        target = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def ref_name(node: dict) -> str | None:
    return node["$ref"].rsplit("/", 1)[1] if "$ref" in node else None


ANNOTATIONS = {"description", "example", "default", "format"}


def problems(value, schema: dict, where: str = "body") -> list[str]:
    """Where `value` breaks `schema` (the OpenAPI 3.0 subset the description uses); [] if nowhere.

    An unknown keyword is an error here, so the description cannot say more than is checked."""
    schema = resolve(schema)
    unknown = set(schema) - ANNOTATIONS - {
        "type", "nullable", "enum", "properties", "required", "items", "minItems", "maxItems",
        "minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "allOf", "anyOf", "oneOf",
        "additionalProperties"}
    assert not unknown, f"the checker does not know {unknown} in {schema}"
    if value is None and schema.get("nullable"):
        return []
    kind = schema.get("type")
    types = {"integer": int, "number": (int, float), "string": str, "boolean": bool,
             "array": list, "object": dict}
    if kind and (not isinstance(value, types[kind]) or (kind in ("integer", "number")
                                                          and isinstance(value, bool))):
        return [f"{where}: {value!r:.80} is not {kind}"]
    found = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and (value < schema["minimum"] or (
            schema.get("exclusiveMinimum") and value == schema["minimum"])):
        found.append(f"{where}: {value} is below {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        found.append(f"{where}: {value} is above {schema['maximum']}")
    if len_limits := (schema.get("minLength", schema.get("minItems", 0)),
                      schema.get("maxLength", schema.get("maxItems"))):
        if isinstance(value, (str, list)) and (len(value) < len_limits[0] or (
                len_limits[1] is not None and len(value) > len_limits[1])):
            found.append(f"{where}: length {len(value)} is outside {len_limits}")
    for key in schema.get("required", []):
        if key not in value:
            found.append(f"{where}: '{key}' is missing")
    for key, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and key in value:
            found += problems(value[key], sub, f"{where}.{key}")
    if isinstance(schema.get("additionalProperties"), dict) and isinstance(value, dict):
        for key, item in value.items():
            if key not in schema.get("properties", {}):
                found += problems(item, schema["additionalProperties"], f"{where}.{key}")
    if "items" in schema:
        for i, item in enumerate(value):
            found += problems(item, schema["items"], f"{where}[{i}]")
    for sub in schema.get("allOf", []):
        found += problems(value, sub, where)
    if "anyOf" in schema and all(problems(value, sub, where) for sub in schema["anyOf"]):
        found.append(f"{where}: matches none of anyOf")
    if "oneOf" in schema and sum(not problems(value, sub, where) for sub in schema["oneOf"]) != 1:
        found.append(f"{where}: does not match exactly one of oneOf")
    return found


# --- strategies derived from the description -------------------------------------------------

DRAWINGS = [png_bytes(draw_digit(d)) for d in (1, 4, 7)] + [
    png_bytes(draw_digit(3), format="JPEG"), png_bytes(draw_digit(8).convert("P"), format="GIF")]


def once(build):
    """Build each strategy once per schema: rebuilding them for every example is slow."""
    built = {}

    def cached(*args):
        key = tuple(id(a) if isinstance(a, dict) else a for a in args)
        if key not in built:
            built[key] = build(*args)
        return built[key]

    return cached


@once
def broken_images() -> st.SearchStrategy[bytes]:
    """Random bytes, real drawings, and real drawings truncated or with bytes overwritten."""
    real = st.sampled_from(DRAWINGS)

    @st.composite
    def damaged(draw):
        data = bytearray(draw(real))
        if draw(st.booleans()):
            return bytes(data[:draw(st.integers(0, len(data)))])
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)

    return st.one_of(st.binary(max_size=2048), real, damaged())


@once
def base64_images() -> st.SearchStrategy[str]:
    encoded = broken_images().map(lambda data: base64.b64encode(data).decode())
    return st.one_of(encoded, encoded.map(lambda text: "data:image/png;base64," + text),
                     encoded.map(lambda text: "data:image/png," + text), st.text(max_size=40))


@once
def pixel_arrays() -> st.SearchStrategy[list]:
    """28x28 values in range, as the Pixels schema says; drawn as arrays (784 separate draws are slow)."""
    rows = resolve(SPEC["components"]["schemas"]["Pixels"])
    side, values = rows["minItems"], rows["items"]["items"]
    in_range = st.floats(values["minimum"], values["maximum"])
    return arrays(np.float64, (side, side), elements=in_range, fill=in_range).map(lambda a: a.tolist())


# Schemas whose description says more than their type (strings that carry an image), or that are
# faster to draw whole.
SPECIAL = {"Base64Image": base64_images, "Pixels": pixel_arrays}


@once
def from_schema(schema: dict, cap: int = 3) -> st.SearchStrategy:
    """Values valid by `schema`. Arrays get at most `cap` items above their minimum."""
    if (name := ref_name(schema)) in SPECIAL:
        return SPECIAL[name]()
    schema = resolve(schema)
    if "oneOf" in schema or ("anyOf" in schema and "type" not in schema):
        return st.one_of([from_schema(sub, cap) for sub in schema.get("oneOf", schema.get("anyOf"))])
    kind = schema.get("type")
    nullable = st.none() if schema.get("nullable") else st.nothing()
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum")) | nullable
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"),
                         exclude_min=bool(schema.get("exclusiveMinimum")), allow_nan=False) | nullable
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 80), 80)) \
            | (st.just("x" * schema["maxLength"]) if "maxLength" in schema else st.nothing())
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        low = schema.get("minItems", 0)
        return st.lists(from_schema(schema["items"], cap), min_size=low,
                        max_size=min(schema.get("maxItems", low + cap), low + cap))
    if kind == "object":
        return objects(schema, cap)
    raise AssertionError(f"no strategy for {schema}")


@st.composite
def objects(draw, schema: dict, cap: int):
    required = set(schema.get("required", []))
    if "anyOf" in schema:  # e.g. one of image, images or pixels is required
        required |= set(draw(st.sampled_from(schema["anyOf"]))["required"])
    result = {}
    for key, sub in schema.get("properties", {}).items():
        if key in required or draw(st.booleans()):
            result[key] = draw(short_generations(sub) if key == "max_chars" else from_schema(sub, cap))
    return result


@once
def short_generations(schema: dict) -> st.SearchStrategy[int]:
    """max_chars: mostly short (generation time grows with it), and its documented bounds themselves."""
    low, high = schema["minimum"], schema["maximum"]
    short = st.integers(low, low + 49)
    return st.one_of(short, short, short, st.sampled_from([low, high]))


HUGE = [2**63, 2**64, -(2**63) - 1, 10**400, -(10**400)]


def containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(  # any JSON, with huge numbers, NaN and unpaired surrogates among it
    st.none() | st.booleans() | st.integers() | st.sampled_from(HUGE) | st.floats()
    | st.text(max_size=20) | st.sampled_from(["\ud800", "a\udfff", "\udc00\ud800"]),
    containers, max_leaves=12)


@once
def wrong_values(schema: dict) -> st.SearchStrategy:
    """Values that break `schema` near its edges: just outside its range or length, huge, wrong type."""
    schema = resolve(schema)
    edges = []
    if "minimum" in schema:
        edges += [schema["minimum"] - 1, schema["minimum"]] if schema.get("type") == "integer" \
            else [schema["minimum"], -1e-300, -0.0]
    if "maximum" in schema:
        edges += [schema["maximum"] + 1, schema["maximum"] + 1e-9, float("inf")]
    if "maxLength" in schema:
        edges.append("y" * (schema["maxLength"] + 1))
    odd = [float("nan"), None, "", "1", 1.5, True, []]
    return st.sampled_from(edges) | st.sampled_from(HUGE + odd) | json_values if edges else \
        st.sampled_from(HUGE + odd) | json_values


@dataclass
class Request:
    kind: str  # what sort of input, for the coverage count
    method: str
    path: str
    query: str = ""
    headers: dict = field(default_factory=dict)
    body: bytes | None = None


@once
def query_strings(operation: dict) -> st.SearchStrategy[str]:
    """The documented query parameters with valid or broken values, plus undocumented ones."""
    params = [resolve(p) for p in operation.get("parameters", []) if resolve(p)["in"] == "query"]
    pairs = [st.tuples(st.just(p["name"]), st.one_of(from_schema(p["schema"]), wrong_values(p["schema"]))
                       .map(lambda v: v if isinstance(v, str) else json.dumps(v)))
             for p in params]
    junk = st.tuples(st.text(max_size=8), st.text(max_size=12))
    chosen = st.lists(st.one_of(*pairs, junk) if pairs else junk, max_size=3)
    encoded = chosen.map(lambda items: urllib.parse.urlencode(
        [(k, v.encode("utf-8", "surrogatepass")) for k, v in items]))
    raw = st.binary(max_size=30).map(urllib.parse.quote_from_bytes)  # e.g. %FF: not UTF-8
    return st.one_of(st.just(""), encoded, raw)


header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
headers = st.fixed_dictionaries({}, optional={
    "Accept": st.sampled_from(["*/*", "application/json", "text/event-stream", "text/html",
                               "text/event-stream;q=0.1, application/json", "text/*"]) | header_text,
    "X-API-Key": header_text, "Authorization": header_text.map(lambda t: "Bearer " + t)})


def serialise(value, ascii_only: bool) -> bytes:
    # Unpaired surrogates without \u escapes become bytes that are not UTF-8: also worth sending.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# What a request body can be, per documented media type; each is drawn equally often
# ("valid" twice, so that enough requests reach the models).
BODY_KINDS = {
    "application/json": ["valid", "valid", "wrong field", "missing field", "extra field", "not an object",
                         "malformed json", "invalid utf-8", "deep nesting"],
    "multipart/form-data": ["multipart", "broken multipart"],
    "image/*": ["image body"],
}


@st.composite
def json_bodies(draw, schema: dict, kind: str) -> bytes:
    """A JSON body for `schema`: valid, with one field broken, or not JSON at all."""
    valid = draw(from_schema(schema, 1))  # cap: at most two 28x28 pixel arrays: small examples
    properties = resolve(schema).get("properties", {})
    if kind == "wrong field":
        key = draw(st.sampled_from(sorted(properties)))
        valid[key] = draw(wrong_values(properties[key]))
    elif kind == "missing field" and valid:
        del valid[draw(st.sampled_from(sorted(valid)))]
    elif kind == "extra field":
        valid[draw(st.text(max_size=10))] = draw(json_values)
    elif kind == "not an object":
        valid = draw(json_values.filter(lambda v: not isinstance(v, dict)))
    body = serialise(valid, draw(st.booleans()))
    if kind == "malformed json":
        body = draw(st.sampled_from([body[:draw(st.integers(0, max(0, len(body) - 1)))],
                                     body.replace(b'"', b"'"), body + b"}", b"{" + body]))
    elif kind == "invalid utf-8":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"])) + body[at:]
    elif kind == "deep nesting":
        depth = draw(st.sampled_from([100, 1000, 100_000]))
        body = b'{"prompt": "a", "pixels": ' + b"[" * depth + b"0" + b"]" * depth + b"}"
    return body


@st.composite
def multipart_bodies(draw, schema: dict, kind: str) -> tuple[bytes, str]:
    """multipart/form-data with documented and undocumented fields, or broken multipart."""
    boundary = "fuzz" + draw(st.text("abcdef0123456789", min_size=1, max_size=16))
    names = sorted(resolve(schema).get("properties", {})) + ["other", ""]
    parts = draw(st.lists(st.tuples(st.sampled_from(names), broken_images()), max_size=3))
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="d.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    body += f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"
    if kind == "broken multipart":
        body = body[:draw(st.integers(0, len(body)))]
        content_type = draw(st.sampled_from([content_type, "multipart/form-data",
                                             "multipart/form-data; boundary=other"]))
    return body, content_type


def concrete(media_type: str) -> st.SearchStrategy[str]:
    """A concrete content type for a documented one (image/* -> image/png, image/x-junk, ...)."""
    if media_type == "image/*":
        return st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp", "image/x-junk"])
    return st.sampled_from([media_type, media_type + "; charset=utf-8"])


UNDOCUMENTED_TYPES = ["text/plain", "application/xml", "application/x-www-form-urlencoded",
                      "application/octet-stream", "application/jsonx", "json", "", "*/*"]


@st.composite
def requests_for(draw, path: str, method: str) -> Request:
    operation = SPEC["paths"][path][method]
    request = Request("", method.upper(), path, draw(query_strings(operation)), draw(headers))
    content = operation.get("requestBody", {}).get("content")
    if not content:
        request.kind = "no body"
        return request
    media_type, request.kind = draw(st.sampled_from(
        [(media, kind) for media in content for kind in BODY_KINDS[media]] + [("", "wrong content type")]))
    if not media_type:
        request.headers["Content-Type"] = draw(st.sampled_from(UNDOCUMENTED_TYPES))
        request.body = draw(st.binary(max_size=200) | st.just(DRAWINGS[0]))
        if not request.headers["Content-Type"]:
            del request.headers["Content-Type"]
        return request
    schema = content[media_type]["schema"]
    if media_type == "multipart/form-data":
        request.body, request.headers["Content-Type"] = draw(multipart_bodies(schema, request.kind))
    elif media_type == "application/json":
        request.body = draw(json_bodies(schema, request.kind))
        request.headers["Content-Type"] = draw(concrete(media_type))
    else:
        request.body = draw(broken_images())
        request.headers["Content-Type"] = draw(concrete(media_type))
    return request


# --- sending and checking --------------------------------------------------------------------

def send(base: str, request: Request) -> tuple[requests.Response, bytes, float]:
    url = base + request.path + ("?" + request.query if request.query else "")
    started = time.perf_counter()
    with requests.request(request.method, url, data=request.body, headers=request.headers,
                          timeout=REQUEST_TIMEOUT, stream=True) as response:
        body = b"".join(response.iter_content(65536))  # a stream is read to its end
    return response, body, time.perf_counter() - started


def media_type_of(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip()


def check(operation: dict, request: Request, response: requests.Response, body: bytes) -> None:
    status = response.status_code
    said = f"{request.method} {request.path} ({request.kind}) -> {status}: {body[:300]!r}"
    # Both models are loaded: a 503 or 504 here would be the model server failing on an input.
    assert status < 500, said
    assert str(status) in operation["responses"], f"undocumented status: {said}"
    documented = resolve(operation["responses"][str(status)])
    for header in documented.get("headers", {}):
        assert response.headers.get(header), f"no {header} header: {said}"
    media_type = media_type_of(response)
    matches = [m for m in documented.get("content", {}) if fnmatch.fnmatch(media_type, m)]
    assert matches, f"undocumented content type {media_type!r}: {said}"
    schema = documented["content"][matches[0]]["schema"]
    if media_type == "application/json":
        found = problems(json.loads(body), schema)
        assert not found, f"{found}: {said}"
    elif media_type == "text/event-stream":
        events = [chunk.split("\n", 1) for chunk in body.decode("utf-8").strip().split("\n\n")]
        assert events[-1][0] in ("event: done", "event: error"), said
        for event, data in events:
            payload = json.loads(data.removeprefix("data: "))
            if event == "event: error":
                assert not problems(payload, SPEC["components"]["schemas"]["Error"]), said
            if event == "event: done":
                assert not problems(payload, SPEC["components"]["schemas"]["GenerateResponse"]), said
    if status >= 400:
        assert b"Traceback" not in body and b"/work/" not in body, said


@pytest.fixture(scope="module")
def figures():
    """What the fuzzing sent and saw, recorded for docs/reliability.md when the module ends."""
    seen: dict = {}
    yield seen
    if seen:
        record("fuzz", endpoints=len(seen),
               requests_per_endpoint=min(s["requests"] for s in seen.values()),
               total_requests=sum(s["requests"] for s in seen.values()),
               server_errors=sum(s["server_errors"] for s in seen.values()),
               max_latency_ms=round(max(s["max_latency_ms"] for s in seen.values())),
               statuses="; ".join(f"{op}: " + ", ".join(f"{k} x{v}" for k, v in sorted(s["statuses"].items()))
                                  for op, s in seen.items()))


@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_generated_requests_get_documented_answers(gateway, figures, path, method):
    operation = SPEC["paths"][path][method]
    statuses, kinds, latencies = Counter(), Counter(), [0.0]

    @settings(max_examples=REQUESTS_PER_ENDPOINT, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
    @given(request=requests_for(path, method))
    def answers_as_documented(request):
        response, body, seconds = send(gateway.url, request)
        statuses[response.status_code] += 1
        kinds[request.kind] += 1
        latencies.append(seconds)
        assert seconds < HANG_SECONDS, f"{request} took {seconds:.1f} s"
        check(operation, request, response, body)

    try:
        answers_as_documented()
    finally:
        figures[f"{method.upper()} {path}"] = {
            "requests": sum(statuses.values()), "statuses": statuses,
            "server_errors": sum(n for s, n in statuses.items() if s >= 500),
            "max_latency_ms": max(latencies) * 1000}
    assert sum(statuses.values()) >= REQUESTS_PER_ENDPOINT
    assert requests.get(gateway.url + "/healthz", timeout=5).status_code == 200
    if "requestBody" in operation:  # every sort of bad input was among them, and some good input
        assert set(kinds) >= {"valid", "wrong field", "malformed json", "invalid utf-8", "deep nesting",
                              "wrong content type"}, kinds
        assert statuses[200] > 0 and any(400 <= s < 500 for s in statuses), statuses
        if "multipart/form-data" in operation["requestBody"]["content"]:
            assert {"image body", "multipart", "broken multipart"} <= set(kinds), kinds


def test_the_description_lists_exactly_the_gateways_routes(gateway):
    routes = {(rule.rule, method.lower()) for rule in gateway.app.url_map.iter_rules()
              if not rule.rule.startswith("/static/") for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes == set(OPERATIONS)


def test_the_gateway_serves_its_description(gateway):
    response = requests.get(gateway.url + "/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert response.json() == SPEC
    assert SPEC["openapi"].startswith("3.")
    for path, method in OPERATIONS:  # every reference resolves, every operation says what it answers
        operation = SPEC["paths"][path][method]
        assert operation["responses"] and operation["operationId"]
        for node in [*operation["responses"].values(), *operation.get("parameters", [])]:
            resolve(node)


def test_the_checker_rejects_what_the_description_forbids():
    """The response check is not vacuous: bodies that break the documented schemas are caught."""
    error = SPEC["paths"]["/v1/text/generate"]["post"]["responses"]["429"]
    schema = resolve(error)["content"]["application/json"]["schema"]
    assert problems({"error": {"code": "overloaded", "message": "busy"}}, schema) == []
    assert problems({"error": {"code": "bad_request", "message": "x"}}, schema)  # wrong code for 429
    assert problems({"error": {"code": "overloaded"}}, schema)  # no message
    assert problems({"detail": "x"}, schema)
    digits = resolve(SPEC["components"]["schemas"]["DigitsResponse"])
    good = {"model": {"name": "digits", "version": 1},
            "predictions": [{"digit": 7, "confidence": 0.9, "probabilities": [0.01] * 10}]}
    assert problems(good, digits) == []
    assert problems({**good, "predictions": [{**good["predictions"][0], "digit": 10}]}, digits)
    assert problems({**good, "model": {"name": "digits", "version": True}}, digits)


def test_a_generated_pixels_body_is_valid_by_the_description():
    """The strategies produce schema-valid bodies when asked: the fuzzing reaches the models."""
    content = SPEC["paths"]["/v1/digits/predict"]["post"]["requestBody"]["content"]
    schema = content["application/json"]["schema"]

    @settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=from_schema(schema))
    def valid(body):
        assert problems(body, schema) == []

    valid()

