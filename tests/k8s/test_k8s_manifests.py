"""The plain manifests in k8s/: what the generator writes, and `kubectl kustomize` of each directory builds
exactly what `helm template` renders, validated like the chart's renders (yamllint, kubernetes-validate,
the strict KubeRay CRD schema, Ray Serve's ServeDeploySchema and Tandem's spec parser).

helm and kubectl come from ../shared/tools/install-helm's bin dir (kubectl beside helm), else PATH.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from yamllint import linter

from serving.config import ServerSpec, parse_spec
from tests.k8s.helm import (
    BUILTIN_KINDS,
    K8S_VERSION,
    YAMLLINT,
    Helm,
    deployed_spec,
    find_helm,
    kinds,
    one,
    pod_specs,
    rayservice_schema,
    serve_config,
)
from tests.k8s.manifests import (
    BUILDS,
    BY_PATH,
    DIRECTORIES,
    HELM_LABELS,
    K8S,
    MANAGED_BY,
    NAMESPACE,
    SALT_SECRET,
    Render,
    apply_json_patch,
    differences,
    expected_objects,
    find_kubectl,
    json_patch,
    kustomize,
    stale,
    write,
)

BUILD_NAMES = [b.name for b in BUILDS]
BY_NAME = {b.name: b for b in BUILDS}


@pytest.fixture(scope="session")
def helm() -> Helm:
    return Helm(find_helm())


@pytest.fixture(scope="session")
def kubectl() -> str:
    return find_kubectl()


@pytest.fixture(scope="session")
def built(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`kubectl kustomize` of every build, from k8s/ itself (by name)."""
    scratch = tmp_path_factory.mktemp("builds")
    return {b.name: kustomize(kubectl, b, scratch=scratch) for b in BUILDS}


@pytest.fixture(scope="session")
def rayservice_validator() -> jsonschema.protocols.Validator:
    """jsonschema.validate's validator of the strict RayService schema, made once (the CRD is large)."""
    schema = rayservice_schema("v1")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def lint(text: str) -> list[str]:
    return [f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(text, YAMLLINT)]


# --- k8s/ is what the chart renders -----------------------------------------------------------------


def test_k8s_holds_exactly_what_the_generator_writes_from_the_chart(helm: Helm) -> None:
    assert stale(helm) == [], "k8s/ differs from the chart: run `python -m tests.k8s.manifests`"


def test_a_hand_edited_missing_or_extra_file_in_k8s_is_reported_and_regenerated(
    helm: Helm, tmp_path: Path
) -> None:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    rayservice = root / "base" / "rayservice.yaml"
    rayservice.write_text(rayservice.read_text().replace("maxReplicas: 8", "maxReplicas: 9"))
    (root / "overlays" / "moe-dp-ep" / "pdb-delete.yaml").unlink()
    (root / "overlays" / "local-cpu" / "extra.yaml").write_text("a: 1\n")
    assert stale(helm, root) == [
        "missing overlays/moe-dp-ep/pdb-delete.yaml",
        "extra overlays/local-cpu/extra.yaml",
        "stale base/rayservice.yaml",
    ]
    (root / "overlays" / "my-cluster").mkdir()
    (root / "overlays" / "my-cluster" / "kustomization.yaml").write_text("resources: [../../base]\n")
    write(helm, root)
    assert stale(helm, root) == []
    mine = {Path("overlays/my-cluster"), Path("overlays/my-cluster/kustomization.yaml")}
    assert {p.relative_to(root) for p in root.rglob("*")} == {
        p.relative_to(K8S) for p in K8S.rglob("*")
    } | mine


@pytest.mark.parametrize("name", BUILD_NAMES)
def test_kustomize_builds_exactly_the_objects_helm_renders(
    helm: Helm, built: dict[str, str], name: str
) -> None:
    got = docs_of(built[name])
    assert got, "kustomize built nothing"
    assert differences(expected_objects(helm, BY_NAME[name].render), got) == []


