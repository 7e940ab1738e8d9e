"""ScribeClient: call the gateway over HTTP. Needs only `requests`, not TensorFlow."""

from __future__ import annotations

from pathlib import Path

import requests

DEFAULT_URL = "http://localhost:8080"


class ScribeError(Exception):
    """The gateway answered with an error: `status`, `code` and `message` say which."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ScribeClient:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 30.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()

    def predict_digit(self, image: bytes | str | Path, version: int | None = None) -> dict:
        """One drawing (PNG/JPEG bytes or a file path) -> {"digit", "confidence", "probabilities",
        "model"}."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        params = {"version": version} if version else None
        body = self._call("POST", "/v1/digits/predict", files={"image": ("drawing", data)},
                          params=params)
        return {**body["predictions"][0], "model": body["model"]}

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models")["models"]

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            raise ScribeError(0, "unreachable", f"cannot reach {self.url}: {error}") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise ScribeError(response.status_code, error.get("code", "http_error"),
                              error.get("message", response.reason))
        return body
