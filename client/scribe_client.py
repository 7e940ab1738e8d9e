"""ScribeClient: call the gateway over HTTP. Needs only `requests`, not TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import requests

DEFAULT_URL = "http://localhost:8080"


class ScribeError(Exception):
    """The gateway answered with an error: `status`, `code` and `message` say which."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ScribeClient:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 30.0, api_key: str | None = None):
        """`api_key`: sent as `X-API-Key`, for a gateway with SCRIBE_API_KEYS (not as Authorization,
        which requests replaces with ~/.netrc's credentials for the host if it has any)."""
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["X-API-Key"] = api_key

    def predict_digit(self, image: bytes | str | Path, version: int | None = None,
                      model: str | None = None) -> dict:
        """One drawing (PNG/JPEG bytes or a file path) -> {"digit", "confidence", "probabilities",
        "model"}, read by `model` (a rung of the ladder: bn, conv-dropout, conv, dense, softmax;
        default bn)."""
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else image
        params = {key: value for key, value in (("version", version), ("model", model)) if value}
        body = self._call("POST", "/v1/digits/predict", files={"image": ("drawing", data)},
                          params=params)
        return {**body["predictions"][0], "model": body["model"]}

    def generate(self, prompt: str, max_chars: int = 300, temperature: float | None = None,
                 top_k: int | None = None, seed: int | None = None) -> dict:
        """One call: {"model", "prompt", "text", "seed"}."""
        return self._call("POST", "/v1/text/generate",
                          json=_generation(prompt, max_chars, temperature, top_k, seed))

    def generate_stream(self, prompt: str, max_chars: int = 300, temperature: float | None = None,
                        top_k: int | None = None, seed: int | None = None):
        """Yield text chunks as the gateway writes them; the last item is the final event (a dict)."""
        body = {**_generation(prompt, max_chars, temperature, top_k, seed), "stream": True}
        try:
            response = self.session.post(self.url + "/v1/text/generate", json=body, stream=True,
                                         timeout=self.timeout,
                                         headers={"Accept": "text/event-stream"})
        except requests.RequestException as error:
            raise ScribeError(0, "unreachable", f"cannot reach {self.url}: {error}") from None
        with response:
            if response.status_code >= 400:
                self._raise(response)
            event = None
            try:
                for line in response.iter_lines(decode_unicode=True):
                    if line.startswith("event: "):
                        event = line[len("event: "):]
                    elif line.startswith("data: "):
                        data = json.loads(line[len("data: "):])
                        if event == "chunk":
                            yield data["text"]
                        elif event == "done":
                            yield data
                            return
                        elif event == "error":
                            error = data["error"]
                            raise ScribeError(502, error["code"], error["message"])
            except (requests.RequestException, ValueError, KeyError, TypeError) as error:
                raise ScribeError(502, "incomplete_stream",
                                  f"the stream from {self.url} broke off: {error}") from None
            # A stream always ends with a done or error event: without one, text is missing.
            raise ScribeError(502, "incomplete_stream",
                              f"the stream from {self.url} ended before its done event")

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models")["models"]

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as error:
            raise ScribeError(0, "unreachable", f"cannot reach {self.url}: {error}") from None
        if response.status_code >= 400:
            self._raise(response)
        try:
            return response.json()
        except ValueError:
            raise ScribeError(response.status_code, "invalid_response",
                              f"{self.url}{path} did not answer JSON: is it a Scribe gateway?") from None

    @staticmethod
    def _raise(response: requests.Response):
        try:
            body = response.json()
        except ValueError:
            body = {}
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise ScribeError(response.status_code, error.get("code", "http_error"),
                          error.get("message", response.reason))


def _generation(prompt, max_chars, temperature, top_k, seed) -> dict:
    body = {"prompt": prompt, "max_chars": max_chars, "temperature": temperature, "top_k": top_k,
            "seed": seed}
    return {key: value for key, value in body.items() if value is not None}