# (build, file under k8s/, text replaced in it, its replacement, the difference it makes)
CHANGES = [
    (
        "base",
        "base/rayservice.yaml",
        "maxReplicas: 8",
        "maxReplicas: 9",
        "ray.io/v1/RayService/tandem differs at /spec/rayClusterConfig/workerGroupSpecs/0/maxReplicas",
    ),
    (
        "overlays/local-cpu",
        "overlays/local-cpu/rayservice-patch.yaml",
        "value: 12Gi",
        "value: 13Gi",
        "ray.io/v1/RayService/tandem differs at "
        "/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0/resources/limits/memory",
    ),
    (
        "overlays/local-cpu",
        "overlays/local-cpu/kustomization.yaml",
        "- path: pdb-delete.yaml\n",
        "",
        "unexpected policy/v1/PodDisruptionBudget/tandem-llama-3-1-8b-instruct-awq-colocated",
    ),
    (
        "overlays/moe-dp-ep",
        "overlays/moe-dp-ep/pdb.yaml",
        "maxUnavailable: 1",
        "maxUnavailable: 2",
        "policy/v1/PodDisruptionBudget/tandem-deepseek-v3-prefill differs at /spec/maxUnavailable",
    ),
    (
        "base + components/monitoring",
        "components/monitoring/kustomization.yaml",
        "- podmonitor.yaml\n",
        "",
        "missing monitoring.coreos.com/v1/PodMonitor/tandem",
    ),
]


@pytest.mark.parametrize(
    ("name", "path", "old", "new", "found"), CHANGES, ids=[f"{c[1]}: {c[2].strip()}" for c in CHANGES]
)
def test_a_changed_copy_of_k8s_no_longer_builds_what_helm_renders(
    helm: Helm, kubectl: str, tmp_path: Path, name: str, path: str, old: str, new: str, found: str
) -> None:
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    text = (root / path).read_text()
    assert text.count(old) >= 1
    (root / path).write_text(text.replace(old, new, 1))
    got = docs_of(kustomize(kubectl, BY_NAME[name], root, scratch=tmp_path / "scratch"))
    assert found in differences(expected_objects(helm, BY_NAME[name].render), got)


def test_every_generated_directory_is_built_by_some_build() -> None:
    used = {b.resource for b in BUILDS} | {c for b in BUILDS for c in b.components}
    assert used == {d.path for d in DIRECTORIES}
    assert all(b.resource in BY_PATH and BY_PATH[b.resource].kind != "component" for b in BUILDS)


