"""docker-compose deployment, checked statically (no Docker engine here), and the tfserving
service's own command line run through the embedded model server."""

import importlib.metadata
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grpc
import pytest
import requests
import tensorflow as tf
import yaml
from conftest import ROOT, ModelServerProcess, copy_model_base, free_port, start_gateway, without_tensorflow
from drawings import draw_digit, png_bytes
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
from test_text import stream_events

from serving.gateway.config import Settings
from serving.gateway.preprocess import decode_image, preprocess_drawing
from serving.model_server.__main__ import compose_command_line
from serving.tfserving import protos as tf_serving_protos
from serving.tfserving.configs import read_batching_parameters, read_model_config, read_monitoring_config

GPU = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` tag (used by the CPU override file)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"!reset": True})


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=ComposeLoader)


def dockerfile_stages() -> dict[str, list[str]]:
    stages, current = {}, None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line)
        if match:
            current = match.group(2)
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def tf_version() -> str:
    return next(d.split("==")[1] for d in project()["optional-dependencies"]["tensorflow"]
                if d.startswith("tensorflow=="))


@pytest.fixture(scope="module")
def services():
    return compose()["services"]


def test_the_gateway_s_copy_of_tf_serving_s_api_is_the_installed_one():
    """The gateway's TF Serving messages (serving/tfserving/protos.binpb, loaded without
    TensorFlow) are the pinned tensorflow-serving-api's, and ship with the package."""
    installed = tf_serving_protos.descriptor_set_from_installed_package()
    assert tf_serving_protos.DESCRIPTORS.read_bytes() == installed.SerializeToString(deterministic=True), \
        "out of date: run `python -m serving.tfserving.protos`"


def test_the_package_ships_the_gateway_s_data_files_and_no_tensorflow_by_default(tmp_path):
    """The wheel the Dockerfile's `pip install .` builds holds every data file the gateway reads,
    and requires TensorFlow only through the `tensorflow` extra."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("serving", "training", "client"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("scribe-*.whl"))) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    data = {str(path.relative_to(ROOT)) for path in (ROOT / "serving").rglob("*")
            if path.is_file() and path.suffix in (".binpb", ".json", ".config", ".html", ".js", ".css")
            and "__pycache__" not in path.parts}
    assert data and data <= names, data - names
    required = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [line for line in required if "tensorflow" in line and "extra ==" not in line]
    assert 'Requires-Dist: tensorflow==' in metadata  # ... behind the extra


def test_one_tensorflow_version_everywhere(services):
    version = tf_version()
    assert f"tensorflow-serving-api=={version}" in project()["optional-dependencies"]["tensorflow"]
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert f"tensorflow=={version}" in constraints and f"tensorflow-serving-api=={version}" in constraints
    assert services["tfserving"]["image"] == f"tensorflow/serving:{version}-gpu"
    cpu = compose("docker-compose.cpu.yml")["services"]
    assert cpu["tfserving"]["image"] == f"tensorflow/serving:{version}"
    assert f"ARG TF_VERSION={version}" in (ROOT / "Dockerfile").read_text()


def test_every_image_is_pinned(services):
    images = [s["image"] for s in services.values() if "image" in s]
    images += [s["image"] for s in compose("docker-compose.cpu.yml")["services"].values() if "image" in s]
    text = (ROOT / "Dockerfile").read_text()
    images += re.findall(r"ARG \w+_IMAGE=(\S+)", text)
    for image in images:
        assert ":" in image and not image.endswith(":latest"), image
        assert re.search(r":[\w.-]*\d", image) or "${" in image, f"{image} has no version tag"


def test_gpu_reservations_are_on_tfserving_and_trainers_only(services):
    for name in ("tfserving", "trainer-digits", "trainer-bard", "trainer-ladder"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"] == [GPU], name
    assert "deploy" not in services["gateway"]
    cpu = compose("docker-compose.cpu.yml")["services"]
    for name in ("tfserving", "trainer-digits", "trainer-bard", "trainer-ladder"):
        assert cpu[name]["deploy"] == {"!reset": True}
    for name in ("trainer-digits", "trainer-bard", "trainer-ladder"):  # CPU images and the cpu profile
        assert cpu[name]["build"]["args"]["TRAINER_IMAGE"] == f"tensorflow/tensorflow:{tf_version()}"
        assert cpu[name]["command"][cpu[name]["command"].index("--profile") + 1] == "cpu"


def test_trainers_are_behind_the_train_profile_with_the_gpu_profile(services):
    for name, model in (("trainer-digits", "digits"), ("trainer-bard", "bard"), ("trainer-ladder", "ladder")):
        service = services[name]
        assert service["profiles"] == ["train"]
        assert service["build"]["target"] == "trainer"
        command = service["command"]
        assert command[0] == model and command[command.index("--profile") + 1] == "gpu"


def test_trainers_write_where_tf_serving_reads(services):
    config = read_model_config(ROOT / "serving" / "models.config")
    served_base = {c.name: c.base_path for c in config.model_config_list.config}
    assert "models:/models:ro" in services["tfserving"]["volumes"]
    for name, models in (("trainer-digits", ["digits"]), ("trainer-bard", ["bard"]),
                         ("trainer-ladder", [n for n in served_base if n.startswith("digits-")])):
        service = services[name]
        assert "models:/models" in service["volumes"]
        model_base = service["command"][service["command"].index("--model-base") + 1]
        for model in models:  # training pushes <base>/<name>/<N>
            assert f"{model_base}/{model}" == served_base[model]


def test_the_multiworker_trainers_find_each_other_by_service_name_and_only_the_chief_pushes(services):
    from training.distribute import cluster_from_env

    workers = sorted(name for name in services if name.startswith("trainer-bard-worker-"))
    assert len(workers) == 2
    gpus = set()
    for index, name in enumerate(workers):
        service = services[name]
        assert service["profiles"] == ["train-multiworker"]
        assert service["command"] == services["trainer-bard"]["command"]  # the gpu profile
        assert "models:/models" in service["volumes"]
        cluster = cluster_from_env(service["environment"])
        assert (cluster.task_index, cluster.tasks, cluster.is_chief) == (index, len(workers), index == 0)
        names = json.loads(service["environment"]["TF_CONFIG"])["cluster"]["worker"]
        assert [n.rsplit(":", 1)[0] for n in names] == workers  # compose's DNS: the service names
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        gpus.update(device["device_ids"])
    assert len(gpus) == len(workers)  # a GPU each


def test_ports_healthchecks_and_depends_on(services):
    # `--scale tfserving=N --scale gateway=M`: neither binds a host port or names its container
    for name in ("tfserving", "gateway"):
        assert "ports" not in services[name] and "container_name" not in services[name], name
    assert services["tfserving"]["expose"] == ["8500", "8501"]
    assert services["gateway"]["environment"]["SCRIBE_MODEL_SERVER"] == "dns:///tfserving:8500"
    assert services["gateway"]["depends_on"] == {"tfserving": {"condition": "service_healthy"}}
    assert services["proxy"]["ports"] == ["8080:8080"]
    assert services["proxy"]["depends_on"] == ["gateway"]
    health = services["tfserving"]["healthcheck"]["test"]
    assert health[:3] == ["CMD", "bash", "-c"] and "curl" not in health[3]  # the image has no curl
    assert "HEALTHCHECK" in "\n".join(dockerfile_stages()["gateway"])


def test_the_proxy_spreads_requests_over_every_gateway_and_holds_slow_clients(services):
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in services["proxy"]["volumes"]
    assert "resolver 127.0.0.11" in conf  # Docker's DNS, read again: gateways added by --scale
    assert re.search(r"set \$gateway http://gateway:8080;.*\n\s+proxy_pass \$gateway;", conf)
    assert "proxy_request_buffering on;" in conf
    assert f"client_max_body_size {Settings().max_body_bytes // 2**20}m;" in conf
    assert "X-Accel-Buffering" in conf  # a stream asks the proxy not to hold it


def test_tfserving_flags(services):
    flags = dict(arg.lstrip("-").split("=", 1) for arg in services["tfserving"]["command"])
    assert services["tfserving"]["entrypoint"] == ["tensorflow_model_server"]
    assert flags["model_config_file"] == "/config/models.config"
    assert float(flags["file_system_poll_wait_seconds"]) > 0
    assert flags["enable_batching"] == "true"
    assert flags["batching_parameters_file"] == "/config/batching.config"
    assert flags["monitoring_config_file"] == "/config/monitoring.config"
    assert flags["enable_model_warmup"] == "true"
    # as many runs of each warmup record as the gateway's embedded model server makes
    assert int(flags["num_request_iterations_for_warmup"]) == Settings().warmup_iterations > 1
    assert flags["model_config_file_poll_wait_seconds"] == "60"  # docs/deployment.md's "re-read every 60 s"
    assert services["tfserving"]["environment"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    # gateways reconnect, and so resolve the replicas again, at least every minute
    assert flags["grpc_channel_arguments"] == "grpc.max_connection_age_ms=60000"


def test_every_referenced_file_exists(services):
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), volume
        if "build" in service:
            assert service["build"]["target"] in dockerfile_stages()
            assert (ROOT / service["build"]["context"] / "Dockerfile").exists()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for source in shlex.split(line)[1:-1]:
                assert (ROOT / source).exists(), line


def test_config_files_parse_and_name_the_models_the_gateway_calls():
    from training.ladder import LOWER_RUNGS, model_name

    config = read_model_config(ROOT / "serving" / "models.config")
    settings = Settings()
    rungs = [model_name(rung) for rung in LOWER_RUNGS]  # bottom-up, as the page expects them
    names = [c.name for c in config.model_config_list.config]
    assert set(names) == {settings.digits_model, settings.text_model, *rungs}
    assert [n for n in names if n in rungs] == rungs
    for entry in config.model_config_list.config:  # where the trainers push them
        assert entry.base_path == f"/models/{entry.name}"
    assert read_batching_parameters(ROOT / "serving" / "batching.config")["max_batch_size"] > 1
    assert read_monitoring_config(ROOT / "serving" / "monitoring.config") == "/monitoring/prometheus/metrics"


def test_dockerfile_runs_as_non_root_and_lints_clean():
    for name, lines in dockerfile_stages().items():
        users = [line.split()[1] for line in lines if line.startswith("USER")]
        assert users and users[-1] not in ("root", "0"), f"stage {name} runs as root"
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def compose_model_server(services, trained, trained_bard, tmp_path_factory):
    """The tfserving service's command line, run through the embedded model server: the same
    flags, with the container's paths mapped to this checkout and a temporary models folder.
    Yields (gRPC port, REST port) once the compose healthcheck passes and both models are
    AVAILABLE."""
    base = copy_model_base(trained, tmp_path_factory.mktemp("compose") / "models")
    copy_model_base(trained_bard, base)
    grpc_port, rest_port = free_port(), free_port()
    args = compose_command_line(grpc_port, rest_port)
    server = ModelServerProcess(*args, f"--base_path_map=/models={base}").start()
    try:
        healthcheck = services["tfserving"]["healthcheck"]["test"][3].replace("8501", str(rest_port))
        def healthy() -> bool:
            return subprocess.run(["bash", "-c", healthcheck], capture_output=True).returncode == 0

        server.wait_until(healthy, 90, "the compose healthcheck never passed")
        for model in ("digits", "bard"):
            server.wait_until(lambda model=model: requests.get(
                f"http://127.0.0.1:{rest_port}/v1/models/{model}", timeout=10).json()[
                "model_version_status"][0]["state"] == "AVAILABLE", 90, f"{model} never became AVAILABLE")
        yield grpc_port, rest_port
    finally:
        server.stop()


def test_the_tfserving_command_line_serves_through_the_embedded_model_server(compose_model_server):
    """The flags in compose are the flags we test: Predict over gRPC, metrics at the monitoring
    path."""
    grpc_port, rest_port = compose_model_server
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "digits"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(tf.zeros([2, 28, 28]).numpy()))
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert tf.make_ndarray(response.outputs["digit"]).shape == (2,)
    metrics = requests.get(f"http://127.0.0.1:{rest_port}/monitoring/prometheus/metrics", timeout=10).text
    assert ':tensorflow:serving:request_count{model_name="digits",status="OK"}' in metrics
    assert ':tensorflow:serving:request_latency_count{model_name="digits",API="Predict",entrypoint="GRPC"}' \
        in metrics


def test_the_gateway_image_installs_only_the_gateway_s_dependencies():
    """The gateway stage installs the package without extras, the trainer stage with TensorFlow's,
    and TensorFlow is not among the base dependencies."""
    stages = dockerfile_stages()
    assert any("pip install -c constraints.txt . " in line for line in stages["gateway"])
    assert any('pip install -c constraints.txt ".[tensorflow]"' in line for line in stages["trainer"])
    assert not [d for d in project()["dependencies"] if d.startswith(("tensorflow", "keras"))]


def requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions that installing `requirements` (no extras) brings, as installed here."""
    seen, todo = set(), list(requirements)
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra's, or another platform's
        name = canonicalize_name(requirement.name)
        if name not in seen:
            seen.add(name)
            todo += importlib.metadata.requires(name) or []
    return seen


def test_the_gateway_imports_nothing_beyond_its_dependencies(tmp_path):
    """A gateway worker (create_app with SCRIBE_MODEL_SERVER set, both endpoints, metrics, the
    gunicorn entry point) and the client import only what the base dependencies install."""
    code = ("import json, sys\nbare = set(sys.modules)  # the interpreter's own, and its .pth files'\n"
            "import serving.__main__, serving.gateway.digits_api, serving.gateway.text_api, client\n"
            "from serving.gateway.app import create_app\ncreate_app()\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - bare})))")
    env = {**without_tensorflow(tmp_path), "SCRIBE_MODEL_SERVER": "127.0.0.1:1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    distributions = importlib.metadata.packages_distributions()
    imported = {canonicalize_name(distribution) for module in json.loads(result.stdout)
                for distribution in distributions.get(module, [])}
    assert imported - {"scribe"} <= requirement_closure(project()["dependencies"])
    assert {"flask", "grpcio", "protobuf", "pillow"} <= imported  # it did look


def test_without_tensorflow_the_embedded_model_server_is_refused_with_a_reason(tmp_path):
    env = {**without_tensorflow(tmp_path), "PORT": str(free_port())}
    env.pop("SCRIBE_MODEL_SERVER", None)
    result = subprocess.run([sys.executable, "-m", "serving"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "needs TensorFlow" in result.stderr and "SCRIBE_MODEL_SERVER" in result.stderr


def test_the_gateway_as_compose_runs_it_calls_the_model_server_without_tensorflow(
        compose_model_server, tmp_path):
    """The gateway service: `python -m serving` with SCRIBE_MODEL_SERVER set, as the Dockerfile
    starts it, in front of the compose model server, with TensorFlow impossible to import (as
    in the gateway image). Its workers answer digits and text through TF Serving's gRPC API
    (serving/tfserving/protos.py): the answers are the model server's own, and no TensorFlow
    library is mapped into a worker."""
    grpc_port, _ = compose_model_server
    gateway = start_gateway(tmp_path, {"PYTHONPATH": without_tensorflow(tmp_path)["PYTHONPATH"],
                                       "SCRIBE_MODEL_SERVER": f"127.0.0.1:{grpc_port}",
                                       "SCRIBE_THREADS": "4"}, workers=2, timeout=60)
    url = gateway.url
    try:
        drawing = png_bytes(draw_digit(7))
        answer = requests.post(url + "/v1/digits/predict", data=drawing,
                               headers={"Content-Type": "image/png"}, timeout=30)
        assert answer.status_code == 200, answer.text
        # The same image straight to the model server, with TensorFlow's own protos.
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "digits"
        image = preprocess_drawing(decode_image(drawing, 10**7))[None]
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(image))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            direct = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
        prediction = answer.json()["predictions"][0]
        assert prediction["digit"] == int(tf.make_ndarray(direct.outputs["digit"])[0])
        assert prediction["probabilities"] == pytest.approx(
            tf.make_ndarray(direct.outputs["probabilities"])[0].tolist(), abs=1e-5)
        assert answer.json()["model"]["version"] == direct.model_spec.version.value
        params = {"prompt": "ROMEO:", "max_chars": 100, "seed": 3}
        text = requests.post(url + "/v1/text/generate", json=params, timeout=60)
        assert text.status_code == 200, text.text
        assert len(text.json()["text"]) == 100
        # A stream: its first chunk from serving_default, the rest from `continue` with the state
        # and the position passed back, and the chunks join into the one-call text.
        with requests.post(url + "/v1/text/generate", json={**params, "stream": True}, stream=True,
                           timeout=60) as response:
            events = stream_events(response)
        chunks = [json.loads(data)["text"] for event, data in events if event == "chunk"]
        assert len(chunks) == math.ceil(100 / Settings().stream_chunk_chars) > 1
        assert "".join(chunks) == text.json()["text"] and events[-1][0] == "done"
        workers = gateway.worker_pids()
        assert len(workers) == 2
        for pid in workers:
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "libtensorflow" not in maps and "_pywrap_tensorflow" not in maps, \
                f"worker {pid} loaded TensorFlow"
    finally:
        gateway.stop()
