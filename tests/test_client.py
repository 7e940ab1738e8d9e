"""The Python client and its command line, against a live gateway."""

import subprocess
import sys

import pytest
from conftest import ROOT
from drawings import draw_digit

from client import ScribeClient, ScribeError


def test_cli_prints_the_digit_and_its_confidence(gateway, tmp_path):
    drawing = tmp_path / "drawing.png"
    draw_digit(3).save(drawing)
    result = subprocess.run([sys.executable, "-m", "client", "--url", gateway.url, "digit", str(drawing)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3 (confidence ")
    assert "digits version 1" in result.stdout


def test_cli_reports_gateway_errors_on_stderr(gateway, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "-m", "client", "--url", gateway.url, "digit", str(junk)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "400 invalid_image" in result.stderr


def test_client_class(gateway, tmp_path):
    client = ScribeClient(gateway.url)
    drawing = tmp_path / "nine.png"
    draw_digit(9).save(drawing)
    assert client.predict_digit(drawing)["digit"] == 9
    assert {m["name"] for m in client.models()} == {"digits", "bard"}
    with pytest.raises(ScribeError) as error:
        client.predict_digit(b"nope")
    assert error.value.status == 400
