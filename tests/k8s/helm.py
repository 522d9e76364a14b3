"""Helpers of the Helm chart tests: find helm, render the chart, validate what it renders.

Also the generator of the chart's values schema for `tandem:` (the deployment spec), which comes from
serving.config.ServingSpec so that a typo in the spec fails at `helm install`:

    python -m tests.k8s.helm --write-schema
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yamllint.config import YamlLintConfig

from serving.config import ServingSpec, SpecError, parse_spec
from serving.replicas.placement import PoolPlacement

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tandem"
SCHEMA_FILE = CHART / "values.schema.json"
#: The shared folder beside the repository (tools and reference schemas).
SHARED = REPO.parent / "shared"
INSTALL_HELM = SHARED / "tools" / "install-helm"
RAYSERVICE_CRD = SHARED / "schemas" / "kuberay" / "ray.io_rayservices.yaml"
#: The values files shipped beside values.yaml.
VALUES_FILES = sorted(p.name for p in CHART.glob("values-*.yaml"))
#: Kubernetes version the built-in kinds are validated against.
K8S_VERSION = "1.30"
RELEASE = "tandem"
#: The kinds of Kubernetes itself the chart renders (kubernetes-validate checks them).
BUILTIN_KINDS = {
    "ConfigMap",
    "Deployment",
    "Ingress",
    "NetworkPolicy",
    "PodDisruptionBudget",
    "Secret",
    "Service",
}
#: yamllint's rules for what the chart renders (and the plain manifests in k8s/).
YAMLLINT = YamlLintConfig(
    "extends: default\n"
    "rules:\n"
    "  line-length: disable\n"
    "  document-start: disable\n"
    "  indentation: {spaces: consistent, indent-sequences: whatever}\n"
    "  braces: {max-spaces-inside: 1}\n"
)


class HelmError(RuntimeError):
    """helm exited non-zero; the message is its stderr."""


def find_helm() -> str:
    """helm on PATH, else the one install-helm puts in its cache (installing it when missing)."""
    found = shutil.which("helm")
    if found:
        return found
    if not INSTALL_HELM.is_file():
        raise FileNotFoundError(
            f"helm is not on PATH and {INSTALL_HELM} is missing: install helm (v3.14+ or v4), or check out "
            "the shared tools beside the repository"
        )
    out = subprocess.run([str(INSTALL_HELM)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{INSTALL_HELM} failed:\n{out.stderr}")
    return str(Path(out.stdout.strip().splitlines()[-1]) / "helm")


@dataclass(frozen=True)
class Helm:
    """Runs one helm binary against the chart."""

    binary: str

    def run(self, *args: str) -> str:
        """helm's stdout (cached: the chart does not change during a test session)."""
        return _run(self.binary, args)

    def template_text(
        self, values: list[str] | tuple[str, ...] = (), set_: dict[str, Any] | None = None, **kw: Any
    ) -> str:
        """`helm template` of the chart with values files (beside the chart, or paths) and --set-json."""
        return self.run("template", RELEASE, str(CHART), *_value_args(values, set_, **kw))

    def template(
        self, values: list[str] | tuple[str, ...] = (), set_: dict[str, Any] | None = None, **kw: Any
    ) -> list[dict[str, Any]]:
        """The rendered objects (documents that are not empty)."""
        return [d for d in yaml.safe_load_all(self.template_text(values, set_, **kw)) if d]

    def lint(self, values: list[str] | tuple[str, ...] = ()) -> str:
        return self.run("lint", "--strict", str(CHART), *_value_args(values, None))


@functools.cache
def _run(binary: str, args: tuple[str, ...]) -> str:
    out = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise HelmError(out.stderr.strip() or out.stdout.strip())
    return out.stdout


def _value_args(values: list[str] | tuple[str, ...], set_: dict[str, Any] | None, **kw: Any) -> list[str]:
    args: list[str] = []
    for v in values:
        path = Path(v) if Path(v).is_absolute() else CHART / v
        args += ["-f", str(path)]
    for key, value in {**(set_ or {}), **kw}.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


# --- What the chart renders -----------------------------------------------------------------------


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of `kind` (and `name`)."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The RayService's serveConfigV2, parsed."""
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def deployed_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Tandem spec the RayService deploys (args.spec of its one application)."""
    (app,) = serve_config(docs)["applications"]
    return app["args"]["spec"]


def worker_groups(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    return {g["groupName"]: g for g in cluster.get("workerGroupSpecs", [])}


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod spec of the head (`head`) and of every worker group (by group name)."""
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    pods.update({name: g["template"]["spec"] for name, g in worker_groups(docs).items()})
    return pods


