"""HTTP -> gateway -> gRPC -> embedded model server -> SavedModel, with every input form."""

import base64
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import predict
from drawings import INKS, LIGHTS, PAPERS, clean_strokes, draw_digit, photo_of_digit, png_bytes
from PIL import Image

from serving.gateway.preprocess import decode_image, preprocess_drawing


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a valid CRC and no real data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.mark.parametrize("digit", range(10))
def test_clearly_drawn_digits_are_recognised(gateway, digit):
    response = predict(gateway, files={"image": ("d.png", png_bytes(draw_digit(digit)), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": "digits", "version": 1}
    [prediction] = body["predictions"]
    assert prediction["digit"] == digit
    assert len(prediction["probabilities"]) == 10
    assert prediction["confidence"] == max(prediction["probabilities"])
    assert sum(prediction["probabilities"]) == pytest.approx(1, abs=1e-3)


def test_photos_of_digits_on_paper_are_read_as_reliably_as_clean_drawings(gateway):
    """Each digit photographed on each paper, in turn in pencil, ink and black, under each
    light, sent as the JPEG a phone sends; and the same strokes drawn black on white, sent as a
    PNG: no photo is misread whose clean drawing is read right (the quick test model reads nearly
    every clean drawing right)."""
    photos, clean, labels = [], [], []
    for paper in PAPERS:
        for digit in range(10):
            ink, light = list(INKS)[digit % 3], LIGHTS[(digit + PAPERS.index(paper)) % 3]
            seed = 100 * PAPERS.index(paper) + digit
            photos.append(("image", (f"{digit}.jpg", photo_of_digit(digit, paper, ink, light, seed=seed),
                                     "image/jpeg")))
            clean.append(("image", (f"{digit}.png", clean_strokes(digit, seed=seed), "image/png")))
            labels.append(digit)

    def read(files) -> list[int]:
        response = predict(gateway, files=files)
        assert response.status_code == 200, response.text
        return [p["digit"] for p in response.json()["predictions"]]

    read_photos, read_clean = read(photos), read(clean)
    assert sum(d == label for d, label in zip(read_clean, labels, strict=True)) >= 0.9 * len(labels)
    # Every digit read right from its clean drawing is read right from its photo.
    misread = [(label, photo) for label, photo, drawing in zip(labels, read_photos, read_clean, strict=True)
               if drawing == label != photo]
    assert not misread, misread


def test_concurrent_requests_share_predict_calls_and_each_gets_its_own_digits(gateway):
    calls = gateway.app.extensions["scribe"].digit_calls
    calls_before, requests_before = calls.batches_run, calls.requests_run
    # 30 requests of one to three drawings each, sent at once: each answer must be its own.
    wanted = [[(i + k) % 10 for k in range(1 + i % 3)] for i in range(30)]
    bodies = [[("image", (f"{d}.png", png_bytes(draw_digit(d)), "image/png")) for d in ds] for ds in wanted]
    start = threading.Barrier(len(bodies))

    def send(files):
        start.wait()
        return predict(gateway, files=files)

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert [[p["digit"] for p in r.json()["predictions"]] for r in responses] == wanted
    assert all(r.json()["model"]["version"] == 1 for r in responses)
    assert calls.requests_run - requests_before == len(bodies)
    assert calls.batches_run - calls_before < len(bodies)  # some requests shared a call
    metrics = requests.get(gateway.url + "/metrics", timeout=10).text
    assert "scribe_requests_per_model_call_count" in metrics


def test_pinned_and_unpinned_requests_never_share_a_call(gateway):
    body = png_bytes(draw_digit(4))
    start = threading.Barrier(12)

    def send(i):
        start.wait()
        params = {"version": 1} if i % 2 else {}
        return predict(gateway, params=params, data=body, headers={"Content-Type": "image/png"})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(12)))
    assert [r.json()["predictions"][0]["digit"] for r in responses] == [4] * 12
    assert [r.json()["model"]["version"] for r in responses] == [1] * 12


def test_several_images_in_one_multipart_request(gateway):
    files = [("image", (f"{d}.png", png_bytes(draw_digit(d)), "image/png")) for d in (3, 1, 4)]
    body = predict(gateway, files=files).json()
    assert [p["digit"] for p in body["predictions"]] == [3, 1, 4]


def test_raw_image_body(gateway):
    response = predict(gateway, data=png_bytes(draw_digit(2)), headers={"Content-Type": "image/png"})
    assert response.json()["predictions"][0]["digit"] == 2


def test_json_base64_and_data_url_and_images_list(gateway):
    encoded = base64.b64encode(png_bytes(draw_digit(5))).decode()
    assert predict(gateway, json={"image": encoded}).json()["predictions"][0]["digit"] == 5
    data_url = "data:image/png;base64," + encoded
    assert predict(gateway, json={"image": data_url}).json()["predictions"][0]["digit"] == 5
    eight = base64.b64encode(png_bytes(draw_digit(8))).decode()
    body = predict(gateway, json={"images": [encoded, eight]}).json()
    assert [p["digit"] for p in body["predictions"]] == [5, 8]


def test_json_pixels_in_mnist_form(gateway):
    pixels = preprocess_drawing(decode_image(png_bytes(draw_digit(6)), 10**7))
    body = predict(gateway, json={"pixels": pixels.tolist()}).json()
    assert body["predictions"][0]["digit"] == 6


def test_pinned_version_answers_and_unknown_version_is_404(gateway):
    image = {"image": ("d.png", png_bytes(draw_digit(1)), "image/png")}
    assert predict(gateway, files=image, params={"version": 1}).json()["model"]["version"] == 1
    missing = predict(gateway, files=image, params={"version": 99})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "version_not_found"


PNG = {"Content-Type": "image/png"}


@pytest.mark.parametrize("kwargs, status, code", [
    ({"data": b"definitely not an image", "headers": PNG}, 400, "invalid_image"),
    ({"data": png_bytes(draw_digit(3))[:300], "headers": PNG}, 400, "invalid_image"),
    ({"data": b"", "headers": PNG}, 400, "invalid_image"),
    ({"data": png_claiming(100000, 100000), "headers": PNG}, 413, "image_too_large"),
    ({"data": png_claiming(5000, 5000), "headers": PNG}, 413, "image_too_large"),
    ({"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
    ({"json": ["a", "list"]}, 400, "bad_request"),
    ({"json": {"image": 5}}, 400, "bad_request"),
    ({"json": {"image": "%%%not base64%%%"}}, 400, "bad_request"),
    ({"json": {"images": "abc"}}, 400, "bad_request"),
    ({"json": {"images": []}}, 400, "bad_request"),
    ({"json": {"pixels": "abc"}}, 400, "invalid_image"),
    ({"json": {"pixels": [[0.5] * 27] * 28}}, 400, "invalid_image"),
    ({"json": {"pixels": [[2.0] * 28] * 28}}, 422, "out_of_range"),
    ({"json": {"nothing": 1}}, 400, "bad_request"),
    ({"json": {"image": base64.b64encode(png_bytes(Image.new("L", (50, 50), 255))).decode()}},
     422, "no_ink"),
    ({"files": {"other": ("x.png", b"x")}}, 400, "bad_request"),
    ({"files": {"image": (None, "not a file upload")}}, 400, "bad_request"),
    ({"json": {"pixels": [["0.5"] * 28] * 28}}, 400, "invalid_image"),
    ({"json": {"pixels": [[True] * 28] * 28}}, 400, "invalid_image"),
    ({"json": {"pixels": [[0] * 28] * 28}}, 422, "no_ink"),
    ({"json": {"pixels": [[[0.5] * 28] * 28, [[0] * 28] * 28]}}, 422, "no_ink"),
    ({"params": {"version": "abc"}, "json": {"pixels": [[0.5] * 28] * 28}}, 400, "bad_request"),
    ({"params": {"version": "99999999999999999999"}, "json": {"pixels": [[0.5] * 28] * 28}},
     422, "out_of_range"),
    ({"json": {"pixels": [[0.5] * 28] * 28, "version": 1.5}}, 400, "bad_request"),
    ({"json": {"pixels": [[0.5] * 28] * 28, "version": True}}, 400, "bad_request"),
])
def test_bad_input_gets_its_4xx_json_error(gateway, kwargs, status, code):
    response = predict(gateway, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in response.text and "/work" not in response.text


def test_sparse_specks_on_a_huge_canvas_are_not_a_server_error(gateway):
    canvas = Image.new("L", (1000, 1000), 255)
    canvas.putpixel((100, 100), 0)
    canvas.putpixel((900, 900), 0)
    response = predict(gateway, data=png_bytes(canvas), headers=PNG)
    assert response.status_code in (200, 422), response.text


def test_body_over_the_limit_is_413(gateway):
    too_big = b"\0" * (gateway.settings.max_body_bytes + 1)
    response = predict(gateway, data=too_big, headers={"Content-Type": "image/png"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_entity_too_large"


def test_service_keeps_answering_after_bad_input(gateway):
    for _ in range(3):
        predict(gateway, data=b"junk", headers={"Content-Type": "image/png"})
    assert requests.get(gateway.url + "/healthz", timeout=5).json() == {"status": "ok"}
    assert predict(gateway, files={"image": png_bytes(draw_digit(7))}).json()["predictions"][0]["digit"] == 7


def test_models_lists_versions_from_the_model_server(gateway):
    answer = requests.get(gateway.url + "/v1/models", timeout=10).json()
    models = {m["name"]: m for m in answer["models"]}
    assert models["digits"]["available"] is True
    assert models["digits"]["versions"] == [{"version": 1, "state": "AVAILABLE", "error": ""}]
    assert models["bard"]["serving_version"] == 1
    server = gateway.settings.model_server
    assert models["digits"]["servers"] == models["bard"]["servers"] == [server]
    lower_rungs = {name: None for name in models if name.startswith("digits-")}  # not trained here
    assert set(lower_rungs) == {"digits-softmax", "digits-dense", "digits-conv", "digits-conv-dropout"}
    assert answer["servers"] == [{"address": server, "answered": True, "ready": True,
                                  "serving": {"digits": 1, "bard": 1, **lower_rungs}}]


def test_a_name_that_resolves_to_no_model_server_is_not_ready_and_says_so(trained):
    from conftest import LiveGateway

    live = LiveGateway(trained.model_base, model_server="dns:///no-such-model-server.invalid:8500",
                       model_timeout_seconds=2)
    try:
        response = requests.get(live.url + "/readyz", timeout=10)
        assert response.status_code == 503 and response.json()["servers"] == []
        assert {m["reason"] for m in response.json()["models"]} == {"no model server found"}
    finally:
        live.close()


def test_the_model_servers_a_target_names_are_each_address_it_names_or_resolves_to():
    from serving.gateway.model_servers import server_addresses

    assert server_addresses("127.0.0.1:8500,127.0.0.2:8500") == ["127.0.0.1:8500", "127.0.0.2:8500"]
    assert server_addresses("[::1]:8500,[::2]:8500") == ["[::1]:8500", "[::2]:8500"]
    assert server_addresses("unix:/tmp/model.sock") == ["unix:/tmp/model.sock"]
    assert server_addresses("tfserving:8500") == ["tfserving:8500"]  # one server, as named
    assert server_addresses("dns:///127.0.0.1:8500") == ["127.0.0.1:8500"]
    assert set(server_addresses("dns:///localhost:8500")) <= {"127.0.0.1:8500", "[::1]:8500"}
    assert server_addresses("dns:///localhost:8500")


def test_readyz_is_200_when_the_digits_and_text_models_are_available(gateway):
    """The ladder's lower rungs (digits-<rung>) are optional: not trained here, still ready."""
    response = requests.get(gateway.url + "/readyz", timeout=10)
    assert response.status_code == 200
    assert {m["name"]: m["available"] for m in response.json()["models"]} == {"digits": True, "bard": True}
    everything = requests.get(gateway.url + "/v1/models", timeout=10).json()["models"]
    lower = [m for m in everything if m["name"].startswith("digits-")]
    assert lower and not any(m["available"] for m in lower)


def test_readyz_is_503_while_a_model_has_no_version(trained):
    from conftest import LiveGateway

    live = LiveGateway(trained.model_base)  # digits only: bard has no pushed version
    try:
        live.wait_for_model("digits")
        response = requests.get(live.url + "/readyz", timeout=10)
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert [m["name"] for m in response.json()["models"] if not m["available"]] == ["bard"]
        text = requests.post(live.url + "/v1/text/generate", json={"prompt": "A"}, timeout=10)
        assert text.status_code == 503 and text.json()["error"]["code"] == "model_unavailable"
    finally:
        live.close()


def test_metrics_count_requests_by_endpoint_and_status(gateway):
    predict(gateway, data=b"junk", headers={"Content-Type": "image/png"})
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    assert 'scribe_http_requests_total{endpoint="/v1/digits/predict",method="POST",status="400"}' in text
    assert 'scribe_http_requests_total{endpoint="/v1/digits/predict",method="POST",status="200"}' in text
    assert "scribe_http_request_seconds_bucket" in text
    assert 'scribe_model_call_seconds_count{model="digits",outcome="OK"}' in text


def test_made_up_methods_add_no_metric_series_and_the_content_type_is_well_formed(gateway):
    for number in range(5):
        assert requests.request(f"MADEUP{number}", gateway.url + "/healthz", timeout=10).status_code == 405
    response = requests.get(gateway.url + "/metrics", timeout=10)
    assert "MADEUP" not in response.text
    assert 'scribe_http_requests_total{endpoint="unmatched",method="other",status="405"}' in response.text
    assert response.headers["Content-Type"].count("charset") == 1, response.headers["Content-Type"]


def test_a_wrong_method_gets_405_with_allow(gateway):
    response = requests.put(gateway.url + "/v1/digits/predict", timeout=10)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_unknown_route_is_a_json_404(gateway):
    response = requests.get(gateway.url + "/v1/nothing", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_model_server_timeout_is_504(gateway, tmp_path):
    from conftest import LiveGateway

    # The embedded server waits 0.3 s for company before each model run, so a 50 ms deadline
    # expires every time. A deadline alone did not: gRPC keeps time in milliseconds, and on a
    # fast machine a digit call answered within even a 1 µs deadline. Each warmup run waits the
    # 0.3 s too: one run per record (5 records: 1.5 s) instead of the default 30 (45 s of waiting).
    slow = tmp_path / "batching.config"
    slow.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 300000 }\n")
    live = LiveGateway(Path(gateway.settings.model_dir), model_timeout_seconds=0.05,
                       batching_config=str(slow), warmup_iterations=1)
    try:
        # A guard against a hang, not a speed limit: loading takes seconds.
        assert live.embedded.manager.wait_until_available(["digits", "bard"], timeout=300)
        response = predict(live, files={"image": png_bytes(draw_digit(1))})
        assert response.status_code == 504 and response.json()["error"]["code"] == "model_timeout"
        text = requests.post(live.url + "/v1/text/generate", json={"prompt": "A", "max_chars": 2000},
                             timeout=30)
        assert text.status_code == 504
        assert requests.get(live.url + "/healthz", timeout=5).status_code == 200
    finally:
        live.close()


def test_model_server_gone_gives_503_and_readyz_503(trained, tmp_path):
    from conftest import LiveGateway, free_port

    live = LiveGateway(trained.model_base, model_server=f"127.0.0.1:{free_port()}",
                       model_timeout_seconds=2)
    try:
        response = predict(live, files={"image": png_bytes(draw_digit(1))})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "model_unavailable"
        assert requests.get(live.url + "/readyz", timeout=10).status_code == 503
    finally:
        live.close()
