"""tensorflow_model_server's command line, as TF Serving 2.19 takes it: every flag its --help
lists, read into ServerOptions. A flag that means something here does it; the few that cannot
(TFLite, TPUs, TF's profiler) are accepted, and a value other than the default is logged as
having no effect, so that TF Serving's command lines run here unchanged."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from serving.model_server.options import ServerOptions

log = logging.getLogger("scribe.model_server")
TF_SERVING_VERSION = "2.19.0"  # the version whose flags and APIs this server takes
GIVEN_NO_EFFECT = {
    "num_load_threads": "versions load one at a time here",
    "num_unload_threads": "versions unload one at a time here",
    "flush_filesystem_caches": "no file system cache to flush here",
    "platform_config_file": "not read here: use --tensorflow_session_config_file and "
                            "--batching_parameters_file",
    "prefer_tflite_model": "no TensorFlow Lite here: SavedModels only",
    "num_tflite_pools": "no TensorFlow Lite here",
    "num_tflite_interpreters_per_pool": "no TensorFlow Lite here",
    "xla_gpu_compilation_enabled": "no GPU compilation here",
    "remove_unused_fields_from_bundle_metagraph": "the graph is kept whole here",
    "thread_pool_factory_config_file": "requests run on the gRPC and REST threads here",
    "mixed_precision": "models run at the precision they were exported with here",
    "skip_initialize_tpu": "no TPU here",
    "enable_profiler": "no profiler service here",
    "enable_serialization_as_tensor_content": "responses already carry arrays of more than one "
                                              "value in tensor_content",
}


@dataclass(frozen=True)
class Flag:
    name: str
    kind: type  # int, float, str or bool
    default: object
    help: str


FLAGS = [
    Flag("port", int, 8500, "gRPC port"),
    Flag("grpc_socket_path", str, "", "also serve gRPC on this Unix socket"),
    Flag("rest_api_port", int, 0, "REST port; 0: no REST API"),
    Flag("rest_api_num_threads", int, 32, "REST requests handled at once; more wait their turn"),
    Flag("rest_api_timeout_in_ms", int, 30000, "a REST client that sends or reads nothing for "
         "this long is disconnected"),
    Flag("rest_api_enable_cors_support", bool, False, "Access-Control-Allow-Origin: * on REST"),
    Flag("enable_batching", bool, False, "batch concurrent requests (also given bare)"),
    Flag("enable_per_model_batching_parameters", bool, False, "with --enable_batching, a "
         "version's assets.extra/batching_params.pbtxt replaces --batching_parameters_file"),
    Flag("allow_version_labels_for_unavailable_models", bool, False, "a reloaded config may "
         "label versions that are not AVAILABLE"),
    Flag("batching_parameters_file", str, "", "BatchingParameters text file"),
    Flag("model_config_file", str, "", "ModelServerConfig text file"),
    Flag("model_config_file_poll_wait_seconds", float, 0, "re-read --model_config_file this "
         "often; 0: read once"),
    Flag("model_name", str, "default", "single-model mode: its name"),
    Flag("model_base_path", str, "", "single-model mode: its base path"),
    Flag("num_load_threads", int, 0, "accepted: versions load one at a time here"),
    Flag("num_unload_threads", int, 0, "accepted: versions unload one at a time here"),
    Flag("max_num_load_retries", int, 5, "tries more of a version that failed to load"),
    Flag("load_retry_interval_micros", int, 60_000_000, "between those tries"),
    Flag("file_system_poll_wait_seconds", float, 1, "between looks for new versions"),
    Flag("flush_filesystem_caches", bool, True, "accepted"),
    Flag("tensorflow_session_parallelism", int, 0, "threads of both pools unless set apart"),
    Flag("tensorflow_intra_op_parallelism", int, 0, "threads per op; 0: TensorFlow's default"),
    Flag("tensorflow_inter_op_parallelism", int, 0, "threads running independent ops; 0: "
         "TensorFlow's default; -1: each run on its caller's thread"),
    Flag("ssl_config_file", str, "", "SSLConfig text file: gRPC over TLS"),
    Flag("use_alts_credentials", bool, False, "gRPC with ALTS credentials (Google Cloud)"),
    Flag("platform_config_file", str, "", "accepted, not read"),
    Flag("saved_model_tags", str, "serve", "comma-separated MetaGraph tags to load"),
    Flag("grpc_channel_arguments", str, "", "gRPC server arguments, key=value,..."),
    Flag("grpc_max_threads", int, 32, "gRPC requests handled at once"),
    Flag("enable_model_warmup", bool, True, "run a version's warmup records before it serves"),
    Flag("num_request_iterations_for_warmup", int, 0, "runs of each warmup record; 0: one"),
    Flag("version", bool, False, "print the version and exit"),
    Flag("monitoring_config_file", str, "", "MonitoringConfig text file: Prometheus on REST"),
    Flag("tensorflow_session_config_file", str, "", "tensorflow.ConfigProto text file for "
         "every session"),
    Flag("prefer_tflite_model", bool, False, "accepted: SavedModels only here"),
    Flag("num_tflite_pools", int, 1, "accepted"),
    Flag("num_tflite_interpreters_per_pool", int, 1, "accepted"),
    Flag("enable_signature_method_name_check", bool, False, "Classify and Regress need the "
         "signature's method_name"),
    Flag("xla_cpu_compilation_enabled", bool, False, "compile sessions with XLA on the CPU"),
    Flag("xla_gpu_compilation_enabled", bool, False, "accepted"),
    Flag("per_process_gpu_memory_fraction", float, 0, "of each GPU's memory for the sessions "
         "(where TensorFlow sees a GPU)"),
    Flag("remove_unused_fields_from_bundle_metagraph", bool, True, "accepted"),
    Flag("thread_pool_factory_config_file", str, "", "accepted"),
    Flag("mixed_precision", str, "", "accepted"),
    Flag("skip_initialize_tpu", bool, False, "accepted"),
    Flag("enable_grpc_healthcheck_service", bool, False, "grpc.health.v1.Health: SERVING once "
         "the config's models have loaded"),
    Flag("enable_profiler", bool, True, "accepted"),
    Flag("enable_serialization_as_tensor_content", bool, False, "accepted"),
]


def boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parser(description: str = "") -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(prog="python -m serving.model_server", description=description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in FLAGS:
        if flag.kind is bool:  # --flag, --flag=true, --flag=false, as TensorFlow's flags
            flags.add_argument(f"--{flag.name}", type=boolean, nargs="?", const=True,
                               default=flag.default, help=f"{flag.help} (default {flag.default})")
        else:
            flags.add_argument(f"--{flag.name}", type=flag.kind, default=flag.default,
                               help=f"{flag.help} (default {flag.default!r})")
    flags.add_argument("--base_path_map", action="append", default=[], metavar="FROM=TO",
                       help="Scribe's own: serve base path FROM (e.g. /models) from local folder TO")
    return flags


def channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """'grpc.max_connection_age_ms=2000,grpc.lb_policy_name=grpclb' -> gRPC options, numbers as
    integers, as TF Serving passes them."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--grpc_channel_arguments: {item!r} is not key=value")
        pairs.append((key.strip(), int(value) if value.strip().lstrip("-").isdigit() else value.strip()))
    return pairs


