"""Tier resolution and degradation chains (router.tiers), and the spec checks that tie tiers,
routing, tenants and pool limits together (serving.config)."""

from __future__ import annotations

import copy

import pytest

from router.tiers import RequestShape, Resolution, Target, TierError, TierRouter, matches
from serving.config import SpecError, TierRuleMatch, parse_spec


def _model(name: str) -> dict:
    return {"name": name, "source": "fake", "pools": [{"engine": "fake"}]}


BASE: dict = {
    "models": [_model("small"), _model("mid"), _model("big"), _model("loner")],
    "tiers": [
        {"name": "intent", "model": "small"},
        {"name": "summary", "model": "mid", "fallback": ["intent"]},
        {"name": "reasoning", "model": "big", "fallback": ["summary", "intent"]},
        {"name": "intent-b", "model": "small"},
    ],
    "auth": {"enabled": False},
}


def spec_dict(**overrides) -> dict:
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(overrides))
    return data


def router(**overrides) -> TierRouter:
    spec = parse_spec(spec_dict(**overrides))
    return spec.tier_router()


def test_explicit_model_resolves_to_its_first_tier() -> None:
    r = router()
    assert r.resolve("big", None) == Resolution("big", "reasoning", "model")
    assert r.resolve("small", "reasoning") == Resolution("small", "intent", "model")  # task ignored
    assert r.resolve("loner", None) == Resolution("loner", None, "model")  # in no tier


def test_unknown_model_is_a_404_on_model() -> None:
    with pytest.raises(TierError) as err:
        router().resolve("gpt-9", None)
    assert err.value.status == 404 and err.value.param == "model"
    assert "gpt-9" in str(err.value) and "auto" in str(err.value)


def test_auto_with_task_header_is_case_insensitive() -> None:
    r = router()
    assert r.resolve("auto", "reasoning") == Resolution("big", "reasoning", "task")
    assert r.resolve("auto", " Summary ") == Resolution("mid", "summary", "task")
    assert r.resolve("auto", "INTENT-B") == Resolution("small", "intent-b", "task")


def test_unknown_task_is_a_400_naming_the_header() -> None:
    with pytest.raises(TierError) as err:
        router().resolve("auto", "poetry")
    assert err.value.status == 400 and err.value.param == "x-tandem-task"
    assert "poetry" in str(err.value) and "reasoning" in str(err.value)


def test_custom_auto_alias() -> None:
    r = router(routing={"auto_model": "pick"})
    assert r.auto_model == "pick"
    assert r.resolve("pick", "summary").model == "mid"
    with pytest.raises(TierError):
        r.resolve("auto", None)


def test_auto_without_tiers_is_a_400() -> None:
    spec = parse_spec({"models": [_model("m")], "auth": {"enabled": False}})
    r = spec.tier_router()
    with pytest.raises(TierError) as err:
        r.resolve("auto", None)
    assert err.value.status == 400 and err.value.param == "model"
    assert r.default_tier() is None


RULES = [
    {"tier": "reasoning", "when": {"reasoning_effort": ["high", "medium"]}},
    {"tier": "summary", "when": {"tools": True}},
    {"tier": "summary", "when": {"min_prompt_tokens": 1000, "max_prompt_tokens": 4000}},
    {"tier": "reasoning", "when": {"min_max_tokens": 2000}},
    {"tier": "intent", "when": {"tools": False, "max_prompt_tokens": 10}},
]


@pytest.mark.parametrize(
    ("shape", "tier", "how"),
    [
        (RequestShape(50, None, "high", True), "reasoning", "rule:0"),  # first match wins over rule 1
        (RequestShape(50, None, "medium"), "reasoning", "rule:0"),
        (RequestShape(50, None, "low", True), "summary", "rule:1"),
        (RequestShape(1000, 10), "summary", "rule:2"),
        (RequestShape(4000, 10), "summary", "rule:2"),
        (RequestShape(4001, 10), "mid", "default"),
        (RequestShape(999, 2000), "reasoning", "rule:3"),
        (RequestShape(999, 1999), "mid", "default"),
        (RequestShape(999, None), "mid", "default"),  # no max_tokens never meets min_max_tokens
        (RequestShape(10, None), "intent", "rule:4"),
        (RequestShape(11, None), "mid", "default"),
        (RequestShape(10, None, None, True), "summary", "rule:1"),
    ],
)
def test_rules_in_order_then_default(shape: RequestShape, tier: str, how: str) -> None:
    r = router(routing={"rules": RULES, "default_tier": "summary"})
    res = r.resolve("auto", None, shape)
    if how == "default":
        assert res == Resolution("mid", "summary", "default")
    else:
        assert (res.tier, res.how) == (tier, how)
        assert res.model == r.tier(tier).model


