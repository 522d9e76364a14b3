"""The Helm chart (helm/tandem): lint, render, validate what it renders, and unit cases named as sentences.

Rendered objects are checked by yamllint, by kubernetes-validate (built-in kinds), by the KubeRay CRD's
schema made strict on unknown fields (the RayService), and the embedded serveConfigV2 by Ray Serve's own
schema and Tandem's spec parser. helm comes from PATH, else from ../shared/tools/install-helm.
"""

from __future__ import annotations

import base64
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from yamllint import linter

from router.hashing import SALT_SECRET_ENV
from serving.config import (
    DATA_PLANE_ENV,
    DataPlane,
    HttpSpec,
    ServerSpec,
    TemplateLibrarySpec,
    TemplatesSpec,
    load_spec,
    parse_spec,
)
from serving.http.auth import load_keys_file
from serving.http.templates import LibraryError, parse_library
from serving.replicas.placement import plan
from tests.k8s.helm import (
    BUILTIN_KINDS,
    CHART,
    K8S_VERSION,
    RELEASE,
    REPO,
    SCHEMA_FILE,
    VALUES_FILES,
    YAMLLINT,
    Helm,
    HelmError,
    PodPlan,
    deployed_spec,
    expected_pods,
    find_helm,
    group_name,
    kinds,
    one,
    pod_specs,
    rayservice_schema,
    restated_defaults,
    schema_text,
    serve_config,
    values_schema,
    worker_groups,
)

KEYS = [{"tenant": "acme", "sha256": "a" * 64}, {"tenant": "batch-jobs", "sha256": "b" * 64}]
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
CHART_DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
#: Every optional object switched on (validated like the values files themselves).
ALL_OPTIONS = {
    "monitoring": {
        "enabled": True,
        "ingressMetrics": {"enabled": True},
        "metricsKeySecret": {"name": "tandem-metrics-key"},
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": ["api.example.com"],
        "tls": [{"secretName": "api-tls", "hosts": ["api.example.com"]}],
    },
    "networkPolicy": {"serveFrom": {"namespaces": ["ingress-nginx"], "cidrs": ["10.0.0.0/8"]}},
    "extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    "extraVolumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": "weights"}}],
    "extraVolumeMounts": [{"name": "weights", "mountPath": "/weights"}],
    "imagePullSecrets": [{"name": "registry"}],
    "podSecurityContext": {"fsGroup": 1000},
    "containerSecurityContext": {"allowPrivilegeEscalation": False},
    "rayTokenAuth": True,
    "saltSecret": {"existingSecret": "prod-salt", "existingSecretKey": "hmac"},
}
#: A prompt template library for MIXED_SPEC (its tier `fast`, its task type `classify`).
LIBRARY = {
    "templates": [
        {
            "name": "classify",
            "system": "Reply with one label from the list.",
            "few_shot": [
                {"role": "user", "content": "Labels: billing, other. Text: I was charged twice."},
                {"role": "assistant", "content": "billing"},
            ],
            "stop": ["\n"],
            "sampling": {"temperature": 0.0, "max_tokens": 8},
        },
        {"name": "classify", "version": 2, "system": "Reply with exactly one label, as spelled."},
    ],
    "bindings": [{"task": "classify", "template": "classify@1"}, {"tier": "fast", "template": "classify"}],
}
#: An external server's pool (engine: openai) whose API key is in $VLLM_API_KEY.
EXTERNAL_POOL = {
    "engine": "openai",
    "upstream": {
        "endpoints": ["http://vllm-0.vllm.llm:8000", "http://vllm-1.vllm.llm:8000"],
        "model": "ext",
        "api_key_env": "VLLM_API_KEY",
        "max_model_len": 8192,
    },
}
UPSTREAM_SECRETS = [{"env": "VLLM_API_KEY", "secretName": "vllm-api-key", "secretKey": "api-key"}]
#: A GPU pool (a worker group besides the head), an external server, and task types for LIBRARY.
MIXED_SPEC = {
    "models": [
        {"name": "m", "source": "org/m", "pools": [{"accelerator": "H100"}]},
        {"name": "ext", "source": "org/ext", "pools": [EXTERNAL_POOL]},
    ],
    "tiers": [{"name": "fast", "model": "m"}, {"name": "remote", "model": "ext", "fallback": ["fast"]}],
    "routing": {"tasks": [{"name": "classify", "tier": "fast"}]},
    "sessions": {"enabled": False},
}
MIXED = {
    "auth": {"keys": KEYS},
    "tandem": MIXED_SPEC,
    "templates": {"library": LIBRARY},
    "upstreamSecrets": UPSTREAM_SECRETS,
}
#: (name, values files, --set-json values) of every rendering that the validators check.
RENDERINGS = (
    [("the chart's defaults", [], {})]
    + [(f, [f], {}) for f in VALUES_FILES]
    + [
        ("values-8b-70b.yaml + every option", ["values-8b-70b.yaml"], ALL_OPTIONS),
        (
            "values-local-cpu.yaml + inline keys",
            ["values-local-cpu.yaml"],
            {"auth": {"existingSecret": "", "keys": KEYS}},
        ),
        ("a gpu pool, an external server and a template library", [], MIXED),
    ]
)
RENDERINGS_BY_NAME = {name: (files, set_) for name, files, set_ in RENDERINGS}
CLUSTER_CONFIGS = {
    "values-8b-70b.yaml": "configs/cluster-8b-70b.yaml",
    "values-moe-dp-ep.yaml": "configs/cluster-moe-dp-ep.yaml",
}


@pytest.fixture(scope="session")
def helm() -> Helm:
    return Helm(find_helm())


@pytest.fixture(scope="session")
def rendered(helm: Helm) -> dict[str, str]:
    """The text of every rendering in RENDERINGS, by name."""
    return {name: helm.template_text(files, set_) for name, files, set_ in RENDERINGS}


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def gpu_spec(*pools: dict[str, Any], sessions: bool = False) -> dict[str, Any]:
    """A one-model spec with `pools` (GPU pools on H100 unless they say otherwise)."""
    return {
        "models": [{"name": "m", "source": "org/m", "pools": [{"accelerator": "H100", **p} for p in pools]}],
        "sessions": {"enabled": sessions},
    }


def render(helm: Helm, tandem: dict[str, Any], **values: Any) -> list[dict[str, Any]]:
    """The chart with a spec of its own and inline keys (plus `values`)."""
    return helm.template(set_={"auth": {"keys": KEYS}, "tandem": tandem, **values})


def render_error(helm: Helm, files: tuple[str, ...] | list[str] = (), **values: Any) -> str:
    with pytest.raises(HelmError) as err:
        helm.template(files, values)
    return str(err.value)


def secret_names(docs: list[dict[str, Any]]) -> list[str]:
    """Names of the Secrets the chart renders."""
    return sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Secret")


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


# --- Every values file -----------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_values_file_passes_helm_lint_strict(helm: Helm, values_file: str) -> None:
    out = helm.lint([values_file])
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("name", [r[0] for r in RENDERINGS])
def test_rendered_yaml_passes_yamllint(rendered: dict[str, str], name: str) -> None:
    problems = [f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(rendered[name], YAMLLINT)]
    assert problems == []


@pytest.mark.parametrize("path", sorted(p.name for p in CHART.glob("*.yaml")))
def test_the_charts_own_yaml_passes_yamllint(path: str) -> None:
    problems = [
        f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run((CHART / path).read_text(), YAMLLINT)
    ]
    assert problems == []


@pytest.mark.parametrize("name", [r[0] for r in RENDERINGS])
def test_builtin_kinds_are_valid_kubernetes_objects(rendered: dict[str, str], name: str) -> None:
    docs = docs_of(rendered[name])
    builtin = [d for d in docs if d["kind"] in BUILTIN_KINDS]
    assert builtin, "nothing to validate"
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert set(kinds(docs)) - BUILTIN_KINDS <= {"RayService", "PodMonitor"}