def note_flags_without_effect(args: argparse.Namespace) -> None:
    defaults = {flag.name: flag.default for flag in FLAGS}
    for name, reason in GIVEN_NO_EFFECT.items():
        if getattr(args, name) != defaults[name]:
            log.warning("--%s=%s has no effect: %s", name, getattr(args, name), reason)


def options_from(args: argparse.Namespace) -> ServerOptions:
    """The ServerOptions the flags describe (the config files they name already read)."""
    from serving.tfserving.configs import read_batching_parameters, read_monitoring_config

    note_flags_without_effect(args)
    intra = args.tensorflow_intra_op_parallelism or args.tensorflow_session_parallelism
    inter = args.tensorflow_inter_op_parallelism or args.tensorflow_session_parallelism
    batching = None
    if args.enable_batching:
        batching = read_batching_parameters(args.batching_parameters_file) \
            if args.batching_parameters_file else {}
        log.info("dynamic batching: %s", batching or "default parameters")
    return ServerOptions(
        grpc_port=args.port, grpc_socket_path=args.grpc_socket_path or None,
        grpc_channel_arguments=channel_arguments(args.grpc_channel_arguments),
        grpc_max_threads=args.grpc_max_threads, grpc_credentials=grpc_credentials(args),
        rest_port=args.rest_api_port or None, rest_threads=args.rest_api_num_threads,
        rest_timeout_seconds=args.rest_api_timeout_in_ms / 1000,
        rest_cors=args.rest_api_enable_cors_support,
        prometheus_path=read_monitoring_config(args.monitoring_config_file)
        if args.monitoring_config_file else None,
        poll_seconds=args.file_system_poll_wait_seconds,
        config_poll_seconds=args.model_config_file_poll_wait_seconds,
        batching=batching, per_model_batching=args.enable_per_model_batching_parameters,
        warmup=args.enable_model_warmup, warmup_iterations=args.num_request_iterations_for_warmup,
        intra_op_threads=intra, inter_op_threads=inter, session_config=session_config(args),
        saved_model_tags=tuple(t.strip() for t in args.saved_model_tags.split(",") if t.strip()),
        max_load_retries=args.max_num_load_retries,
        load_retry_seconds=args.load_retry_interval_micros / 1e6,
        method_name_check=args.enable_signature_method_name_check,
        labels_for_unavailable_versions=args.allow_version_labels_for_unavailable_models,
        health_service=args.enable_grpc_healthcheck_service,
        load_before_listening=True)