def test_task_header_beats_rules_and_default_is_the_first_tier() -> None:
    r = router(routing={"rules": RULES})
    assert r.resolve("auto", "intent", RequestShape(50, None, "high")).how == "task"
    assert r.default_tier() == "intent"
    assert r.resolve("auto", None, RequestShape(5000, 1)) == Resolution("small", "intent", "default")
    assert r.resolve("auto", None, None) == Resolution("small", "intent", "default")


def test_needs_shape_only_for_auto_without_task_when_rules_exist() -> None:
    with_rules = router(routing={"rules": RULES})
    assert with_rules.needs_shape("auto", None)
    assert with_rules.needs_shape("auto", "")
    assert not with_rules.needs_shape("auto", "intent")
    assert not with_rules.needs_shape("big", None)
    assert not router().needs_shape("auto", None)


def test_matches_empty_and_each_condition() -> None:
    shape = RequestShape(100, 50, "low", False)
    assert matches(TierRuleMatch().policy(), shape)
    assert matches(TierRuleMatch(reasoning_effort=["low"]).policy(), shape)
    assert not matches(TierRuleMatch(reasoning_effort=["high"]).policy(), shape)
    assert not matches(TierRuleMatch(reasoning_effort=["low"]).policy(), RequestShape(100))
    assert matches(TierRuleMatch(tools=False).policy(), shape)
    assert not matches(TierRuleMatch(tools=True).policy(), shape)
    assert matches(TierRuleMatch(min_prompt_tokens=100, max_prompt_tokens=100).policy(), shape)
    assert not matches(TierRuleMatch(min_prompt_tokens=101).policy(), shape)
    assert not matches(TierRuleMatch(max_prompt_tokens=99).policy(), shape)
    assert matches(TierRuleMatch(min_max_tokens=50).policy(), shape)
    assert not matches(TierRuleMatch(min_max_tokens=51).policy(), shape)
    assert matches(TierRuleMatch(min_max_tokens=0).policy(), RequestShape(1, None))
    assert not matches(TierRuleMatch(min_max_tokens=1).policy(), RequestShape(1, None))
    # Every condition must hold.
    assert not matches(TierRuleMatch(reasoning_effort=["low"], tools=True).policy(), shape)


def test_chain_is_tier_then_fallbacks_each_model_once() -> None:
    r = router(
        tiers=[
            {"name": "intent", "model": "small"},
            {"name": "summary", "model": "mid", "fallback": ["intent"]},
            {"name": "reasoning", "model": "big", "fallback": ["summary", "big-alt", "intent", "intent-b"]},
            {"name": "intent-b", "model": "small"},
            {"name": "big-alt", "model": "big"},
        ]
    )
    assert r.chain(r.resolve("auto", "reasoning")) == [
        Target("reasoning", "big"),
        Target("summary", "mid"),  # big-alt is skipped: big is already first
        Target("intent", "small"),  # intent-b is skipped: small is already in
    ]
    # A fallback's own fallbacks are not followed.
    assert r.chain(r.resolve("auto", "summary")) == [Target("summary", "mid"), Target("intent", "small")]
    assert r.chain(r.resolve("auto", "intent")) == [Target("intent", "small")]
    # An explicit model degrades along the chain of the first tier it serves.
    assert [t.model for t in r.chain(r.resolve("big", None))] == ["big", "mid", "small"]
    assert r.chain(r.resolve("loner", None)) == [Target(None, "loner")]


def test_tiers_in_spec_order() -> None:
    r = router()
    assert r.tiers == ["intent", "summary", "reasoning", "intent-b"]
    assert r.tier("summary").fallback == ("intent",)
    with pytest.raises(KeyError):
        r.tier("nope")


# -- spec validation -------------------------------------------------------------------------------


def _tiers_with(i: int, **changes) -> list[dict]:
    tiers = copy.deepcopy(BASE["tiers"])
    tiers[i].update(changes)
    return tiers


