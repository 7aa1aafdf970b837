"""`moeray k8s render --overlay NAME [--set KIND[/NAME]:PATH=VALUE ...]`: the complete manifest set of an
overlay as multi-document YAML, the same resources as `kubectl kustomize k8s/overlays/NAME`, without
kubectl.

The kustomizations under k8s/ use a small part of kustomize on purpose, and this module implements that
part exactly: `resources` (files and directories), `patches` (JSON 6902, from a file or inline, with a
`target`) and `images`; output in kustomize's default (legacy) order. Anything else in a kustomization
is refused with a message rather than rendered differently.

`--set` changes one field of the rendered output, e.g.
    --set 'RayService:spec.rayClusterConfig.workerGroupSpecs[groupName=workers].replicas=2'
    --set 'RayJob/moeray-sft:metadata.annotations["example.com/owner"]=me'
PATH is dotted keys, `[N]` list indexes, `[key=value]` list items selected by a field, and `["key"]`
for keys with dots or slashes; VALUE is read as YAML (`2` is a number, `'"2"'` a string).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
OVERLAYS_DIR = K8S_DIR / "overlays"
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}

# kustomize's legacy output order (api/resid/gvk.go): these kinds first, these last, the rest between,
# ordered by group_version_kind, then by namespace and name.
ORDER_FIRST = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap", "Secret",
    "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume", "PersistentVolumeClaim",
    "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class RenderError(Exception):
    """A mistake in the overlay name, a --set, or a kustomization: reported as one line."""


# ---- YAML as Kubernetes reads it ------------------------------------------------------------------


class Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `yes`, `on` or `y` stay strings, as in kustomize."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class Dumper(yaml.SafeDumper):
    """kustomize's output style: block style, sorted keys, double quotes where quotes are needed, and
    multi-line strings (a Serve config, a script) as `|` blocks."""

    def choose_scalar_style(self):
        style = super().choose_scalar_style()
        return '"' if style == "'" else style


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, _represent_str)


def load_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.load_all(text, Loader=Loader) if doc is not None]


def dump_documents(documents: Sequence[dict]) -> str:
    return "---\n".join(
        yaml.dump(doc, Dumper=Dumper, sort_keys=True, default_flow_style=False) for doc in documents
    )


# ---- the kustomize subset ------------------------------------------------------------------------


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory} has no kustomization.yaml")


def build(directory: Path) -> list[dict]:
    """The resources of one kustomization directory, with its patches and images applied (unsorted)."""
    path = kustomization_file(directory)
    kustomization = yaml.load(path.read_text(), Loader=Loader) or {}
    unsupported = sorted(set(kustomization) - SUPPORTED_FIELDS)
    if unsupported:
        raise RenderError(f"{path}: {', '.join(unsupported)} not supported by moeray k8s render "
                          f"(it renders {', '.join(sorted(SUPPORTED_FIELDS - {'apiVersion', 'kind'}))})")
    resources: list[dict] = []
    for entry in kustomization.get("resources") or []:
        source = directory / entry
        if source.is_dir():
            resources += build(source)
        elif source.is_file():
            resources += load_documents(source.read_text())
        else:
            raise RenderError(f"{path}: resource {entry!r} is neither a file nor a directory here")
    _check_unique(resources, path)
    for patch in kustomization.get("patches") or []:
        _apply_patch(resources, patch, directory, path)
    for image in kustomization.get("images") or []:
        _set_images(resources, image)
    return resources


def _resource_id(resource: dict) -> tuple[str, str, str, str]:
    group = resource.get("apiVersion", "").rpartition("/")[0]
    metadata = resource.get("metadata") or {}
    return group, resource.get("kind", ""), metadata.get("namespace", ""), metadata.get("name", "")


def _check_unique(resources: list[dict], path: Path) -> None:
    seen = set()
    for resource in resources:
        key = _resource_id(resource)
        if key in seen:
            raise RenderError(f"{path}: {key[1]}/{key[3]} is listed twice")
        seen.add(key)


def _target_matches(target: dict, resource: dict) -> bool:
    """kustomize's patch target: every given field matches (names and kinds as anchored regexps)."""
    group, _, version = resource.get("apiVersion", "").rpartition("/")
    metadata = resource.get("metadata") or {}
    actual = {"group": group, "version": version, "kind": resource.get("kind", ""),
              "name": metadata.get("name", ""), "namespace": metadata.get("namespace", "")}
    return all(re.fullmatch(str(pattern), actual[field]) for field, pattern in target.items())


