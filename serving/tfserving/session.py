"""A SavedModel in a TF1 session, loaded the way TF Serving's SavedModelBundle loads it. The
model server serves through it, and training verifies every export through it in a fresh
process before a push, so that a version loads in the server that serves it."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.saved_model import loader_impl


def first_line(exc: Exception) -> str:
    """The line of an error that says what went wrong. TensorFlow 2 starts with 'Graph execution
    error:' and puts the cause a few lines down, after where it was detected."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Graph execution error"):
        causes = [line for line in lines[1:] if not line.startswith(
            ("Detected at node", "File ", "[[", "Stack trace", "Traceback"))
            and not line.endswith(":")]
        lines = causes[-1:] or lines
    return lines[0] if lines else type(exc).__name__


def read_signature_defs(path: Path) -> dict:
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    defs = saved_model.meta_graphs[0].signature_def
    return {name: defs[name] for name in defs if not name.startswith("__")}


class SavedModelSession:
    """A SavedModel's signatures run through load_session, as a model server runs them."""

    def __init__(self, path: Path):
        path = Path(path)
        self.session, self.signature_defs = load_session(path), read_signature_defs(path)

    def run(self, signature: str, inputs: dict) -> dict:
        spec = self.signature_defs[signature]
        names = list(spec.outputs)
        values = self.session.run([spec.outputs[name].name for name in names],
                                  {spec.inputs[key].name: value for key, value in inputs.items()})
        return dict(zip(names, values, strict=True))


def load_session(path: Path, tags: tuple[str, ...] = ("serve",), config: bytes | None = None):
    """The SavedModel in a TF1 session, the way TF Serving loads it (SavedModelBundle): a run
    costs about half the CPU of calling the restored signature function eagerly, and every export
    is already checked through this loader by `saved_model_cli run`. The session uses this
    process's thread settings (configure_threads) unless `config`, a serialized ConfigProto,
    sets them. Nothing closes it: requests still running on
    an unloaded version keep it alive until they end, and garbage collection closes it after
    them."""
    graph = tf.Graph()
    session_config = tf.compat.v1.ConfigProto.FromString(config or b"")
    if not session_config.intra_op_parallelism_threads:
        session_config.intra_op_parallelism_threads = tf.config.threading.get_intra_op_parallelism_threads()
    if not session_config.inter_op_parallelism_threads:
        session_config.inter_op_parallelism_threads = tf.config.threading.get_inter_op_parallelism_threads()
    session = tf.compat.v1.Session(graph=graph, config=session_config)
    with graph.as_default():
        # The class behind tf.compat.v1.saved_model.load, without that function's deprecation
        # warning: TF Serving's session path is this one.
        loader_impl.SavedModelLoader(str(path)).load(session, list(tags))
    return session
