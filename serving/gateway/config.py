"""The configuration of `python -m serving`: environment variables with documented defaults, read
in one place. The gateway reads most of them; the fields marked "embedded server" configure the
model server that `python -m serving` starts when SCRIBE_MODEL_SERVER is empty."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: serving/gateway/config.py


NEEDS_A_MODEL_SERVER = (
    "the gateway needs a model server: set SCRIBE_MODEL_SERVER to a TF Serving gRPC address "
    "(host:port or unix:PATH), or run `python -m serving`, which starts the embedded one")


def channel_target(target: str) -> str:
    """SCRIBE_MODEL_SERVER as a gRPC target: one address (host:port, unix:PATH), a name for every
    address it resolves to (dns:///tfserving:8500, as Docker's and Kubernetes' headless services
    give them), or a comma-separated list of IP addresses with their ports."""
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    if len(addresses) < 2:
        return target.strip()
    try:
        hosts = [ipaddress.ip_address(a.rsplit(":", 1)[0].strip("[]")) for a in addresses]
    except ValueError:
        raise ValueError(f"SCRIBE_MODEL_SERVER={target!r}: a list names IP addresses with ports; "
                         "for host names use dns:///NAME:PORT") from None
    if len({h.version for h in hosts}) > 1:
        raise ValueError(f"SCRIBE_MODEL_SERVER={target!r}: IPv4 and IPv6 addresses cannot be mixed")
    return f"ipv{hosts[0].version}:{','.join(addresses)}"


# In the WSGI environ of the gateway's own warm-up requests (serving/gateway/app.py: warm_up_requests):
# the HTTP metrics leave them out and the API key check lets them through. No client can set it:
# a WSGI server puts request headers under HTTP_* keys.
WARM_UP_ENVIRON = "scribe.warm_up"
EXTENSION = "scribe"  # the app.extensions key of the app's Gateway (serving/gateway/state.py)


@dataclass(frozen=True)
class Settings:
    """Every field is read from the environment variable SCRIBE_<FIELD NAME> (PORT for port)."""

    # TF Serving's gRPC address: host:port, unix:PATH, dns:///NAME:PORT (every address the name
    # resolves to) or IP:PORT,IP:PORT (calls spread over them, see model_client.py); empty:
    # python -m serving starts the embedded one
    model_server: str = ""
    model_config: str = str(ROOT / "serving" / "models.config")
    model_dir: str = str(ROOT / "models")  # embedded server: local folder for /models base paths
    poll_seconds: float = 1.0  # embedded server: how often to look for new versions
    intra_op_threads: int = 1  # embedded server: TensorFlow threads per op (0: TF's default)
    # embedded server: TensorFlow's inter-op threads (0: TF's default pool, one thread per core, as
    # TF Serving); -1 runs each model call on the thread that makes it, with no hand-off to a pool
    inter_op_threads: int = 0
    batching_config: str = str(ROOT / "serving" / "batching.config")  # embedded server; "" = off
    # embedded server: runs of each warmup record as a version loads (TF Serving's
    # --num_request_iterations_for_warmup, set alike in docker-compose.yml); 30 makes the first
    # generation after a load as fast as the later ones, for about 0.2 s more per bard version
    warmup_iterations: int = 30
    model_timeout_seconds: float = 10.0  # deadline of every gRPC call to the model server
    # Digit Predict calls running at once per gateway process (and model pin); requests arriving
    # meanwhile share the next call, up to max_images rows (tfserving/batching.py). 0: one
    # call per request.
    coalesce_calls: int = 1
    # Generations in flight per gateway process; more are turned away at once (429). Half of
    # gunicorn's 16 threads: a flood of generations leaves threads for digits, /readyz and
    # /metrics, and 8 at a time (up to ~1 s each for 2,000 characters on the cpu model, batched
    # by the model server) keep the model busy; a queue beyond that only adds waiting.
    max_generations: int = 8
    # A client that sends or reads nothing for this long is disconnected (slowloris, a stalled
    # reader of a stream): each waiting client holds one of gunicorn's threads.
    client_timeout_seconds: float = 30.0
    max_body_bytes: int = 10 * 1024 * 1024
    api_keys: str = dataclasses.field(default="", repr=False)  # comma-separated; empty: keys off
    api_keys_file: str = ""  # a file with one API key per line (Docker secrets), added to api_keys
    cors_origins: str = ""  # comma-separated origins allowed by CORS, "*" for any; empty: no CORS
    max_image_pixels: int = 4096 * 4096  # decompression bomb guard, checked before decoding
    max_images: int = 64  # images per digits request
    max_prompt_chars: int = 4000
    stream_chunk_chars: int = 40  # characters per server-sent event (one model call each)
    digits_model: str = "digits"
    text_model: str = "bard"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    threads: int = 16

    @classmethod
    def from_env(cls, environ=os.environ, **overrides) -> Settings:
        values = {}
        for field in fields(cls):
            name = "PORT" if field.name == "port" else f"SCRIBE_{field.name.upper()}"
            if name in environ:
                kind = {"int": int, "float": float}.get(field.type, str)
                try:
                    values[field.name] = kind(environ[name])
                except ValueError:
                    raise SystemExit(f"{name}={environ[name]!r} is not a valid {field.type}") from None
        values.update(overrides)
        return cls(**values)
