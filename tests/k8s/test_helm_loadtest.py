"""The chart's load test (`loadtest.enabled`): a Locust master Job with its Service, the worker Deployment,
the workload ConfigMap and their NetworkPolicies, rendered and checked; and the values schema of the
workload file, which comes from loadtests.workload.WorkloadFile so that a misspelt workload field fails at
`helm install`:

    python -m tests.k8s.test_helm_loadtest --write-schema
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter

from loadtests.workload import WorkloadFile, parse_workload
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
    drop_titles,
    find_helm,
    kinds,
    one,
    schema_text,
)

CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
APP_VERSION, CHART_VERSION = CHART_META["appVersion"], CHART_META["version"]
CHART_DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
DEFAULT_WORKLOAD = CHART_DEFAULTS["loadtest"]["workload"]
#: The load test on, with the Secret of its API key (the values files keep auth on).
ON = {"loadtest": {"enabled": True, "apiKeySecret": {"name": "loadtest-key", "key": "token"}}}
LOADTEST_KINDS = {"ConfigMap", "Deployment", "Job", "Service"}
RELEASE_LABELS = {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/instance": RELEASE}
RELEASE_SELECTOR = {"matchLabels": RELEASE_LABELS}
WORKLOAD_PATH = "/etc/tandem-loadtest/workload.yaml"
#: Prefix of the values schema's definitions generated from the workload file's models.
WORKLOAD_DEF_PREFIX = "loadtest"


@pytest.fixture(scope="session")
def helm() -> Helm:
    return Helm(find_helm())


def leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Values as dotted paths to their leaves, for --set-json (which replaces a map given whole, where a
    values file merges into it). A workload is given whole: it replaces the default one."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and key != "workload":
            out |= leaves(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def lt_values(**loadtest: Any) -> dict[str, Any]:
    """The load test on (its key's Secret named) plus `loadtest`, as --set-json paths."""
    return leaves({"loadtest": {**ON["loadtest"], **loadtest}})


def render(helm: Helm, files: tuple[str, ...] = ("values-8b-70b.yaml",), **loadtest: Any) -> list[dict]:
    """The chart with the load test on plus `loadtest` values."""
    return helm.template(list(files), lt_values(**loadtest))


def render_error(helm: Helm, files: tuple[str, ...] = ("values-8b-70b.yaml",), **values: Any) -> str:
    with pytest.raises(HelmError) as err:
        helm.template(list(files), leaves(values))
    return str(err.value)


def unchecked_error(helm: Helm, **loadtest: Any) -> str:
    """The error of a rendering that skips the values schema: the chart's own checks behind it."""
    args = [a for k, v in lt_values(**loadtest).items() for a in ("--set-json", f"{k}={json.dumps(v)}")]
    with pytest.raises(HelmError) as err:
        helm.run(
            "template", RELEASE, str(CHART), "-f", str(CHART / "values-8b-70b.yaml"),
            "--skip-schema-validation", *args,
        )  # fmt: skip
    return str(err.value)


def loadtest_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if "loadtest" in d["metadata"]["name"]]


def job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Job")


def master_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return job(docs)["spec"]["template"]["spec"]


def worker_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def flag(args: list[str], name: str) -> str:
    """The value after `name` in an argument list."""
    return args[args.index(name) + 1]


def deployed_workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", "tandem-loadtest")["data"]["workload.yaml"])


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def pod_labels(docs: list[dict[str, Any]], kind: str) -> dict[str, str]:
    """Labels of the pods of the load test's Job or Deployment."""
    return one(docs, kind)["spec"]["template"]["metadata"]["labels"]


def component_in(*components: str) -> dict[str, Any]:
    return {"key": "app.kubernetes.io/component", "operator": "In", "values": list(components)}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) selects these labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def install_notes(helm: Helm, set_: dict[str, Any]) -> str:
    """NOTES.txt of a client-side dry-run install of values-8b-70b.yaml with `set_`."""
    args = [a for k, v in set_.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]
    out = helm.run(
        "install", RELEASE, str(CHART), "--dry-run=client", "-f", str(CHART / "values-8b-70b.yaml"), *args
    )
    return out.split("\nNOTES:\n", 1)[1]


# --- On and off ----------------------------------------------------------------------------------------