@pytest.mark.parametrize(
    ("overrides", "field", "hint"),
    [
        ({"tiers": _tiers_with(1, fallback=["nowhere"])}, "tiers[1].fallback[0]", "'nowhere'"),
        (
            {"tiers": _tiers_with(2, fallback=["summary", "reasoning"])},
            "tiers[2].fallback[1]",
            "another tier",
        ),
        ({"tiers": _tiers_with(3, name="intent")}, "tiers: duplicate tier names", ""),
        ({"tiers": _tiers_with(0, model="huge")}, "tiers[0].model", "'huge'"),
        ({"routing": {"default_tier": "poetry"}}, "routing.default_tier", "'poetry'"),
        (
            {"routing": {"rules": [{"tier": "intent"}, {"tier": "poetry"}]}},
            "routing.rules[1].tier",
            "'poetry'",
        ),
        ({"routing": {"auto_model": "big"}}, "routing.auto_model", "also a model name"),
        (
            {"routing": {"rules": [{"tier": "intent", "when": {"tool": True}}]}},
            "routing.rules.0.when.tool",
            "",
        ),
        (
            {"admission": {"tenants": [{"name": "acme"}, {"name": "bob"}, {"name": "acme"}]}},
            "admission.tenants",
            "duplicate",
        ),
        (
            {"admission": {"pool_limits": [{"model": "big", "max_concurrency": 2}, {"model": "x"}]}},
            "admission.pool_limits.1.max_concurrency",
            "required",
        ),
        (
            {
                "admission": {
                    "pool_limits": [
                        {"model": "big", "max_concurrency": 2},
                        {"model": "x", "max_concurrency": 1},
                    ]
                }
            },
            "admission.pool_limits[1].model",
            "'x'",
        ),
        (
            {"auth": {"enabled": False}, "server": {"host": "0.0.0.0"}},
            "auth.enabled",
            "allow_remote_unauthenticated",
        ),
        ({"auth": {"keys": [{"tenant": "a", "sha256": "abc"}]}}, "auth.keys.0.sha256", "pattern"),
        ({"tiers": _tiers_with(0, ttft_slo_s=0)}, "tiers.0.ttft_slo_s", "greater than 0"),
    ],
)
def test_invalid_spec_names_the_field(overrides: dict, field: str, hint: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_dict(**overrides))
    msg = str(err.value)
    assert field in msg
    assert hint in msg


def test_first_token_timeout_must_leave_room_for_the_pd_prefill_fallback() -> None:
    pd = {
        "name": "big",
        "source": "fake",
        "pools": [{"role": "prefill", "engine": "fake"}, {"role": "decode", "engine": "fake"}],
        "disaggregation": {"prefill_timeout_s": 10, "prefill_attempts": 2, "kv_transfer_timeout_s": 5},
    }
    models = [_model("small"), _model("mid"), pd, _model("loner")]
    with pytest.raises(SpecError) as err:
        parse_spec(spec_dict(models=models, resilience={"first_token_timeout_s": 25}))
    assert "tiers[2].first_token_timeout_s" in str(err.value) and "25s" in str(err.value)
    tiers = _tiers_with(2, first_token_timeout_s=20)
    with pytest.raises(SpecError, match=r"tiers\[2\]\.first_token_timeout_s: 20s"):
        parse_spec(spec_dict(models=models, tiers=tiers))
    assert parse_spec(spec_dict(models=models, resilience={"first_token_timeout_s": 25.5}))
    assert parse_spec(spec_dict(models=models, tiers=_tiers_with(2, first_token_timeout_s=26)))


def test_remote_unauthenticated_must_be_explicit() -> None:
    spec = parse_spec(
        spec_dict(auth={"enabled": False, "allow_remote_unauthenticated": True}, server={"host": "0.0.0.0"})
    )
    assert spec.server.host == "0.0.0.0" and not spec.auth.enabled
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert parse_spec(spec_dict(server={"host": host})).server.host == host
    # With auth enabled any host is fine.
    with_auth = spec_dict(auth={"keys": [{"tenant": "a", "sha256": "0" * 64}]}, server={"host": "0.0.0.0"})
    assert parse_spec(with_auth).auth.enabled


def test_tier_defaults() -> None:
    spec = parse_spec(spec_dict())
    t = spec.tier("intent")
    assert t.fallback == [] and t.ttft_slo_s == 2.0 and t.first_token_timeout_s is None
    assert spec.routing.auto_model == "auto" and spec.routing.default_tier is None


# -- task types ------------------------------------------------------------------------------------

TASKS = {
    "tasks": [{"name": "math", "tier": "reasoning"}, {"name": "classify", "tier": "intent"}],
    "rules": [{"tier": "summary", "task": "classify", "when": {"min_prompt_tokens": 100}}],
}


