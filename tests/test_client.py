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
    assert {m["name"]: m["available"] for m in client.models()} == {"digits": True, "bard": True}
    with pytest.raises(ScribeError) as error:
        client.predict_digit(b"nope")
    assert error.value.status == 400


def test_cli_generate_streams_the_same_text_as_one_call(gateway):
    expected = ScribeClient(gateway.url).generate("ROMEO:", max_chars=120, seed=11)["text"]
    result = subprocess.run([sys.executable, "-m", "client", "--url", gateway.url, "generate", "ROMEO:",
                             "--max-chars", "120", "--seed", "11", "--stream"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ROMEO:" + expected + "\n"


def test_client_stream_yields_chunks_then_the_final_event(gateway):
    items = list(ScribeClient(gateway.url).generate_stream("To be", max_chars=100, seed=2))
    *chunks, final = items
    assert len(chunks) >= 3 and all(isinstance(c, str) for c in chunks)
    assert final["text"] == "".join(chunks) and final["model"]["name"] == "bard"
