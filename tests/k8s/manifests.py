"""The plain manifests in k8s/ (for `kubectl apply -k`, no Helm) and their generator.

Every directory is written from a `helm template` of the chart (RENDERS): k8s/base holds the render with
values-8b-70b.yaml, one file per chart template; each overlay is the base plus kustomize patches that
turn it into another values file's render (objects the base lacks, `$patch: delete` for objects it has
too many, a JSON patch per object that differs); components/monitoring adds what `monitoring.enabled`
adds. The only change to what helm renders: Helm's own labels (`helm.sh/chart`, `managed-by: Helm`)
become `app.kubernetes.io/managed-by: kustomize` (plain_labels).

    python -m tests.k8s.manifests            # rewrite k8s/ (all but k8s/README.md)
    python -m tests.k8s.manifests --check    # exit 1 naming the files that differ from the chart

tests/k8s/test_k8s_manifests.py checks that the files are current and that `kubectl kustomize` of each
directory builds exactly the objects helm renders.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.helm import CHART, RELEASE, REPO, Helm, find_helm

K8S = REPO / "k8s"
#: The namespace of the renders. Nothing the chart renders names it (a test checks): the objects carry no
#: namespace, so `kubectl apply -n NAMESPACE -k ...` puts them anywhere.
NAMESPACE = "tandem"
MANAGED_BY = "kustomize"
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")
#: The cache-salt secret comes from a Secret you create, like the API keys: the chart would otherwise make
#: one with a random value, which has no place in files kept in git (and differs on every render).
SALT_SECRET = "tandem-salt"
SALT_SET = f"saltSecret.existingSecret={SALT_SECRET}"


@dataclass(frozen=True)
class Render:
    """One `helm template` of the chart: values files beside it and `--set` flags."""

    values: tuple[str, ...]
    sets: tuple[str, ...] = ()

    def args(self, namespace: str = NAMESPACE, absolute: bool = False) -> list[str]:
        """helm's arguments; the chart's paths relative to the repository root unless `absolute`."""
        chart = CHART if absolute else CHART.relative_to(REPO)
        args = ["template", RELEASE, str(chart), "--namespace", namespace]
        for v in self.values:
            args += ["-f", str(chart / v)]
        for s in self.sets:
            args += ["--set", s]
        return args

    @property
    def command(self) -> str:
        """The command line, run from the repository root."""
        return " ".join(["helm", *self.args()])

    def text(self, helm: Helm, namespace: str = NAMESPACE) -> str:
        return helm.run(*self.args(namespace, absolute=True))


@dataclass(frozen=True)
class Directory:
    """A generated directory of k8s/: a base, an overlay of `parent` or a component on top of `parent`."""

    path: str
    kind: str
    render: Render
    parent: str | None
    about: str


BASE = Directory(
    "base",
    "base",
    Render(("values-8b-70b.yaml",), (SALT_SET,)),
    None,
    "The GPU cluster of values-8b-70b.yaml.",
)
DIRECTORIES = [
    BASE,
    Directory(
        "overlays/local-cpu",
        "overlay",
        Render(("values-local-cpu.yaml",), (SALT_SET,)),
        "base",
        "Both tiny models on CPUs, everything on the head pod (kind): values-local-cpu.yaml.",
    ),
    Directory(
        "overlays/moe-dp-ep",
        "overlay",
        Render(("values-moe-dp-ep.yaml",), (SALT_SET,)),
        "base",
        "DeepSeek-V3 on H100 DP + EP prefill and decode pools: values-moe-dp-ep.yaml.",
    ),
    Directory(
        "components/monitoring",
        "component",
        Render(("values-8b-70b.yaml",), (SALT_SET, "monitoring.enabled=true")),
        "base",
        "The PodMonitor (Prometheus Operator) and the Grafana dashboard ConfigMap: monitoring.enabled=true.",
    ),
]
BY_PATH = {d.path: d for d in DIRECTORIES}


@dataclass(frozen=True)
class Build:
    """What `kubectl kustomize` builds (a directory, or an overlay with components) and its helm render."""

    name: str
    resource: str
    components: tuple[str, ...]
    render: Render


def _build(resource: str, *components: str) -> Build:
    """A directory with components, and the render of the directory's values with the components' --set."""
    render = BY_PATH[resource].render
    sets = tuple(dict.fromkeys(render.sets + tuple(s for c in components for s in BY_PATH[c].render.sets)))
    return Build(" + ".join([resource, *components]), resource, components, Render(render.values, sets))


#: Every build the tests check: each base and overlay, and the monitoring component on two of them.
BUILDS = [_build(d.path) for d in DIRECTORIES if d.kind != "component"] + [
    _build("base", "components/monitoring"),
    _build("overlays/local-cpu", "components/monitoring"),
]


# --- Objects -----------------------------------------------------------------------------------------


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return (doc["apiVersion"], doc["kind"], doc["metadata"]["name"])


def plain_labels(doc: dict[str, Any]) -> dict[str, Any]:
    """An object as k8s/ has it: without Helm's labels, `app.kubernetes.io/managed-by: kustomize`."""
    doc = copy.deepcopy(doc)
    labels = doc["metadata"].get("labels")
    if labels and any(k in labels for k in HELM_LABELS):
        labels.pop("helm.sh/chart", None)
        labels["app.kubernetes.io/managed-by"] = MANAGED_BY
    return doc


