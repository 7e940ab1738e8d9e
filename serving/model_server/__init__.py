"""The embedded model server: TF Serving's gRPC and REST APIs, in Python, for machines
without the TF Serving container. It reads the same serving/models.config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2


def read_model_config(path: str | Path) -> model_server_config_pb2.ModelServerConfig:
    """Parse a ModelServerConfig text file, as TF Serving's --model_config_file does."""
    config = model_server_config_pb2.ModelServerConfig()
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


@dataclass
class RunningModelServer:
    manager: object
    grpc_server: object
    grpc_port: int
    rest_server: object = None
    rest_port: int | None = None

    def stop(self) -> None:
        if self.rest_server is not None:
            self.rest_server.shutdown()
        self.grpc_server.stop(grace=2).wait()
        self.manager.stop()


def start_model_server(config_file: str | Path, base_path_map: dict[str, str] | None = None,
                       grpc_port: int = 0, rest_port: int | None = None, host: str = "0.0.0.0",
                       poll_seconds: float = 1.0) -> RunningModelServer:
    """Start polling versions and serving gRPC (and REST when rest_port is not None)."""
    from serving.model_server.grpc_api import start_grpc_server
    from serving.model_server.rest_api import start_rest_server
    from serving.model_server.servables import ServableManager

    manager = ServableManager(read_model_config(config_file), base_path_map, poll_seconds)
    manager.start()
    grpc_server, bound = start_grpc_server(manager, grpc_port, host)
    running = RunningModelServer(manager, grpc_server, bound)
    if rest_port is not None:
        running.rest_server, running.rest_port = start_rest_server(manager, rest_port, host)
    return running
