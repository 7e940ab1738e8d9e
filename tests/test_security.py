"""Optional API keys and the CORS allow-list, through real gateways over one real model server.

Three gateways share the digits model server of the first: `open_gateway` has the defaults (no
keys, no CORS), `locked` has keys (two in SCRIBE_API_KEYS, one in a keys file) and one allowed
origin, `any_origin` allows every origin.
"""

import logging
import os
import subprocess
import sys

import conftest
import pytest
import requests
from conftest import DIGITS_CONFIG, ROOT, LiveGateway, copy_model_base
from drawings import draw_digit, png_bytes

from client import ScribeClient, ScribeError
from serving.gateway.config import Settings
from serving.gateway.security import read_api_keys

KEYS = ("k1-alpha-3f9c", "k2-bravo-81d0")
FILE_KEY = "k3-from-secret-file-77aa"
ORIGIN = "https://draw.example.org"


@pytest.fixture(scope="module")
def open_gateway(trained, tmp_path_factory):
    """The defaults: no API keys, no CORS. Its embedded model server serves the other gateways too."""
    folder = tmp_path_factory.mktemp("security")
    config = folder / "models.config"
    config.write_text(DIGITS_CONFIG % 'model_platform: "tensorflow"')
    live = LiveGateway(copy_model_base(trained, folder / "models"), model_config=str(config))
    live.wait_for_model("digits")
    yield live
    live.close()


def sharing_model_server(gateway: LiveGateway, **overrides) -> LiveGateway:
    """Another gateway in front of `gateway`'s model server, as the gateway fronts TF Serving."""
    embedded = gateway.embedded
    return LiveGateway(gateway.settings.model_dir, model_server=f"127.0.0.1:{embedded.grpc_port}",
                       model_config=gateway.settings.model_config, **overrides)


@pytest.fixture(scope="module")
def locked(open_gateway, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("secrets") / "api_keys"
    keys_file.write_text(f"# one key a line\n{FILE_KEY}\n  # rotate this one in June\n")
    live = sharing_model_server(open_gateway, api_keys=",".join(KEYS), api_keys_file=str(keys_file),
                                cors_origins=ORIGIN)
    yield live
    live.close()


@pytest.fixture(scope="module")
def any_origin(open_gateway):
    live = sharing_model_server(open_gateway, cors_origins="*")
    yield live
    live.close()


def predict(gateway: LiveGateway, digit: int = 3, **headers) -> requests.Response:
    return conftest.predict(gateway, headers=headers,
                            files={"image": ("d.png", png_bytes(draw_digit(digit)), "image/png")})


def preflight(gateway: LiveGateway, origin: str, path: str = "/v1/digits/predict") -> requests.Response:
    return requests.options(gateway.url + path, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def cors_headers(response: requests.Response) -> dict:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


# ---- API keys -------------------------------------------------------------------------------

def test_without_configured_keys_the_api_is_open(open_gateway):
    response = predict(open_gateway, digit=7)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["digit"] == 7


def test_a_request_without_a_key_gets_401_json_and_www_authenticate(locked):
    response = predict(locked)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and body["error"]["code"] == "unauthorized"
    assert "Authorization: Bearer" in body["error"]["message"]


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/digits/predict"),
                                          ("POST", "/v1/text/generate"), ("GET", "/metrics")])
def test_the_api_and_metrics_need_a_key(locked, method, path):
    response = requests.request(method, locked.url + path, json={"prompt": "ROMEO:"}, timeout=10)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("headers", [
    bearer("not-a-key"),
    bearer(KEYS[0][:-1]),                 # a prefix of a key
    bearer(KEYS[0] + "0"),                # a key with more after it
    bearer(KEYS[0].upper()),              # keys are case-sensitive
    bearer(",".join(KEYS)),               # the whole configured list is not a key
    bearer("# rotate this one in June"),  # an indented comment in the keys file is not a key
    bearer("k1-alpha-3f9\u00e9"),         # not ASCII: still a 401, never a 500
    {"Authorization": "Bearer "},
    {"Authorization": f"Basic {KEYS[0]}"},  # only the Bearer scheme carries a key
    {"X-API-Key": "not-a-key"},
], ids=["wrong", "prefix", "longer", "case", "list", "comment", "latin1", "empty", "basic", "x-api-key"])
def test_a_wrong_key_gets_401(locked, headers):
    response = predict(locked, **headers)
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("key", [*KEYS, FILE_KEY], ids=["first", "second", "from-file"])
@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
def test_any_configured_key_in_either_header_gets_a_real_prediction(locked, key, header):
    headers = bearer(key) if header == "Authorization" else {"X-API-Key": key}
    response = predict(locked, digit=4, **headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "digits", "version": 1}
    assert body["predictions"][0]["digit"] == 4