@pytest.mark.parametrize("name", [r[0] for r in RENDERINGS])
def test_rayservice_matches_the_kuberay_crd_schema_with_no_unknown_fields(
    rendered: dict[str, str], name: str
) -> None:
    rayservice = one(docs_of(rendered[name]), "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    jsonschema.validate(rayservice, rayservice_schema("v1"))


@pytest.mark.parametrize("name", [r[0] for r in RENDERINGS])
def test_serve_config_is_a_ray_serve_deploy_config_carrying_a_valid_tandem_spec(
    rendered: dict[str, str], name: str
) -> None:
    docs = docs_of(rendered[name])
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("tandem", "/", "serving.app:build_app")
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    spec = parse_spec(deployed_spec(docs), origin=name)
    assert spec.server.host == "0.0.0.0"
    assert spec.auth.enabled and spec.auth.keys_file == "/etc/tandem/keys/keys.yaml"


@pytest.mark.parametrize("name", [r[0] for r in RENDERINGS])
def test_autoscaled_pools_get_tandems_slo_policy_with_the_deployed_spec(
    rendered: dict[str, str], name: str
) -> None:
    """As serving.autoscaling.serve_config writes it: the policy iff a pool has min < max, same spec."""
    from serving.autoscaling import POLICY_PATH
    from serving.autoscaling import serve_config as tandem_serve_config

    docs = docs_of(rendered[name])
    (app,) = serve_config(docs)["applications"]
    spec = parse_spec(deployed_spec(docs), origin=name)
    expected = tandem_serve_config(spec, "tandem")["applications"][0]
    if any(spec.autoscaled(m) for m in spec.models):
        assert app["autoscaling_policy"]["policy_function"] == POLICY_PATH
        assert parse_spec(app["autoscaling_policy"]["policy_kwargs"]["spec"]) == spec
        assert "autoscaling_policy" in expected
    else:
        assert "autoscaling_policy" not in app and "autoscaling_policy" not in expected


@pytest.mark.parametrize("values_file", sorted(CLUSTER_CONFIGS))
def test_cluster_values_deploy_exactly_the_spec_of_their_config_file(helm: Helm, values_file: str) -> None:
    deployed = parse_spec(deployed_spec(helm.template([values_file])))
    assert deployed == load_spec(REPO / CLUSTER_CONFIGS[values_file])


def test_local_cpu_values_deploy_the_local_spec_on_the_pod_network_with_keys(helm: Helm) -> None:
    deployed = parse_spec(deployed_spec(helm.template(["values-local-cpu.yaml"])))
    local = load_spec(REPO / "configs/local.yaml")
    expected = local.model_copy(
        update={
            "server": local.server.model_copy(update={"host": "0.0.0.0"}),
            "auth": deployed.auth,
            # The library is in the chart's ConfigMap (test_local_cpu_values_carry_the_local_template_...).
            "templates": TemplatesSpec(library_file="/etc/tandem/templates/library.yaml"),
            "model_dir": "/var/lib/tandem/models",
            "sessions": local.sessions.model_copy(
                update={
                    "store": local.sessions.store.model_copy(
                        update={"path": "/var/lib/tandem/state/sessions.db"}
                    )
                }
            ),
        }
    )
    assert deployed == expected
    assert deployed.auth.enabled and deployed.auth.keys_file == "/etc/tandem/keys/keys.yaml"


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_values_files_state_no_spec_default(values_file: str) -> None:
    spec = yaml.safe_load((CHART / values_file).read_text())["tandem"]
    assert restated_defaults(spec) == []


def test_values_schema_embeds_the_current_deployment_spec_schema() -> None:
    assert SCHEMA_FILE.read_text() == schema_text(values_schema()), (
        "values.schema.json is stale: run `python -m tests.k8s.helm --write-schema`"
    )


def test_chart_app_version_is_the_tandem_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert APP_VERSION == project["version"]


# --- GPU pools -> worker groups --------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_each_gpu_pool_gets_a_worker_group_with_the_gpus_serving_placement_asks_for(
    helm: Helm, values_file: str
) -> None:
    docs = helm.template([values_file])
    spec = parse_spec(deployed_spec(docs))
    groups = worker_groups(docs)
    gpu = [p for p in plan(spec) if p.gpus_per_replica > 0]
    assert sorted(groups) == sorted(group_name(p) for p in gpu)
    for p in gpu:
        pool = next(q for q in spec.model(p.model).pools if q.pool_name == p.pool)
        g = groups[group_name(p)]
        per_pod = CHART_DEFAULTS["accelerators"][p.accelerator]["gpusPerPod"]
        container = g["template"]["spec"]["containers"][0]
        assert g["rayStartParams"]["num-gpus"] == str(per_pod)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(per_pod)
        assert container["resources"]["requests"]["nvidia.com/gpu"] == str(per_pod)
        reps = (pool.replicas.min, pool.replicas.start, pool.replicas.max)
        pods = expected_pods(p, reps, pool.parallelism.pp, per_pod)
        assert (g["minReplicas"], g["replicas"], g["maxReplicas"]) == (pods.min, pods.start, pods.max)
        # Enough GPUs for the pool at its largest, and not a pod more than that needs.
        assert g["maxReplicas"] * per_pod >= p.total_gpus
        assert (g["maxReplicas"] - 1) * per_pod < p.total_gpus


def test_gpu_worker_groups_of_the_8b_70b_cluster_have_the_documented_pod_counts(helm: Helm) -> None:
    groups = worker_groups(helm.template(["values-8b-70b.yaml"]))
    counts = {n: (g["minReplicas"], g["replicas"], g["maxReplicas"]) for n, g in groups.items()}
    assert counts == {
        "llama-3-1-8b-instruct-awq-colocated": (2, 2, 8),
        "llama-3-3-70b-instruct-prefill": (1, 1, 2),
        "llama-3-3-70b-instruct-decode": (1, 1, 4),
    }


def pool(
    tp: int = 1, pp: int = 1, dp: int = 1, reps: tuple[int, int | None, int] = (1, None, 1), **kw: Any
) -> dict[str, Any]:
    """A pool's spec: parallelism, replicas (min, initial, max) and other fields."""
    replicas = {"min": reps[0], "max": reps[2]} | ({"initial": reps[1]} if reps[1] is not None else {})
    return {"parallelism": {"tp": tp, "pp": pp, "dp": dp, "ep": dp > 1}, "replicas": replicas, **kw}


# (case, pool, accelerator, worker pods (min, start, max)); H100 pods have 8 GPUs, L4 pods 1.
POD_CASES = [
    ("a pool of spec defaults has one one-GPU replica", {}, "H100", (1, 1, 1)),
    ("tp 4 packs two replicas per 8-GPU pod", pool(tp=4, reps=(0, None, 5)), "H100", (0, 1, 3)),
    ("pp stages may spill onto the next pod", pool(tp=4, pp=2, reps=(1, None, 3)), "H100", (1, 1, 3)),
    ("vllm dp ranks are replicas of tp GPUs", pool(tp=2, dp=8, reps=(2, None, 2)), "H100", (4, 4, 4)),
    (
        "sglang keeps its dp ranks in one replica",
        pool(tp=2, dp=4, reps=(2, None, 2), engine="sglang"),
        "H100",
        (2, 2, 2),
    ),
    ("initial replicas size the starting pods", pool(reps=(1, 3, 9)), "L4", (1, 3, 9)),
]


@pytest.mark.parametrize(
    ("case", "spec_pool", "accelerator", "pods"), POD_CASES, ids=[c[0] for c in POD_CASES]
)
def test_worker_group_pods_follow_the_pool_parallelism_and_replica_bounds(
    helm: Helm, case: str, spec_pool: dict[str, Any], accelerator: str, pods: tuple[int, int, int]
) -> None:
    docs = render(helm, gpu_spec({**spec_pool, "accelerator": accelerator}))
    spec = parse_spec(deployed_spec(docs))
    (p,) = plan(spec)
    (g,) = worker_groups(docs).values()
    assert g["groupName"] == group_name(p) == "m-colocated"
    assert (g["minReplicas"], g["replicas"], g["maxReplicas"]) == pods
    per_pod = CHART_DEFAULTS["accelerators"][accelerator]["gpusPerPod"]
    parsed = spec.models[0].pools[0]
    reps = (parsed.replicas.min, parsed.replicas.start, parsed.replicas.max)
    assert expected_pods(p, reps, parsed.parallelism.pp, per_pod) == PodPlan(*pods)
    assert g["maxReplicas"] * per_pod >= p.total_gpus


def test_cpu_pools_get_no_worker_group(helm: Helm) -> None:
    docs = helm.template(["values-local-cpu.yaml"])
    assert worker_groups(docs) == {}
    assert all(p.gpus_per_replica == 0 for p in plan(parse_spec(deployed_spec(docs))))