def expected_objects(helm: Helm, render: Render) -> list[dict[str, Any]]:
    """What a k8s/ build must produce for `render`: helm's objects with plain labels."""
    return [plain_labels(d) for d in yaml.safe_load_all(render.text(helm)) if d]


def differences(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> list[str]:
    """How two sets of objects differ (in any order); empty when they are equal."""
    want = {key(d): d for d in expected}
    got = {key(d): d for d in actual}
    found = []
    if len(want) < len(expected) or len(got) < len(actual):
        found.append("the same object twice")
    for k in sorted(want.keys() - got.keys()):
        found.append(f"missing {'/'.join(k)}")
    for k in sorted(got.keys() - want.keys()):
        found.append(f"unexpected {'/'.join(k)}")
    for k in sorted(want.keys() & got.keys()):
        where = _first_difference(want[k], got[k], "")
        if where is not None:
            found.append(f"{'/'.join(k)} differs at {where or '/'}")
    return found


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}/{k}"
            where = _first_difference(a[k], b[k], f"{path}/{k}")
            if where is not None:
                return where
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            where = _first_difference(x, y, f"{path}/{i}")
            if where is not None:
                return where
        return None
    return None if type(a) is type(b) and a == b else path


# --- Helm's text, split by template -------------------------------------------------------------------

_SOURCE = re.compile(r"^# Source: [^/]+/templates/(?P<file>[^\n]+)\n", re.M)


def split_by_template(text: str) -> dict[str, list[str]]:
    """Documents of a render (text, Helm's labels made plain) by the chart template that made them."""
    files: dict[str, list[str]] = defaultdict(list)
    for doc in re.split(r"^---\n", text, flags=re.M):
        match = _SOURCE.match(doc)
        if not match:
            assert not doc.strip(), f"a document without its `# Source:` line:\n{doc[:200]}"
            continue
        body = doc[match.end() :]
        if yaml.safe_load(body) is None:
            continue
        files[match["file"]].append(_plain_label_lines(body))
    return dict(files)


def _plain_label_lines(body: str) -> str:
    """plain_labels on the text (comments and layout kept); checked against plain_labels."""
    out = re.sub(r"^    helm\.sh/chart: .*\n", "", body, count=1, flags=re.M)
    out = re.sub(
        r"^(    app\.kubernetes\.io/managed-by:) Helm$", rf"\1 {MANAGED_BY}", out, count=1, flags=re.M
    )
    assert yaml.safe_load(out) == plain_labels(yaml.safe_load(body)), f"labels not where expected:\n{body}"
    return out


# --- Patches ------------------------------------------------------------------------------------------


