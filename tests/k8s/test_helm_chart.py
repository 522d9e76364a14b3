"""The Helm chart (helm/tandem): lint, render, validate what it renders, and unit cases named as sentences.

Rendered objects are checked by yamllint, by kubernetes-validate (built-in kinds), by the KubeRay CRD's
schema made strict on unknown fields (the RayService), and the embedded serveConfigV2 by Ray Serve's own
schema and Tandem's spec parser. helm comes from PATH, else from ../shared/tools/install-helm.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from yamllint import linter

from serving.config import (
    DATA_PLANE_ENV,
    DataPlane,
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
    "monitoring": {"enabled": True, "ingressMetrics": {"enabled": True}},
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
RENDERINGS = [(f, [f], {}) for f in VALUES_FILES] + [
    ("values-8b-70b.yaml + every option", ["values-8b-70b.yaml"], ALL_OPTIONS),
    (
        "values-local-cpu.yaml + inline keys",
        ["values-local-cpu.yaml"],
        {"auth": {"existingSecret": "", "keys": KEYS}},
    ),
    ("a gpu pool, an external server and a template library", [], MIXED),
]
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
    docs = helm.template(["values-8b-70b.yaml"], {"image": {"digest": digest}})
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
    assert [k.model_dump() for k in load_keys_file(str(keys_file))] == KEYS
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
    assert "Secret" not in kinds(docs)
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
    assert "Secret" not in kinds(docs)
    assert all(v["name"] != "api-keys" for v in pod_specs(docs)["head"]["volumes"])


def test_the_redis_url_reaches_every_ray_container_from_the_named_secret(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"])
    for pod in pod_specs(docs).values():
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["TANDEM_REDIS_URL"]["valueFrom"] == {
            "secretKeyRef": {"name": "tandem-redis", "key": "url"}
        }


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
    err = render_error(helm, auth={"keys": KEYS})
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


def test_the_ingress_routes_every_path_to_the_kuberay_serve_service(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"], ALL_OPTIONS)
    ingress = one(docs, "Ingress")["spec"]
    (rule,) = ingress["rules"]
    (path,) = rule["http"]["paths"]
    assert rule["host"] == "api.example.com"
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    assert path["backend"]["service"] == {"name": "tandem-serve-svc", "port": {"name": "serve"}}
    assert ingress["ingressClassName"] == "nginx"
    assert "Service" not in kinds(docs)  # KubeRay owns the Service; the chart adds none


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
    changed = [d["metadata"]["name"] for d in new if d not in old]
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
    err = render_error(helm, **values)
    assert "this spec has no GPU pools" in err and "head.numCpus is 0" in err
    docs = helm.template(set_={**values, "head": {"numCpus": 2}})
    assert worker_groups(docs) == {}
    assert "workerGroupSpecs" not in one(docs, "RayService")["spec"]["rayClusterConfig"]


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