def test_the_only_change_to_the_helm_render_is_its_helm_labels(helm: Helm, built: dict[str, str]) -> None:
    raw = docs_of(BY_NAME["base"].render.text(helm))
    got = docs_of(built["base"])
    for doc in raw:
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    for doc in got:
        labels = doc["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and labels["app.kubernetes.io/managed-by"] == MANAGED_BY
    for doc in raw + got:
        for label in HELM_LABELS:
            doc["metadata"]["labels"].pop(label, None)
    assert differences(raw, got) == []


def test_the_renders_name_no_namespace_so_k8s_applies_to_any(helm: Helm, built: dict[str, str]) -> None:
    for b in BUILDS:
        assert b.render.text(helm, namespace="elsewhere") == b.render.text(helm, namespace=NAMESPACE)
        assert all("namespace" not in d["metadata"] for d in docs_of(built[b.name]))


def secret_material(docs: list[dict[str, Any]]) -> list[str]:
    """Secrets, and key hashes anywhere in the objects."""
    found = [f"Secret {d['metadata']['name']}" for d in docs if d["kind"] == "Secret"]
    return found + ["a sha256 key hash" for d in docs if "sha256" in yaml.safe_dump(d)]


def test_k8s_holds_no_secret_material_and_mounts_the_secrets_you_create(
    helm: Helm, built: dict[str, str]
) -> None:
    inline = Render(
        ("values-8b-70b.yaml",),
        ("auth.existingSecret=", "auth.keys[0].tenant=acme", "auth.keys[0].sha256=" + "a" * 64),
    )
    assert secret_material(docs_of(inline.text(helm))) == [
        "Secret tandem-salt",  # the chart's own cache-salt secret, random: k8s/ names yours instead
        "Secret tandem-api-keys",
        "a sha256 key hash",
    ]
    from_secrets = [{"name": "tandem-redis", "key": "url"}, {"name": SALT_SECRET, "key": "secret"}]
    for name, text in built.items():
        docs = docs_of(text)
        assert secret_material(docs) == [], name
        for pod in pod_specs(docs).values():
            volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
            assert volume["secret"]["secretName"] == "tandem-api-keys"
            salt = next(e for e in pod["containers"][0]["env"] if e["name"] == "TANDEM_SALT_SECRET")
            assert salt["valueFrom"]["secretKeyRef"] == {"name": SALT_SECRET, "key": "secret"}
            for env in pod["containers"][0].get("env", []):
                if "valueFrom" in env:
                    assert env["valueFrom"]["secretKeyRef"] in from_secrets, env
                else:  # literal values only for Ray's own settings (serving.config.ServerSpec.ray_env)
                    assert env["name"] in ServerSpec().ray_env(), env
    assert all("sha256" not in p.read_text() for p in K8S.rglob("*.yaml"))


def test_json_patches_escape_keys_and_replace_lists_they_cannot_extend() -> None:
    old = {"a/b~c": 1, "list": [1, 2], "grow": [1], "gone": {"x": 1}, "same": "s"}
    new = {"a/b~c": 2, "list": [3], "grow": [1, 2], "same": "s", "new": True}
    ops = json_patch(old, new)
    assert ops == [
        {"op": "replace", "path": "/a~1b~0c", "value": 2},
        {"op": "replace", "path": "/list", "value": [3]},
        {"op": "add", "path": "/grow/-", "value": 2},
        {"op": "remove", "path": "/gone"},
        {"op": "add", "path": "/new", "value": True},
    ]
    assert apply_json_patch(old, ops) == new
    assert json_patch({"n": 1}, {"n": True}) == [{"op": "replace", "path": "/n", "value": True}]


# --- Validated like the chart's renders -------------------------------------------------------------


@pytest.mark.parametrize("name", BUILD_NAMES)
def test_kustomize_output_passes_yamllint(built: dict[str, str], name: str) -> None:
    assert lint(built[name]) == []


@pytest.mark.parametrize("path", sorted(str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")))
def test_the_files_in_k8s_pass_yamllint(path: str) -> None:
    assert lint((K8S / path).read_text()) == []


@pytest.mark.parametrize("name", BUILD_NAMES)
def test_builtin_kinds_are_valid_kubernetes_objects(built: dict[str, str], name: str) -> None:
    docs = docs_of(built[name])
    builtin = [d for d in docs if d["kind"] in BUILTIN_KINDS]
    assert builtin, "nothing to validate"
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert set(kinds(docs)) - BUILTIN_KINDS <= {"RayService", "PodMonitor"}


@pytest.mark.parametrize("name", BUILD_NAMES)
def test_rayservice_matches_the_kuberay_crd_schema_with_no_unknown_fields(
    rayservice_validator: jsonschema.protocols.Validator, built: dict[str, str], name: str
) -> None:
    rayservice = one(docs_of(built[name]), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    rayservice_validator.validate(rayservice)


@pytest.mark.parametrize("name", BUILD_NAMES)
def test_serve_config_is_a_ray_serve_deploy_config_carrying_a_valid_tandem_spec(
    built: dict[str, str], name: str
) -> None:
    docs = docs_of(built[name])
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("tandem", "/", "serving.app:build_app")
    spec = parse_spec(deployed_spec(docs), origin=name)
    assert spec.server.host == "0.0.0.0"
    assert spec.auth.enabled and spec.auth.keys_file == "/etc/tandem/keys/keys.yaml"


def test_the_validators_refuse_a_broken_build(
    rayservice_validator: jsonschema.protocols.Validator, built: dict[str, str]
) -> None:
    docs = docs_of(built["base"])
    rayservice = one(docs, "RayService")
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        rayservice_validator.validate(rayservice)
    pdb = one(docs, "PodDisruptionBudget", "tandem-head")
    pdb["spec"]["maxUnavailabe"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, K8S_VERSION, strict=True)
    assert lint(built["base"].replace("kind: RayService", "kind:  RayService")) != []
