"""The embedded model server: TF Serving's gRPC and REST APIs, in Python, for machines
without the TF Serving container. It reads the same serving/models.config."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from serving.model_server.options import ServerOptions
from serving.tfserving.configs import read_model_config


def configure_threads(intra_op: int = 0, inter_op: int = 0) -> bool:
    """TF Serving's --tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism (0 keeps
    TensorFlow's default). One intra-op thread suits in-graph generation, a long chain of tiny ops
    that splitting only slows; requests still run in parallel on the server's threads. The
    inter-op pool (TensorFlow's default, one thread per core) runs the independent ops of one call
    at the same time: in a generation, each GRU layer's recurrent product for the next character
    runs beside the chain that samples this one. docs/benchmarks.md measures both. Returns False
    when TensorFlow had already started in this process and kept its settings."""
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

    @property
    def target(self) -> str:
        """The gRPC address for a client on this machine: the Unix socket when there is one."""
        return f"unix:{self.unix_socket}" if self.unix_socket else f"127.0.0.1:{self.grpc_port}"

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
                       options: ServerOptions | None = None, **changes) -> RunningModelServer:
    """Start the model server: `options` (by default ServerOptions()) with `changes` to its
    fields. gRPC also listens on `grpc_socket_path` if given: cheaper than TCP for a client on
    the same machine; REST when `rest_port` is not None (0: a free port). With
    `load_before_listening`, as TF Serving, the config's models load before the ports open;
    otherwise the ports open first and requests wait on the loads (the embedded default: a
    gateway worker reports itself alive meanwhile)."""
    options = dataclasses.replace(options or ServerOptions(), **changes)
    configure_threads(options.intra_op_threads, options.inter_op_threads)
    from serving.model_server.grpc_api import start_grpc_server
    from serving.model_server.rest_api import start_rest_server
    from serving.model_server.servables import ServableManager

    if options.config_poll_seconds:
        options.config_file = str(config_file)
    manager = ServableManager(read_model_config(config_file), base_path_map, options)
    if options.load_before_listening:
        manager.first_pass()
    grpc_server, bound = start_grpc_server(manager, options)
    running = RunningModelServer(manager, grpc_server, bound, unix_socket=options.grpc_socket_path)
    if options.rest_port is not None:
        try:
            running.rest_server, running.rest_port = start_rest_server(manager, options)
        except OSError:
            grpc_server.stop(grace=0)
            raise
    manager.start()
    return running
