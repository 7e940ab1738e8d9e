"""The talk's ladder, served side by side: `python -m training ladder` trains each lower rung as
its own model (digits-<rung>), the model config serves them beside digits and bard, the digits
endpoint reads a drawing with the rung a request names (the page's side-by-side view is tested in
Chromium in test_page.py). The `ladder` fixture is in conftest.py."""

from __future__ import annotations

import base64
import json

import requests
from drawings import draw_digit, png_bytes

from serving.tfserving.versions import WARMUP_FILE, pushed_versions
from training.ladder import LOWER_RUNGS, model_name


def test_the_ladder_command_trains_each_lower_rung_as_its_own_model(ladder):
    _, base, runs, output = ladder
    assert sorted(p.name for p in base.iterdir()) == sorted(
        ["digits", "bard", *(model_name(r) for r in LOWER_RUNGS)])
    for rung in LOWER_RUNGS:
        name = model_name(rung)
        assert pushed_versions(base / name) == [1]
        assert f"{name}: pushed version 1" in output
        metrics = json.loads(next(runs.glob(f"{name}/*/metrics.json")).read_text())
        assert metrics["model"] == name and metrics["settings"]["rung"] == rung
        assert not metrics["settings"]["augmented"]  # the talk trained on the digits as they are
        assert metrics["test_accuracy"] >= 0.70
        # the warmup records ask for the rung's own model, as TF Serving replays them
        assert name.encode() in (base / name / "1" / WARMUP_FILE).read_bytes()
    # digits and bard had versions: the ladder leaves them alone
    assert pushed_versions(base / "digits") == [1] and pushed_versions(base / "bard") == [1]


def test_the_softmax_rung_is_the_talk_s_plain_gradient_descent(ladder):
    _, _, runs, _ = ladder
    settings = json.loads(next(runs.glob("digits-softmax/*/metrics.json")).read_text())["settings"]
    assert (settings["optimizer"], settings["schedule"], settings["batch"]) == ("sgd", "constant", 100)


def predict(live, *, query: str = "", **kwargs) -> requests.Response:
    return requests.post(f"{live.url}/v1/digits/predict{query}", timeout=30, **kwargs)


def test_a_drawing_is_read_by_the_rung_a_request_names(ladder):
    live, *_ = ladder
    image = {"image": png_bytes(draw_digit(1))}
    assert predict(live, files=image).json()["model"] == {"name": "digits", "version": 1}
    for rung in LOWER_RUNGS:
        answer = predict(live, query=f"?model={rung}", files=image)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == {"name": model_name(rung), "version": 1}
        assert len(answer.json()["predictions"][0]["probabilities"]) == 10
    assert predict(live, query="?model=bn", files=image).json()["model"]["name"] == "digits"
    assert predict(live, query="?model=digits-conv", files=image).json()["model"]["name"] == "digits-conv"
    body = {"image": base64.b64encode(png_bytes(draw_digit(1))).decode(), "model": "dense"}
    assert predict(live, json=body).json()["model"]["name"] == "digits-dense"
    form = predict(live, files=image, data={"model": "softmax"})
    assert form.json()["model"]["name"] == "digits-softmax"


def test_the_client_reads_a_drawing_with_a_rung(ladder, tmp_path):
    from client.__main__ import main
    from client.scribe_client import ScribeClient

    live, *_ = ladder
    drawing = tmp_path / "seven.png"
    drawing.write_bytes(png_bytes(draw_digit(7)))
    assert ScribeClient(live.url).predict_digit(drawing, model="conv")["model"]["name"] == "digits-conv"
    assert main(["--url", live.url, "digit", str(drawing), "--model", "dense"]) == 0


def test_an_unknown_model_is_a_404_that_lists_the_known_ones(ladder):
    live, *_ = ladder
    answer = predict(live, query="?model=lenet", files={"image": png_bytes(draw_digit(3))})
    assert answer.status_code == 404
    error = answer.json()["error"]
    assert error["code"] == "unknown_model"
    assert "bn, conv-dropout, conv, dense, softmax" in error["message"]
    empty = predict(live, query="?model=", files={"image": png_bytes(draw_digit(3))})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "bad_request"


def test_pins_and_metrics_are_per_model(ladder):
    live, *_ = ladder
    image = {"image": png_bytes(draw_digit(7))}
    missing = predict(live, query="?model=softmax&version=2", files=image)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "version_not_found"
    assert "digits-softmax" in missing.json()["error"]["message"]
    assert predict(live, query="?model=softmax&version=1", files=image).status_code == 200
    metrics = requests.get(live.url + "/metrics", timeout=10).text
    assert 'scribe_model_call_seconds_count{model="digits-softmax",outcome="OK"}' in metrics


def test_a_rung_not_trained_yet_is_unavailable_and_the_service_ready_without_it(gateway):
    """The session's gateway has digits and bard only, as `make run` leaves it."""
    answer = predict(gateway, query="?model=conv", files={"image": png_bytes(draw_digit(2))})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_unavailable"
    assert requests.get(gateway.url + "/readyz", timeout=10).status_code == 200
    reports = {m["name"]: m for m in requests.get(gateway.url + "/v1/models", timeout=10).json()["models"]}
    assert not reports["digits-conv"]["available"] and reports["digits"]["available"]