def test_the_client_and_its_command_line_send_a_key(locked, tmp_path):
    assert ScribeClient(locked.url, api_key=KEYS[1]).models()[0]["name"] == "digits"
    with pytest.raises(ScribeError) as refused:
        ScribeClient(locked.url).models()
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    drawing = tmp_path / "five.png"
    draw_digit(5).save(drawing)
    command = [sys.executable, "-m", "client", "--url", locked.url, "digit", str(drawing)]
    environment = {k: v for k, v in os.environ.items() if k != "SCRIBE_API_KEY"}
    for extra, env, code, output in [
            ([], environment, 1, "401 unauthorized"),
            ([], {**environment, "SCRIBE_API_KEY": FILE_KEY}, 0, "5 (confidence"),
            (["--api-key", KEYS[0]], environment, 0, "5 (confidence")]:
        result = subprocess.run(command[:3] + extra + command[3:], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == code, result.stderr
        assert output in result.stdout + result.stderr


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/static/app.js", "/openapi.json"])
def test_probes_the_drawing_page_and_the_api_description_need_no_key(locked, path):
    assert requests.get(locked.url + path, timeout=10).status_code == 200


def test_metrics_with_a_key_count_the_refused_requests(locked):
    predict(locked)
    response = requests.get(locked.url + "/metrics", headers=bearer(KEYS[1]), timeout=10)
    assert response.status_code == 200
    refused = [line for line in response.text.splitlines()
               if line.startswith("scribe_http_requests_total{") and 'status="401"' in line]
    assert refused and any('endpoint="/v1/digits/predict"' in line for line in refused)


def test_a_refusal_carries_no_stack_trace_and_does_not_echo_the_key(locked):
    response = predict(locked, **bearer("guess-5551234"))
    assert response.status_code == 401
    assert "Traceback" not in response.text and "guess-5551234" not in response.text
    assert set(response.json()["error"]) == {"code", "message"}


def test_keys_never_reach_the_logs(locked, caplog):
    caplog.set_level(logging.DEBUG)
    assert predict(locked, **bearer("guess-5551234")).status_code == 401
    assert predict(locked, **{"X-API-Key": KEYS[0]}).status_code == 200
    assert "/v1/digits/predict" in caplog.text  # the requests were logged, without their keys
    logged = caplog.text + repr(locked.settings)  # settings are what a startup log would print
    assert "guess-5551234" not in logged and KEYS[0] not in logged and KEYS[1] not in logged


def test_a_keys_file_without_keys_refuses_to_start(tmp_path):
    empty = tmp_path / "api_keys"
    empty.write_text("# nothing here yet\n\n")
    with pytest.raises(SystemExit, match="holds no keys"):  # an empty secret must not open the API
        read_api_keys(Settings(api_keys_file=str(empty)))
    with pytest.raises(SystemExit, match="cannot read"):
        read_api_keys(Settings(api_keys_file=str(tmp_path / "missing")))
    with pytest.raises(SystemExit, match="printable ASCII"):  # a header could never carry it
        read_api_keys(Settings(api_keys="ascii-key,ключ"))


# ---- CORS -----------------------------------------------------------------------------------

def test_an_allowed_origin_gets_allow_origin_and_vary(locked):
    response = requests.get(locked.url + "/v1/models", headers={"Origin": ORIGIN, **bearer(KEYS[0])},
                            timeout=10)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in [v.strip() for v in response.headers["Vary"].split(",")]


def test_a_refusal_is_readable_by_an_allowed_origin(locked):
    response = predict(locked, Origin=ORIGIN)  # the page's script can show the 401's message
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_a_preflight_from_an_allowed_origin_gets_204_without_a_key(locked):
    response = preflight(locked, ORIGIN)
    assert response.status_code == 204 and response.content == b""
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    methods = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "POST"} <= methods
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "authorization", "x-api-key"} <= allowed
    assert int(response.headers["Access-Control-Max-Age"]) > 0


@pytest.mark.parametrize("origin", ["https://evil.example", "http://draw.example.org",
                                    "https://draw.example.org.evil.example", "null"])
def test_a_disallowed_origin_gets_no_cors_headers(locked, origin):
    response = requests.get(locked.url + "/v1/models", headers={"Origin": origin, **bearer(KEYS[0])},
                            timeout=10)
    assert response.status_code == 200  # served, but the browser will not let the page read it
    assert cors_headers(response) == {}


@pytest.mark.parametrize("origin", ["https://evil.example", "https://draw.example.org.evil.example"])
def test_a_preflight_from_a_disallowed_origin_gets_403_json(locked, origin):
    response = preflight(locked, origin)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert cors_headers(response) == {}


def test_cors_is_off_by_default(open_gateway):
    response = requests.get(open_gateway.url + "/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert response.status_code == 200 and cors_headers(response) == {}
    refused = preflight(open_gateway, ORIGIN)
    assert refused.status_code == 403 and cors_headers(refused) == {}


def test_a_star_allows_any_origin(any_origin):
    origin = "http://anything.example:3000"
    response = requests.get(any_origin.url + "/v1/models", headers={"Origin": origin}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert preflight(any_origin, origin).status_code == 204