def test_the_load_test_is_off_by_default_and_renders_nothing(helm: Helm) -> None:
    assert CHART_DEFAULTS["loadtest"]["enabled"] is False
    for values_file in VALUES_FILES:
        docs = helm.template([values_file])
        assert loadtest_docs(docs) == []
        assert not {"Job", "Deployment"} & set(kinds(docs))


def test_on_it_adds_a_configmap_a_master_job_and_service_a_worker_deployment_and_policies(helm: Helm) -> None:
    docs = render(helm)
    ours = loadtest_docs(docs)
    assert sorted(d["kind"] for d in ours) == sorted([*LOADTEST_KINDS, "NetworkPolicy", "NetworkPolicy"])
    names = {(d["kind"], d["metadata"]["name"]) for d in ours if d["kind"] != "Job"}
    assert names == {
        ("ConfigMap", "tandem-loadtest"),
        ("Service", "tandem-loadtest-master"),
        ("Deployment", "tandem-loadtest-worker"),
        ("NetworkPolicy", "tandem-loadtest-master"),
        ("NetworkPolicy", "tandem-loadtest-worker"),
    }
    assert re.fullmatch(r"tandem-loadtest-[0-9a-f]{8}", job(docs)["metadata"]["name"])
    for d in ours:
        labels = d["metadata"]["labels"]
        assert labels["helm.sh/chart"] == f"tandem-{CHART_VERSION}"
        assert labels.items() >= RELEASE_LABELS.items()
        assert labels["app.kubernetes.io/component"].startswith("loadtest")


def test_no_load_test_network_policy_when_network_policies_are_off(helm: Helm) -> None:
    docs = helm.template(["values-8b-70b.yaml"], {**lt_values(), "networkPolicy.enabled": False})
    assert "NetworkPolicy" not in kinds(docs)
    assert LOADTEST_KINDS <= set(kinds(docs))


# --- Validation ----------------------------------------------------------------------------------------

#: (name, values file, loadtest values) of the renderings the validators check.
RENDERINGS = [
    ("defaults", "values-8b-70b.yaml", {}),
    (
        "claim and ttl",
        "values-8b-70b.yaml",
        {"results": {"existingClaim": "lt"}, "ttlSecondsAfterFinished": 600},
    ),
    ("own image", "values-8b-70b.yaml", {"image": {"repository": "reg/lt", "tag": "0.1.0-lt"}, "workers": 5}),
    ("local cpu", "values-local-cpu.yaml", {}),
]


@pytest.mark.parametrize(
    ("values_file", "loadtest"), [r[1:] for r in RENDERINGS], ids=[r[0] for r in RENDERINGS]
)
def test_what_it_renders_is_valid_kubernetes_and_passes_yamllint(
    helm: Helm, values_file: str, loadtest: dict[str, Any]
) -> None:
    text = helm.template_text([values_file], lt_values(**loadtest))
    problems = [f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(text, YAMLLINT)]
    assert problems == []
    docs = [d for d in yaml.safe_load_all(text) if d]
    checked = [d for d in docs if d["kind"] in BUILTIN_KINDS | {"Job"}]
    assert {"Job", "Deployment", "Service", "ConfigMap"} <= set(kinds(checked))
    for doc in checked:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_helm_lint_strict_passes_with_the_load_test_on(helm: Helm, values_file: str, tmp_path: Path) -> None:
    on = tmp_path / "loadtest.yaml"
    on.write_text(yaml.safe_dump(ON))
    assert "0 chart(s) failed" in helm.lint([values_file, str(on)])


# --- The master ----------------------------------------------------------------------------------------


def test_the_master_job_runs_once_against_the_serve_service_and_waits_for_the_workers(helm: Helm) -> None:
    docs = render(helm)
    spec = job(docs)["spec"]
    assert spec["backoffLimit"] == 0
    assert "ttlSecondsAfterFinished" not in spec  # null: kept until the load test is turned off
    pod = master_pod(docs)
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["args"] == [
        "python", "-m", "loadtests", "run",
        "--workload", WORKLOAD_PATH,
        "--host", "http://tandem-serve-svc:8000",
        "--out", "/results",
        "--expect-workers", "2",
        "--master-bind-port", "5557",
        "--wait-s", "900",
    ]  # fmt: skip
    # The runner's own parser takes exactly these arguments.
    from loadtests.run import build_parser

    parsed = build_parser().parse_args(c["args"][3:])
    assert (parsed.expect_workers, parsed.wait_s, parsed.host) == (2, 900.0, "http://tandem-serve-svc:8000")
    assert c["ports"] == [{"name": "locust", "containerPort": 5557, "protocol": "TCP"}]
    assert c["image"] == f"tandem:{APP_VERSION}" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["workingDir"] == "/home/ray/tandem"
    assert c["resources"] == CHART_DEFAULTS["loadtest"]["resources"]["master"]


