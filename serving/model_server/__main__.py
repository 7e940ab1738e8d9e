"""python -m serving.model_server: a stand-in for tensorflow_model_server.

Takes TF Serving's own flag names, so the command line of the tfserving service in
docker-compose.yml runs here unchanged, plus --base_path_map to map the container's
model base paths (/models/...) onto a local folder.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def compose_command_line(grpc_port: int, rest_port: int,
                         compose_file: Path | None = None) -> list[str]:
    """The flags of docker-compose.yml's tfserving service, for running it here: the container's
    mounted config files mapped to this checkout, and the given ports. Add
    --base_path_map=/models=<folder> for the models. Reads YAML: PyYAML, a dev dependency."""
    import yaml

    compose_file = compose_file or Path(__file__).resolve().parents[2] / "docker-compose.yml"
    service = yaml.safe_load(compose_file.read_text())["services"]["tfserving"]
    mounts = {volume.split(":")[1]: str(compose_file.parent / volume.split(":")[0])
              for volume in service["volumes"] if volume.startswith(".")}
    ports = {"--port": str(grpc_port), "--rest_api_port": str(rest_port)}
    flags = (arg.split("=", 1) for arg in service["command"])
    return [f"{flag}={ports.get(flag, mounts.get(value, value))}" for flag, value in flags]


def flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.model_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (default 8500)")
    parser.add_argument("--rest_api_port", type=int, default=0,
                        help="REST port; 0 disables REST, as in TF Serving (default 0)")
    parser.add_argument("--model_config_file", help="ModelServerConfig in text format")
    parser.add_argument("--model_name", default="default", help="single-model mode: its name")
    parser.add_argument("--model_base_path", help="single-model mode: its base path")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="seconds between polls for new versions (default 1)")
    parser.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0,
                        help="seconds between re-reads of --model_config_file; 0: read once")
    parser.add_argument("--enable_model_warmup", type=_bool, default=True,
                        help="accepted for compatibility: warmup records always run")
    parser.add_argument("--num_request_iterations_for_warmup", type=int, default=0,
                        help="runs of each warmup record when a version loads; 0: one, as in TF Serving")
    parser.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0,
                        help="threads per TensorFlow op; 0: TensorFlow's default")
    parser.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0,
                        help="threads running independent ops; 0: TensorFlow's default; -1: each "
                             "run on its caller's thread")
    parser.add_argument("--enable_batching", type=_bool, default=False)
    parser.add_argument("--batching_parameters_file",
                        help="BatchingParameters text file (with --enable_batching)")
    parser.add_argument("--monitoring_config_file",
                        help="MonitoringConfig text file: Prometheus metrics on the REST port")
    parser.add_argument("--base_path_map", action="append", default=[], metavar="FROM=TO",
                        help="serve base path FROM (e.g. /models) from local folder TO")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = flags()
    args = parser.parse_args(argv)
    if bool(args.model_config_file) == bool(args.model_base_path):
        parser.error("give exactly one of --model_config_file and --model_base_path")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("scribe.model_server")
    try:
        server = start(args)
    except (OSError, ValueError) as error:
        print(f"model server: {error}", file=sys.stderr)
        return 1
    rest = f", REST on port {server.rest_port}" if server.rest_port else ""
    log.info("serving gRPC on port %d%s", server.grpc_port, rest)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop()
    return 0


def start(args: argparse.Namespace):
    """The model server the parsed flags describe, started."""
    from serving.model_server import start_model_server
    from serving.tfserving.configs import (
        parse_base_path_map,
        read_batching_parameters,
        read_monitoring_config,
    )

    config_file = args.model_config_file
    if args.model_base_path:
        config_file = Path(tempfile.mkdtemp()) / "models.config"
        config_file.write_text(f'model_config_list {{ config {{ name: "{args.model_name}" '
                               f'base_path: "{args.model_base_path}" model_platform: "tensorflow" }} }}')
    prometheus_path = None
    if args.monitoring_config_file:
        prometheus_path = read_monitoring_config(args.monitoring_config_file)
    batching = None
    if args.enable_batching:
        batching = (read_batching_parameters(args.batching_parameters_file)
                    if args.batching_parameters_file else {})
        logging.getLogger("scribe.model_server").info("dynamic batching: %s",
                                                      batching or "default parameters")
    return start_model_server(
        config_file, parse_base_path_map(args.base_path_map), grpc_port=args.port,
        rest_port=args.rest_api_port or None, host="0.0.0.0",
        poll_seconds=args.file_system_poll_wait_seconds,
        config_poll_seconds=args.model_config_file_poll_wait_seconds,
        prometheus_path=prometheus_path, intra_op_threads=args.tensorflow_intra_op_parallelism,
        inter_op_threads=args.tensorflow_inter_op_parallelism, batching=batching,
        warmup_iterations=args.num_request_iterations_for_warmup)


if __name__ == "__main__":
    sys.exit(main())
