"""Offline checks of rendered Kubernetes manifests: what the API server and the KubeRay operator would
say about them, without either. Each check returns a list of problems (empty = accepted).

- ray.io kinds: the CRD's openAPIV3Schema as strict JSON Schema (an unknown field is an error unless the
  schema preserves unknown fields: the API server would silently drop it), list-map keys unique, and the
  CRD's CEL rules (x-kubernetes-validations; transition rules, which use oldSelf, need an old object and
  are skipped); then the KubeRay operator's own spec validation (a port of the rules of
  ray-operator/controllers/ray/utils/validation.go that apply to a new object).
- core kinds: the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import yaml

INT32 = {"minimum": -(2**31), "maximum": 2**31 - 1}
OBJECT_META_FIELDS = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# KubeRay's limits (utils/constant.go): the generated cluster and Service names must fit 63 characters.
MAX_NAME = {"RayCluster": 53, "RayService": 47, "RayJob": 47}
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


# ---- CRD schemas --------------------------------------------------------------------------------


def strict_json_schema(schema: dict) -> dict:
    """An OpenAPI v3 structural schema as JSON Schema that rejects what the API server would prune."""
    out = dict(schema)
    for key in ("properties",):
        if key in schema:
            out[key] = {name: strict_json_schema(sub) for name, sub in schema[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = strict_json_schema(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict_json_schema(sub) for sub in schema[key]]
    if schema.get("type") == "object" and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if schema.get("format") == "int32":
        out.update(INT32)
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


@cache
def crd_schemas(crd_dir: Path) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema, for every served version of every CRD in the folder."""
    schemas = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schemas[(api_version, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def crd_errors(resource: dict, crd_dir: Path) -> list[str]:
    import jsonschema

    schema = crd_schemas(crd_dir).get((resource.get("apiVersion"), resource.get("kind")))
    if schema is None:
        return [f"no CRD serves {resource.get('apiVersion')} {resource.get('kind')}"]
    # ObjectMeta is validated by the API server itself, not by the CRD (its schema there is a bare object).
    top = {**schema, "properties": {**schema["properties"],
                                   "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}
    validator = jsonschema.Draft202012Validator(strict_json_schema(top))
    problems = [f"{_path(e.absolute_path)}: {e.message}" for e in validator.iter_errors(resource)]
    problems += object_meta_errors(resource.get("metadata") or {})
    if not problems:  # CEL and list-map rules assume a well-typed object
        problems += [f"{path}: {message}" for path, message in extension_rule_errors(schema, resource)]
    return problems


def object_meta_errors(metadata: dict) -> list[str]:
    problems = [f"metadata.{key}: unknown field" for key in sorted(set(metadata) - OBJECT_META_FIELDS)]
    for field in ("labels", "annotations"):
        values = metadata.get(field) or {}
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            problems.append(f"metadata.{field}: must map strings to strings")
    return problems


def _walk(schema: dict, value: Any, path: str) -> Iterator[tuple[dict, Any, str]]:
    """Every (schema node, value, path) of the document, following properties, maps and items."""
    yield schema, value, path
    if isinstance(value, dict):
        for key, item in value.items():
            sub = (schema.get("properties") or {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:
                yield from _walk(sub, item, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _walk(schema["items"], item, f"{path}[{index}]")


def extension_rule_errors(schema: dict, resource: dict) -> Iterator[tuple[str, str]]:
    import celpy

    environment = celpy.Environment()
    for node, value, path in _walk(schema, resource, ""):
        if node.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
            keys = [tuple(item.get(k) for k in node.get("x-kubernetes-list-map-keys", [])) for item in value]
            if len(keys) != len(set(keys)):
                yield path, f"duplicate entries for the list-map keys {node['x-kubernetes-list-map-keys']}"
        for rule in node.get("x-kubernetes-validations") or []:
            if "oldSelf" in rule["rule"]:
                continue  # a transition rule: needs the stored object
            program = environment.program(environment.compile(rule["rule"]))
            try:
                holds = program.evaluate({"self": celpy.json_to_cel(value)})
            except celpy.CELEvalError as error:
                holds = error
            if isinstance(holds, celpy.CELEvalError) or not bool(holds):
                yield path, f"CEL rule {rule['rule']!r}: {rule.get('message', 'failed')}"


def _path(parts) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "(root)"


# ---- the KubeRay operator's validation ------------------------------------------------------------


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:3])
    return numbers >= minimum


def ray_cluster_spec_errors(spec: dict, where: str) -> list[str]:
    problems = []
    groups = [("head", spec.get("headGroupSpec") or {})] + [
        (g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs") or []]
    for name, group in groups:
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            problems.append(f"{where}: group {name} has no container")
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"{where}: group {name} sets resources both in rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{where}: group {name}: rayStartParams['labels'] is not supported, use labels")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = spec.get("rayVersion", "")
        if not version or not _version_at_least(version, (2, 52, 0)):
            problems.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0, got {version!r}")
    return problems


def operator_errors(resource: dict) -> list[str]:
    """What KubeRay's ValidateRay*Metadata / ValidateRay*Spec reject in a new object."""
    kind, metadata, spec = resource["kind"], resource.get("metadata") or {}, resource.get("spec") or {}
    name = metadata.get("name", "")
    problems = []
    if len(name) > MAX_NAME[kind] or not DNS_1035.match(name):
        problems.append(f"{kind} name {name!r} must be a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    if kind == "RayCluster":
        problems += ray_cluster_spec_errors(spec, "spec")
    elif kind == "RayService":
        problems += ray_cluster_spec_errors(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig")
        head_service = ((spec.get("rayClusterConfig") or {}).get("headGroupSpec") or {}).get("headService") or {}
        if (head_service.get("metadata") or {}).get("name"):
            problems.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name must not be set")
        strategy = (spec.get("upgradeStrategy") or {}).get("type")
        if strategy is not None and strategy not in ("NewClusterWithIncrementalUpgrade", "NewCluster", "None"):
            problems.append(f"spec.upgradeStrategy.type {strategy!r} is invalid")
        if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
            problems.append("spec.rayClusterDeletionDelaySeconds must be >= 0")
        timeout = (metadata.get("annotations") or {}).get("ray.io/initializing-timeout")
        if timeout and not (GO_DURATION.match(timeout) or (timeout.isdigit() and int(timeout) > 0)):
            problems.append(f"annotation ray.io/initializing-timeout {timeout!r} is not a duration")
    else:
        problems += ray_job_spec_errors(spec)
    return problems


def ray_job_spec_errors(spec: dict) -> list[str]:
    problems = []
    shutdown, mode = spec.get("shutdownAfterJobFinishes", False), spec.get("submissionMode", "K8sJobMode")
    if spec.get("suspend") and not shutdown:
        problems.append("a suspended RayJob needs shutdownAfterJobFinishes")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        problems.append("ttlSecondsAfterFinished must be >= 0")
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("rayClusterSpec") is None and not spec.get("clusterSelector"):
        problems.append("one of rayClusterSpec or clusterSelector must be set")
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        problems.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") or spec.get("submitterConfig") or spec.get("clusterSelector"):
            problems.append("SidecarMode takes no submitterPodTemplate, submitterConfig or clusterSelector")
        head = ((spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}).get("template") or {}
        if (head.get("spec") or {}).get("restartPolicy", "Never") != "Never":
            problems.append("SidecarMode needs the head's restartPolicy Never or unset")
    if spec.get("rayClusterSpec") is not None:
        problems += ray_cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as error:
        problems.append(f"runtimeEnvYAML is not YAML: {error}")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds must be > 0")
    if spec.get("backoffLimit", 0) < 0:
        problems.append("backoffLimit must be >= 0")
    return problems


# ---- core kinds ---------------------------------------------------------------------------------


def core_errors(resource: dict, kubernetes_version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{_path(error.path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [str(error)]
    return []