def json_patch(old: Any, new: Any, path: str = "") -> list[dict[str, Any]]:
    """RFC 6902 operations that turn `old` into `new`.

    Maps are patched key by key; lists of the same length item by item, a longer list that starts with
    the old one by appending, and any other list, string or number is replaced whole.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        ops: list[dict[str, Any]] = []
        for k in old:
            p = f"{path}/{_pointer(k)}"
            ops += [{"op": "remove", "path": p}] if k not in new else json_patch(old[k], new[k], p)
        ops += [{"op": "add", "path": f"{path}/{_pointer(k)}", "value": new[k]} for k in new if k not in old]
        return ops
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            return [
                op
                for i, (a, b) in enumerate(zip(old, new, strict=True))
                for op in json_patch(a, b, f"{path}/{i}")
            ]
        if len(new) > len(old) and new[: len(old)] == old:
            return [{"op": "add", "path": f"{path}/-", "value": v} for v in new[len(old) :]]
    if type(old) is type(new) and old == new:
        return []
    return [{"op": "replace", "path": path, "value": new}]


def _pointer(k: str) -> str:
    return k.replace("~", "~0").replace("/", "~1")


def apply_json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """`ops` applied to a copy of `doc` (the operations json_patch writes), to check them before writing."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            if op["op"] == "add" and last == "-":
                node.append(copy.deepcopy(op["value"]))
            else:
                assert op["op"] == "replace", op
                node[int(last)] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del node[last]
        else:
            assert op["op"] == "replace" or last not in node, op
            node[last] = copy.deepcopy(op["value"])
    return doc


