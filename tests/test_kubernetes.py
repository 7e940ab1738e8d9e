"""deploy/kubernetes, checked offline: `kubectl kustomize` renders each variant, every object
validates against Kubernetes' schemas, images are pinned, GPUs are requested where they belong,
the trainers write where TF Serving reads, and TF Serving runs with docker-compose's flags (which
the embedded model server is tested with, tests/test_deploy.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT

KUBERNETES_VERSION = "1.32"
VARIANTS = ("cpu", "gpu", "kserve")
# The fields KServe adds to a predictor; the rest of it is a Kubernetes PodSpec.
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (.ci/run installs it)")


def render(variant: str) -> dict[tuple[str, str], dict]:
    """The variant's objects, as `kubectl kustomize` renders them, by (kind, name)."""
    done = subprocess.run([KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                           str(ROOT / "deploy" / "kubernetes" / variant)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(done.stdout) if o}


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    return request.param, render(request.param)


def pod_spec(obj: dict) -> dict:
    """The pod template's spec of a workload, or a KServe predictor's PodSpec fields."""
    if obj["kind"] == "InferenceService":
        return {k: v for k, v in obj["spec"]["predictor"].items() if k not in KSERVE_PREDICTOR_FIELDS}
    return obj.get("spec", {}).get("template", {}).get("spec", {})


def containers(obj: dict) -> list[dict]:
    return pod_spec(obj).get("containers", [])


def tf_serving(objects: dict) -> dict:
    """TF Serving's pod spec: the base's Deployment, or the kserve variant's InferenceService."""
    return pod_spec(objects.get(("Deployment", "tfserving")) or objects["InferenceService", "tfserving"])


def test_every_object_validates_against_kubernetes_schemas(variant):
    import kubernetes_validate

    _, objects = variant
    for obj in objects.values():
        if obj["kind"] == "InferenceService":  # a CRD: its predictor must be a valid PodSpec
            obj = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
                   "spec": pod_spec(obj)}
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_images_are_pinned(variant):
    _, objects = variant
    for obj in objects.values():
        for container in containers(obj):
            name, _, tag = container["image"].partition(":")
            assert tag and tag != "latest" and any(c.isdigit() for c in tag), container["image"]


def test_gpus_are_requested_by_tf_serving_and_the_trainers_only_in_the_gpu_variant(variant):
    name, objects = variant
    for (kind, object_name), obj in objects.items():
        for container in containers(obj):
            limits = container.get("resources", {}).get("limits", {})
            wants_gpu = name == "gpu" and (object_name == "tfserving" or kind == "Job")
            assert ("nvidia.com/gpu" in limits) == wants_gpu, (kind, object_name)
    serving = tf_serving(objects)["containers"][0]["image"]
    assert serving == ("tensorflow/serving:2.19.0-gpu" if name == "gpu" else "tensorflow/serving:2.19.0")
    for job in ("trainer-digits", "trainer-bard", "trainer-ladder"):
        args = containers(objects["Job", job])[0]["args"]
        assert args[args.index("--profile") + 1] == ("gpu" if name == "gpu" else "cpu")


