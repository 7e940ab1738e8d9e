"""Versions on disk -> loaded SavedModels, the way TF Serving's manager does it.

Each configured model has a base path holding integer version directories. A poller finds
them, applies the model's version policy, loads new versions (running their warmup records)
before unloading old ones, so no request fails during a swap, and remembers versions that
failed to load so the previous one keeps serving.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config.file_system_storage_path_source_pb2 import (
    FileSystemStoragePathSourceConfig,
)

from serving.model_server.options import ServerOptions
from serving.tfserving.batching import DynamicBatcher, QueueFull
from serving.tfserving.configs import read_batching_parameters, read_model_config
from serving.tfserving.protos import ModelConfig, ModelServerConfig
from serving.tfserving.session import first_line, load_session, read_signature_defs
from serving.tfserving.tensors import from_proto
from serving.tfserving.versions import (
    AVAILABLE,
    END,
    GRAPH_FILE,
    LOADING,
    WARMUP_FILE,
    version_folders,
)

log = logging.getLogger("scribe.model_server")
BATCHING_FILE = Path("assets.extra") / "batching_params.pbtxt"  # a version's own BatchingParameters



class ServingError(Exception):
    """An error with a gRPC status code name (NOT_FOUND, INVALID_ARGUMENT, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Servable:
    """One loaded version of one model."""

    name: str
    version: int
    path: Path
    session: object  # a tf.compat.v1.Session holding the SavedModel's graph and variables
    signature_defs: dict  # name -> meta_graph_pb2.SignatureDef
    batchers: dict = field(default_factory=dict)  # signature -> DynamicBatcher

    def __post_init__(self):
        # What each run needs from the signature, worked out once instead of on every request:
        # the output names and tensors, each input's tensor and dtype, and a callable that runs
        # them. Like TF Serving's C++ session, the callable does not hold a feed to the static
        # shape of its placeholder (x of shape [3] runs where the graph says (None, 1)), and it
        # costs less per run than Session.run.
        self._plans = {}
        for name, spec in self.signature_defs.items():
            feeds = {key: (t.name, tf.dtypes.as_dtype(t.dtype)) for key, t in sorted(spec.inputs.items())}
            fetches = [t.name for t in spec.outputs.values()]
            runner = self.session._make_callable_from_options(config_pb2.CallableOptions(
                feed=[tensor for tensor, _ in feeds.values()], fetch=fetches))
            self._plans[name] = (list(spec.outputs), runner, feeds)

    def enable_batching(self, parameters: dict) -> None:
        """Batch the signatures whose every input and output has a batch dimension (digits and
        bard alike); any other signature runs request by request (TF Serving would refuse it)."""
        for name, signature_def in self.signature_defs.items():
            tensors = list(signature_def.inputs.values()) + list(signature_def.outputs.values())
            if all(not t.tensor_shape.unknown_rank and t.tensor_shape.dim
                   and t.tensor_shape.dim[0].size == -1 for t in tensors):
                self.batchers[name] = DynamicBatcher(
                    lambda inputs, _key, name=name: self._run(name, inputs), parameters,
                    f"batch-{self.name}-{self.version}")

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.stop()
        # The batchers' run functions point back at this servable: drop them, so that once the
        # last request on this version ends, reference counting frees its session at once
        # instead of whenever a full garbage collection runs.
        self.batchers = {}

    def predict(self, signature: str, inputs: dict[str, np.ndarray],
                output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        signature = signature or "serving_default"
        if signature not in self.signature_defs:
            raise ServingError("INVALID_ARGUMENT", f"Serving signature name: \"{signature}\" not "
                               f"found in signature def")
        expected = self.signature_defs[signature].inputs
        missing = sorted(set(expected) - set(inputs))
        extra = sorted(set(inputs) - set(expected))
        if missing or extra:
            raise ServingError("INVALID_ARGUMENT", f"input tensor alias not found in signature: "
                               f"missing {missing}, unexpected {extra}")
        feeds = self._plans[signature][2]
        for key, value in inputs.items():  # each request on its own, before it can share a batch
            _check_input(key, np.asarray(value), feeds[key][1])
        batcher = self.batchers.get(signature)
        rows = {np.shape(v)[0] if np.ndim(v) else None for v in inputs.values()}
        if batcher is not None and rows and None not in rows:
            if len(rows) > 1:  # TF Serving's batching session says the same
                raise ServingError("INVALID_ARGUMENT", "Batching session Run() input tensors must "
                                   f"have equal 0th-dimension size: {sorted(rows)}")
            try:
                outputs = batcher.submit(inputs)
            except QueueFull as error:
                raise ServingError("UNAVAILABLE", str(error)) from None
        else:
            outputs = self._run(signature, inputs)
        wanted = output_filter or list(outputs)
        unknown = [key for key in wanted if key not in outputs]
        if unknown:
            raise ServingError("INVALID_ARGUMENT", f"output tensor alias not found in signature: "
                               f"{unknown}")
        return {key: outputs[key] for key in wanted}

    def _run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, runner, feeds = self._plans[signature]
        try:
            values = runner(*(as_feed(inputs[key], dtype) for key, (_, dtype) in feeds.items()))
        except (TypeError, ValueError) as exc:
            raise ServingError("INVALID_ARGUMENT", first_line(exc)) from None
        except tf.errors.OpError as exc:  # keep TensorFlow's own code: RESOURCE_EXHAUSTED, ...
            code = exc.error_code
            name = {3: "INVALID_ARGUMENT", 8: "RESOURCE_EXHAUSTED", 4: "DEADLINE_EXCEEDED",
                    9: "FAILED_PRECONDITION", 11: "OUT_OF_RANGE"}.get(code, "INTERNAL")
            raise ServingError(name, first_line(exc)) from None
        return dict(zip(names, values, strict=True))


@dataclass
class VersionState:
    state: int
    error: str = ""
    mtime: float = 0.0
    tries: int = 0  # failed loads of this version as it is on disk
    retry_at: float = 0.0  # monotonic time of the next try, while tries are left


@dataclass
class ModelEntry:
    config: ModelConfig  # read by field: messages of either pool (TensorFlow's or the gateway's)
    base_path: Path
    loaded: dict = field(default_factory=dict)  # version -> Servable
    states: dict = field(default_factory=dict)  # version -> VersionState

    def loaded_from_base_path(self) -> set[int]:
        """The loaded versions that come from the current base path (not an old one it moved from)."""
        return {v for v, s in self.loaded.items() if s.path.parent == self.base_path}


def as_feed(value, dtype) -> np.ndarray:
    """An input as the numpy array its tensor takes (checked by _check_input already)."""
    if dtype == tf.string:
        value = np.asarray(value)
        return value if value.dtype.kind in "SO" else np.char.encode(value, "utf-8")
    return np.asarray(value, dtype=dtype.as_numpy_dtype)


def _check_input(key: str, value: np.ndarray, wanted) -> None:
    """As TF Serving: no silent float -> int, text -> number, number -> text or bool -> number, and
    no integer that the input's type cannot hold (numpy would wrap 2**32 + 5 round to 5)."""
    given = value.dtype
    problem = None
    if wanted == tf.string:
        if given.kind == "O":
            if not all(isinstance(item, (bytes, str)) for item in value.flat):
                problem = "strings"
        elif given.kind not in "SU":
            problem = "strings"
    elif given.kind in "SUO" or (given.kind == "b") != (wanted == tf.bool) \
            or not np.can_cast(given, wanted.as_numpy_dtype, "same_kind"):
        problem = wanted.name
    elif wanted.is_integer and value.size:
        info = np.iinfo(wanted.as_numpy_dtype)
        if value.min() < info.min or value.max() > info.max:
            raise ServingError("INVALID_ARGUMENT", f"input '{key}': a value does not fit {wanted.name}")
    if problem:
        raise ServingError("INVALID_ARGUMENT", f"input '{key}' must be {problem}, got {given}")


def load_servable(name: str, version: int, path: Path, options: ServerOptions | None = None) -> Servable:
    """Load a SavedModel and run each of its warmup records (if any) `warmup_iterations` times
    (TF Serving's --num_request_iterations_for_warmup) before it takes traffic. One run of each
    builds TensorFlow's executors; repeated runs also let the executor learn from measured costs
    which ops to run inline rather than hand to the inter-op pool, so that the first requests
    after a load are as fast as the later ones (docs/benchmarks.md)."""
    options = options or ServerOptions()
    signature_defs = read_signature_defs(path)
    session = load_session(path, options.saved_model_tags, options.session_config)
    servable = Servable(name, version, path, session, signature_defs)
    batching = options.batching
    own = path / BATCHING_FILE
    if batching is not None and options.per_model_batching and own.is_file():
        batching = read_batching_parameters(own)  # --enable_per_model_batching_parameters
    if batching is not None:
        servable.enable_batching(batching)
    warmup = path / WARMUP_FILE
    try:
        if options.warmup and warmup.exists():
            for record in tf.data.TFRecordDataset(str(warmup)).as_numpy_iterator():
                entry = prediction_log_pb2.PredictionLog.FromString(record)
                if entry.WhichOneof("log_type") == "predict_log":
                    request = entry.predict_log.request
                    inputs = {k: from_proto(v) for k, v in request.inputs.items()}
                    for _ in range(max(1, options.warmup_iterations)):
                        servable.predict(request.model_spec.signature_name, inputs)
    except BaseException:  # a failed warmup fails the load: leave no session behind
        servable.close()
        servable.session.close()
        raise
    return servable


class ServableManager:
    """Keeps the versions that each model's version policy asks for loaded."""

    def __init__(self, config: ModelServerConfig, base_path_map: dict[str, str] | None = None,
                 options: ServerOptions | None = None, **changes):
        """`options` (by default ServerOptions()) with `changes` to its fields."""
        self.options = dataclasses.replace(options or ServerOptions(), **changes)
        self.poll_seconds = self.options.poll_seconds
        self.base_path_map = base_path_map
        self.config_file = self.options.config_file
        self.config_poll_seconds = self.options.config_poll_seconds
        self._config_checked = time.monotonic()
        self._lock = threading.Lock()  # guards loaded/states against the request threads
        self._reconcile_lock = threading.RLock()  # one poll or config change at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set once the poller has made its first pass: every version then on disk loaded (warmup
        # records run) or failed. A gateway worker takes connections after it (serving/__main__.py).
        self.first_poll_done = threading.Event()
        self.metrics = ServerMetrics()
        self.models: dict[str, ModelEntry] = {}
        self.apply_config(config, first=True)

    def apply_config(self, config: ModelServerConfig, first: bool = False) -> None:
        """Serve the models `config` lists: new ones are added, removed ones dropped, changed
        base paths, policies or labels take effect from the next poll. A model whose base path
        changed keeps serving the versions it loaded from the old one until the policy's versions
        from the new one load; while none of those can load (or the new path has none yet), the
        newest of them stays. Unless `first` or labels_for_unavailable_versions, a label must
        name a version that is AVAILABLE (a ValueError otherwise, and nothing changes)."""
        wanted = {m.name: m for m in config.model_config_list.config}
        with self._reconcile_lock, self._lock:  # never in the middle of a poll
            if not first and not self.options.labels_for_unavailable_versions:
                self._check_labels(wanted)
            for name in list(self.models):
                if name not in wanted:
                    del self.models[name]
                    log.info("model %s removed from the config", name)
            for name, model in wanted.items():
                base = map_base_path(model.base_path, self.base_path_map)
                entry = self.models.get(name)
                if entry is None:
                    self.models[name] = ModelEntry(model, base)
                    continue
                entry.config = model
                if entry.base_path != base:
                    log.info("model %s moves from %s to %s", name, entry.base_path, base)
                    entry.base_path = base  # what failed or went under the old path is forgotten
                    entry.states = {v: VersionState(AVAILABLE) for v in entry.loaded}

    def _check_labels(self, wanted: dict) -> None:
        for name, model in wanted.items():
            entry = self.models.get(name)
            for label, version in model.version_labels.items():
                if entry is None or version not in entry.loaded:
                    raise ValueError(f"Request to assign label {label} to version {version} of "
                                     f"model {name}, which is not currently available for "
                                     "inference")

    def _reload_config_if_due(self) -> None:
        if not self.config_file or time.monotonic() - self._config_checked < self.config_poll_seconds:
            return
        self._config_checked = time.monotonic()

        try:
            self.apply_config(read_model_config(self.config_file))
        except Exception as error:  # a bad edit keeps the running config, as TF Serving does
            log.error("cannot reload %s: %s", self.config_file, first_line(error))

    # -- lookups used by the APIs ------------------------------------------------------
    @contextlib.contextmanager
    def counted(self, name: str, api: str, entrypoint: str):
        """Count the call run inside (`api` Predict, Classify, ...; entrypoint GRPC or REST) in
        TF Serving's metrics,
        whatever it raises: OK, a ServingError's code, or INTERNAL. It is labelled with the model
        it asked for; names the config does not list count as "unknown", so that made-up names
        cannot mint time series without bound."""
        started, status = time.perf_counter(), "INTERNAL"
        try:
            yield
            status = "OK"
        except ServingError as error:
            status = error.code
            raise
        finally:
            self.metrics.observe(name if name in self.models else "unknown", api, entrypoint,
                                 status, time.perf_counter() - started)

    def servable(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        entry = self.models.get(name)
        if entry is None:
            raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
        if label:
            labels = dict(entry.config.version_labels)
            if label not in labels:
                raise ServingError("INVALID_ARGUMENT",
                                   f"Unrecognized servable version label: {label}")
            version = labels[label]
        with self._lock:
            if version is not None:  # 0 too: TF Serving's Specific(name, 0), not the latest
                servable = entry.loaded.get(version)
                if servable is None:
                    raise ServingError("NOT_FOUND", f"Servable not found for request: "
                                                    f"Specific({name}, {version})")
                return servable
            if not entry.loaded:
                raise ServingError("NOT_FOUND", f"Servable not found for request: Latest({name})")
            return entry.loaded[max(entry.loaded)]

    def status(self, name: str, version: int | None = None) -> list[tuple[int, int, str]]:
        """(version, state, error message) for each version the manager knows, newest first."""
        entry = self.models.get(name)
        if entry is None:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        with self._lock:
            states = {v: (s.state, s.error) for v, s in entry.states.items()}
        if version is not None:
            if version not in states:
                raise ServingError("NOT_FOUND", f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        if not states:
            raise ServingError("NOT_FOUND", f"Could not find any versions of model {name}")
        return [(v, *states[v]) for v in sorted(states, reverse=True)]

    def is_available(self, name: str) -> bool:
        entry = self.models.get(name)
        return bool(entry and entry.loaded)

    # -- polling -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._poll_forever, name="version-poller",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)

    def wait_until_available(self, names: list[str] | None = None, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.is_available(n) for n in (names or self.models)):
                return True
            time.sleep(0.05)
        return False

    def first_pass(self) -> None:
        """Load what the config's models have on disk now, before anything else runs."""
        try:
            self.poll_once()
        finally:
            self.first_poll_done.set()

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            finally:  # even a poll that failed is a pass: nobody waits for one that never ends
                self.first_poll_done.set()
            self._stop.wait(self.poll_seconds)

    def poll_once(self) -> None:
        with self._reconcile_lock:
            self._reload_config_if_due()
            for entry in list(self.models.values()):
                try:
                    self._reconcile(entry)
                except Exception:  # a poll must never kill the poller
                    log.exception("polling %s failed", entry.config.name)

    def _reconcile(self, entry: ModelEntry) -> None:
        name = entry.config.name
        on_disk = modified_versions(entry.base_path)
        loadable = {v: mtime for v, (mtime, _) in on_disk.items()
                    if v not in entry.states or self._may_try(entry.states[v], mtime)}
        policy = entry.config.model_version_policy
        failed = set()
        while True:  # the policy over the versions that can load; again after a load fails
            wanted = _apply_policy(policy, sorted(set(loadable) - failed))
            new = sorted(set(wanted) - entry.loaded_from_base_path(), reverse=True)
            if not new:
                break  # every wanted version is serving
            for version in new:
                if not self._load(entry, version, *on_disk[version]):
                    failed.add(version)
        # Unload only what is no longer wanted, once what is wanted serves. As TF Serving's
        # availability-preserving policy: while the policy picks versions on disk but none of them
        # can load, the newest version serving stays; only a model with no version left on disk
        # for the policy to pick is left with none.
        unwanted = sorted(set(entry.loaded) - set(wanted))
        moved = entry.loaded_from_base_path() != set(entry.loaded)
        if unwanted and not wanted and (moved or _apply_policy(policy, sorted(on_disk))):
            unwanted.pop()  # (a moved base path with nothing there yet keeps the old one too)
        for version in unwanted:
            with self._lock:
                servable = entry.loaded.pop(version)
                servable.close()
                state = entry.states.get(version, VersionState(END))
                entry.states[version] = VersionState(END, state.error, state.mtime)
            log.info("unloaded version %d of %s (%s)", version, name, servable.path)
        with self._lock:  # versions that vanished from disk before they loaded are forgotten
            for version in [v for v, s in entry.states.items()  # (a kept one still serves)
                            if v not in on_disk and v not in entry.loaded and s.state != END]:
                entry.states[version] = VersionState(END)

    def _may_try(self, state: VersionState, mtime: float) -> bool:
        """Whether a version may load: it never failed as it is on disk, or a retry is due
        (TF Serving's --max_num_load_retries, --load_retry_interval_micros)."""
        if not state.error or state.mtime != mtime:
            return True
        return state.tries <= self.options.max_load_retries and time.monotonic() >= state.retry_at

    def _load(self, entry: ModelEntry, version: int, mtime: float, path: Path) -> bool:
        """Load one version from `path` and run its warmup records; False (and the error in its
        status) if that failed. A version of the same number from an old base path serves until
        then."""
        name = entry.config.name
        replaced = entry.loaded.get(version)
        before = entry.states.get(version)
        tries = before.tries if before and before.error and before.mtime == mtime else 0
        with self._lock:
            entry.states[version] = VersionState(AVAILABLE if replaced else LOADING, mtime=mtime)
        try:
            servable = load_servable(name, version, path, self.options)
        except Exception as exc:
            message = f"Failed to load version {version} of {name} from {path}: {first_line(exc)}"
            log.error(message)
            with self._lock:
                entry.states[version] = VersionState(
                    AVAILABLE if replaced else END, message, mtime, tries + 1,
                    time.monotonic() + self.options.load_retry_seconds)
            return False
        with self._lock:
            entry.loaded[version] = servable
            entry.states[version] = VersionState(AVAILABLE, mtime=mtime)
        if replaced is not None:
            replaced.close()
        log.info("loaded version %d of %s from %s", version, name, path)
        return True


class ServerMetrics:
    """TF Serving's own Prometheus metrics, written as its exporter writes them, so that one
    dashboard reads TF Serving and this server alike: `:tensorflow:serving:request_count` counts
    every Predict by the model name it asked for and its status, whatever failed, and
    `:tensorflow:serving:request_latency` is the wall time of those that succeeded, in
    microseconds, by API and entrypoint (GRPC or REST), in TF Serving's buckets."""

    COUNT = ":tensorflow:serving:request_count"
    LATENCY = ":tensorflow:serving:request_latency"
    BUCKETS = [10 * 1.8 ** i for i in range(33)]  # TF Serving's Buckets::Exponential(10, 1.8, 33)

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._latency: dict[tuple[str, str, str], list] = {}  # [per-bucket counts, sum]

    def observe(self, model: str, api: str, entrypoint: str, status: str, seconds: float) -> None:
        with self._lock:
            self._counts[model, status] = self._counts.get((model, status), 0) + 1
            if status != "OK":
                return
            micros = int(seconds * 1e6)
            cell = self._latency.setdefault((model, api, entrypoint),
                                            [[0] * (len(self.BUCKETS) + 1), 0])
            cell[0][bisect.bisect_right(self.BUCKETS, micros)] += 1  # TF: first limit above it
            cell[1] += micros

    def render(self) -> str:
        """The page TF Serving's PrometheusExporter writes: each label value escaped, numbers as
        absl::StrCat prints them (six significant digits), the +Inf bucket last."""
        def labels(**values: str) -> str:
            return ",".join(f'{name}="{_escape_label(value)}"' for name, value in values.items())

        with self._lock:
            counts = sorted(self._counts.items())
            latency = sorted((key, (list(buckets), total)) for key, (buckets, total) in self._latency.items())
        lines = [f"# TYPE {self.COUNT} counter"]
        lines += [f"{self.COUNT}{{{labels(model_name=model, status=status)}}} {count}"
                  for (model, status), count in counts]
        lines.append(f"# TYPE {self.LATENCY} histogram")
        for (model, api, entrypoint), (buckets, total) in latency:
            point = labels(model_name=model, API=api, entrypoint=entrypoint)
            cumulative = 0
            for limit, count in zip([*(f"{b:.6g}" for b in self.BUCKETS), "+Inf"], buckets, strict=True):
                cumulative += count
                lines.append(f'{self.LATENCY}_bucket{{{point},le="{limit}"}} {cumulative}')
            lines.append(f"{self.LATENCY}_sum{{{point}}} {total:.6g}")
            lines.append(f"{self.LATENCY}_count{{{point}}} {cumulative}")
        return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    # TF Serving escapes backslashes and quotes; a newline too here, as Prometheus does
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def map_base_path(base_path: str, mapping: dict[str, str] | None) -> Path:
    """Map a container path (/models/digits) to a local folder, longest prefix first."""
    for prefix in sorted(mapping or {}, key=len, reverse=True):
        if base_path == prefix or base_path.startswith(prefix.rstrip("/") + "/"):
            return Path(mapping[prefix]) / base_path[len(prefix):].lstrip("/")
    return Path(base_path)


def modified_versions(base: Path) -> dict[int, tuple[float, Path]]:
    """The complete versions under `base`: {version: (when its graph was written, its folder)}."""
    found = {}
    for version, path in version_folders(base).items():
        with contextlib.suppress(OSError):  # removed since the scan
            found[version] = (path / GRAPH_FILE).stat().st_mtime, path
    return found


def _apply_policy(policy: FileSystemStoragePathSourceConfig.ServableVersionPolicy,
                  versions: list[int]) -> list[int]:
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return versions
    if kind == "specific":
        return [v for v in versions if v in set(policy.specific.versions)]
    keep = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
    return versions[-keep:]
