"""k8s/: what `moeray k8s render` prints for each overlay (the same as `kubectl kustomize`), accepted
offline by the KubeRay CRDs, their CEL rules and the operator's validation, by the Kubernetes schemas
and by Ray Serve's schema and moeray's builder; the rules the manifests promise (token auth, no secrets,
only the Serve ports open, the actor graph fits its workers, checkpoints on a claim); and, on a local Ray
cluster, the RayService's Serve config answering the openai client and the SFT RayJob's entrypoint
training and resuming under `ray job submit`; the image recipe.

The KubeRay v1.7.0 CRDs are read from ../shared/kuberay-crds-v1.7.0 next to the repository (or the
folder in MOERAY_KUBERAY_CRDS); where neither exists the CRD checks skip and say so.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import ConfigDict

from jobs.config import SHORTCUT_FLAGS, RunConfig, TrainConfig, load_config
from jobs.grpo_config import GRPOConfig
from k8s import render as k8s_render
from k8s import serve_config
from k8s.render import Loader, RenderError, overlays, render, render_resources

from .k8s_checks import core_errors, crd_errors, operator_errors
from .local_ray import free_port, ray_head

REPO = Path(__file__).resolve().parents[1]
CRD_DIR = Path(os.environ.get("MOERAY_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds-v1.7.0"))
OVERLAYS = overlays()
# The oldest Kubernetes the manifests support (PodDisruptionBudget.unhealthyPodEvictionPolicy is GA in
# 1.31) and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31", "1.37")
SERVE_PORTS = {"http": 8000, "grpc": 9000}
TOKEN_SECRET, API_KEYS_SECRET = "moeray-ray-token", "moeray-api-keys"


def pinned_ray_version() -> str:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", d.replace(" ", "")) for d in dependencies if d.startswith("ray")]
    return pin.group(2)


@pytest.fixture(scope="module")
def crd_dir() -> Path:
    if not (CRD_DIR / "ray.io_rayservices.yaml").exists():
        pytest.skip(f"the KubeRay v1.7.0 CRDs are not at {CRD_DIR} (they sit next to the repository in the "
                    "project's workspace; set MOERAY_KUBERAY_CRDS to a folder with ray.io_*.yaml to run these checks)")
    return CRD_DIR


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> str:
    return request.param


def of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def the(resources: list[dict], kind: str, name: str | None = None) -> dict:
    (resource,) = [r for r in of_kind(resources, kind) if name is None or r["metadata"]["name"] == name]
    return resource


# The training RayJobs by name: the module each one runs and its config's schema.
JOBS = {"moeray-sft": ("jobs.sft", TrainConfig), "moeray-grpo": ("jobs.grpo", GRPOConfig)}


def job_config(job: dict) -> tuple[RunConfig, object]:
    """The config of a RayJob's `python -m jobs.<module> ...` entrypoint, and its parsed arguments."""
    python, flag, module, *args = shlex.split(job["spec"]["entrypoint"])
    expected_module, schema = JOBS[job["metadata"]["name"]]
    assert (python, flag, module) == ("python", "-m", expected_module)
    parsed = importlib.import_module(module).build_parser().parse_args(args)
    overrides = list(parsed.set) + [f"{key}={getattr(parsed, key)}" for key in SHORTCUT_FLAGS.values()
                                    if getattr(parsed, key) is not None]
    return load_config(REPO / parsed.config, overrides, schema), parsed


def cluster_specs(resource: dict) -> list[dict]:
    """The RayCluster specs inside a ray.io resource."""
    spec = resource["spec"]
    return {"RayCluster": [spec], "RayService": [spec.get("rayClusterConfig")],
            "RayJob": [spec.get("rayClusterSpec")]}.get(resource["kind"], [])


def pod_templates(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"]["template"])] + [
        (group["groupName"], group["template"]) for group in cluster.get("workerGroupSpecs", [])]


def serve_config_of(resources: list[dict]) -> dict:
    return yaml.safe_load(the(resources, "RayService")["spec"]["serveConfigV2"])