class _Dumper(yaml.SafeDumper):
    """A SafeDumper of our own, so the representers registered on it do not change yaml's global one."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)


# --- The directories ------------------------------------------------------------------------------------


def header(d: Directory, what: str) -> str:
    return (
        f"# {what}\n"
        f"# Generated from the chart by `python -m tests.k8s.manifests`; do not edit (k8s/README.md).\n"
        f"#   {d.render.command}\n"
    )


def generate(helm: Helm) -> dict[str, str]:
    """Every generated file of k8s/, by path relative to k8s/."""
    files: dict[str, str] = {}
    rendered = {d.path: split_by_template(d.render.text(helm)) for d in DIRECTORIES}
    for d in DIRECTORIES:
        if d.kind == "base":
            files.update(_base(d, rendered[d.path]))
        else:
            assert d.parent is not None
            files.update(_layer(d, rendered[d.parent], rendered[d.path]))
    return files


def _base(d: Directory, templates: dict[str, list[str]]) -> dict[str, str]:
    files = {
        f"{d.path}/{name}": header(d, f"The {_kinds(docs)} of the chart's templates/{name}.")
        + "---\n".join(docs)
        for name, docs in templates.items()
    }
    files[f"{d.path}/kustomization.yaml"] = (
        header(d, d.about)
        + f"# Create the Secrets it mounts first: tandem-api-keys, {SALT_SECRET}, and tandem-redis for Redis "
        "sessions.\n"
        + dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": list(templates),
            }
        )
    )
    return files


def _layer(d: Directory, parent: dict[str, list[str]], own: dict[str, list[str]]) -> dict[str, str]:
    """An overlay or component: the objects `own` adds to `parent`, deletes from it, and patches in it."""
    source = {key(o): (name, o) for name, docs in parent.items() for o in map(yaml.safe_load, docs)}
    files: dict[str, str] = {}
    resources: list[str] = [] if d.kind == "component" else [f"../../{d.parent}"]
    patches: list[dict[str, Any]] = []
    kept: set[tuple[str, str, str]] = set()
    for name, docs in own.items():
        added = []
        changed = []
        for text in docs:
            obj = yaml.safe_load(text)
            if key(obj) not in source:
                added.append(text)
                continue
            kept.add(key(obj))
            ops = json_patch(source[key(obj)][1], obj)
            if ops:
                assert apply_json_patch(source[key(obj)][1], ops) == obj
                changed.append((obj, ops))
        if added:
            files[f"{d.path}/{name}"] = header(
                d, f"The {_kinds(added)} of the chart's templates/{name} that k8s/{d.parent} lacks."
            ) + "---\n".join(added)
            resources.append(name)
        for obj, ops in changed:
            stem = name.removesuffix(".yaml")
            patch = (
                f"{stem}-patch.yaml" if len(changed) == 1 else f"{stem}-{obj['metadata']['name']}-patch.yaml"
            )
            what = (
                f"JSON patch (RFC 6902): the {obj['kind']} {obj['metadata']['name']} of k8s/{d.parent} "
                "as this render has it."
            )
            files[f"{d.path}/{patch}"] = header(d, what) + dump(ops)
            group, _, version = obj["apiVersion"].rpartition("/")
            target = {
                "group": group,
                "version": version,
                "kind": obj["kind"],
                "name": obj["metadata"]["name"],
            }
            patches.append({"path": patch, "target": {k: v for k, v in target.items() if v}})
    deletes: list[dict[str, Any]] = []
    gone: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for k, (name, obj) in source.items():
        if k not in kept:
            meta = {"name": obj["metadata"]["name"]}
            gone[name].append({"$patch": "delete", "apiVersion": k[0], "kind": k[1], "metadata": meta})
    for name, objs in gone.items():
        patch = f"{name.removesuffix('.yaml')}-delete.yaml"
        what = f"Deletes the {_kinds(objs)} of k8s/{d.parent} that this render has not."
        files[f"{d.path}/{patch}"] = header(d, what) + "---\n".join(dump(o) for o in objs)
        deletes.append({"path": patch})
    api = "v1alpha1" if d.kind == "component" else "v1beta1"
    kustomization: dict[str, Any] = {
        "apiVersion": f"kustomize.config.k8s.io/{api}",
        "kind": "Component" if d.kind == "component" else "Kustomization",
    }
    if resources:
        kustomization["resources"] = resources
    if deletes or patches:
        kustomization["patches"] = deletes + patches
    files[f"{d.path}/kustomization.yaml"] = header(d, d.about) + dump(kustomization)
    return files


def _kinds(docs: list[Any]) -> str:
    kinds = sorted({(yaml.safe_load(d) if isinstance(d, str) else d)["kind"] for d in docs})
    return " and ".join(f"{k}s" if len(docs) > 1 else k for k in kinds)


def stale(helm: Helm, root: Path = K8S) -> list[str]:
    """Files under `root` (a copy of k8s/) that differ from what generate writes, are missing or extra."""
    files = generate(helm)
    on_disk = {
        str(p.relative_to(root))
        for d in DIRECTORIES
        if (root / d.path).is_dir()
        for p in (root / d.path).rglob("*")
        if p.is_file()
    }
    found = [f"missing {f}" for f in sorted(files.keys() - on_disk)]
    found += [f"extra {f}" for f in sorted(on_disk - files.keys())]
    found += [f"stale {f}" for f in sorted(files.keys() & on_disk) if (root / f).read_text() != files[f]]
    return found


def write(helm: Helm, root: Path = K8S) -> list[str]:
    """Rewrite the generated directories under `root`; the files written."""
    files = generate(helm)
    for d in DIRECTORIES:
        shutil.rmtree(root / d.path, ignore_errors=True)
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return sorted(files)


# --- kubectl kustomize ------------------------------------------------------------------------------------


def find_kubectl() -> str:
    """kubectl beside helm (install-helm puts both in one bin dir), else the one on PATH."""
    beside = Path(find_helm()).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    found = shutil.which("kubectl")
    if not found:
        raise FileNotFoundError(
            "kubectl is neither beside helm nor on PATH (../shared/tools/install-helm has both)"
        )
    return found


def kustomize(kubectl: str, build: Build, root: Path = K8S, scratch: Path | None = None) -> str:
    """`kubectl kustomize` of a build from `root` (k8s/ or a copy of it). A build with components needs
    `scratch`, a directory outside `root` for a kustomization of its own that names them."""
    target = root / build.resource
    if build.components:
        assert scratch is not None, "a build with components needs a scratch directory"
        target = scratch / re.sub(r"[^a-z0-9]+", "-", build.name)
        target.mkdir(parents=True, exist_ok=True)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(root / build.resource, target)],
            "components": [os.path.relpath(root / c, target) for c in build.components],
        }
        (target / "kustomization.yaml").write_text(dump(kustomization))
    out = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {target} failed:\n{out.stderr}")
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report the files that differ")
    args = parser.parse_args()
    helm = Helm(find_helm())
    if args.check:
        found = stale(helm)
        print("\n".join(found) or f"{K8S} is current")
        sys.exit(1 if found else 0)
    for path in write(helm):
        print(f"wrote k8s/{path}")


if __name__ == "__main__":
    main()
