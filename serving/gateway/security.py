"""Optional API keys and a CORS allow-list for the gateway; both are off by default.

API keys (SCRIBE_API_KEYS, SCRIBE_API_KEYS_FILE): every path except the public ones below needs
`Authorization: Bearer <key>` or `X-API-Key: <key>`, else 401 with `WWW-Authenticate: Bearer`.
The probes, the drawing page and the API description stay public. Keys are never logged.

CORS (SCRIBE_CORS_ORIGINS): a response to an allowed Origin carries Access-Control-Allow-Origin;
the gateway answers preflights itself (204 for an allowed origin, 403 otherwise), without a key,
because browsers never send credentials on a preflight.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from flask import Flask, Response, request

from serving.gateway.config import WARM_UP_ENVIRON, Settings
from serving.gateway.errors import ApiError

PUBLIC_PATHS = {"/", "/healthz", "/readyz", "/openapi.json", "/favicon.ico"}
PUBLIC_PREFIX = "/static/"
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Content-Type, Authorization, X-API-Key"
CORS_EXPOSED = "Retry-After, WWW-Authenticate"
CORS_MAX_AGE_SECONDS = 600


def read_api_keys(settings: Settings) -> list[str]:
    """The configured keys: SCRIBE_API_KEYS (comma-separated) plus SCRIBE_API_KEYS_FILE (one a line)."""
    keys = settings.api_keys.split(",")
    if settings.api_keys_file:
        try:
            lines = Path(settings.api_keys_file).read_text().splitlines()
        except OSError as error:
            raise SystemExit(f"SCRIBE_API_KEYS_FILE: cannot read {settings.api_keys_file}: "
                             f"{error.strerror}") from None
        stripped = [line.strip() for line in lines]
        file_keys = [line for line in stripped if line and not line.startswith("#")]
        if not file_keys:  # a mounted but empty secret must not silently open the API
            raise SystemExit(f"SCRIBE_API_KEYS_FILE: {settings.api_keys_file} holds no keys")
        keys += file_keys
    keys = [key.strip() for key in keys if key.strip()]
    if not all(key.isascii() and key.isprintable() for key in keys):
        # HTTP headers carry Latin-1 at best: a key outside printable ASCII could never match
        raise SystemExit("SCRIBE_API_KEYS: keys must be printable ASCII")
    return keys


def read_origins(settings: Settings) -> set[str]:
    return {o.strip().rstrip("/").lower() for o in settings.cors_origins.split(",") if o.strip()}


def digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps even the length of the keys out of the timing.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def key_matches(presented: str, key_digests: list[bytes]) -> bool:
    """Constant time: every configured key is compared, with no early exit on a match."""
    given = digest(presented)
    matched = False
    for key in key_digests:
        matched |= hmac.compare_digest(given, key)
    return matched


def presented_key() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip()


def install_security(app: Flask, settings: Settings) -> None:
    """Check API keys and answer CORS on every request, as configured in `settings`."""
    key_digests = [digest(key) for key in read_api_keys(settings)]
    origins = read_origins(settings)

    def origin_allowed(origin: str | None) -> bool:
        return bool(origin) and ("*" in origins or origin.rstrip("/").lower() in origins)

    @app.before_request
    def check_request():
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not origin_allowed(request.headers.get("Origin")):
                raise ApiError(403, "origin_not_allowed",
                               "this origin is not allowed to call the gateway (SCRIBE_CORS_ORIGINS)")
            preflight = Response(status=204)
            preflight.headers.update({
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE_SECONDS)})
            return preflight
        if key_digests and not (request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIX)
                                or request.environ.get(WARM_UP_ENVIRON)):
            presented = presented_key()
            if not presented:
                raise ApiError(401, "unauthorized", "an API key is required: send "
                               "'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                               {"WWW-Authenticate": "Bearer"})
            if not key_matches(presented, key_digests):
                raise ApiError(401, "unauthorized", "the API key is not valid",
                               {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return None

    @app.after_request
    def add_cors_headers(response: Response) -> Response:
        if not origins:
            return response
        response.vary.add("Origin")  # the answer depends on the Origin: caches must keep them apart
        origin = request.headers.get("Origin")
        if origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        return response
