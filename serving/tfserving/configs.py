"""TF Serving's configuration files, read as TF Serving reads them: protobuf text format, into TF
Serving's own messages. The ModelServerConfig of --model_config_file uses the gateway's copy of TF
Serving's messages (serving/tfserving/protos.py, no TensorFlow). The tensorflow-serving-api wheel
ships neither MonitoringConfig (--monitoring_config_file), BatchingParameters
(--batching_parameters_file) nor SSLConfig (--ssl_config_file): their definitions, copied from TF
Serving's .proto files, are built here, so that protobuf's own parser reads them (a colon before a
brace or not, comments, either quote, repeated fields) and refuses an unknown field, as TF Serving
does. Also Scribe's own --base_path_map."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

from serving.tfserving.protos import ModelServerConfig

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's kPrometheusPath
WRAPPERS = {".google.protobuf.Int64Value", ".google.protobuf.BoolValue", ".google.protobuf.StringValue"}
# name, number, type, label ("repeated" or not), message type: as in TF Serving 2.19's
# tensorflow_serving/config/monitoring_config.proto, ssl_config.proto and
# tensorflow_serving/servables/tensorflow/session_bundle_config.proto.
MESSAGES = {
    "PrometheusConfig": [("enable", 1, "bool"), ("path", 2, "string")],
    "MonitoringConfig": [("prometheus_config", 1, ".tensorflow.serving.PrometheusConfig")],
    "SSLConfig": [("server_key", 1, "string"), ("server_cert", 2, "string"), ("custom_ca", 3, "string"),
                  ("client_verify", 4, "bool")],
    "BatchingParameters": [
        ("max_batch_size", 1, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, "repeated int64"),
        ("pad_variable_length_inputs", 7, "bool"),
        ("enable_large_batch_splitting", 8, ".google.protobuf.BoolValue"),
        ("max_execution_batch_size", 9, ".google.protobuf.Int64Value"),
    ],
}


def message_classes(file_name: str, package: str, messages: dict) -> dict:
    """Protobuf message classes from a table like MESSAGES, in a descriptor pool of their own:
    for messages whose .proto no installed package ships."""
    types = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name=file_name, syntax="proto3", package=package,
                                              dependency=["google/protobuf/wrappers.proto"])
    for name, fields in messages.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind in fields:
            repeated = kind.startswith("repeated ")
            kind = kind.removeprefix("repeated ")
            field = message.field.add(name=field_name, number=number, json_name=field_name,
                                      label=types.LABEL_REPEATED if repeated else types.LABEL_OPTIONAL)
            if kind.startswith("."):
                field.type, field.type_name = types.TYPE_MESSAGE, kind
            else:
                field.type = getattr(types, f"TYPE_{kind.upper()}")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
            for name in messages}


_CLASSES = message_classes("scribe/tf_serving_configs.proto", "tensorflow.serving", MESSAGES)
MonitoringConfig = _CLASSES["MonitoringConfig"]
BatchingParameters = _CLASSES["BatchingParameters"]
SSLConfig = _CLASSES["SSLConfig"]


def read_text_format(path: str | Path, message_class):
    """A config file parsed into `message_class`, as TF Serving parses it; a ValueError in TF
    Serving's words when the file does not parse."""
    message = message_class()
    try:
        text_format.Parse(Path(path).read_text(), message)
    except text_format.ParseError as error:
        raise ValueError(f"Error parsing text-format {message.DESCRIPTOR.full_name}: {error} "
                         f"(in {path})") from None
    return message


def read_model_config(path: str | Path) -> ModelServerConfig:
    """Parse a ModelServerConfig text file, as TF Serving's --model_config_file does (with the
    gateway's own copy of the message: the gateway reads the model names without TensorFlow;
    the model server reads the message field by field). That copy knows no types beyond TF
    Serving's own, so a `custom_model_config` Any written out in expanded form would not parse;
    models.config has none."""
    return read_text_format(path, ModelServerConfig)


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


def read_batching_parameters(path: str | Path) -> dict:
    """TF Serving's BatchingParameters text file -> {field: value} for the fields it sets."""
    values = {}
    for field, value in read_text_format(path, BatchingParameters).ListFields():
        if field.message_type is not None and f".{field.message_type.full_name}" in WRAPPERS:
            value = value.value
        values[field.name] = list(value) if field.label == field.LABEL_REPEATED else value
    return values


def read_monitoring_config(path: str | Path) -> str | None:
    """TF Serving's MonitoringConfig text file -> the Prometheus path, or None when disabled."""
    prometheus = read_text_format(path, MonitoringConfig).prometheus_config
    if not prometheus.enable:
        return None
    return prometheus.path or DEFAULT_PROMETHEUS_PATH
