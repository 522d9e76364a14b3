"""The spec of an `engine: openai` pool (serving.config.UpstreamSpec): what it refuses and why, where its
key comes from, and what admission and the app builder make of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import SpecError, parse_spec
from serving.upstreams import PROFILES, UpstreamServer


def _spec(pool: dict | None = None, model: dict | None = None) -> dict:
    up = {"engine": "openai", "upstream": {"endpoints": ["http://10.0.0.5:8000"], "max_model_len": 4096}}
    return {
        "models": [
            {"name": "ext", "source": "local:tiny-intent", "pools": [{**up, **(pool or {})}], **(model or {})}
        ],
        "auth": {"enabled": False},
    }


def test_a_minimal_external_pool_and_what_it_implies() -> None:
    spec = parse_spec(_spec())
    m = spec.model("ext")
    assert m.external is not None and m.external.server is UpstreamServer.VLLM
    assert m.serving_pool.max_replicas == 1 and not spec.autoscaled(m)
    # Admission's pool limit: endpoints x max_ongoing_requests.
    two = parse_spec(
        _spec({"upstream": {**A, "endpoints": ["http://a:1", "http://b:1/"]}, "max_ongoing_requests": 8})
    )
    assert two.model("ext").external.endpoints == ["http://a:1", "http://b:1"]
    assert two.admission_controller().pool("ext").limit == 16
    # A round trip through the dict form (what the ingress and the chart carry) validates again.
    assert parse_spec(two.model_dump(mode="json")).model("ext").external == two.model("ext").external


A = {"endpoints": ["http://a:1"], "max_model_len": 4096}


@pytest.mark.parametrize(
    ("pool", "model", "hint"),
    [
        ({"upstream": None}, None, "upstream: required with engine: openai"),
        ({"engine": "vllm"}, None, "upstream: only for engine: openai"),
        ({"role": "decode"}, None, "set role: colocated"),
        ({"engine_args": {"dtype": "float32"}}, None, "engine_args: an external server takes its own"),
        ({"replicas": {"min": 1, "max": 3}}, None, "replicas are its upstream.endpoints"),
        ({"upstream": {**A, "endpoints": ["10.0.0.5:8000"]}}, None, "is not an http:// or https:// URL"),
        ({"upstream": {**A, "endpoints": ["http://a:1/v1"]}}, None, "without /v1"),
        ({"upstream": {**A, "endpoints": ["http://a:1", "http://a:1/"]}}, None, "duplicate URLs"),
        ({"upstream": {**A, "kv_events": ["tcp://a:5", "tcp://b:5"]}}, None, "one per endpoint"),
        ({"upstream": {**A, "api_key_env": "K", "api_key_file": "/k"}}, None, "at most one"),
        # The context length is always given (Tandem starts while the server is down).
        ({"upstream": {"endpoints": ["http://a:1"]}}, None, "max_model_len: required field is missing"),
        # A server that cannot salt its prefix cache per tenant is refused while salting is on.
        ({"upstream": {**A, "server": "tgi"}}, None,
         "router.tenant_salt: server tgi cannot salt its prefix cache"),
    ],
)  # fmt: skip
def test_bad_external_pools_name_the_field_and_the_fix(pool: dict, model: dict | None, hint: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(pool, model))
    assert hint in str(err.value)


def test_a_server_without_cache_salt_is_accepted_when_salting_is_turned_off() -> None:
    pool = {"upstream": {**A, "server": "tgi"}}
    spec = parse_spec(_spec(pool, {"router": {"tenant_salt": False}}))
    assert not PROFILES[spec.model("ext").external.server].cache_salt


def test_the_key_comes_from_the_environment_or_a_file_never_the_request(tmp_path: Path, monkeypatch) -> None:
    up = parse_spec(_spec({"upstream": {**A, "api_key_env": "UPSTREAM_KEY"}}))
    monkeypatch.delenv("UPSTREAM_KEY", raising=False)
    with pytest.raises(SpecError, match=r"\$UPSTREAM_KEY is not set"):
        up.model("ext").external.api_key()
    monkeypatch.setenv("UPSTREAM_KEY", " k1 \n")
    assert up.model("ext").external.api_key() == "k1"
    f = tmp_path / "key"
    f.write_text("k2\n")
    up = parse_spec(_spec({"upstream": {**A, "api_key_file": str(f)}}))
    assert up.model("ext").external.api_key() == "k2"
    up = parse_spec(_spec({"upstream": {**A, "api_key_file": str(tmp_path / "no")}}))
    with pytest.raises(SpecError, match="cannot read"):
        up.model("ext").external.api_key()
    assert parse_spec(_spec()).model("ext").external.api_key() is None


def test_the_app_builds_no_deployment_and_placement_skips_an_external_pool() -> None:
    from serving.replicas.placement import plan

    spec = parse_spec(
        {
            "models": [
                {"name": "ext", "source": "x", "pools": [{"engine": "openai", "upstream": A}]},
                {"name": "own", "source": "x", "pools": [{"engine": "fake"}]},
            ],
            "auth": {"enabled": False},
        }
    )  # fmt: skip
    assert [p.model for p in plan(spec)] == ["own"]
