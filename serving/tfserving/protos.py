"""TF Serving's API messages for the gateway, without importing TensorFlow.

`tensorflow_serving.apis` imports the whole `tensorflow` package (about 620 MB per process, and
seconds at start) only to reach TensorProto's definition, although a gateway that calls a
separate model server runs no model. The definitions the gateway needs (Predict,
GetModelStatus, ModelServerConfig, and what they use) are kept here as a FileDescriptorSet,
`protos.binpb`, written from the installed tensorflow-serving-api by

    python -m serving.tfserving.protos

and loaded into a descriptor pool of their own, so that they never clash with the real modules
when the embedded model server loads TensorFlow into the same process. The full names, and so
the bytes on the wire and the gRPC method paths, are TF Serving's own. tests/test_deploy.py
checks that the file matches the installed package (run the command above after upgrading it).
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTORS = Path(__file__).with_name("protos.binpb")
# The .proto files the gateway uses; the file holds them with everything they import.
ROOTS = ("tensorflow_serving/apis/predict.proto", "tensorflow_serving/apis/get_model_status.proto",
         "tensorflow_serving/config/model_server_config.proto")
PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"


def descriptor_set_from_installed_package() -> descriptor_pb2.FileDescriptorSet:
    """ROOTS and everything they import, as the installed tensorflow-serving-api defines them,
    each file after the files it imports. Imports TensorFlow: for writing and checking only."""
    from google.protobuf import descriptor_pool as pools
    from tensorflow_serving.apis import get_model_status_pb2, predict_pb2  # noqa: F401 - registers them
    from tensorflow_serving.config import model_server_config_pb2  # noqa: F401

    ordered, seen = [], set()

    def visit(file) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        ordered.append(proto)

    for name in ROOTS:
        visit(pools.Default().FindFileByName(name))
    return descriptor_pb2.FileDescriptorSet(file=ordered)


def _load_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes()).file:
        pool.Add(file)
    return pool


def _message(full_name: str):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(full_name))


if __name__ == "__main__":  # (re)write the file; it need not exist yet
    data = descriptor_set_from_installed_package().SerializeToString(deterministic=True)
    DESCRIPTORS.write_bytes(data)
    print(f"wrote {DESCRIPTORS} ({len(data):,} bytes)")
else:
    _pool = _load_pool()
    PredictRequest = _message("tensorflow.serving.PredictRequest")
    PredictResponse = _message("tensorflow.serving.PredictResponse")
    GetModelStatusRequest = _message("tensorflow.serving.GetModelStatusRequest")
    GetModelStatusResponse = _message("tensorflow.serving.GetModelStatusResponse")
    ModelServerConfig = _message("tensorflow.serving.ModelServerConfig")
    ModelConfig = _message("tensorflow.serving.ModelConfig")
    TensorProto = _message("tensorflow.TensorProto")
    # TensorFlow's DataType numbers by name (DT_FLOAT, DT_STRING, ...), from types.proto.
    DATA_TYPES = {v.name: v.number for v in _pool.FindEnumTypeByName("tensorflow.DataType").values}
