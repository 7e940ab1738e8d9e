"""python -m serving.model_server: a stand-in for tensorflow_model_server.

Takes every flag of TF Serving's own (serving/model_server/flags.py), so the command line of
the tfserving service in docker-compose.yml runs here unchanged, plus --base_path_map to map the
container's model base paths (/models/...) onto a local folder.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    from serving.model_server import flags

    parser = flags.parser(__doc__)
    args = parser.parse_args(argv)
    if args.version:
        print_version()
        return 0
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
    """The model server the parsed flags describe: the config's models loaded, then listening."""
    from serving.model_server import flags, start_model_server
    from serving.tfserving.configs import parse_base_path_map

    config_file = args.model_config_file or flags.single_model_config(args.model_name,
                                                                      args.model_base_path)
    return start_model_server(config_file, parse_base_path_map(args.base_path_map),
                              flags.options_from(args))


def print_version() -> None:
    import tensorflow as tf

    from serving.model_server.flags import TF_SERVING_VERSION

    print(f"TensorFlow ModelServer: {TF_SERVING_VERSION} (Scribe's embedded model server)\n"
          f"TensorFlow Library: {tf.__version__}")


if __name__ == "__main__":
    sys.exit(main())