def group_name(p: PoolPlacement) -> str:
    """The worker group the chart makes for a GPU pool."""
    return f"{p.model}-{p.pool}".lower().replace(".", "-").replace("_", "-")[:50].rstrip("-")


@dataclass(frozen=True)
class PodPlan:
    """Pods of one worker group, as the chart's README states the rule (serving.replicas.placement)."""

    min: int
    start: int
    max: int


def expected_pods(
    p: PoolPlacement, pool_replicas: tuple[int, int, int], pp: int, gpus_per_pod: int
) -> PodPlan:
    """Pods for a pool: GPUs that must share a node (a replica; a stage when pp > 1) packed into pods.

    `pool_replicas` is the spec's (min, start, max); placement's max_replicas / spec max is the number of
    Serve replicas per spec replica (the dp ranks of a vLLM DP group).
    """
    unit = p.gpus_per_replica // pp
    per_pod = gpus_per_pod // unit
    units_per = p.max_replicas // pool_replicas[2] * pp
    return PodPlan(*(math.ceil(n * units_per / per_pod) for n in pool_replicas))


def restated_defaults(spec: dict[str, Any]) -> list[str]:
    """Keys of a spec (dotted paths) whose removal leaves the parsed spec unchanged: restated defaults."""
    spec = copy.deepcopy(spec)
    base = parse_spec(spec)
    found: list[str] = []

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for key in list(node):
                value = node.pop(key)
                try:
                    same = parse_spec(spec) == base
                except SpecError:
                    same = False
                node[key] = value
                if same:
                    found.append(".".join(path + [key]))
                else:
                    walk(value, path + [key])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, path + [str(i)])

    walk(spec, [])
    return found


# --- Validation -----------------------------------------------------------------------------------


def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that refuses unknown fields.

    Objects that list `properties` and say nothing about `additionalProperties` get
    `additionalProperties: false`, unless they keep unknown fields (`x-kubernetes-preserve-unknown-fields`).
    """
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def rayservice_schema(version: str = "v1") -> dict[str, Any]:
    """The RayService CRD's openAPIV3Schema for `version`, made strict."""
    if not RAYSERVICE_CRD.is_file():
        raise FileNotFoundError(
            f"the KubeRay CRD {RAYSERVICE_CRD} is missing (the shared schemas beside the repo)"
        )
    crd = yaml.safe_load(RAYSERVICE_CRD.read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict_schema(v["schema"]["openAPIV3Schema"])


# --- The values schema of `tandem:` ---------------------------------------------------------------


def spec_definitions() -> dict[str, Any]:
    """JSON schema definitions of the deployment spec as the chart takes it.

    The chart owns `server.host` (0.0.0.0), `auth` (from its own `auth` values) and
    `templates.library_file` (the mounted ConfigMap of its `templates` values), so they are left out.
    """
    schema = ServingSpec.model_json_schema(ref_template="#/definitions/{model}")
    defs = schema.pop("$defs")
    schema["description"] = (
        "The Tandem deployment spec (serving.config.ServingSpec; generated by "
        "`python -m tests.k8s.helm --write-schema`). The chart sets server.host, auth and "
        "templates.library_file."
    )
    del schema["properties"]["auth"]
    del defs["ServerSpec"]["properties"]["host"]
    del defs["TemplatesSpec"]["properties"]["library_file"]
    defs.pop("AuthSpec")
    defs.pop("ApiKey")
    defs["ServingSpec"] = schema
    drop_titles(defs)
    return dict(sorted(defs.items()))


def drop_titles(node: Any) -> None:
    """Remove pydantic's `title` keys from a JSON schema, in place (the chart's schema has none)."""
    if isinstance(node, dict):
        if isinstance(node.get("title"), str):
            del node["title"]
        for value in node.values():
            drop_titles(value)
    elif isinstance(node, list):
        for value in node:
            drop_titles(value)


def values_schema() -> dict[str, Any]:
    """values.schema.json with its spec definitions regenerated.

    Definitions named in lowerCamelCase are the chart's own; the UpperCamelCase ones come from the spec.
    """
    current = json.loads(SCHEMA_FILE.read_text())
    own = {k: v for k, v in current["definitions"].items() if k[:1].islower()}
    current["definitions"] = {**own, **spec_definitions()}
    return current


def schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-schema", action="store_true", help=f"regenerate {SCHEMA_FILE}")
    args = parser.parse_args()
    if args.write_schema:
        SCHEMA_FILE.write_text(schema_text(values_schema()))
        print(f"wrote {SCHEMA_FILE}")


if __name__ == "__main__":
    main()