def _apply_patch(resources: list[dict], patch: dict, directory: Path, path: Path) -> None:
    target = patch.get("target") or {}
    unknown = sorted(set(target) - {"group", "version", "kind", "name", "namespace"}) + sorted(
        set(patch) - {"path", "patch", "target"})
    if unknown or not target:
        raise RenderError(f"{path}: patches need a target (group, version, kind, name, namespace); "
                          f"not supported: {', '.join(unknown) or 'a patch without target'}")
    text = (directory / patch["path"]).read_text() if "path" in patch else patch.get("patch", "")
    operations = yaml.load(text, Loader=Loader)
    if not isinstance(operations, list):
        raise RenderError(f"{path}: only JSON 6902 patches (a list of operations) are supported")
    matched = [r for r in resources if _target_matches(target, r)]
    if not matched:
        raise RenderError(f"{path}: patch target {target} matches no resource")
    for resource in matched:
        for operation in operations:
            json_patch(resource, operation, where=f"{path} ({resource['kind']}/{resource['metadata']['name']})")


def _pointer(path: str, where: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"{where}: JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _child(node: Any, key: str, where: str) -> Any:
    try:
        return node[int(key)] if isinstance(node, list) else node[key]
    except (KeyError, IndexError, ValueError, TypeError):
        raise RenderError(f"{where}: no {key!r} in the document") from None


def json_patch(document: dict, operation: dict, where: str) -> None:
    """One RFC 6902 operation (add, remove, replace, test), in place."""
    op = operation.get("op")
    if op not in ("add", "remove", "replace", "test"):
        raise RenderError(f"{where}: JSON patch op {op!r} not supported (add, remove, replace, test)")
    *parents, last = _pointer(operation.get("path", ""), where)
    node = document
    for key in parents:
        node = _child(node, key, where)
    if op == "test":
        if _child(node, last, where) != operation.get("value"):
            raise RenderError(f"{where}: JSON patch test of {operation['path']} failed")
    elif op == "add" and isinstance(node, list):
        node.insert(len(node) if last == "-" else int(last), operation["value"])
    elif op == "add":
        node[last] = operation["value"]
    else:
        _child(node, last, where)  # remove and replace need the field to exist
        if op == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            node[int(last) if isinstance(node, list) else last] = operation["value"]


def _set_images(resources: list[dict], image: dict) -> None:
    """kustomize's `images`: every container and init container whose image is `name` (with any tag or
    digest) gets newName / newTag / digest."""
    pattern = re.compile("^" + image["name"] + r"(@sha256)?(:[a-zA-Z0-9_.{}-]*)?$")

    def rewrite(value: str) -> str:
        if not pattern.match(value):
            return value
        name, tag, digest = _split_image(value)
        name = image.get("newName") or name
        if image.get("newTag") or image.get("digest"):
            tag, digest = image.get("newTag", ""), image.get("digest", "")
        return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        if isinstance(container, dict) and isinstance(container.get("image"), str):
                            container["image"] = rewrite(container["image"])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(resources)


def _split_image(value: str) -> tuple[str, str, str]:
    name, _, digest = value.partition("@")
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon + 1:], digest
    return name, "", digest


def legacy_sort(resources: list[dict]) -> list[dict]:
    def key(resource: dict):
        group, kind, namespace, name = _resource_id(resource)
        version = resource.get("apiVersion", "").rpartition("/")[2]
        if kind in ORDER_FIRST:
            rank = ORDER_FIRST.index(kind) - len(ORDER_FIRST)
        else:
            rank = ORDER_LAST.index(kind) + 1 if kind in ORDER_LAST else 0
        gvk = "_".join([group or "~G", version or "~V", kind or "~K"])
        return rank, gvk, namespace, name

    return sorted(resources, key=key)


# ---- --set ---------------------------------------------------------------------------------------

_SELECTOR = re.compile(r"^(?P<kind>[A-Za-z][A-Za-z0-9]*)(?:/(?P<name>[^/]+))?$")
_SEGMENT = re.compile(r'\.?([A-Za-z0-9_-]+)|\[(\d+)\]|\["([^"]+)"\]|\[([^\]=]+)=([^\]]*)\]')


def parse_path(path: str) -> list[str | int | tuple[str, str]]:
    """`a.b[0].c[name=x]["d.e/f"]` -> ["a", "b", 0, "c", ("name", "x"), "d.e/f"]."""
    segments: list[str | int | tuple[str, str]] = []
    position = 0
    while position < len(path):
        match = _SEGMENT.match(path, position)
        if match is None or (position and match.group(1) and path[position] != "."):
            raise RenderError(f"--set: cannot read the path {path!r} at {path[position:]!r}")
        key, index, quoted, field, value = match.groups()
        if key or quoted:
            segments.append(key or quoted)
        elif index is not None:
            segments.append(int(index))
        else:
            segments.append((field, value))
        position = match.end()
    return segments