def test_worker_groups_select_their_accelerators_nodes_and_tolerate_gpu_taints(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"])
    for name, g in worker_groups(docs).items():
        pod = g["template"]["spec"]
        product = "NVIDIA-L4" if "8b" in name else "NVIDIA-H100-80GB-HBM3"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    head = pod_specs(docs)["head"]
    assert "tolerations" not in head and "nodeSelector" not in head


def test_worker_groups_advertise_the_accelerator_type_resource_placement_requests(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"])
    groups = worker_groups(docs)
    for p in plan(parse_spec(deployed_spec(docs))):
        # The autoscaler's format: a JSON object in an extra pair of quotes, backslash-escaped.
        raw = groups[group_name(p)]["rayStartParams"]["resources"]
        advertised = json.loads(raw[1:-1].replace("\\", ""))
        wanted = {k for b in p.bundles for k in b if k.startswith("accelerator_type:")}
        assert wanted == set(advertised) == {f"accelerator_type:{p.accelerator}"}


def test_head_group_has_no_gpus_and_exposes_serve_dashboard_and_metrics_ports(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"])
    head = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
    assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_the_serve_port_follows_the_spec_server_port(helm: Helm) -> None:
    docs = render(helm, {**gpu_spec({}), "server": {"port": 9000}})
    assert serve_config(docs)["http_options"]["port"] == 9000
    for pod in pod_specs(docs).values():
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        assert ports["serve"] == 9000


def test_autoscaler_runs_in_tree_with_the_v2_autoscaler(helm: Helm) -> None:
    cluster = one(helm.template(["values-8b-70b.yaml"]), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["autoscalerOptions"]["imagePullPolicy"] == "IfNotPresent"
    local = one(helm.template(["values-local-cpu.yaml"]), "RayService")["spec"]["rayClusterConfig"]
    assert local["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in local


def test_upgrades_start_a_new_cluster_by_default(helm: Helm) -> None:
    spec = one(helm.template(["values-8b-70b.yaml"]), "RayService")["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}


# --- Images ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_container_image_is_pinned_to_the_app_version_and_pulled_if_not_present(
    helm: Helm, values_file: str
) -> None:
    for pod in pod_specs(helm.template([values_file])).values():
        for c in containers(pod):
            repo, tag = c["image"].rsplit(":", 1)
            assert tag == APP_VERSION and repo in ("tandem", "tandem-cpu")
            assert c["imagePullPolicy"] == "IfNotPresent"


def test_an_image_digest_replaces_the_tag(helm: Helm) -> None:
    digest = "sha256:" + "c" * 64
    docs = helm.template(["values-8b-70b.yaml"], {"image.digest": digest})
    assert {c["image"] for pod in pod_specs(docs).values() for c in containers(pod)} == {f"tandem@{digest}"}


def test_the_latest_image_tag_is_refused_by_the_values_schema(helm: Helm) -> None:
    err = render_error(helm, ["values-8b-70b.yaml"], **{"image": {"tag": "latest"}})
    assert "/image/tag" in err


# --- API keys, Redis, state ----------------------------------------------------------------------------


def test_inline_keys_become_a_secret_mounted_where_the_spec_reads_them(helm: Helm, tmp_path: Path) -> None:
    docs = render(helm, gpu_spec({}))
    secret = one(docs, "Secret", "tandem-api-keys")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(secret["stringData"]["keys.yaml"])
    assert [k.model_dump(include={"tenant", "sha256"}) for k in load_keys_file(str(keys_file))] == KEYS
    assert deployed_spec(docs)["auth"] == {"enabled": True, "keys_file": "/etc/tandem/keys/keys.yaml"}
    for pod in pod_specs(docs).values():
        volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
        assert volume["secret"] == {
            "secretName": "tandem-api-keys",
            "items": [{"key": "keys.yaml", "path": "keys.yaml"}],
        }
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "api-keys", "mountPath": "/etc/tandem/keys", "readOnly": True} in mounts


def test_an_existing_keys_secret_is_mounted_instead_of_the_charts_own(helm: Helm) -> None:
    docs = helm.template(
        ["values-8b-70b.yaml"], {"auth": {"existingSecret": "prod-keys", "existingSecretKey": "hashes"}}
    )
    assert secret_names(docs) == ["tandem-salt"]  # the cache-salt secret only, no key hashes
    for pod in pod_specs(docs).values():
        volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
        assert volume["secret"] == {
            "secretName": "prod-keys",
            "items": [{"key": "hashes", "path": "keys.yaml"}],
        }


def test_auth_on_without_keys_fails_saying_what_to_set(helm: Helm) -> None:
    err = render_error(helm, ["values-8b-70b.yaml"], auth={"existingSecret": ""})
    assert "auth.keys (or auth.existingSecret) is required when auth.enabled is true" in err
    assert "tandem key new --tenant NAME" in err


def test_auth_off_is_refused_unless_remote_unauthenticated_access_is_allowed(helm: Helm) -> None:
    err = render_error(helm, ["values-local-cpu.yaml"], auth={"enabled": False})
    assert "auth.allowRemoteUnauthenticated: true" in err
    docs = helm.template(
        ["values-local-cpu.yaml"], {"auth": {"enabled": False, "allowRemoteUnauthenticated": True}}
    )
    assert deployed_spec(docs)["auth"] == {"enabled": False, "allow_remote_unauthenticated": True}
    assert parse_spec(deployed_spec(docs)).auth.enabled is False
    assert secret_names(docs) == ["tandem-salt"]
    assert all(v["name"] != "api-keys" for v in pod_specs(docs)["head"]["volumes"])


def test_the_redis_url_reaches_every_ray_container_from_the_named_secret(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"])
    for pod in pod_specs(docs).values():
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["TANDEM_REDIS_URL"]["valueFrom"] == {
            "secretKeyRef": {"name": "tandem-redis", "key": "url"}
        }


#: The variable router.hashing.salt_secret reads (the per-tenant cache salt is HMAC(secret, tenant)).
SALT_ENV = SALT_SECRET_ENV


@pytest.mark.parametrize("name", [r[0] for r in RENDERINGS])
def test_every_ray_container_gets_the_salt_secret_from_a_secret_the_render_has_or_names(
    rendered: dict[str, str], name: str
) -> None:
    """The ingress (on any Ray pod) salts each tenant's cache keys with $TANDEM_SALT_SECRET: every Ray
    container of the head and of each worker group reads it from a Secret, never from a literal value;
    the chart's own Secret when the values name none, with the key the reference asks for."""
    assert SALT_ENV == "TANDEM_SALT_SECRET"
    docs = docs_of(rendered[name])
    values = dict(RENDERINGS_BY_NAME[name][1])
    named = values.get("saltSecret", {}).get("existingSecret")
    pods = pod_specs(docs)
    for group, pod in pods.items():
        ray = [c for c in pod["containers"] if c["name"] in ("ray-head", "ray-worker")]
        assert ray, group
        for c in ray:
            salt = [e for e in c.get("env", []) if e["name"] == SALT_ENV]
            assert len(salt) == 1, (group, c["name"])
            assert set(salt[0]) == {"name", "valueFrom"}, salt  # no literal value
            ref = salt[0]["valueFrom"]["secretKeyRef"]
            if named:
                assert ref == {"name": named, "key": values["saltSecret"]["existingSecretKey"]}
                assert named not in secret_names(docs)
            else:
                secret = one(docs, "Secret", ref["name"])
                assert ref == {"name": "tandem-salt", "key": "secret"}
                assert len(base64.b64decode(secret["data"]["secret"])) == 48
    # Nothing else gets it: the load test's pods, the init containers that build models.
    for group, pod in pods.items():
        others = pod.get("initContainers", []) + [
            c for c in pod["containers"] if c["name"] not in ("ray-head", "ray-worker")
        ]
        assert all(SALT_ENV not in {e["name"] for e in c.get("env", [])} for c in others), group


def test_the_charts_salt_secret_is_random_alphanumeric_and_kept_across_upgrades(helm: Helm) -> None:
    """48 random letters and digits on a first install; the value the cluster holds afterwards
    (`lookup`: helm install/upgrade ask the cluster; helm template cannot, so it gets a new one)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["saltSecret"] == {"existingSecret": "", "existingSecretKey": "secret"}
    a = one(helm.template(), "Secret", "tandem-salt")["data"]["secret"]
    b = one(helm.template(set_={"podLabels": {"x": "y"}}), "Secret", "tandem-salt")["data"]["secret"]
    for value in (a, b):
        assert re.fullmatch(r"[A-Za-z0-9]{48}", base64.b64decode(value).decode())
    assert a != b  # no cluster to read it back from: each render makes one
    source = (CHART / "templates" / "salt-secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace $name' in source
    other = helm.template(set_={"fullnameOverride": "prod"})
    assert "prod-salt" in secret_names(other)
    head = pod_specs(other)["head"]["containers"][0]
    ref = next(e for e in head["env"] if e["name"] == SALT_ENV)["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "prod-salt", "key": "secret"}


def test_a_named_salt_secret_replaces_the_charts_own(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"], {"saltSecret": {"existingSecret": "tandem-salt-prod"}})
    assert secret_names(docs) == []
    for pod in pod_specs(docs).values():
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env[SALT_ENV]["valueFrom"] == {"secretKeyRef": {"name": "tandem-salt-prod", "key": "secret"}}


def test_the_salt_secret_in_extra_env_is_refused_naming_the_value_to_use(helm: Helm) -> None:
    err = render_error(helm, extraEnv=[{"name": SALT_ENV, "value": "s3cret"}])
    assert "extraEnv sets TANDEM_SALT_SECRET" in err and "saltSecret.existingSecret" in err


@pytest.mark.parametrize("plane", [None, *DataPlane])
def test_every_ray_container_gets_the_data_plane_of_the_spec(helm: Helm, plane: DataPlane | None) -> None:
    """Serve reads its data plane from the environment of every pod: the chart sets it from
    tandem.server.data_plane, and with none set, the spec's own default."""
    tandem = gpu_spec({"role": "colocated"})
    if plane is not None:
        tandem["server"] = {"data_plane": plane.value}
    expected = {**DATA_PLANE_ENV[plane or ServerSpec().data_plane], "RAY_worker_niceness": "0"}
    assert ServerSpec().worker_niceness == 0  # the chart's default is the spec's
    pods = pod_specs(render(helm, tandem))
    assert len(pods) >= 2  # the head and a GPU worker group
    for pod in pods.values():
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert {k: env.get(k) for k in expected} == expected


def test_the_worker_niceness_of_the_spec_reaches_every_ray_container(helm: Helm) -> None:
    tandem = {**gpu_spec({"role": "colocated"}), "server": {"worker_niceness": 5}}
    for pod in pod_specs(render(helm, tandem)).values():
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["RAY_worker_niceness"] == "5"


def test_an_unknown_data_plane_is_refused(helm: Helm) -> None:
    tandem = {**gpu_spec({"role": "colocated"}), "server": {"data_plane": "envoy"}}
    with pytest.raises(HelmError, match="data_plane"):
        render(helm, tandem)


def test_a_redis_store_without_its_secret_fails_saying_what_to_set(helm: Helm) -> None:
    err = render_error(helm, ["values-8b-70b.yaml"], redis={"existingSecret": ""})
    assert "redis.existingSecret is required" in err and "$TANDEM_REDIS_URL" in err


def test_sqlite_sessions_next_to_gpu_worker_pods_fail_saying_to_use_redis(helm: Helm) -> None:
    err = render_error(helm, **{"auth": {"keys": KEYS}, "tandem": gpu_spec({}, sessions=True)})
    assert "tandem.sessions.store.kind is sqlite" in err and "kind: redis" in err


def test_local_cpu_keeps_sqlite_sessions_and_built_models_on_the_head_pod(helm: Helm) -> None:
    docs = helm.template(["values-local-cpu.yaml"], {"state": {"existingClaim": "tandem-state"}})
    spec = deployed_spec(docs)
    assert spec["sessions"]["store"]["path"] == "/var/lib/tandem/state/sessions.db"
    assert spec["model_dir"] == "/var/lib/tandem/models"
    head = pod_specs(docs)["head"]
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": "tandem-state"}
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts["state"] == "/var/lib/tandem/state" and mounts["local-models"] == "/var/lib/tandem/models"
    (init,) = head["initContainers"]
    assert init["command"] == [
        "tandem", "model", "build", "--dir", "/var/lib/tandem/models",
        "--name", "tiny-intent", "--name", "tiny-reasoning",
    ]  # fmt: skip
    assert (
        one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"]
        == "4"
    )


# --- Values that are wrong -----------------------------------------------------------------------------


def test_an_unknown_values_key_is_a_schema_error(helm: Helm) -> None:
    err = render_error(helm, ["values-8b-70b.yaml"], imagee={"tag": "1.0"})
    assert "additional properties 'imagee' not allowed" in err


def test_an_unknown_spec_field_is_a_schema_error_naming_its_place(helm: Helm) -> None:
    err = render_error(helm, ["values-8b-70b.yaml"], tandem={"server": {"ingress_replica": 3}})
    assert "/tandem/server" in err and "ingress_replica" in err


@pytest.mark.parametrize(
    "field",
    [
        {"server": {"host": "127.0.0.1"}},
        {"auth": {"enabled": False}},
        {"templates": {"library_file": "/etc/tandem/templates/library.yaml"}},
    ],
)
def test_the_spec_fields_the_chart_owns_are_refused_in_values(helm: Helm, field: dict[str, Any]) -> None:
    err = render_error(helm, ["values-8b-70b.yaml"], tandem=field)
    assert "/tandem" in err and "not allowed" in err


def test_a_spec_without_models_is_a_schema_error(helm: Helm) -> None:
    err = render_error(helm, tandem={"models": None})
    assert "/tandem" in err and "models" in err


def test_a_gpu_type_without_node_settings_fails_saying_what_to_set(helm: Helm) -> None:
    err = render_error(helm, **{"auth": {"keys": KEYS}, "tandem": gpu_spec({"accelerator": "A10G"})})
    assert "runs on accelerator A10G, but accelerators.A10G is not set" in err


def test_a_replica_larger_than_a_pod_fails_naming_the_pool(helm: Helm) -> None:
    err = render_error(helm, **{"auth": {"keys": KEYS}, "tandem": gpu_spec({"parallelism": {"tp": 16}})})
    assert "tandem.models[m].pools[colocated] needs 16 GPUs on one node" in err
    assert "accelerators.H100.gpusPerPod is 8" in err


def test_replicas_reserving_more_cpus_than_a_pod_has_fail(helm: Helm) -> None:
    pool = {"accelerator": "L4", "cpus_per_replica": 8}
    err = render_error(helm, **{"auth": {"keys": KEYS}, "tandem": gpu_spec(pool)})
    assert "reserves 8 CPUs" in err and "accelerators.L4.cpu is 6" in err


# --- The chart's own defaults ------------------------------------------------------------------------


def test_the_chart_passes_helm_lint_strict_with_its_own_defaults(helm: Helm) -> None:
    assert "0 chart(s) failed" in helm.lint([])


def test_the_defaults_are_a_small_cpu_deployment_of_the_local_tiny_intent_model(helm: Helm) -> None:
    """No values file: one tiny model on the CPU image, everything on the head pod, keys from the Secret
    the install steps create; the RayService passes the CRD schema like every rendering above."""
    docs = helm.template()
    jsonschema.validate(one(docs, "RayService"), rayservice_schema("v1"))
    spec = parse_spec(deployed_spec(docs), origin="values.yaml")
    local = load_spec(REPO / "configs/local.yaml")
    assert [m.name for m in spec.models] == ["tiny-intent"]
    assert spec.model("tiny-intent") == local.model("tiny-intent")
    assert worker_groups(docs) == {} and plan(spec) and all(p.gpus_per_replica == 0 for p in plan(spec))
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "4"
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    head = pod_specs(docs)["head"]
    assert {c["image"] for c in containers(head)} == {f"tandem-cpu:{APP_VERSION}"}
    assert head["initContainers"][0]["command"][-2:] == ["--name", "tiny-intent"]
    keys = next(v for v in head["volumes"] if v["name"] == "api-keys")["secret"]
    assert keys["secretName"] == "tandem-api-keys" and secret_names(docs) == ["tandem-salt"]


def test_tiers_next_to_the_default_models_fail_naming_the_tier_and_the_fix(helm: Helm) -> None:
    """A values file that sets tandem.tiers but not tandem.models keeps values.yaml's model list."""
    err = render_error(helm, tandem={"tiers": [{"name": "chat", "model": "llama"}]})
    assert 'tandem.tiers[chat].model is llama, but tandem.models has ["tiny-intent"]' in err
    assert "give tandem.models with your tiers" in err


def test_inline_keys_are_used_instead_of_the_default_existing_secret(helm: Helm) -> None:
    docs = helm.template(set_={"auth": {"keys": KEYS}})
    assert CHART_DEFAULTS["auth"]["existingSecret"] == "tandem-api-keys"
    assert one(docs, "Secret", "tandem-api-keys")["stringData"]["keys.yaml"]
    other = helm.template(set_={"fullnameOverride": "prod", "auth": {"keys": KEYS}})
    volume = next(v for v in pod_specs(other)["head"]["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == one(other, "Secret", "prod-api-keys")["metadata"]["name"]


def test_key_scopes_pass_the_values_schema_and_reach_the_keys_file(helm: Helm, tmp_path: Path) -> None:
    scraper = {"tenant": "prometheus", "sha256": "c" * 64, "scopes": ["metrics"]}
    docs = helm.template(set_={"auth": {"keys": [*KEYS, scraper]}})
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(one(docs, "Secret", "tandem-api-keys")["stringData"]["keys.yaml"])
    scopes = {k.tenant: k.scopes for k in load_keys_file(str(keys_file))}
    assert scopes == {"acme": ["inference"], "batch-jobs": ["inference"], "prometheus": ["metrics"]}
    bad = {"tenant": "x", "sha256": "d" * 64, "scopes": ["admin"]}
    assert "/auth/keys/0/scopes/0" in render_error(helm, auth={"keys": [bad]})


def test_an_operators_key_with_an_allow_list_reaches_the_keys_file(helm: Helm, tmp_path: Path) -> None:
    ops = {"tenant": "ops", "sha256": "e" * 64, "scopes": ["inference", "debug"], "models": ["intent"]}
    docs = helm.template(set_={"auth": {"keys": [*KEYS, ops]}})
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(one(docs, "Secret", "tandem-api-keys")["stringData"]["keys.yaml"])
    (key,) = [k for k in load_keys_file(str(keys_file)) if k.tenant == "ops"]
    assert key.scopes == ["inference", "debug"] and key.models == ["intent"]
    assert "/auth/keys/0/models" in render_error(helm, auth={"keys": [{**ops, "models": []}]})


# --- Hardening: the NetworkPolicy, the pods, the scrape --------------------------------------------

#: Ports with no authentication of their own: the Ray dashboard (its Jobs API runs code) and its agent
#: (the Serve REST API KubeRay deploys through).
RAY_UNAUTHENTICATED_PORTS = (8265, 52365)
#: The load test on (its pods are checked too), with the Secret of its key.
LOADTEST_ON = {"loadtest.enabled": True, "loadtest.apiKeySecret.name": "loadtest-key"}
#: Every rendering above, and each again with the load test on.
HARDENED = RENDERINGS + [(f"{n} + the load test", f, {**s, **LOADTEST_ON}) for n, f, s in RENDERINGS]
#: Where Ray, vLLM and Python write in every Ray container (the images' HOME is /home/ray).
WRITABLE = {"/tmp", "/tmp/ray", "/home/ray/.cache", "/home/ray/.config"}


@pytest.fixture(scope="session")
def hardened(helm: Helm) -> dict[str, list[dict[str, Any]]]:
    return {name: helm.template(files, set_) for name, files, set_ in HARDENED}


def every_pod(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the chart renders: Ray's head and worker groups, the load test's Job and Deployment."""
    pods = {f"ray {k}": v for k, v in pod_specs(docs).items()}
    for d in docs:
        if d["kind"] in ("Job", "Deployment"):
            pods[f"{d['kind']} {d['metadata']['name']}"] = d["spec"]["template"]["spec"]
    return pods


def named_port(rule: dict[str, Any], port: int) -> bool:
    """The rule lists `port` (by number, or `dashboard` for 8265)."""
    names = {8265: "dashboard"}
    return any(p["port"] in (port, names.get(port)) for p in rule.get("ports", []))


@pytest.mark.parametrize("name", [r[0] for r in HARDENED])
def test_every_rule_admitting_the_ray_dashboard_or_agent_admits_named_namespaces_only(
    hardened: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """A rule that lists 8265 or 52365 admits peers by namespace name and label together; a rule for
    every port (Ray inside the release) admits pods of the policy's own namespace only (a podSelector
    without namespaceSelector). `namespaceSelector: {}` would be any namespace."""
    policies = [d for d in hardened[name] if d["kind"] == "NetworkPolicy"]
    assert policies
    explicit = 0
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if not any(named_port(rule, p) for p in RAY_UNAUTHENTICATED_PORTS) and "ports" in rule:
                continue
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule open to every source"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, peer
                selector = peer.get("namespaceSelector")
                if "ports" not in rule and selector is None:
                    assert "podSelector" in peer  # the policy's namespace
                    continue
                assert selector and (selector.get("matchExpressions") or selector.get("matchLabels")), peer
                assert "podSelector" in peer, peer  # and the operator's labels
                explicit += 1
    assert explicit == 1  # the KubeRay operator's rule


def test_the_operator_is_admitted_from_kuberay_system_by_default_and_from_the_namespaces_given(
    helm: Helm,
) -> None:
    def operator_peer(docs: list[dict[str, Any]]) -> dict[str, Any]:
        (rule,) = [r for r in one(docs, "NetworkPolicy")["spec"]["ingress"] if named_port(r, 52365)]
        (peer,) = rule["from"]
        return peer

    peer = operator_peer(helm.template())
    assert peer == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
        "namespaceSelector": {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["kuberay-system"]}
            ]
        },
    }
    peer = operator_peer(helm.template(set_={"networkPolicy.operator.namespaces": ["ray-system", "ops"]}))
    assert peer["namespaceSelector"]["matchExpressions"][0]["values"] == ["ray-system", "ops"]


def test_no_operator_namespace_fails_the_render_naming_the_value(helm: Helm) -> None:
    err = render_error(helm, **{"networkPolicy.operator.namespaces": []})
    assert "networkPolicy.operator.namespaces is empty" in err
    assert "networkPolicy.operator.namespaces: [kuberay-system]" in err
    off = helm.template(set_={"networkPolicy.operator.namespaces": [], "networkPolicy.enabled": False})
    assert "NetworkPolicy" not in kinds(off)


def test_the_readme_says_the_ray_dashboard_and_agent_have_no_authentication() -> None:
    text = " ".join((CHART / "README.md").read_text().split())
    assert "the Ray dashboard (8265) and its agent (52365) have no authentication" in text
    assert "networkPolicy.operator.namespaces" in text and "rayTokenAuth" in text


@pytest.mark.parametrize("name", [r[0] for r in HARDENED])
def test_every_container_runs_as_non_root_without_privileges_on_a_read_only_root(
    hardened: dict[str, list[dict[str, Any]]], name: str
) -> None:
    docs = hardened[name]
    pods = every_pod(docs)
    assert any(k.startswith("Job") for k in pods) == name.endswith("the load test")
    for where, pod in pods.items():
        pod_sc = pod["securityContext"]
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod_sc["runAsUser"] == 1000 and pod_sc.get("runAsGroup", 1000) == 1000, where
        for c in containers(pod):
            sc = c["securityContext"]
            assert {**pod_sc, **sc}["runAsNonRoot"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert "ALL" in sc["capabilities"]["drop"], (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
    # KubeRay's autoscaler sidecar (not in the pod template) gets the same context.
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    if cluster["enableInTreeAutoscaling"]:
        sidecar = cluster["autoscalerOptions"]["securityContext"]
        assert sidecar["readOnlyRootFilesystem"] is True and "ALL" in sidecar["capabilities"]["drop"]
        assert sidecar["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("name", [r[0] for r in HARDENED])
def test_only_the_head_pod_with_the_autoscaler_mounts_a_service_account_token(
    hardened: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """KubeRay runs the head under the autoscaler's ServiceAccount (pods, RayCluster patch rights) when it
    injects the autoscaler sidecar, which needs the token; nothing else calls the API server."""
    docs = hardened[name]
    autoscaler = one(docs, "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    for where, pod in every_pod(docs).items():
        if where == "ray head" and autoscaler:
            assert "automountServiceAccountToken" not in pod
        else:
            assert pod["automountServiceAccountToken"] is False, where


@pytest.mark.parametrize("name", [r[0] for r in HARDENED])
def test_what_the_containers_write_is_on_writable_volumes(
    hardened: dict[str, list[dict[str, Any]]], name: str
) -> None:
    """With the root filesystem read-only: every Ray container has emptyDirs at /tmp, /tmp/ray and the
    HOME caches, every mount names a volume of its pod, and the spec's own paths (the SQLite store, the
    local models) are on mounted volumes of the pods that use them."""
    docs = hardened[name]
    spec = parse_spec(deployed_spec(docs))
    for where, pod in every_pod(docs).items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in containers(pod):
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert len(mounts) == len(c.get("volumeMounts", [])), (where, c["name"], "a path twice")
            assert set(mounts.values()) <= set(volumes), (where, c["name"])
            if not where.startswith("ray"):
                assert "emptyDir" in volumes[mounts["/tmp"]], where
                continue
            assert WRITABLE <= set(mounts), (where, c["name"])
            for path in WRITABLE:
                assert "emptyDir" in volumes[mounts[path]], (where, path)
            # KubeRay's name for Ray's session volume: its autoscaler sidecar shares this one.
            assert mounts["/tmp/ray"] == "ray-logs"
        ray = pod["containers"][0]
        paths = [m["mountPath"] for m in ray.get("volumeMounts", [])]
        if where == "ray head" and spec.sessions.enabled and spec.sessions.store.kind == "sqlite":
            store = Path(spec.sessions.store.path).parent
            assert any(store.is_relative_to(p) for p in paths), store
        if where.startswith("ray") and any(m.source.startswith("local:") for m in spec.models):
            assert spec.model_dir in paths and spec.model_dir in [
                m["mountPath"] for m in pod["initContainers"][0]["volumeMounts"]
            ]


def test_the_autoscaler_sidecar_shares_the_heads_writable_directories(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"])
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    sidecar = {m["mountPath"]: m["name"] for m in cluster["autoscalerOptions"]["volumeMounts"]}
    head = pod_specs(docs)["head"]
    ray = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert WRITABLE <= set(sidecar) and {p: ray[p] for p in sidecar} == sidecar
    assert sidecar["/tmp/ray"] == "ray-logs"  # Ray's session: the autoscaler's events reach the head


def test_nixl_over_rdma_adds_ipc_lock_and_keeps_the_rest(helm: Helm) -> None:
    """The documented opt-out: a capability added, every other setting (drop ALL) kept by Helm's merge."""
    rdma = {"capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}
    docs = helm.template(["values-8b-70b.yaml"], {"containerSecurityContext": rdma})
    for pod in pod_specs(docs).values():
        for c in containers(pod):
            assert c["securityContext"]["capabilities"] == rdma["capabilities"]
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "IPC_LOCK" in (CHART / "values.yaml").read_text()


def test_a_volume_of_ones_own_at_a_writable_path_replaces_that_directory(helm: Helm) -> None:
    weights = {
        "extraVolumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": "hf-cache"}}],
        "extraVolumeMounts": [{"name": "weights", "mountPath": "/home/ray/.cache"}],
    }
    docs = helm.template(["values-8b-70b.yaml"], weights)
    for pod in pod_specs(docs).values():
        assert "home-cache" not in {v["name"] for v in pod["volumes"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/home/ray/.cache"]
        assert mount["name"] == "weights"
    clash = {"extraVolumes": [{"name": "tmp", "emptyDir": {"medium": "Memory"}}]}
    err = render_error(helm, ["values-8b-70b.yaml"], **clash)
    assert "extraVolumes has a volume tmp, the name of the writable directory writableDirs.tmp" in err


def test_ray_token_auth_is_off_by_default_and_asks_kuberay_for_a_token(helm: Helm) -> None:
    cluster = one(helm.template(), "RayService")["spec"]["rayClusterConfig"]
    assert "authOptions" not in cluster
    on = one(helm.template(set_={"rayTokenAuth": True}), "RayService")
    assert on["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    jsonschema.validate(on, rayservice_schema("v1"))


def test_the_ingress_metrics_scrape_sends_a_metrics_key_and_needs_one_while_auth_is_on(helm: Helm) -> None:
    scrape = {"monitoring": {"enabled": True, "ingressMetrics": {"enabled": True}}}
    err = render_error(helm, ["values-8b-70b.yaml"], **scrape)
    assert "monitoring.metricsKeySecret.name is required when monitoring.ingressMetrics.enabled" in err
    assert "tandem key new --tenant prometheus --scope metrics" in err
    keyed = {"monitoring.metricsKeySecret": {"name": "prom-key", "key": "token"}}
    docs = helm.template(["values-8b-70b.yaml"], {**scrape, **keyed})
    (endpoint,) = one(docs, "PodMonitor", "tandem-ingress")["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("serve", "/metrics")
    bearer = {"type": "Bearer", "credentials": {"name": "prom-key", "key": "token"}}
    assert endpoint["authorization"] == bearer
    # Ray's own metrics port has no key to send.
    assert "authorization" not in one(docs, "PodMonitor", "tandem")["spec"]["podMetricsEndpoints"][0]
    # Auth off: /metrics is open, nothing to send.
    open_ = {**scrape, "auth": {"enabled": False, "allowRemoteUnauthenticated": True}}
    docs = helm.template(["values-local-cpu.yaml"], open_)
    (endpoint,) = one(docs, "PodMonitor", "tandem-ingress")["spec"]["podMetricsEndpoints"]
    assert "authorization" not in endpoint


# --- Optional objects ------------------------------------------------------------------------------------


def test_monitoring_is_off_by_default_and_brings_a_pod_monitor_and_the_dashboard(helm: Helm) -> None:
    assert not {"PodMonitor", "ConfigMap"} & set(kinds(helm.template(["values-8b-70b.yaml"])))
    docs = helm.template(["values-8b-70b.yaml"], {"monitoring": {"enabled": True}})
    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "interval": "30s"}]
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "tandem",
        "app.kubernetes.io/instance": "tandem",
    }
    dashboard = one(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["tandem.json"]) == json.loads(
        (CHART / "files/dashboards/tandem.json").read_text()
    )


def test_monitoring_toggles_pick_the_pod_monitor_and_dashboard_separately(helm: Helm) -> None:
    only_dashboard = helm.template(
        ["values-8b-70b.yaml"], {"monitoring": {"enabled": True, "podMonitor": {"enabled": False}}}
    )
    assert "PodMonitor" not in kinds(only_dashboard) and "ConfigMap" in kinds(only_dashboard)
    no_dashboard = helm.template(
        ["values-8b-70b.yaml"],
        {
            "monitoring": {
                "enabled": True,
                "dashboard": {"enabled": False},
                "ingressMetrics": {"enabled": True},
                "metricsKeySecret": {"name": "tandem-metrics-key"},
            }
        },
    )
    assert "ConfigMap" not in kinds(no_dashboard)
    ingress = one(no_dashboard, "PodMonitor", "tandem-ingress")
    assert ingress["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert ingress["spec"]["podMetricsEndpoints"][0] | {"interval": None} == {
        "port": "serve",
        "path": "/metrics",
        "interval": None,
        "authorization": {"type": "Bearer", "credentials": {"name": "tandem-metrics-key", "key": "api-key"}},
    }


def test_pod_disruption_budgets_cover_the_head_and_every_gpu_worker_group(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"])
    pdbs = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert pdbs["tandem-head"]["maxUnavailable"] == 0
    assert pdbs["tandem-head"]["selector"]["matchLabels"]["ray.io/node-type"] == "head"
    for group in worker_groups(docs):
        assert pdbs[f"tandem-{group}"]["maxUnavailable"] == 1
        assert pdbs[f"tandem-{group}"]["selector"]["matchLabels"]["ray.io/group"] == group
    assert len(pdbs) == 1 + len(worker_groups(docs))
    off = helm.template(["values-8b-70b.yaml"], {"podDisruptionBudget": {"enabled": False}})
    assert "PodDisruptionBudget" not in kinds(off)


def test_the_network_policy_opens_ray_within_the_release_and_the_api_to_allowed_peers(helm: Helm) -> None:
    docs = helm.template(
        ["values-8b-70b.yaml"],
        {
            "networkPolicy": {
                "serveFrom": {"sameNamespace": False, "namespaces": ["gw"], "cidrs": ["10.1.0.0/16"]}
            }
        },
    )
    policy = one(docs, "NetworkPolicy")["spec"]
    release = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": "tandem"}
    assert policy["podSelector"] == {"matchLabels": release}
    assert policy["policyTypes"] == ["Ingress"]
    internal, serve, operator, metrics = policy["ingress"]
    assert internal == {"from": [{"podSelector": {"matchLabels": release}}]}
    assert serve["ports"] == [{"port": "serve", "protocol": "TCP"}]
    assert serve["from"] == [
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["gw"]}
                ]
            }
        },
        {"ipBlock": {"cidr": "10.1.0.0/16"}},
    ]
    assert operator["from"][0]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}
    }
    assert {p["port"] for p in operator["ports"]} == {"dashboard", 52365}
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    off = helm.template(["values-8b-70b.yaml"], {"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in kinds(off)


def prefix_matches(prefix: str, path: str) -> bool:
    """An Ingress `pathType: Prefix` match: element by element of the /-split path."""
    want = [p for p in prefix.split("/") if p]
    return [p for p in path.split("/") if p][: len(want)] == want


def test_the_ingress_routes_the_openai_api_to_the_kuberay_serve_service_and_nothing_else(
    helm: Helm,
) -> None:
    docs = helm.template(["values-8b-70b.yaml"], ALL_OPTIONS)
    ingress = one(docs, "Ingress")["spec"]
    (rule,) = ingress["rules"]
    (path,) = rule["http"]["paths"]
    assert rule["host"] == "api.example.com"
    assert (path["path"], path["pathType"]) == ("/v1", "Prefix")
    routed = [p["path"] for p in rule["http"]["paths"]]
    for api in ("/v1/models", "/v1/chat/completions", "/v1/responses/r-1/cancel"):
        assert any(prefix_matches(p, api) for p in routed), api
    # Tenant names and bucket levels (/metrics), the API schema, the probe: inside the cluster only.
    for internal in ("/metrics", "/docs", "/redoc", "/openapi.json", "/health", "/v1x"):
        assert not any(prefix_matches(p, internal) for p in routed), internal
    assert path["backend"]["service"] == {"name": "tandem-serve-svc", "port": {"name": "serve"}}
    assert ingress["ingressClassName"] == "nginx"
    assert "Service" not in kinds(docs)  # KubeRay owns the Service; the chart adds none


#: An Ingress, for the cases below.
INGRESS_ON = {"enabled": True, "hosts": ["api.example.com"]}


def ingress_annotations(helm: Helm, **values: Any) -> dict[str, str]:
    return one(helm.template(set_={"ingress": INGRESS_ON, **values}), "Ingress")["metadata"]["annotations"]


def test_the_ingress_body_limit_is_the_specs_max_body_bytes(helm: Helm) -> None:
    """ingress-nginx refuses bodies over 1m by default, long before Tandem's own limit: the chart sets
    its limit to tandem.http.max_body_bytes (the template's default is the spec's)."""
    body = "nginx.ingress.kubernetes.io/proxy-body-size"
    assert HttpSpec().max_body_bytes == 8 * 2**20
    assert ingress_annotations(helm) == {body: "8m"}
    assert ingress_annotations(helm, **{"tandem.http": {"max_body_bytes": 32 * 2**20}})[body] == "32m"
    assert ingress_annotations(helm, **{"tandem.http": {"max_body_bytes": 1_500_000}})[body] == "1500000"
    # The values' annotations are kept, and win over the chart's.
    mine = {body: "4m", "nginx.ingress.kubernetes.io/proxy-buffering": "off"}
    assert ingress_annotations(helm, **{"ingress.annotations": mine}) == mine


def test_the_documented_header_strip_names_the_headers_ray_serve_acts_on(helm: Helm) -> None:
    """Ray Serve's proxy (and a replica behind HAProxy) reads `x-request-disconnect-disabled` (?1: the
    request is not cancelled when the client leaves) and `x-request-timeout-seconds` from the client:
    the example annotation in values.yaml and the README strips exactly those, and passes through."""
    from ray.serve._private import constants

    headers = (
        constants.SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER,
        constants.SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER,
    )
    assert headers == ("x-request-disconnect-disabled", "x-request-timeout-seconds")
    snippet = "more_clear_input_headers " + " ".join(f'"{h}"' for h in headers) + ";"
    assert snippet in (CHART / "values.yaml").read_text()
    assert snippet in (CHART / "README.md").read_text()
    key = "nginx.ingress.kubernetes.io/configuration-snippet"
    annotations = ingress_annotations(helm, **{"ingress.annotations": {key: snippet + "\n"}})
    assert annotations[key] == snippet + "\n"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "8m"


def test_an_ingress_without_hosts_fails_saying_what_to_set(helm: Helm) -> None:
    err = render_error(helm, ["values-8b-70b.yaml"], ingress={"enabled": True})
    assert "ingress.hosts is required when ingress.enabled is true" in err


def test_release_names_are_cut_to_leave_room_for_kuberay_suffixes(helm: Helm) -> None:
    long = "a-very-long-release-name-that-goes-on-and-on"
    text = helm.run("template", long, str(CHART), "-f", str(CHART / "values-8b-70b.yaml"))
    name = one(docs_of(text), "RayService")["metadata"]["name"]
    assert len(name) <= 40 and long.startswith(name)


def test_every_rendered_pod_carries_the_release_selector_labels(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"], {"podLabels": {"team": "llm"}})
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for t in templates:
        labels = t["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "tandem" and labels["team"] == "llm"
    components = [t["metadata"]["labels"]["app.kubernetes.io/component"] for t in templates]
    assert components == ["ray-head"] + ["ray-worker"] * len(cluster["workerGroupSpecs"])


# --- Prompt templates ----------------------------------------------------------------------------------

TEMPLATES_DIR = "/etc/tandem/templates"
LIBRARY_FILE = f"{TEMPLATES_DIR}/library.yaml"


def spec_scopes(docs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The deployed spec's tier and task type names (what a library's bindings may name)."""
    spec = parse_spec(deployed_spec(docs))
    return [t.name for t in spec.tiers], [t.name for t in spec.routing.tasks]


def library_of(docs: list[dict[str, Any]], name: str = "tandem-templates") -> TemplateLibrarySpec:
    """The ConfigMap's library as the ingress reads it (serving.http.templates.parse_library)."""
    text = one(docs, "ConfigMap", name)["data"]["library.yaml"]
    tiers, tasks = spec_scopes(docs)
    return parse_library(text, f"ConfigMap {name}", tiers, tasks)


def test_a_template_library_becomes_a_configmap_mounted_as_a_directory_on_every_ray_container(
    helm: Helm,
) -> None:
    docs = helm.template(set_=MIXED)
    assert library_of(docs) == TemplateLibrarySpec.model_validate(LIBRARY)
    # Only the path reaches the spec: the ingress reads the library from the mounted file.
    assert deployed_spec(docs)["templates"] == {"library_file": LIBRARY_FILE}
    assert parse_spec(deployed_spec(docs)).templates == TemplatesSpec(library_file=LIBRARY_FILE)
    pods = pod_specs(docs)
    assert set(pods) == {"head", "m-colocated"}  # the head and a GPU worker group: the ingress may run on any
    for pod in pods.values():
        volume = next(v for v in pod["volumes"] if v["name"] == "templates")
        assert volume["configMap"] == {
            "name": "tandem-templates",
            "items": [{"key": "library.yaml", "path": "library.yaml"}],
        }
        for c in pod["containers"]:
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "templates"]
            # A directory mount: kubelet never updates a subPath mount, so the library could not reload.
            assert mount == {"name": "templates", "mountPath": TEMPLATES_DIR, "readOnly": True}


def source_text(text: str, template: str) -> str:
    """The text helm rendered from one chart template (its `# Source:` document)."""
    (doc,) = [d for d in text.split("\n---\n") if d.startswith(f"# Source: tandem/templates/{template}\n")]
    return doc


def test_a_change_of_the_library_alone_changes_only_the_configmap(helm: Helm) -> None:
    """`helm upgrade` with another library: serveConfigV2 (whose change redeploys the application) and the
    rest of the RayService stay byte-identical, so nothing restarts; the ingress reloads the new file."""
    other = {
        "templates": [*LIBRARY["templates"], {"name": "classify", "version": 3, "system": "One label."}],
        "bindings": [{"task": "classify", "template": "classify@3"}],
    }
    before = helm.template_text(set_=MIXED)
    after = helm.template_text(set_={**MIXED, "templates": {"library": other}})
    assert source_text(before, "rayservice.yaml") == source_text(after, "rayservice.yaml")
    old, new = docs_of(before), docs_of(after)
    assert one(old, "RayService")["spec"]["serveConfigV2"] == one(new, "RayService")["spec"]["serveConfigV2"]
    assert library_of(old) != library_of(new) == TemplateLibrarySpec.model_validate(other)
    # The chart's cache-salt Secret is random here (no cluster for `lookup`); an upgrade keeps its value.
    changed = [d["metadata"]["name"] for d in new if d not in old and d["metadata"]["name"] != "tandem-salt"]
    assert changed == ["tandem-templates"]


def test_an_existing_configmap_is_mounted_instead_of_the_charts_own(helm: Helm) -> None:
    templates = {"existingConfigMap": "prod-templates", "existingConfigMapKey": "lib.yaml"}
    docs = helm.template(set_={**MIXED, "templates": templates})
    assert "ConfigMap" not in kinds(docs)
    assert deployed_spec(docs)["templates"] == {"library_file": LIBRARY_FILE}
    for pod in pod_specs(docs).values():
        volume = next(v for v in pod["volumes"] if v["name"] == "templates")
        assert volume["configMap"] == {
            "name": "prod-templates",
            "items": [{"key": "lib.yaml", "path": "library.yaml"}],
        }


def test_without_a_library_there_is_no_configmap_mount_or_library_file(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"])
    assert "ConfigMap" not in kinds(docs)
    assert "library_file" not in deployed_spec(docs).get("templates", {})
    for pod in pod_specs(docs).values():
        assert all(v["name"] != "templates" for v in pod["volumes"])


def test_the_spec_keeps_its_own_template_settings_next_to_the_library_file(helm: Helm) -> None:
    docs = helm.template(set_={**MIXED, "tandem": {**MIXED_SPEC, "templates": {"reload_interval_s": 30}}})
    assert deployed_spec(docs)["templates"] == {"library_file": LIBRARY_FILE, "reload_interval_s": 30}


def test_local_cpu_values_carry_the_local_template_library_in_the_configmap(helm: Helm) -> None:
    docs = helm.template(["values-local-cpu.yaml"])
    assert library_of(docs) == load_spec(REPO / "configs/local.yaml").templates.library
    head = pod_specs(docs)["head"]
    assert {"name": "templates", "mountPath": TEMPLATES_DIR, "readOnly": True} in head["containers"][0][
        "volumeMounts"
    ]


def _with_classify(*bindings: dict[str, Any], **template: Any) -> dict[str, Any]:
    """A one-template library (`classify`, plus `template`'s fields) with `bindings`."""
    return {
        "templates": [{"name": "classify", "system": "One label.", **template}],
        "bindings": list(bindings),
    }


# (case, library, what the chart's failure says); serving.http.templates.parse_library refuses each too.
BAD_LIBRARIES = [
    (
        "a binding to a template the library lacks",
        _with_classify({"task": "classify", "template": "extract"}),
        'templates.library.bindings[0].template: "extract" is not in the library; choose from ["classify@1"]',
    ),
    (
        "a binding to a version the library lacks",
        _with_classify({"task": "classify", "template": "classify@2"}),
        'bindings[0].template: "classify@2" is not in the library',
    ),
    (
        "a binding to a task type the spec lacks",
        _with_classify({"task": "poetry", "template": "classify"}),
        'templates.library.bindings[0].task: unknown task type "poetry"; choose from tandem.routing.tasks',
    ),
    (
        "a binding to a tier the spec lacks",
        _with_classify({"task": "classify", "template": "classify"}, {"tier": "slow", "template": "none"}),
        'templates.library.bindings[1].tier: unknown tier "slow"; choose from tandem.tiers ["fast","remote"]',
    ),
    (
        "a binding for no requests",
        _with_classify({"template": "classify"}),
        "templates.library.bindings[0]: a binding needs at least one of tier, task or tenant",
    ),
    (
        "a version given twice",
        {
            "templates": [
                {"name": "classify", "system": "a"},
                {"name": "classify", "version": 1, "system": "b"},
            ]
        },
        "templates.library.templates[1]: classify@1 is defined twice",
    ),
    (
        "a template with nothing to put in",
        _with_classify(system=""),
        "templates.library.templates[0] (classify@1): a template needs a system prompt or few-shot turns",
    ),
    (
        "few-shot turns that start with the assistant",
        _with_classify(few_shot=[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]),
        "templates.library.templates[0].few_shot (classify@1): user/assistant pairs, starting with user",
    ),
    (
        "a few-shot question without its answer",
        _with_classify(few_shot=[{"role": "user", "content": "a"}]),
        "few_shot (classify@1): user/assistant pairs",
    ),
    (
        "a misspelt field (the values schema)",
        {"templates": [{"name": "classify", "sytem": "One label."}]},
        "at '/templates/library/templates/0': additional properties 'sytem' not allowed",
    ),
    (
        "a binding's template that is no name (the values schema)",
        _with_classify({"task": "classify", "template": "Classify!"}),
        "/templates/library/bindings/0/template",
    ),
]


@pytest.mark.parametrize(("case", "library", "message"), BAD_LIBRARIES, ids=[c[0] for c in BAD_LIBRARIES])
def test_a_bad_library_fails_at_render_time_as_the_ingress_would_refuse_it(
    helm: Helm, case: str, library: dict[str, Any], message: str
) -> None:
    err = render_error(helm, **{**MIXED, "templates": {"library": library}})
    assert message in err
    tiers, tasks = spec_scopes(helm.template(set_=MIXED))
    with pytest.raises(LibraryError):
        parse_library(yaml.safe_dump(library), case, tiers, tasks)


def test_the_library_checks_accept_what_the_ingress_accepts(helm: Helm) -> None:
    """The other side of BAD_LIBRARIES: pins, `none`, a tenant override and inject: never render."""
    library = {
        "templates": [
            {"name": "classify", "system": "One label."},
            {
                "name": "classify",
                "version": 2,
                "few_shot": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            },
            {"name": "off", "inject": "never"},
        ],
        "bindings": [
            {"task": "classify", "template": "classify@2"},
            {"tier": "remote", "template": "classify"},
            {"tenant": "acme", "task": "classify", "template": "none"},
            {"tenant": "batch-jobs", "template": "off"},
        ],
    }
    docs = helm.template(set_={**MIXED, "templates": {"library": library}})
    assert library_of(docs) == TemplateLibrarySpec.model_validate(library)


def test_a_library_file_of_the_spec_fails_even_without_the_values_schema(helm: Helm) -> None:
    """The schema refuses tandem.templates.library_file (the owned-fields test); the template says what
    to set instead, also for `helm template --skip-schema-validation`."""
    values = str(CHART / "values-local-cpu.yaml")
    owned = "tandem.templates.library_file=/etc/library.yaml"
    with pytest.raises(HelmError) as err:
        helm.run("template", RELEASE, str(CHART), "--skip-schema-validation", "-f", values, "--set", owned)
    if "unknown flag" in str(err.value):
        pytest.skip("this helm has no --skip-schema-validation (helm 3.16+)")
    assert "tandem.templates.library_file is set by the chart: put the library in templates.library" in (
        str(err.value)
    )


def test_a_spec_library_next_to_the_charts_is_refused(helm: Helm) -> None:
    tandem = {**MIXED_SPEC, "templates": {"library": LIBRARY}}
    err = render_error(helm, **{**MIXED, "tandem": tandem})
    assert "tandem.templates.library and the chart's templates.library" in err
    assert "keep the library in templates.library only" in err


def test_a_library_and_an_existing_configmap_together_are_refused(helm: Helm) -> None:
    err = render_error(helm, **{**MIXED, "templates": {"library": LIBRARY, "existingConfigMap": "mine"}})
    assert "templates.library and templates.existingConfigMap are both set" in err


# --- External OpenAI-compatible servers (engine: openai) ---------------------------------------------


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_an_upstream_key_reaches_every_ray_container_from_its_secret(helm: Helm) -> None:
    docs = helm.template(set_=MIXED)
    pods = pod_specs(docs)
    assert len(pods) == 2
    for pod in pods.values():
        for c in pod["containers"]:
            assert env_of(c)["VLLM_API_KEY"] == {
                "name": "VLLM_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "vllm-api-key", "key": "api-key"}},
            }
    ext = parse_spec(deployed_spec(docs)).model("ext").pools[0]
    assert ext.upstream is not None and ext.upstream.api_key_env == "VLLM_API_KEY"


def test_an_upstream_key_without_a_secret_fails_naming_the_pool_and_the_fix(helm: Helm) -> None:
    err = render_error(helm, **{**MIXED, "upstreamSecrets": []})
    assert "tandem.models[ext].pools[colocated].upstream.api_key_env is VLLM_API_KEY" in err
    assert "add {env: VLLM_API_KEY, secretName: upstream-key, secretKey: api-key} to upstreamSecrets" in err


def test_an_upstream_key_may_come_from_extra_env_instead(helm: Helm) -> None:
    env = {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "shared", "key": "vllm"}}}
    docs = helm.template(set_={**MIXED, "upstreamSecrets": [], "extraEnv": [env]})
    for pod in pod_specs(docs).values():
        assert env_of(pod["containers"][0])["VLLM_API_KEY"] == env


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"upstreamSecrets": UPSTREAM_SECRETS * 2}, "upstreamSecrets names VLLM_API_KEY twice"),
        (
            {"extraEnv": [{"name": "VLLM_API_KEY", "value": "x"}]},
            "VLLM_API_KEY is set by both upstreamSecrets and extraEnv",
        ),
        ({"upstreamSecrets": [{"env": "VLLM_API_KEY", "secretName": "k"}]}, "missing property 'secretKey'"),
        (
            {"upstreamSecrets": [{"env": "VLLM-KEY", "secretName": "k", "secretKey": "api-key"}]},
            "/upstreamSecrets/0/env",
        ),
    ],
    ids=["twice", "also in extraEnv", "no secretKey", "not a variable name"],
)
def test_upstream_secrets_that_cannot_work_are_refused(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    assert message in render_error(helm, **{**MIXED, **values})


def test_external_pools_get_no_worker_group_whatever_their_accelerator(helm: Helm) -> None:
    """No Ray replicas, so no pods: placement leaves the pool out, and so does the chart."""
    ext = {**EXTERNAL_POOL, "accelerator": "H100"}
    tandem = {
        **MIXED_SPEC,
        "models": [MIXED_SPEC["models"][0], {"name": "ext", "source": "org/ext", "pools": [ext]}],
    }
    docs = helm.template(set_={**MIXED, "tandem": tandem})
    gpu = [p for p in plan(parse_spec(deployed_spec(docs))) if p.gpus_per_replica > 0]
    assert sorted(worker_groups(docs)) == sorted(group_name(p) for p in gpu) == ["m-colocated"]
    pdbs = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdbs == ["tandem-head", "tandem-m-colocated"]


def test_a_spec_of_external_servers_only_runs_on_the_head_and_needs_its_cpus(helm: Helm) -> None:
    tandem = {"models": [MIXED_SPEC["models"][1]], "sessions": {"enabled": False}}
    values = {**MIXED, "tandem": tandem, "templates": {}}
    err = render_error(helm, **values, **{"head.numCpus": 0})
    assert "this spec has no GPU pools" in err and "head.numCpus is 0" in err
    docs = helm.template(set_={**values, "head": {"numCpus": 2}})
    assert worker_groups(docs) == {}
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert "workerGroupSpecs" not in cluster and cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "2"
    # Left null, the head offers Ray its CPU limit (everything runs there).
    auto = one(helm.template(set_=values), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert auto["rayStartParams"]["num-cpus"] == CHART_DEFAULTS["head"]["resources"]["limits"]["cpu"] == "4"


def readme_example(heading: str) -> dict[str, Any]:
    """The first ```yaml block of the chart README's section `heading`."""
    text = (CHART / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_the_readmes_external_server_example_renders_with_its_key_from_the_secret(
    helm: Helm, tmp_path: Path
) -> None:
    values = tmp_path / "external.yaml"
    values.write_text(yaml.safe_dump(readme_example("External OpenAI-compatible servers")))
    docs = helm.template([str(values)])
    spec = parse_spec(deployed_spec(docs))
    (pool,) = spec.model("llama-3-1-8b").pools
    assert pool.upstream is not None and pool.upstream.api_key_env == "VLLM_API_KEY"
    assert worker_groups(docs) == {} and plan(spec) == []
    (container,) = pod_specs(docs)["head"]["containers"]
    assert env_of(container)["VLLM_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "vllm-api-key", "key": "api-key"}
    }


def test_egress_is_left_open_so_the_ingress_reaches_external_servers(helm: Helm) -> None:
    """The README says so instead of offering an egress value: the policy restricts ingress only."""
    policy = one(helm.template(set_=MIXED), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"] and "egress" not in policy
    assert "egress is open" in (CHART / "README.md").read_text()