def grpc_credentials(args: argparse.Namespace):
    """TLS from --ssl_config_file (TF Serving's SSLConfig: PEM texts), or ALTS; None: insecure."""
    import grpc

    from serving.tfserving.configs import SSLConfig, read_text_format

    if args.use_alts_credentials:
        return grpc.alts_server_credentials()
    if not args.ssl_config_file:
        return None
    ssl = read_text_format(args.ssl_config_file, SSLConfig)
    if not ssl.server_key or not ssl.server_cert:
        raise ValueError(f"{args.ssl_config_file}: server_key and server_cert are both needed")
    return grpc.ssl_server_credentials(
        [(ssl.server_key.encode(), ssl.server_cert.encode())],
        root_certificates=ssl.custom_ca.encode() or None, require_client_auth=ssl.client_verify)


def session_config(args: argparse.Namespace) -> bytes | None:
    """The tensorflow.ConfigProto of every session: --tensorflow_session_config_file, with
    --per_process_gpu_memory_fraction and --xla_cpu_compilation_enabled on top. None: the
    defaults (thread settings come from the thread flags)."""
    if not (args.tensorflow_session_config_file or args.per_process_gpu_memory_fraction
            or args.xla_cpu_compilation_enabled):
        return None
    from tensorflow.core.protobuf import config_pb2

    from serving.tfserving.configs import read_text_format

    config = (read_text_format(args.tensorflow_session_config_file, config_pb2.ConfigProto)
              if args.tensorflow_session_config_file else config_pb2.ConfigProto())
    if args.per_process_gpu_memory_fraction:
        config.gpu_options.per_process_gpu_memory_fraction = args.per_process_gpu_memory_fraction
    if args.xla_cpu_compilation_enabled:
        config.graph_options.optimizer_options.global_jit_level = config_pb2.OptimizerOptions.ON_1
    return config.SerializeToString()


def single_model_config(name: str, base_path: str) -> Path:
    """--model_name and --model_base_path as a ModelServerConfig file, as TF Serving builds one."""
    import tempfile

    config_file = Path(tempfile.mkdtemp()) / "models.config"
    config_file.write_text(f'model_config_list {{ config {{ name: "{name}" '
                           f'base_path: "{base_path}" model_platform: "tensorflow" }} }}')
    return config_file