def _select_resource(resources: list[dict], kind: str, name: str | None) -> dict:
    matches = [r for r in resources if r.get("kind") == kind and name in (None, r["metadata"].get("name"))]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        present = sorted({f"{r['kind']}/{r['metadata']['name']}" for r in resources})
        raise RenderError(f"--set: no {kind}{'/' + name if name else ''} in this overlay (it has {', '.join(present)})")
    names = ", ".join(f"{kind}/{r['metadata']['name']}" for r in matches)
    raise RenderError(f"--set: {kind} matches {len(matches)} resources ({names}): name one as {kind}/NAME")


def split_assignment(assignment: str) -> tuple[str, str | None, str, str]:
    """`KIND[/NAME]:PATH=VALUE` -> (kind, name, path, value); an `=` inside [...] belongs to the path."""
    selector, colon, rest = assignment.partition(":")
    depth = 0
    for position, char in enumerate(rest):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "=" and depth == 0:
            match = _SELECTOR.match(selector)
            if colon and match and position:
                return match["kind"], match["name"], rest[:position].strip(), rest[position + 1:]
            break
    raise RenderError(f"--set {assignment!r}: expected KIND[/NAME]:PATH=VALUE")


def apply_set(resources: list[dict], assignment: str) -> None:
    kind, name, path, text = split_assignment(assignment)
    node: Any = _select_resource(resources, kind, name)
    *parents, last = parse_path(path)
    for segment in parents:
        node = _step(node, segment, assignment, create=True)
    value = yaml.load(text, Loader=Loader)
    if isinstance(last, str) and isinstance(node, dict):
        node[last] = value
    elif isinstance(last, int) and isinstance(node, list) and last < len(node):
        node[last] = value
    else:
        raise RenderError(f"--set {assignment!r}: cannot set {_describe(last)} in {_kind_of(node)}")


def _step(node: Any, segment: str | int | tuple[str, str], assignment: str, create: bool) -> Any:
    if isinstance(segment, str) and isinstance(node, dict):
        return node.setdefault(segment, {}) if create else node[segment]
    if isinstance(segment, int) and isinstance(node, list) and segment < len(node):
        return node[segment]
    if isinstance(segment, tuple) and isinstance(node, list):
        field, value = segment
        items = [item for item in node if isinstance(item, dict) and str(item.get(field)) == value]
        if len(items) == 1:
            return items[0]
        raise RenderError(f"--set {assignment!r}: {len(items)} items have {field}={value}, not 1")
    raise RenderError(f"--set {assignment!r}: no {_describe(segment)} in {_kind_of(node)}")


def _describe(segment: str | int | tuple[str, str]) -> str:
    if isinstance(segment, int):
        return f"[{segment}]"
    return f"[{segment[0]}={segment[1]}]" if isinstance(segment, tuple) else repr(segment)


def _kind_of(node: Any) -> str:
    if isinstance(node, dict):
        return "a mapping"
    if isinstance(node, list):
        return f"a list of {len(node)}"
    return f"a {type(node).__name__} value"


# ---- the entry points ----------------------------------------------------------------------------


def overlays() -> list[str]:
    return sorted(p.name for p in OVERLAYS_DIR.iterdir() if p.is_dir() and any(
        (p / name).is_file() for name in KUSTOMIZATION_FILES))


def render_resources(overlay: str, sets: Sequence[str] = ()) -> list[dict]:
    """The overlay's resources in output order, `--set` assignments applied."""
    if overlay not in overlays():
        raise RenderError(f"no overlay {overlay!r} (overlays: {', '.join(overlays())})")
    try:
        resources = legacy_sort(build(OVERLAYS_DIR / overlay))
        for assignment in sets:
            apply_set(resources, assignment)
    except (OSError, yaml.YAMLError) as error:  # a missing file, a YAML typo: one line too
        raise RenderError(" ".join(str(error).split())) from error
    return resources


def render(overlay: str, sets: Sequence[str] = ()) -> str:
    """Multi-document YAML of the overlay, as `kubectl kustomize k8s/overlays/OVERLAY` renders it."""
    return dump_documents(render_resources(overlay, sets))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        raise RenderError(message)


def main(argv: Sequence[str] | None = None, prog: str = "moeray k8s render") -> int:
    parser = _Parser(prog=prog, description="print the manifests of a k8s/ overlay (what `kubectl apply -k` applies)")
    parser.add_argument("--overlay", required=True, help=f"one of: {', '.join(overlays())}")
    parser.add_argument("--set", action="append", default=[], metavar="KIND[/NAME]:PATH=VALUE",
                        help="change one field of the output (repeatable)")
    try:
        args = parser.parse_args(argv)
        sys.stdout.write(render(args.overlay, args.set))
    except RenderError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m k8s.render"))
