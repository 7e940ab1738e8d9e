"""How the embedded model server runs: the settings behind TF Serving's flags, in one object."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerOptions:
    grpc_port: int = 8500  # 0 picks a free port
    host: str = "0.0.0.0"
    grpc_socket_path: str | None = None  # gRPC on a Unix socket too
    grpc_channel_arguments: list[tuple[str, int | str]] = field(default_factory=list)
    grpc_max_threads: int = 32
    grpc_credentials: object = None  # grpc.ServerCredentials (TLS, ALTS); None: insecure
    rest_port: int | None = None  # None: no REST API
    rest_threads: int = 32  # REST requests handled at once; more wait their turn
    rest_timeout_seconds: float = 30.0  # a REST client that sends or reads nothing for this long
    rest_cors: bool = False  # Access-Control-Allow-Origin: * on REST answers
    prometheus_path: str | None = None  # TF Serving's metrics on the REST port
    poll_seconds: float = 1.0  # between looks for new versions
    config_file: str | None = None  # re-read every config_poll_seconds when that is above 0
    config_poll_seconds: float = 0
    batching: dict | None = None  # TF Serving's BatchingParameters; None: no batching
    per_model_batching: bool = False  # a version's assets.extra/batching_params.pbtxt wins
    warmup: bool = True  # run a version's warmup records before it serves
    warmup_iterations: int = 1  # runs of each record (TF Serving: 0 and 1 both mean one)
    intra_op_threads: int = 0  # 0: TensorFlow's default
    inter_op_threads: int = 0  # 0: TensorFlow's default; -1: on the caller's thread
    session_config: bytes | None = None  # a serialized tensorflow.ConfigProto for every session
    saved_model_tags: tuple[str, ...] = ("serve",)
    max_load_retries: int = 0  # more tries of a version that failed to load
    load_retry_seconds: float = 60.0
    method_name_check: bool = False  # Classify and Regress need the signature's method_name
    labels_for_unavailable_versions: bool = False  # a reloaded config may label unloaded versions
    health_service: bool = False  # grpc.health.v1.Health
    load_before_listening: bool = False  # TF Serving's order: the config's models, then the ports