def test_a_task_type_picks_its_tier_and_is_kept_in_the_resolution() -> None:
    r = router(routing=TASKS)
    assert r.resolve("auto", "math") == Resolution("big", "reasoning", "task", "math")
    assert r.resolve("auto", " Classify ") == Resolution("small", "intent", "task", "classify")
    # A tier name still works and carries no task type.
    assert r.resolve("auto", "reasoning") == Resolution("big", "reasoning", "task", None)
    # A rule may name the task type of what it matches.
    assert r.resolve("auto", None, RequestShape(150)) == Resolution("mid", "summary", "rule:0", "classify")
    # A request naming a model keeps a task type its header names (for its template), not an unknown one.
    assert r.resolve("big", "math").task == "math" and r.resolve("big", "whatever").task is None
    assert r.tasks == ["math", "classify"]


def test_an_unknown_task_lists_tiers_and_task_types() -> None:
    with pytest.raises(TierError) as err:
        router(routing=TASKS).resolve("auto", "poetry")
    assert err.value.param == "x-tandem-task"
    assert "'poetry' is not a tier" in str(err.value) and "task type of ['math', 'classify']" in str(
        err.value
    )


@pytest.mark.parametrize(
    ("routing", "hint"),
    [
        ({"tasks": [{"name": "math", "tier": "nope"}]}, "routing.tasks[0].tier: unknown tier 'nope'"),
        ({"tasks": [{"name": "intent", "tier": "intent"}]}, "is also a tier"),
        (
            {"tasks": [{"name": "m", "tier": "intent"}, {"name": "m", "tier": "intent"}]},
            "duplicate task type",
        ),
        (
            {"rules": [{"tier": "intent", "task": "ghost"}]},
            "routing.rules[0].task: unknown task type 'ghost'",
        ),
    ],
)
def test_task_type_spec_errors_name_the_field(routing: dict, hint: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec_dict(routing=routing))
    assert hint in str(err.value)


# -- per-key allow-lists (review L6) -----------------------------------------------------------------


def test_a_listed_tier_opens_its_model_and_every_tier_that_model_serves() -> None:
    r = router()
    allowed = frozenset({"intent-b"})  # small's second tier
    assert r.allowed_models(allowed) == ["small"]
    assert r.allowed_tiers(allowed) == ["intent", "intent-b"]
    # A direct request for `small` resolves to its first tier, `intent`: allowed through the model.
    r.check_allowed(r.resolve("small", None), allowed)
    r.check_allowed(r.resolve("auto", "intent"), allowed)
    assert r.allowed_models(None) == ["small", "mid", "big", "loner"]
    assert r.allowed_tiers(None) == ["intent", "summary", "reasoning", "intent-b"]


def test_a_model_or_tier_off_the_list_is_a_403_on_model_that_says_what_the_key_may_call() -> None:
    r = router()
    allowed = frozenset({"loner", "intent"})
    with pytest.raises(TierError) as e:
        r.check_allowed(r.resolve("big", None), allowed)
    assert e.value.status == 403 and e.value.param == "model"
    assert "may not call tier `reasoning` (model `big`)" in str(e.value)
    assert "small, loner, auto (tiers intent, intent-b)" in str(e.value)
    with pytest.raises(TierError) as e:  # auto resolved by default to a tier off the list
        r.check_allowed(Resolution("mid", "summary", "default"), allowed)
    assert e.value.status == 403
    r.check_allowed(r.resolve("loner", None), allowed)  # a model with no tier
    with pytest.raises(TierError) as e:
        r.check_allowed(r.resolve("small", None), frozenset({"loner"}))
    assert "it may call: loner" in str(e.value) and "x-tandem-task" not in str(e.value)


def test_an_inline_key_naming_an_unknown_model_or_tier_is_refused_at_parse() -> None:
    key = {"tenant": "acme", "sha256": "0" * 64, "models": ["intent", "gpt-9"]}
    with pytest.raises(SpecError, match=r"auth.keys\[0\].models\[1\]: 'gpt-9' is neither a model nor a tier"):
        parse_spec(spec_dict(auth={"enabled": True, "keys": [key]}))
    key["models"] = ["intent", "big"]
    spec = parse_spec(spec_dict(auth={"enabled": True, "keys": [key]}))
    assert spec.auth.keys[0].models == ["intent", "big"]