def test_the_trainers_write_where_tf_serving_reads(variant):
    _, objects = variant
    serving = tf_serving(objects)
    claim = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in serving["volumes"]}
    read = {m["mountPath"]: claim[m["name"]] for m in serving["containers"][0]["volumeMounts"]}
    assert objects["PersistentVolumeClaim", "models"]["spec"]["accessModes"] == ["ReadWriteMany"]
    served = config_files(objects)["models.config"]
    rungs = [f"digits-{rung}" for rung in ("softmax", "dense", "conv", "conv-dropout")]
    for job, names in (("trainer-digits", ["digits"]), ("trainer-bard", ["bard"]), ("trainer-ladder", rungs)):
        spec = objects["Job", job]["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        base = args[args.index("--model-base") + 1]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
        assert read[base] == volumes[mounts[base]] == "models"
        for name in names:  # the job pushes <base>/<name>/<N>, the config serves it
            assert f'base_path: "{base}/{name}"' in served


def config_files(objects: dict) -> dict:
    """The ConfigMap of TF Serving's config files (kustomize adds a hash to its name)."""
    return next(obj for (kind, _), obj in objects.items() if kind == "ConfigMap")["data"]


def test_tf_serving_runs_with_docker_compose_s_flags_and_config_files(variant):
    _, objects = variant
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["tfserving"]
    container = tf_serving(objects)["containers"][0]
    assert container["command"] == compose["entrypoint"]
    assert container["args"] == compose["command"]
    for name in ("models.config", "batching.config", "monitoring.config"):
        assert config_files(objects)[name] == (ROOT / "serving" / name).read_text()
    probes = [container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")]
    assert probes == ["/v1/models/digits", "/v1/models/digits"]
    volumes = {v["name"]: v for v in tf_serving(objects)["volumes"]}
    assert volumes["config"]["configMap"]["name"] in {name for kind, name in objects if kind == "ConfigMap"}


@pytest.mark.parametrize("name", ["cpu", "gpu"])  # kserve: KServe makes TF Serving's Service (below)
def test_the_gateway_calls_every_replica_through_a_headless_service(name):
    objects = render(name)
    assert objects["Service", "tfserving"]["spec"]["clusterIP"] == "None"
    gateway = containers(objects["Deployment", "gateway"])[0]
    env = {e["name"]: e["value"] for e in gateway["env"]}
    assert env["SCRIBE_MODEL_SERVER"] == "dns:///tfserving:8500"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert objects["HorizontalPodAutoscaler", "gateway"]["spec"]["scaleTargetRef"]["name"] == "gateway"
    assert {n for k, n in objects if k == "PodDisruptionBudget"} == {"tfserving", "gateway"}


def test_kserve_runs_tf_serving_as_an_inference_service_the_gateway_calls_over_grpc():
    objects = render("kserve")
    assert not {(k, n) for k, n in objects if n == "tfserving" and k != "InferenceService"}
    service = objects["InferenceService", "tfserving"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    container = service["spec"]["predictor"]["containers"][0]
    assert container["ports"] == [{"name": "h2c", "containerPort": 8500, "protocol": "TCP"}]
    gateway = containers(objects["Deployment", "gateway"])[0]
    env = {e["name"]: e["value"] for e in gateway["env"]}
    assert env["SCRIBE_MODEL_SERVER"] == "dns:///tfserving-predictor:80"  # KServe's <name>-predictor


def test_the_multiworker_job_starts_workers_that_find_each_other_and_push_where_tf_serving_reads():
    import kubernetes_validate

    from training.distribute import cluster_from_env

    objects = render("multiworker")
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    job, service = objects["Job", "trainer-bard-multiworker"], objects["Service", "trainer-workers"]
    spec = job["spec"]["template"]["spec"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert spec["subdomain"] == "trainer-workers" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    container = spec["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    script = container["args"][0]
    assert script.rstrip().endswith("--profile gpu --model-base /models --runs-dir /runs")
    workers = job["spec"]["completions"]
    for index in range(workers):  # the TF_CONFIG each pod's shell builds, read as training reads it
        printed = script.replace("exec python -m training", "printenv TF_CONFIG #")
        shown = subprocess.run(["sh", "-c", printed], env={"JOB_COMPLETION_INDEX": str(index)},
                               capture_output=True, text=True)
        cluster = cluster_from_env({"TF_CONFIG": shown.stdout})
        assert (cluster.task_index, cluster.tasks, cluster.is_chief) == (index, workers, index == 0)
        names = json.loads(shown.stdout)["cluster"]["worker"]
        port = service["spec"]["ports"][0]["port"]
        assert names == [f"trainer-bard-multiworker-{i}.trainer-workers:{port}" for i in range(workers)]
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/models"]] == "models"  # the claim TF Serving reads