def test_the_default_host_is_the_kuberay_serve_service_on_the_spec_port(helm: Helm) -> None:
    docs = helm.template(
        ["values-8b-70b.yaml"], {**lt_values(), "tandem.server.port": 9000, "fullnameOverride": "llm"}
    )
    (c,) = master_pod(docs)["containers"]
    assert flag(c["args"], "--host") == "http://llm-serve-svc:9000"
    (c,) = master_pod(render(helm, host="https://tandem.example.com"))["containers"]
    assert flag(c["args"], "--host") == "https://tandem.example.com"
    assert "/loadtest/host" in render_error(helm, loadtest={**ON["loadtest"], "host": "tandem:8000"})


def test_the_master_runs_its_arguments_then_keeps_the_report_for_kubectl_cp(helm: Helm) -> None:
    (c,) = master_pod(render(helm, results={"keepSeconds": 120}))["containers"]
    assert c["command"][:2] == ["sh", "-c"] and c["command"][3:] == ["loadtest-master"]
    script = c["command"][2]
    assert script.startswith('"$@" &') and script.rstrip().endswith('exit "$rc"')
    assert "sleep 120 & wait $!" in script
    shlex.split(script)  # balanced quotes


def test_the_master_service_selects_the_master_pod_on_the_locust_port(helm: Helm) -> None:
    docs = render(helm)
    svc = one(docs, "Service", "tandem-loadtest-master")["spec"]
    assert svc["ports"] == [{"name": "locust", "port": 5557, "targetPort": "locust", "protocol": "TCP"}]
    assert svc["selector"] == {**RELEASE_LABELS, "app.kubernetes.io/component": "loadtest-master"}
    assert selects({"matchLabels": svc["selector"]}, pod_labels(docs, "Job"))
    assert not selects({"matchLabels": svc["selector"]}, pod_labels(docs, "Deployment"))


def test_the_job_deadline_follows_the_duration_and_the_keep_time_unless_set(helm: Helm) -> None:
    assert job(render(helm))["spec"]["activeDeadlineSeconds"] == 120 + 900 + 3600
    workload = {**DEFAULT_WORKLOAD, "duration_s": 30.5}
    short = job(render(helm, workload=workload, results={"keepSeconds": 0}))["spec"]
    assert short["activeDeadlineSeconds"] == 31 + 900
    assert job(render(helm, activeDeadlineSeconds=7200))["spec"]["activeDeadlineSeconds"] == 7200


def test_a_deadline_shorter_than_the_run_fails_saying_what_to_set(helm: Helm) -> None:
    err = render_error(helm, loadtest={**ON["loadtest"], "activeDeadlineSeconds": 600})
    assert "loadtest.activeDeadlineSeconds is 600" in err and "is 3720" in err and "leave it 0" in err