def ray_cpus(group: dict) -> float:
    """Ray's logical CPUs per pod of a group: rayStartParams num-cpus, else the container's CPU limit."""
    if "num-cpus" in group.get("rayStartParams", {}):
        return float(group["rayStartParams"]["num-cpus"])
    cpu = str(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


# ---- render: kubectl kustomize's output, without kubectl -----------------------------------------


def test_render_equals_kubectl_kustomize(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot compare with `kubectl kustomize`")
    expected = subprocess.run([kubectl, "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    assert render(overlay) == expected  # byte for byte


def test_render_command_prints_the_overlay_with_set_overrides():
    done = subprocess.run(
        [sys.executable, "-m", "k8s.render", "--overlay", "cpu-dev",
         "--set", "RayService:spec.rayClusterConfig.workerGroupSpecs[groupName=workers].maxReplicas=3",
         "--set", 'RayJob/moeray-sft:metadata.annotations["example.com/owner"]="0"'],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    printed = yaml.load_all(done.stdout, Loader=Loader)
    changed = {(r["kind"], r["metadata"]["name"]): r for r in printed}
    assert changed["RayService", "moeray"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 3
    assert changed["RayJob", "moeray-sft"]["metadata"]["annotations"] == {"example.com/owner": "0"}
    untouched = {(r["kind"], r["metadata"]["name"]): r for r in render_resources("cpu-dev")}
    assert changed["RayJob", "moeray-grpo"] == untouched["RayJob", "moeray-grpo"]  # only the job named
    assert changed["NetworkPolicy", "moeray"] == untouched["NetworkPolicy", "moeray"]


@pytest.mark.parametrize("argv, message", [
    (["--overlay", "prod"], "no overlay 'prod' (overlays: cpu-dev, gpu)"),
    ([], "the following arguments are required: --overlay"),
    (["--overlay", "cpu-dev", "--set", "replicas=2"], "expected KIND[/NAME]:PATH=VALUE"),
    (["--overlay", "cpu-dev", "--set", "RayJob:spec.backoffLimit=3"], "name one as RayJob/NAME"),
    (["--overlay", "cpu-dev", "--set", "Deployment:spec.replicas=2"], "no Deployment in this overlay"),
    (["--overlay", "cpu-dev", "--set", "PersistentVolumeClaim:spec.x=1"], "name one as PersistentVolumeClaim/NAME"),
    (["--overlay", "cpu-dev", "--set", "RayService:spec.rayClusterConfig.workerGroupSpecs[groupName=gpu].replicas=2"],
     "0 items have groupName=gpu"),
    (["--overlay", "cpu-dev", "--set", "RayJob/moeray-sft:spec.entrypoint[3]=x"], "cannot set [3] in a str value"),
    (["--overlay", "cpu-dev", "--set", "RayJob/moeray-sft:spec.backoffLimit=[1"], "expected ',' or ']'"),
    (["--overlay", "cpu-dev", "--set", "RayJob/moeray-sft:spec.rayClusterSpec.workerGroupSpecs[5].replicas=1"],
     "no [5] in a list of 1"),
])
def test_render_reports_a_mistake_in_one_line(argv, message, capsys):
    assert k8s_render.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("moeray k8s render: error: ")
    assert message in captured.err


def test_render_refuses_kustomize_features_it_does_not_implement(tmp_path, monkeypatch, capsys):
    """What render cannot do exactly it refuses, rather than print something kustomize would not."""
    overlay = tmp_path / "overlays" / "prefixed"
    overlay.mkdir(parents=True)
    base = os.path.relpath(REPO / "k8s" / "base", overlay)
    (overlay / "kustomization.yaml").write_text(f"resources: [{base}]\nnamePrefix: dev-\n")
    monkeypatch.setattr(k8s_render, "OVERLAYS_DIR", tmp_path / "overlays")
    assert k8s_render.main(["--overlay", "prefixed"]) == 2
    assert "namePrefix not supported by moeray k8s render" in capsys.readouterr().err
    (overlay / "kustomization.yaml").write_text(  # a strategic merge patch
        f"resources: [{base}]\npatches:\n- target: {{kind: RayJob}}\n  patch: 'spec: {{backoffLimit: 1}}'\n")
    with pytest.raises(RenderError, match="only JSON 6902 patches"):
        render("prefixed")


def test_the_serve_config_patch_is_generated_from_the_serve_config(overlay):
    assert serve_config.TARGET.read_text() == serve_config.patch_text(), "run: python -m k8s.serve_config"
    rayservice = the(render_resources(overlay), "RayService")
    assert rayservice["spec"]["serveConfigV2"] == serve_config.SOURCE.read_text()


# ---- what the API server and the KubeRay operator would say ----------------------------------------


def test_ray_resources_pass_the_crds_cel_rules_and_the_operator(overlay, crd_dir):
    ray_resources = [r for r in render_resources(overlay) if r["apiVersion"].startswith("ray.io/")]
    assert {r["kind"] for r in ray_resources} == {"RayCluster", "RayJob", "RayService"}
    for resource in ray_resources:
        assert crd_errors(resource, crd_dir) == [], resource["kind"]
        assert operator_errors(resource) == [], resource["kind"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_resources_pass_the_kubernetes_schemas(overlay, version):
    core = [r for r in render_resources(overlay) if not r["apiVersion"].startswith("ray.io/")]
    assert {r["kind"] for r in core} == {"PersistentVolumeClaim", "Job", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    for resource in core:
        assert core_errors(resource, version) == [], f"{resource['kind']}/{resource['metadata']['name']}"


def serve_config_errors(rayservice: dict) -> list[str]:
    """Ray Serve's schema, every import path importable, every application's args (and engine settings)
    accepted by the builder's pydantic models with unknown keys refused (they would be ignored)."""
    from ray.serve.schema import ServeDeploySchema

    from serving.app import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, AppArgs
    from engine import EngineConfig

    if not rayservice["spec"].get("serveConfigV2"):
        return ["the RayService has no serveConfigV2"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    strict_args = type("StrictAppArgs", (AppArgs,), {"model_config": ConfigDict(extra="forbid")})
    strict_engine = type("StrictEngineConfig", (EngineConfig,), {"model_config": ConfigDict(extra="forbid")})
    problems = []
    for path in [app.import_path for app in config.applications] + list(config.grpc_options.grpc_servicer_functions):
        module, _, attribute = path.replace(":", ".").rpartition(".")
        if not hasattr(importlib.import_module(module), attribute):
            problems.append(f"{path} is not importable")
    for app in config.applications:
        try:
            args = strict_args.model_validate(app.args)
            strict_engine.model_validate(args.engine)
        except ValueError as error:
            problems.append(f"application {app.name}: {error}")
        problems += [f"application {app.name}: no deployment {d.name}" for d in app.deployments
                     if d.name not in (ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT)]
    return problems


def test_serve_config_passes_serve_schema_imports_and_builder_args(overlay):
    resources = render_resources(overlay)
    assert serve_config_errors(the(resources, "RayService")) == []
    config = serve_config_of(resources)
    assert (config["http_options"]["port"], config["grpc_options"]["port"]) == tuple(SERVE_PORTS.values())
    assert config["http_options"]["host"] == "0.0.0.0"  # reachable from outside the pod


def test_rayjob_entrypoints_run_real_modules_with_configs_that_parse(overlay):
    jobs = of_kind(render_resources(overlay), "RayJob")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(JOBS)
    for job in jobs:
        config, parsed = job_config(job)
        assert parsed.resume, "a retry must resume from the newest checkpoint"
        assert config.run_dir.startswith("/mnt/runs/") and config.export_dir.startswith("/mnt/models/")
    run_dirs = [job_config(job)[0].run_dir for job in jobs]
    assert len(set(run_dirs)) == len(run_dirs), "two jobs in one run folder would resume each other's checkpoints"


# ---- negative: what the checks must refuse ----------------------------------------------------------


def _rayservice() -> dict:
    return copy.deepcopy(the(render_resources("cpu-dev"), "RayService"))


def test_a_misspelled_field_fails_the_crd(crd_dir):
    resource = _rayservice()
    head = resource["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParameters"] = head.pop("rayStartParams")
    assert crd_errors(resource, crd_dir) == [
        "spec.rayClusterConfig.headGroupSpec: Additional properties are not allowed ('rayStartParameters' was unexpected)"]
    resource = _rayservice()
    resource["metadata"]["label"] = {"a": "b"}
    assert crd_errors(resource, crd_dir) == ["metadata.label: unknown field"]


def test_a_wrong_type_fails_the_crd(crd_dir):
    resource = _rayservice()
    resource["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert crd_errors(resource, crd_dir) == [
        "spec.rayClusterConfig.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"]
    resource = _rayservice()
    resource["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert crd_errors(resource, crd_dir) == [
        "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"]


def test_cel_rules_and_list_map_keys_are_enforced(crd_dir):
    resource = _rayservice()
    resource["spec"]["rayClusterConfig"]["managedBy"] = "someone-else"
    (problem,) = crd_errors(resource, crd_dir)
    assert problem.startswith("spec.rayClusterConfig.managedBy: CEL rule") and "must be either" in problem
    resource = _rayservice()
    env = resource["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "MOERAY_API_KEYS", "value": "twice"})
    (problem,) = crd_errors(resource, crd_dir)
    assert "duplicate entries for the list-map keys ['name']" in problem


def test_a_rayservice_without_serve_config_fails():
    resource = _rayservice()
    del resource["spec"]["serveConfigV2"]
    assert serve_config_errors(resource) == ["the RayService has no serveConfigV2"]


def test_serve_args_the_builder_would_ignore_fail():
    resource = _rayservice()
    config = yaml.safe_load(resource["spec"]["serveConfigV2"])
    config["applications"][0]["args"]["expert_actor"] = 4  # AppArgs would drop it silently
    resource["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    (problem,) = serve_config_errors(resource)
    assert "expert_actor" in problem and "Extra inputs are not permitted" in problem


def test_operator_rules_are_enforced():
    resource = _rayservice()
    resource["spec"]["rayClusterConfig"]["rayVersion"] = "2.46.0"
    resource["spec"]["upgradeStrategy"]["type"] = "RollingUpdate"
    assert operator_errors(resource) == [
        "spec.rayClusterConfig: authOptions.mode token needs rayVersion >= 2.52.0, got '2.46.0'",
        "spec.upgradeStrategy.type 'RollingUpdate' is invalid"]
    job = copy.deepcopy(the(render_resources("cpu-dev"), "RayJob", "moeray-sft"))
    job["spec"]["shutdownAfterJobFinishes"] = False
    assert operator_errors(job) == ["ttlSecondsAfterFinished needs shutdownAfterJobFinishes"]


def test_a_misspelled_core_field_fails_the_kubernetes_schema():
    policy = copy.deepcopy(the(render_resources("cpu-dev"), "NetworkPolicy"))
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    (problem,) = core_errors(policy, KUBERNETES_VERSIONS[0])
    assert "'ingres' was unexpected" in problem


# ---- what the manifests promise --------------------------------------------------------------------


def test_every_ray_cluster_runs_the_pinned_ray_with_token_auth_and_no_work_on_the_head(overlay):
    version, image = pinned_ray_version(), {"cpu-dev": "moeray:0.1.0", "gpu": "moeray:0.1.0-gpu"}[overlay]
    resources = render_resources(overlay)
    clusters = [spec for r in resources for spec in cluster_specs(r)]
    assert len(clusters) == 2 + len(JOBS)  # RayService, RayCluster, a RayJob each
    for cluster in clusters:
        assert cluster["rayVersion"] == version
        assert cluster["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # dashboard stays inside
        assert not cluster["headGroupSpec"].get("enableIngress", False)
        for _, template in pod_templates(cluster):
            spec = template["spec"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            (shm,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert [c["image"] for c in spec["containers"]] == [image]
            assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "moeray"


def test_api_keys_come_from_a_secret_and_no_secret_is_in_the_manifests(overlay):
    resources = render_resources(overlay)
    assert not of_kind(resources, "Secret")
    (cluster,) = cluster_specs(the(resources, "RayService"))
    for _, template in pod_templates(cluster):
        for container in template["spec"]["containers"]:
            (keys,) = [e for e in container["env"] if e["name"] == "MOERAY_API_KEYS"]
            assert keys == {"name": "MOERAY_API_KEYS",
                            "valueFrom": {"secretKeyRef": {"name": API_KEYS_SECRET, "key": "keys"}}}
    assert not re.search(r"\bsk-|auth_token", render(overlay))


def test_only_the_serve_ports_are_open_beyond_moerays_pods(overlay):
    resources = render_resources(overlay)
    policy = the(resources, "NetworkPolicy")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for resource in resources:  # every pod moeray creates is behind the policy
        templates = [t for spec in cluster_specs(resource) for _, t in pod_templates(spec)]
        templates += [resource["spec"]["template"]] if resource["kind"] == "Job" else []
        for template in templates:
            assert selected.items() <= template["metadata"]["labels"].items()
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if "from" not in rule:  # open to every pod: only Serve
            assert ports == set(SERVE_PORTS.values())
            continue
        assert all("ipBlock" not in peer for peer in rule["from"])
        peers = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]}
        assert peers in ({"moeray"}, {"kuberay-operator"})
        if peers == {"kuberay-operator"}:
            assert ports == {8265}  # the operator reads Serve and job status from the dashboard


def test_services_and_disruption_budget_select_the_serving_workers(overlay):
    resources = render_resources(overlay)
    rayservice = the(resources, "RayService")
    (worker,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    # KubeRay labels every worker of a RayService ray.io/node-type=worker and ray.io/serve=true.
    worker_labels = {**worker["template"]["metadata"]["labels"], "ray.io/node-type": "worker", "ray.io/serve": "true"}
    assert [p["port"] for p in rayservice["spec"]["serveService"]["spec"]["ports"]] == [SERVE_PORTS["http"]]
    assert rayservice["spec"]["excludeHeadPodFromServeSvc"] is True
    grpc = the(resources, "Service")
    assert [p["port"] for p in grpc["spec"]["ports"]] == [SERVE_PORTS["grpc"]]
    assert grpc["spec"]["selector"].items() <= worker_labels.items()
    budget = the(resources, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    ports = {p["name"]: p["containerPort"] for p in worker["template"]["spec"]["containers"][0]["ports"]}
    assert (ports["serve"], ports["grpc"]) == tuple(SERVE_PORTS.values())


def test_the_actor_graph_fits_the_worker_groups(overlay):
    """ClusterSpec -> worker groups: the serving graph and each training job's graph fit their clusters,
    and the RayService's workers carry the graph's ClusterSpec fields (changing them rolls a new cluster,
    see kuberay.yaml)."""
    from cluster.spec import ClusterSpec

    resources = render_resources(overlay)
    config = serve_config_of(resources)
    (app,) = config["applications"]
    args = app["args"]
    (worker,) = the(resources, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    graph = {field: str(args[field]) for field in ClusterSpec.model_fields if field in args}
    annotation = worker["template"]["metadata"]["annotations"]["moeray.io/actor-graph"]
    assert dict(pair.split("=", 1) for pair in annotation.split(",")) == graph
    (engine,) = [d for d in app["deployments"] if d["name"] == "EngineServer"]
    needed = ((args["routers"] + args["expert_actors"]) * args["cpus_per_actor"]
              + engine["ray_actor_options"]["num_cpus"] + args["max_replicas"] * args["ingress_num_cpus"])
    assert worker["maxReplicas"] * ray_cpus(worker) >= needed
    assert engine["ray_actor_options"]["num_cpus"] > 0 and args["ingress_num_cpus"] > 0  # never on the head

    for job in of_kind(resources, "RayJob"):
        train, _ = job_config(job)
        workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert train.cpus_per_actor is not None, "set explicitly: Ray's free CPUs are 0 before the workers join"
        needed = (train.routers + train.expert_actors) * train.cpus_per_actor
        assert sum(g["replicas"] * ray_cpus(g) for g in workers) >= needed, job["metadata"]["name"]


@pytest.mark.parametrize("name", JOBS)
def test_training_checkpoints_live_on_a_claim_every_job_pod_mounts(overlay, name):
    spec = the(render_resources(overlay), "RayJob", name)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    for _, template in pod_templates(spec["rayClusterSpec"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        for path, claim in (("/mnt/runs", "moeray-runs"), ("/mnt/models", "moeray-models")):
            assert volumes[mounts[path]["name"]]["persistentVolumeClaim"]["claimName"] == claim
            assert not mounts[path].get("readOnly", False)


def test_gpu_overlay_runs_the_workers_on_gpu_nodes():
    resources = render_resources("gpu")
    for cluster in [spec for r in resources for spec in cluster_specs(r)]:
        for group in cluster["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    for cluster in [spec for r in render_resources("cpu-dev") for spec in cluster_specs(r)]:
        assert all("nvidia.com/gpu" not in json.dumps(group) for group in cluster["workerGroupSpecs"])


def test_dockerfile_builds_on_the_pinned_ray_image_and_installs_the_package():
    """`docker build` is not available here: read the recipe instead."""
    lines = [line.strip() for line in (REPO / "k8s" / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    args = dict(re.fullmatch(r"ARG (\w+)=?(.*)", line).groups() for line in instructions if line.startswith("ARG "))
    (base,) = [line.split()[1] for line in instructions if line.startswith("FROM ")]

    def image(**overrides) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: {**args, **overrides}[m.group(1)], base)

    version = pinned_ray_version()
    assert image() == f"rayproject/ray:{version}-py311"
    assert image(VARIANT="-gpu") == f"rayproject/ray:{version}-py311-gpu"
    (install,) = [line for line in instructions if line.startswith("RUN pip install")]
    assert shlex.split(install.rstrip("\\"))[-1] == "."  # the package itself (setuptools builds it)
    copy_line = next(line for line in instructions if line.startswith("COPY "))
    assert copy_line.split()[-2:] == [".", "/home/ray/moeray"]
    ignored = (REPO / "k8s" / "Dockerfile.dockerignore").read_text().split()
    assert "checkpoints" not in ignored and "serving" not in ignored  # bundled models and gRPC modules go in
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert instructions.index(next(line for line in instructions if line.startswith("USER "))) < instructions.index(install)


# ---- on a local Ray cluster: the Serve config and the RayJob, as rendered -------------------------


API_KEY = "sk-k8s-test"


@pytest.fixture(scope="module")
def local_head():
    """A head in the repository root (the image's WORKDIR holds the same tree), with MOERAY_API_KEYS in
    its environment, as the Secret puts it on every Ray container. 8 logical CPUs: the serving graph and
    the job's graph (3 actors of 1 CPU each) side by side."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), "MOERAY_API_KEYS": API_KEY}
    with ray_head(env, REPO, num_cpus=8) as head:
        yield head


def local_serve_config(rayservice: dict, http_port: int, grpc_port: int) -> dict:
    """The RayService's Serve config with what needs the cluster rewritten: no runtime_env working_dir (the
    code is on this machine), the bundled model instead of the claim's path, and ports of our own (other
    clusters on this machine may hold 8000 and 9000)."""
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    config["http_options"]["port"], config["grpc_options"]["port"] = http_port, grpc_port
    for app in config["applications"]:
        (app.get("runtime_env") or {}).pop("working_dir", None)
        app["args"]["model"] = "checkpoints/" + Path(app["args"]["model"]).name
    return config


@pytest.mark.timeout(600)
def test_the_rayservice_serve_config_answers_the_openai_client(local_head, tmp_path):
    import openai

    rayservice = the(render_resources("cpu-dev"), "RayService")
    port = free_port()
    config = local_serve_config(rayservice, port, free_port())
    assert config["applications"][0]["args"]["model"] == "checkpoints/arith-tiny"
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    deploy = subprocess.run(["serve", "deploy", str(tmp_path / "serve.yaml"), "--address", local_head.dashboard],
                            cwd=REPO, env=local_head.env, capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    try:
        models = _wait_for_models(client)
        assert [m.id for m in models] == ["arith-tiny"]
        answer = client.chat.completions.create(model="arith-tiny", max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "What is 2 + 3?"}])
        assert answer.choices[0].message.content.strip() == "5"
        assert answer.choices[0].finish_reason == "stop"
        with pytest.raises(openai.AuthenticationError):  # the key came from the environment, as on the pods
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0).models.list()
    finally:
        subprocess.run(["serve", "shutdown", "-y", "--address", local_head.dashboard], env=local_head.env,
                       capture_output=True, timeout=120)


def _wait_for_models(client) -> list:
    """Poll until the application answers (its actors load the weights first), at most 5 minutes."""
    import openai

    deadline = time.monotonic() + 300
    while True:
        try:
            return client.models.list().data
        except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError) as error:
            assert time.monotonic() < deadline, f"the application never answered: {error!r}"
            time.sleep(2)


@pytest.mark.timeout(900)
def test_the_sft_rayjob_entrypoint_trains_then_resumes_under_ray_job_submit(local_head, tmp_path):
    job = the(render_resources("cpu-dev"), "RayJob", "moeray-sft")
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    run_dir, export_dir = tmp_path / "run", tmp_path / "export"
    # Only what needs the cluster changes (the claims' paths); the config is shortened with --set.
    local = ["--run-dir", str(run_dir), "--export-dir", str(export_dir)]
    short = ["--set", "checkpoint_every=1", "--set", "batch_size=8", "--set", "eval.arith_heldout=4",
             "--set", "progress=false"]
    runtime_env = json.dumps({"env_vars": {"RAY_AUTH_MODE": "disabled"}})

    first = local_head.submit([*entrypoint, *local, *short, "--set", "steps=2"], runtime_env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "no complete checkpoint" in first.stdout  # --resume on an empty run folder starts at step 0
    assert (run_dir / "latest").read_text().strip() == "checkpoint-2"
    assert (export_dir / "config.json").exists()

    # One more step, not two: see test_a_resumed_run_keeps_its_tokenizer_in_every_checkpoint.
    second = local_head.submit([*entrypoint, *local, *short, "--set", "steps=3"], runtime_env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert f"resuming from {run_dir / 'checkpoint-2'} (step 2" in second.stdout
    assert (run_dir / "latest").read_text().strip() == "checkpoint-3"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert json.loads((run_dir / "result.json").read_text())["started_at_step"] == 2


@pytest.mark.timeout(300)
def test_a_resumed_run_keeps_its_tokenizer_in_every_checkpoint(tmp_path):
    """The RayJob's retry path (entrypoint as rendered, --resume twice), in one process to be quick."""
    entrypoint = shlex.split(the(render_resources("cpu-dev"), "RayJob", "moeray-sft")["spec"]["entrypoint"])
    local = ["--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "export"), "--set", "expert_actors=0",
             "--set", "checkpoint_every=1", "--set", "batch_size=8", "--set", "eval.arith_heldout=0",
             "--set", "progress=false", "--set", "plot=false"]
    for steps in (2, 4):
        done = subprocess.run([sys.executable, *entrypoint[1:], *local, "--set", f"steps={steps}"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint-4" / "tokenizer.json").exists()
