"""The embedded model server: TF Serving's gRPC and REST APIs, in Python, for machines
without the TF Serving container. It reads the same serving/models.config."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from serving.tf_serving_protos import ModelServerConfig

# Where a version keeps its TF Serving warmup records (a TFRecord of PredictionLogs), as TF
# Serving looks for them.
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"


def read_model_config(path: str | Path) -> ModelServerConfig:
    """Parse a ModelServerConfig text file, as TF Serving's --model_config_file does (with the
    gateway's own copy of the message: the gateway reads the model names without TensorFlow;
    the model server reads the message field by field). That copy knows no types beyond TF
    Serving's own, so a `custom_model_config` Any written out in expanded form would not parse;
    models.config has none."""
    config = ModelServerConfig()
    text_format.Parse(Path(path).read_text(), config)
    return config


def parse_base_path_map(pairs: list[str] | str | None) -> dict[str, str]:
    """'/models=./models,/other=/data' or a list of 'FROM=TO' -> {FROM: TO}."""
    if isinstance(pairs, str):
        pairs = [p for p in pairs.split(",") if p.strip()]
    mapping = {}
    for pair in pairs or []:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise ValueError(f"base path map entry {pair!r} is not FROM=TO")
        mapping[source.strip()] = str(Path(target.strip()).resolve())
    return mapping


BATCHING_FIELDS = {"max_batch_size": int, "batch_timeout_micros": int, "max_enqueued_batches": int,
                   "num_batch_threads": int, "allowed_batch_sizes": int,
                   "pad_variable_length_inputs": bool, "thread_pool_name": str}


def read_batching_parameters(path: str | Path) -> dict:
    """TF Serving's BatchingParameters text file -> {field: value}. The tensorflow-serving-api
    wheel does not ship that proto, so its fields are parsed here; an unknown field is an error,
    as it is for TF Serving."""
    values: dict = {}
    text = re.sub(r"#.*", "", Path(path).read_text())
    for field, wrapped, plain in re.findall(r"(\w+)\s*(?:\{\s*value\s*:\s*([^}\s]+)\s*\}|:\s*(\S+))", text):
        if field not in BATCHING_FIELDS:
            raise ValueError(f"{path}: unknown batching parameter {field!r}")
        raw = (wrapped or plain).strip('"')
        kind = BATCHING_FIELDS[field]
        value = raw == "true" if kind is bool else kind(raw)
        if field == "allowed_batch_sizes":
            values.setdefault(field, []).append(value)
        else:
            values[field] = value
    leftover = re.sub(r"(\w+)\s*(?:\{\s*value\s*:\s*[^}\s]+\s*\}|:\s*\S+)", "", text).strip()
    if leftover:
        raise ValueError(f"{path}: cannot parse {leftover[:60]!r}")
    return values


def read_monitoring_config(path: str | Path) -> str | None:
    """TF Serving's MonitoringConfig text file -> the Prometheus path, or None when disabled."""
    text = re.sub(r"#.*", "", Path(path).read_text())
    block = re.search(r"prometheus_config\s*\{([^}]*)\}", text)
    if not block:
        raise ValueError(f"{path}: no prometheus_config block")
    enabled = re.search(r"enable\s*:\s*(true|false)", block.group(1))
    where = re.search(r'path\s*:\s*"([^"]+)"', block.group(1))
    if not enabled or enabled.group(1) != "true":
        return None
    return where.group(1) if where else "/monitoring/prometheus/metrics"


def configure_threads(intra_op: int = 0, inter_op: int = 0) -> bool:
    """TF Serving's --tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism (0 keeps
    TensorFlow's default). One intra-op thread makes in-graph generation, a long chain of tiny ops,
    about 2.8x as fast here; requests still run in parallel on the server's threads. The inter-op
    pool (TensorFlow's default, one thread per core) runs the independent ops of one call at the
    same time: in a generation, each GRU layer's recurrent product for the next character runs
    beside the chain that samples this one: about 1.6x as fast through the model server as on the
    caller's thread (-1), for about 11% more CPU per character. A digit call is a single chain:
    the hand-off costs it 6 to 11% more CPU in-process, which disappears in the noise over HTTP
    (docs/benchmarks.md). Returns False when TensorFlow had already started in this process and
    kept its settings."""
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        logging.getLogger("scribe.model_server").warning(
            "TensorFlow was already initialised in this process: thread settings unchanged")
        return False
    return True


@dataclass
class RunningModelServer:
    manager: object
    grpc_server: object
    grpc_port: int
    rest_server: object = None
    rest_port: int | None = None
    unix_socket: str | None = None

    def stop(self) -> None:
        if self.rest_server is not None:
            self.rest_server.shutdown()
            self.rest_server.server_close()
        self.grpc_server.stop(grace=2).wait()
        self.manager.stop()
        if self.unix_socket:
            Path(self.unix_socket).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # its folder, if nothing else is in it
                Path(self.unix_socket).parent.rmdir()


def start_model_server(config_file: str | Path, base_path_map: dict[str, str] | None = None,
                       grpc_port: int = 0, rest_port: int | None = None, host: str = "0.0.0.0",
                       poll_seconds: float = 1.0, config_poll_seconds: float = 0,
                       prometheus_path: str | None = None, intra_op_threads: int = 0,
                       inter_op_threads: int = 0, batching: dict | None = None,
                       unix_socket: str | None = None,
                       warmup_iterations: int = 1) -> RunningModelServer:
    """Start polling versions and serving gRPC (and REST when rest_port is not None). gRPC also
    listens on `unix_socket` if given: cheaper than TCP for a client on the same machine. Each
    warmup record of a loading version runs `warmup_iterations` times."""
    configure_threads(intra_op_threads, inter_op_threads)
    from serving.model_server.grpc_api import start_grpc_server
    from serving.model_server.rest_api import start_rest_server
    from serving.model_server.servables import ServableManager

    manager = ServableManager(read_model_config(config_file), base_path_map, poll_seconds,
                              config_file=config_file if config_poll_seconds else None,
                              config_poll_seconds=config_poll_seconds, batching=batching,
                              warmup_iterations=warmup_iterations)
    grpc_server, bound = start_grpc_server(manager, grpc_port, host,  # bind before loading
                                           unix_socket=unix_socket)
    running = RunningModelServer(manager, grpc_server, bound, unix_socket=unix_socket)
    if rest_port is not None:
        try:
            running.rest_server, running.rest_port = start_rest_server(manager, rest_port, host,
                                                                       prometheus_path)
        except OSError:
            grpc_server.stop(grace=0)
            raise
    manager.start()
    return running