def test_the_job_name_changes_with_the_run_so_an_upgrade_starts_a_new_job(helm: Helm) -> None:
    """A Job's pod template cannot change: its name carries a hash of its spec (and of the workload)."""
    name = job(render(helm))["metadata"]["name"]
    assert job(helm.template(["values-8b-70b.yaml"], lt_values()))["metadata"]["name"] == name
    others = {
        job(render(helm, workload={**DEFAULT_WORKLOAD, "duration_s": 60}))["metadata"]["name"],
        job(render(helm, workers=3))["metadata"]["name"],
        job(render(helm, host="http://other:8000"))["metadata"]["name"],
    }
    assert name not in others and len(others) == 3
    long = helm.template(["values-8b-70b.yaml"], {**lt_values(), "fullnameOverride": "x" * 60})
    assert len(job(long)["metadata"]["name"]) <= 63
    # A new run gets fresh workers, which connect to its master.
    annotations = one(render(helm), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["tandem.io/loadtest-run"] == name


def test_results_go_to_an_emptydir_or_a_directory_per_run_on_a_claim(helm: Helm) -> None:
    volumes = {v["name"]: v for v in master_pod(render(helm))["volumes"]}
    assert volumes["results"] == {"name": "results", "emptyDir": {}}
    docs = render(helm, results={"existingClaim": "lt-results", "keepSeconds": 0}, ttlSecondsAfterFinished=60)
    pod = master_pod(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["results"]["persistentVolumeClaim"] == {"claimName": "lt-results"}
    (c,) = pod["containers"]
    assert {"name": "results", "mountPath": "/results"} in c["volumeMounts"]
    assert flag(c["args"], "--out") == f"/results/{job(docs)['metadata']['name']}"
    assert job(docs)["spec"]["ttlSecondsAfterFinished"] == 60


# --- The workers ---------------------------------------------------------------------------------------


def test_the_workers_connect_to_the_master_service_from_the_source_directory(helm: Helm) -> None:
    docs = render(helm, workers=4)
    deployment = one(docs, "Deployment", "tandem-loadtest-worker")["spec"]
    assert deployment["replicas"] == 4
    assert flag(master_pod(docs)["containers"][0]["args"], "--expect-workers") == "4"
    (c,) = worker_pod(docs)["containers"]
    assert c["command"] == [
        "locust", "-f", "loadtests/locustfile.py", "--worker",
        "--master-host", "tandem-loadtest-master", "--master-port", "5557",
    ]  # fmt: skip
    assert flag(c["command"], "--master-host") == one(docs, "Service")["metadata"]["name"]
    assert c["workingDir"] == values_of("values-8b-70b.yaml")["loadtest"]["workingDir"] == "/home/ray/tandem"
    assert deployment["selector"]["matchLabels"] == {
        **RELEASE_LABELS,
        "app.kubernetes.io/component": "loadtest-worker",
    }
    assert selects(deployment["selector"], pod_labels(docs, "Deployment"))
    assert c["resources"] == CHART_DEFAULTS["loadtest"]["resources"]["workers"]


def values_of(values_file: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / values_file).read_text())


def test_the_working_directories_are_where_the_images_keep_the_sources() -> None:
    """The CPU image (the chart's default, values-local-cpu.yaml) and the CUDA one (the GPU values files)
    keep serving/ apart; each values file names its image's."""
    images = {"tandem-cpu": "Dockerfile.cpu", "tandem": "Dockerfile.cuda"}
    files = {"values.yaml": CHART_DEFAULTS} | {f: values_of(f) for f in VALUES_FILES}
    for name, values in files.items():
        repository = values.get("image", {}).get("repository", CHART_DEFAULTS["image"]["repository"])
        working_dir = values.get("loadtest", {}).get("workingDir", CHART_DEFAULTS["loadtest"]["workingDir"])
        assert source_dir(REPO / "docker" / images[repository]) == working_dir, name


def source_dir(dockerfile: Path) -> str:
    """The WORKDIR that a Dockerfile copies serving/ into (`COPY ... serving ./serving`)."""
    workdir = ""
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["WORKDIR"]:
            workdir = words[1]
        elif words[:1] == ["COPY"] and words[-2:] == ["serving", "./serving"]:
            return workdir
    raise AssertionError(f"{dockerfile} copies no serving/")


def test_the_cpu_values_run_the_load_test_from_the_cpu_images_source_directory(helm: Helm) -> None:
    docs = render(helm, ("values-local-cpu.yaml",))
    for pod in (master_pod(docs), worker_pod(docs)):
        (c,) = pod["containers"]
        assert c["workingDir"] == "/opt/tandem/src"
        assert c["image"] == f"tandem-cpu:{APP_VERSION}"


def test_the_workers_build_the_default_tokenizer_unless_the_workload_names_one(helm: Helm) -> None:
    pod = worker_pod(render(helm))
    (init,) = pod["initContainers"]
    assert init["command"] == [
        "tandem", "model", "build", "--dir", "/var/lib/tandem-loadtest/models", "--name", "tiny-intent",
    ]  # fmt: skip
    assert "TANDEM_API_KEY" not in env_of(init)
    (c,) = pod["containers"]
    assert env_of(c)["TANDEM_MODEL_DIR"]["value"] == "/var/lib/tandem-loadtest/models"
    assert env_of(c)["TANDEM_WORKLOAD"]["value"] == WORKLOAD_PATH
    mounts = [{"name": "tok", "mountPath": "/tokenizers", "readOnly": True}]
    pod = worker_pod(
        render(
            helm,
            workload={**DEFAULT_WORKLOAD, "tokenizer": "/tokenizers/llama"},
            extraVolumes=[{"name": "tok", "persistentVolumeClaim": {"claimName": "tok"}}],
            extraVolumeMounts=mounts,
        )
    )
    assert "initContainers" not in pod
    (c,) = pod["containers"]
    assert "TANDEM_MODEL_DIR" not in env_of(c) and mounts[0] in c["volumeMounts"]
    assert {v["name"] for v in pod["volumes"]} == {"workload", "tmp", "tok"}


# --- The workload --------------------------------------------------------------------------------------


def test_the_configmap_workload_is_a_valid_workload_file_mounted_where_both_read_it(helm: Helm) -> None:
    docs = render(helm)
    wf = parse_workload(deployed_workload(docs), "the ConfigMap")
    assert (wf.duration_s, wf.shape.kind, wf.shape.rate) == (120, "poisson", 2)
    assert [(w.type, w.weight) for w in wf.workloads] == [("intent", 3), ("agent", 1)]
    intent, agent = wf.workloads
    assert intent.slo.ttft_s == 1.0 and (agent.turns, agent.slo.ttft_s, agent.slo.tpot_s) == (4, 2.0, 0.1)
    assert wf.api_key_env == "TANDEM_API_KEY"  # the chart's, for loadtest.apiKeySecret
    for pod in (master_pod(docs), worker_pod(docs)):
        (c,) = pod["containers"]
        assert {"name": "workload", "mountPath": "/etc/tandem-loadtest", "readOnly": True} in c[
            "volumeMounts"
        ]
        volume = next(v for v in pod["volumes"] if v["name"] == "workload")
        assert volume["configMap"] == {"name": "tandem-loadtest"}
    assert flag(master_pod(docs)["containers"][0]["args"], "--workload") == WORKLOAD_PATH
    checksums = {
        one(docs, kind)["spec"]["template"]["metadata"]["annotations"]["checksum/workload"]
        for kind in ("Job", "Deployment")
    }
    assert len(checksums) == 1


def test_a_workload_of_its_own_is_deployed_as_given(helm: Helm) -> None:
    workload = {
        "duration_s": 300,
        "shape": {"kind": "constant", "rate": 5},
        "workloads": [{"type": "reasoning", "reasoning_budget": 64, "max_tokens": 128, "slo": {"ttft_s": 3}}],
        "api_key_env": "MY_KEY",
        "seed": 7,
    }
    docs = render(helm, workload=workload)
    assert deployed_workload(docs) == workload
    assert parse_workload(deployed_workload(docs)).api_key_env == "MY_KEY"
    for pod in (master_pod(docs), worker_pod(docs)):
        env = env_of(pod["containers"][0])
        assert "MY_KEY" in env and "TANDEM_API_KEY" not in env


def test_a_misspelt_workload_field_is_a_schema_error_naming_its_place(helm: Helm) -> None:
    err = render_error(helm, loadtest={**ON["loadtest"], "workload": {**DEFAULT_WORKLOAD, "durations_s": 10}})
    assert "/loadtest/workload" in err and "durations_s" in err
    unknown = {**DEFAULT_WORKLOAD, "workloads": [{"type": "chat"}]}
    assert "/loadtest/workload/workloads/0" in render_error(
        helm, loadtest={**ON["loadtest"], "workload": unknown}
    )


def test_a_workload_without_workloads_or_shape_fails_saying_what_to_set(helm: Helm) -> None:
    empty = {**DEFAULT_WORKLOAD, "workloads": []}
    assert "/loadtest/workload/workloads" in render_error(
        helm, loadtest={**ON["loadtest"], "workload": empty}
    )
    # The schema refuses them first; the chart's own checks stand behind it (helm --skip-schema-validation).
    # A value given merges into the default workload key by key: null drops a key.
    err = unchecked_error(helm, workload={"workloads": None})
    assert "loadtest.workload.workloads is required" in err and "[{type: intent, weight: 3}" in err
    err = unchecked_error(helm, workload={"shape": None})
    assert "loadtest.workload.shape is required" in err


def test_a_workload_given_merges_into_the_default_one_key_by_key(helm: Helm) -> None:
    """Helm's rule for maps in values: what a workload leaves out keeps its default; null drops it."""
    given = {"workloads": [{"type": "fanout", "width": 4}], "shape": {"rate": 8}, "seed": 3}
    deployed = deployed_workload(render(helm, workload=given))
    assert deployed == {
        **DEFAULT_WORKLOAD,
        **given,
        "shape": {"kind": "poisson", "rate": 8},
        "api_key_env": "TANDEM_API_KEY",
    }
    dropped = deployed_workload(render(helm, workload={"duration_s": None}))
    assert "duration_s" not in dropped and parse_workload(dropped).duration_s == 60


def test_fewer_than_one_worker_fails(helm: Helm) -> None:
    assert "/loadtest/workers" in render_error(helm, loadtest={**ON["loadtest"], "workers": 0})
    err = unchecked_error(helm, workers=0)
    assert "loadtest.workers is 0" in err and "give at least 1" in err


# --- The API key ---------------------------------------------------------------------------------------


def test_the_api_key_comes_from_the_named_secret_on_the_master_and_the_workers(helm: Helm) -> None:
    docs = render(helm)
    for pod in (master_pod(docs), worker_pod(docs)):
        (c,) = pod["containers"]
        assert env_of(c)["TANDEM_API_KEY"] == {
            "name": "TANDEM_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "loadtest-key", "key": "token"}},
        }
    assert not [d for d in docs if d["kind"] == "Secret" and "loadtest" in d["metadata"]["name"]]
    key = CHART_DEFAULTS["loadtest"]["apiKeySecret"]
    assert key == {"name": "", "key": "api-key"}


def test_auth_on_without_a_key_secret_fails_saying_what_to_set(helm: Helm) -> None:
    err = render_error(helm, loadtest={"enabled": True})
    assert "loadtest.apiKeySecret.name is required when auth.enabled is true" in err
    assert "kubectl create secret generic tandem-loadtest-key --from-literal=api-key=KEY" in err


def test_an_api_key_variable_without_its_secret_fails(helm: Helm) -> None:
    err = render_error(
        helm,
        ["values-local-cpu.yaml"],
        auth={"enabled": False, "allowRemoteUnauthenticated": True},
        loadtest={"enabled": True, "workload": {**DEFAULT_WORKLOAD, "api_key_env": "TANDEM_API_KEY"}},
    )
    assert "loadtest.workload.api_key_env is TANDEM_API_KEY, but loadtest.apiKeySecret.name is empty" in err


def test_auth_off_runs_without_a_key(helm: Helm) -> None:
    values = {
        "auth": {"enabled": False, "allowRemoteUnauthenticated": True},
        "loadtest": {"enabled": True, "workload": {**DEFAULT_WORKLOAD, "tenant": "bench"}},
    }
    docs = helm.template(["values-local-cpu.yaml"], leaves(values))
    deployed = deployed_workload(docs)
    assert "api_key_env" not in deployed and parse_workload(deployed).tenant == "bench"
    for pod in (master_pod(docs), worker_pod(docs)):
        assert not [e for e in pod["containers"][0]["env"] if "valueFrom" in e]


# --- Pods ----------------------------------------------------------------------------------------------


def test_load_test_pods_run_as_non_root_on_a_read_only_root_with_a_writable_tmp(helm: Helm) -> None:
    docs = render(helm)
    for pod in (master_pod(docs), worker_pod(docs)):
        assert pod["automountServiceAccountToken"] is False
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
        for c in containers(pod):
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
            assert env_of(c)["HOME"]["value"] == "/tmp"


def test_an_image_of_its_own_replaces_the_charts(helm: Helm) -> None:
    digest = "sha256:" + "d" * 64
    docs = render(helm, image={"repository": "reg/lt", "digest": digest})
    assert {c["image"] for pod in (master_pod(docs), worker_pod(docs)) for c in containers(pod)} == {
        f"reg/lt@{digest}"
    }
    docs = render(helm, image={"repository": "reg/lt"})
    assert master_pod(docs)["containers"][0]["image"] == f"reg/lt:{APP_VERSION}"
    latest = {**ON["loadtest"], "image": {"repository": "reg/lt", "tag": "latest"}}
    assert "/loadtest/image/tag" in render_error(helm, loadtest=latest)


def test_placement_and_pull_secrets_reach_both_load_test_pods(helm: Helm) -> None:
    tolerations = [{"key": "loadgen", "operator": "Exists", "effect": "NoSchedule"}]
    docs = helm.template(
        ["values-8b-70b.yaml"],
        {
            **lt_values(nodeSelector={"pool": "loadgen"}, tolerations=tolerations),
            "imagePullSecrets": [{"name": "r"}],
        },
    )
    for pod in (master_pod(docs), worker_pod(docs)):
        assert pod["nodeSelector"] == {"pool": "loadgen"} and pod["tolerations"] == tolerations
        assert pod["imagePullSecrets"] == [{"name": "r"}]


# --- NetworkPolicy -------------------------------------------------------------------------------------


def test_network_policies_open_the_serve_port_and_the_master_port_and_nothing_more(helm: Helm) -> None:
    docs = render(helm)
    ray = one(docs, "NetworkPolicy", "tandem")["spec"]
    only_ray = {**RELEASE_SELECTOR, "matchExpressions": [component_in("ray-head", "ray-worker")]}
    assert ray["podSelector"] == only_ray
    assert ray["ingress"][0] == {"from": [{"podSelector": only_ray}]}
    loadtest_pods = {
        **RELEASE_SELECTOR,
        "matchExpressions": [component_in("loadtest-master", "loadtest-worker")],
    }
    (to_serve,) = [r for r in ray["ingress"] if r.get("from") == [{"podSelector": loadtest_pods}]]
    assert to_serve["ports"] == [{"port": "serve", "protocol": "TCP"}]
    master = one(docs, "NetworkPolicy", "tandem-loadtest-master")["spec"]
    workers = {"matchLabels": {**RELEASE_LABELS, "app.kubernetes.io/component": "loadtest-worker"}}
    assert master == {
        "podSelector": {"matchLabels": {**RELEASE_LABELS, "app.kubernetes.io/component": "loadtest-master"}},
        "policyTypes": ["Ingress"],
        "ingress": [{"ports": [{"port": 5557, "protocol": "TCP"}], "from": [{"podSelector": workers}]}],
    }
    assert one(docs, "NetworkPolicy", "tandem-loadtest-worker")["spec"] == {
        "podSelector": workers,
        "policyTypes": ["Ingress"],
    }


def test_each_policy_selects_the_pods_it_is_meant_for(helm: Helm) -> None:
    """The selectors of the policies against the labels of every pod the chart renders."""
    docs = render(helm)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    ray = [t["metadata"]["labels"] for t in [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster["workerGroupSpecs"]
    ]]  # fmt: skip
    master, workers = pod_labels(docs, "Job"), pod_labels(docs, "Deployment")
    policy = one(docs, "NetworkPolicy", "tandem")["spec"]
    internal = policy["ingress"][0]["from"][0]["podSelector"]
    for selector in (policy["podSelector"], internal):
        assert all(selects(selector, labels) for labels in ray)
        assert not selects(selector, master) and not selects(selector, workers)
    master_policy = one(docs, "NetworkPolicy", "tandem-loadtest-master")["spec"]
    assert selects(master_policy["podSelector"], master) and not selects(
        master_policy["podSelector"], workers
    )
    (rule,) = master_policy["ingress"]
    assert selects(rule["from"][0]["podSelector"], workers) and not selects(
        rule["from"][0]["podSelector"], master
    )
    # With the load test off, Ray's policy is the chart's usual one.
    plain = one(helm.template(["values-8b-70b.yaml"]), "NetworkPolicy")["spec"]
    assert plain["podSelector"] == RELEASE_SELECTOR


# --- NOTES, values and their schema --------------------------------------------------------------------


def test_notes_say_how_to_follow_the_master_and_copy_the_report_out(helm: Helm) -> None:
    name = job(render(helm))["metadata"]["name"]
    notes = install_notes(helm, lt_values())
    assert f"kubectl logs -n default -f job/{name}" in notes
    assert f"-l job-name={name}" in notes and 'kubectl cp -n default -c master "$POD":/results' in notes
    assert "--set loadtest.enabled=false" in notes
    claim = lt_values(results={"existingClaim": "lt-results"})
    claim_name = job(helm.template(["values-8b-70b.yaml"], claim))["metadata"]["name"]
    notes = install_notes(helm, claim)
    assert f"the claim lt-results, under {claim_name}/" in notes and f":/results/{claim_name}" in notes
    assert "kubectl cp" not in install_notes(helm, {})


def test_values_schema_embeds_the_current_workload_file_schema() -> None:
    assert SCHEMA_FILE.read_text() == schema_text(values_schema_with_workload()), (
        "values.schema.json is stale: run `python -m tests.k8s.test_helm_loadtest --write-schema`"
    )
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["properties"]["loadtest"]["properties"]["workload"] == {
        "$ref": f"#/definitions/{WORKLOAD_DEF_PREFIX}WorkloadFile"
    }


def test_the_default_workload_is_valid_and_the_small_agent_intent_mix() -> None:
    wf = parse_workload(DEFAULT_WORKLOAD, "values.yaml")
    assert wf.mix() == [("intent", 0.75), ("agent", 0.25)]
    schema = json.loads(SCHEMA_FILE.read_text())
    loadtest = {**schema["properties"]["loadtest"], "definitions": schema["definitions"]}
    jsonschema.validate(CHART_DEFAULTS["loadtest"], loadtest)


def test_every_loadtest_value_is_in_the_schema_and_the_schema_has_nothing_else() -> None:
    def check(values: dict[str, Any], schema: dict[str, Any], path: str) -> None:
        assert schema.get("additionalProperties") is False, path
        props = schema["properties"]
        assert set(values) == set(props), path
        for key, value in values.items():
            if isinstance(value, dict) and "properties" in props[key]:
                check(value, props[key], f"{path}.{key}")

    check(
        CHART_DEFAULTS["loadtest"], json.loads(SCHEMA_FILE.read_text())["properties"]["loadtest"], "loadtest"
    )


def test_every_loadtest_value_is_documented_in_values_yaml() -> None:
    section = (CHART / "values.yaml").read_text().split("\nloadtest:\n", 1)[1]
    assert undocumented(section) == []


def undocumented(section: str) -> list[str]:
    """Keys with a value of their own (or under one) that no `# --` comment above documents."""
    out: list[str] = []
    covered_at: int | None = None  # the indent of a documented key: what is deeper is part of its value
    documented = False
    for line in section.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            documented = documented or stripped.startswith("# --")
            continue
        if covered_at is not None and indent > covered_at:
            continue
        covered_at = None
        key, _, value = stripped.partition(":")
        if documented:
            covered_at = indent
        elif value.strip():
            out.append(key)
        documented = False
    return out


def workload_definitions() -> dict[str, Any]:
    """JSON schema definitions of the workload file (loadtests.workload.WorkloadFile), `loadtest`-prefixed.

    values.schema.json keeps definitions in lowerCamelCase as the chart's own, so `python -m tests.k8s.helm
    --write-schema` (the deployment spec's) leaves these alone.
    """
    schema = WorkloadFile.model_json_schema(ref_template=f"#/definitions/{WORKLOAD_DEF_PREFIX}{{model}}")
    defs = schema.pop("$defs")
    schema["description"] = (
        "The load test's workload file (loadtests.workload.WorkloadFile; generated by "
        "`python -m tests.k8s.test_helm_loadtest --write-schema`)."
    )
    defs["WorkloadFile"] = schema
    drop_titles(defs)
    return {f"{WORKLOAD_DEF_PREFIX}{k}": defs[k] for k in sorted(defs)}


def values_schema_with_workload() -> dict[str, Any]:
    """values.schema.json with its workload definitions regenerated (after the chart's own definitions,
    before the spec's)."""
    current = json.loads(SCHEMA_FILE.read_text())
    defs = current["definitions"]
    own = {k: v for k, v in defs.items() if k[:1].islower() and not k.startswith(WORKLOAD_DEF_PREFIX)}
    spec = {k: v for k, v in defs.items() if not k[:1].islower()}
    current["definitions"] = {**own, **workload_definitions(), **spec}
    return current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write-schema", action="store_true", help=f"regenerate the workload part of {SCHEMA_FILE}"
    )
    args = parser.parse_args()
    if args.write_schema:
        SCHEMA_FILE.write_text(schema_text(values_schema_with_workload()))
        print(f"wrote {SCHEMA_FILE}")


if __name__ == "__main__":
    main()
