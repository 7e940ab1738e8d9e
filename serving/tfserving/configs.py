"""TF Serving's configuration files, read as TF Serving reads them: the ModelServerConfig of
--model_config_file, the BatchingParameters of --batching_parameters_file, the MonitoringConfig
of --monitoring_config_file, and Scribe's own --base_path_map."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

from serving.tfserving.protos import ModelServerConfig


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
