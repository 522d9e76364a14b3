"""The deployment spec: shipped configs load; bad specs fail naming the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serving.config import Role, SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def minimal(**model_overrides) -> dict:
    model = {"name": "m", "source": "local:tiny-intent", "pools": [{"role": "colocated"}]}
    model.update(model_overrides)
    return {"models": [model]}


def test_local_config_has_both_tiny_models() -> None:
    spec = load_spec(ROOT / "configs" / "local.yaml")
    assert [m.name for m in spec.models] == ["tiny-intent", "tiny-reasoning"]
    assert {t.name: t.model for t in spec.tiers} == {"intent": "tiny-intent", "reasoning": "tiny-reasoning"}
    pool = spec.models[0].pools[0]
    assert pool.max_ongoing_requests > 5  # Ray Serve's default of 5 throttles an engine
    assert not pool.uses_gpu
    assert spec.server.host == "127.0.0.1" and spec.server.port == 8000


def test_cluster_config_has_int4_intent_and_pd_reasoning() -> None:
    spec = load_spec(ROOT / "configs" / "cluster-8b-70b.yaml")
    intent = spec.model(spec.tiers[0].model)
    assert intent.pools[0].engine_args["quantization"].startswith("awq")
    reasoning = spec.model("llama-3.3-70b-instruct")
    roles = {p.role: p for p in reasoning.pools}
    assert set(roles) == {Role.PREFILL, Role.DECODE}
    assert roles[Role.PREFILL].parallelism.tp == 4 and roles[Role.DECODE].parallelism.tp == 8
    assert all(p.uses_gpu for p in reasoning.pools)


def test_defaults_come_from_the_model() -> None:
    spec = parse_spec(minimal())
    pool = spec.models[0].pools[0]
    assert pool.pool_name == "colocated"
    assert pool.replicas.start == 1
    assert pool.parallelism.accelerators_per_replica == 1


def test_model_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_MODEL_DIR", str(tmp_path))
    spec = parse_spec(minimal())
    assert spec.resolve_source(spec.models[0]) == str(tmp_path / "tiny-intent")
    hub = parse_spec(minimal(source="org/model"))
    assert hub.resolve_source(hub.models[0]) == "org/model"


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        ({"models": []}, "models", "at least 1"),
        ({"modles": []}, "modles", "unknown field"),
        (minimal(pools=[{"role": "colocated", "replica": 2}]), "models.0.pools.0.replica", "unknown field"),
        (minimal(pools=[{"role": "both"}]), "models.0.pools.0.role", "colocated"),
        (minimal(pools=[{"replicas": {"min": 3, "max": 2}}]), "models.0.pools.0.replicas", "min <= max"),
        (
            minimal(pools=[{"replicas": {"min": 1, "initial": 5, "max": 2}}]),
            "models.0.pools.0.replicas",
            "between",
        ),
        (minimal(pools=[{"parallelism": {"tp": 0}}]), "models.0.pools.0.parallelism.tp", "greater than"),
        (minimal(pools=[{"parallelism": {"ep": True}}]), "models.0.pools.0.parallelism", "dp * tp > 1"),
        (minimal(pools=[{"max_ongoing_requests": 0}]), "models.0.pools.0.max_ongoing_requests", ""),
        (minimal(pools=[{"role": "prefill"}]), "models.0", "one with role: decode"),
        (minimal(pools=[{}, {}]), "models.0", "unique name"),
        (minimal(pools=[{"engine_args": {"model": "x"}}]), "models.0.pools.0.engine_args", "source"),
        (minimal(pools=[{"engine": "tgi"}]), "models.0.pools.0.engine", "vllm"),
        (minimal(name="Bad Name"), "models.0.name", "pattern"),
        ({**minimal(), "tiers": [{"name": "intent", "model": "missing"}]}, "tiers[0].model", "choose one"),
        ({**minimal(), "server": {"port": 70000}}, "server.port", "65535"),
    ],
)
def test_invalid_spec_names_field_and_fix(data: dict, field: str, hint: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    msg = str(err.value)
    assert field in msg
    assert hint in msg


def test_load_spec_reports_yaml_and_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(SpecError, match="mapping"):
        load_spec(listy)
