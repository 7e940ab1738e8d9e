"""The Python client and its command line, against a live gateway."""

import http.server
import subprocess
import sys
import threading

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
    available = {m["name"]: m["available"] for m in client.models()}
    assert available["digits"] and available["bard"]
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


class CannedGateway(http.server.BaseHTTPRequestHandler):
    """Not a gateway: answers every request with `body` (status 200, `content_type`), or, for a
    stream, one chunk event and then either a clean end without the done event or a cut
    connection. What a client sees when a gateway worker dies mid-stream, or the URL is wrong."""

    protocol_version = "HTTP/1.1"
    content_type, body, stream_end = "text/html", b"<html>not scribe</html>", None

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = b'event: chunk\ndata: {"text": "Whe"}\n\n'
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        if self.stream_end == "clean":
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def canned():
    servers = []

    def start(**attributes) -> str:
        handler = type("Handler", (CannedGateway,), attributes)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("end", ["clean", "cut"])
def test_a_stream_that_ends_without_its_done_event_is_an_error_not_a_short_text(canned, end):
    url = canned(stream_end=end)
    stream = ScribeClient(url, timeout=10).generate_stream("ROMEO:", max_chars=100)
    assert next(stream) == "Whe"
    with pytest.raises(ScribeError) as error:
        next(stream)
    assert (error.value.status, error.value.code) == (502, "incomplete_stream")
    result = subprocess.run([sys.executable, "-m", "client", "--url", url, "generate", "ROMEO:",
                             "--stream"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout.startswith("ROMEO:Whe")
    assert "502 incomplete_stream" in result.stderr and "Traceback" not in result.stderr


def test_an_answer_that_is_not_json_is_a_clear_error(canned):
    with pytest.raises(ScribeError) as error:
        ScribeClient(canned(), timeout=10).models()
    assert (error.value.status, error.value.code) == (200, "invalid_response")
    assert "is it a Scribe gateway?" in error.value.message


def test_cli_reports_an_image_it_cannot_read(tmp_path):
    result = subprocess.run([sys.executable, "-m", "client", "--url", "http://127.0.0.1:9", "digit",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"error: cannot read {tmp_path}" in result.stderr and "Traceback" not in result.stderr
