"""Prompt templates: selection and precedence (router.templates), composition, the library's hot reload
(serving.http.templates), and what the gateway does with them on the request path (serving.http.pipeline)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.templates import Binding, Inject, Library, Template, common_prefix, compose, merged_stop
from serving.config import SpecError, TemplatesSpec, parse_spec
from serving.http.metrics import IngressMetrics
from serving.http.templates import LibraryError, TemplateLibrary, parse_library, to_library
from serving.replicas.engines.base import Chunk, GenerateRequest
from serving.replicas.engines.fake import FakeEngine
from tests.unit.test_gateway_api import CountingBackend, FlakyBackend, route, stack

# -- selection (pure) ------------------------------------------------------------------------------

T = {
    ("tier-t", 1): Template("tier-t", 1, "tier prompt"),
    ("task-t", 1): Template("task-t", 1, "task prompt v1"),
    ("task-t", 2): Template("task-t", 2, "task prompt v2"),
    ("acme-t", 1): Template("acme-t", 1, "acme prompt"),
    ("acme-task", 1): Template("acme-task", 1, "acme math prompt"),
}


def _library(*bindings: Binding) -> Library:
    by: dict[str, dict[int, Template]] = {}
    for (name, v), t in T.items():
        by.setdefault(name, {})[v] = t
    return Library(by, bindings)


LIB = _library(
    Binding("tier-t", tier="reasoning"),
    Binding("task-t", task="math"),
    Binding("acme-t", tenant="acme"),
    Binding("acme-task", tenant="acme", task="math"),
    Binding("none", tenant="plain"),
    Binding("task-t@1", tenant="pinned", task="math"),
)


@pytest.mark.parametrize(
    ("tenant", "tier", "task", "want"),
    [
        ("bob", "reasoning", None, "tier-t@1"),  # the tier's own template
        ("bob", "reasoning", "math", "task-t@2"),  # a task type beats its tier; highest version
        ("bob", "intent", "math", "task-t@2"),  # task type wherever it is served
        ("bob", "intent", None, None),  # nothing bound
        ("acme", "intent", None, "acme-t@1"),  # a tenant override beats everything shared
        ("acme", "reasoning", "math", "acme-task@1"),  # tenant + task beats tenant alone
        ("plain", "reasoning", "math", None),  # a tenant bound to `none`: no template at all
        ("pinned", "reasoning", "math", "task-t@1"),  # a pinned version
    ],
)
def test_selection_precedence(tenant: str, tier: str | None, task: str | None, want: str | None) -> None:
    got = LIB.select(tenant, tier, task)
    assert (got.ref if got else None) == want


def test_ties_go_to_the_first_binding_and_unknown_refs_select_nothing() -> None:
    lib = _library(Binding("tier-t", tier="x"), Binding("task-t", tier="x"))
    assert lib.select("t", "x", None).ref == "tier-t@1"
    assert lib.resolve("missing") is None and lib.resolve("task-t@9") is None and lib.resolve("none") is None


# -- composition (pure) ----------------------------------------------------------------------------


def _msgs(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    return list(pairs)


def _compose(t: Template | None, msgs: list[tuple[str, str]]):
    return compose(t, msgs, lambda m: m[0], lambda m: m[1], lambda r, c: (r, c))


FEW = Template(
    "f", 1, "be precise", (("user", "1+1?"), ("assistant", "2")), ("###",), (("temperature", 0.0),)
)


def test_template_goes_first_with_its_few_shot_turns() -> None:
    out, choice = _compose(FEW, _msgs(("user", "2+2?")))
    assert out == [("system", "be precise"), ("user", "1+1?"), ("assistant", "2"), ("user", "2+2?")]
    assert choice.applied and choice.template is FEW


def test_if_missing_keeps_the_requests_own_system_message() -> None:
    msgs = _msgs(("system", "mine"), ("user", "q"))
    out, choice = _compose(FEW, msgs)
    assert out == msgs and not choice.applied and choice.skipped == "own_system"
    out, choice = _compose(FEW, _msgs(("developer", "mine"), ("user", "q")))
    assert not choice.applied


def test_always_puts_the_template_first_in_one_system_message() -> None:
    t = Template("a", 1, "template rules", inject=Inject.ALWAYS)
    out, choice = _compose(t, _msgs(("system", "my rules"), ("user", "q")))
    assert out == [("system", "template rules\n\nmy rules"), ("user", "q")] and choice.applied


def test_never_and_none_leave_the_request_alone() -> None:
    msgs = _msgs(("user", "q"))
    out, choice = _compose(Template("n", 1, "x", inject=Inject.NEVER), msgs)
    assert out == msgs and not choice.applied and choice.skipped == "inject_never"
    out, choice = _compose(None, msgs)
    assert out == msgs and choice.template is None


def test_stops_are_merged_once_and_the_prefix_is_measured() -> None:
    assert merged_stop(FEW, ["a", "###"]) == ["a", "###"]
    assert merged_stop(FEW, []) == ["###"] and merged_stop(None, ["x"]) == ["x"]
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2 and common_prefix([], [1]) == 0


# -- the library file and its reload ---------------------------------------------------------------

GOOD = {
    "templates": [
        {"name": "math", "version": 1, "system": "v1"},
        {"name": "math", "version": 2, "system": "v2"},
    ],
    "bindings": [{"task": "math", "template": "math"}],
}


def _write(path: Path, data: Any) -> None:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))


def test_reload_swaps_a_valid_file_and_keeps_the_old_library_on_a_bad_one(tmp_path: Path) -> None:
    f = tmp_path / "library.yaml"
    _write(f, GOOD)
    metrics = IngressMetrics()
    lib = TemplateLibrary(TemplatesSpec(library_file=str(f)), ["reasoning"], ["math"], metrics)
    assert lib.library.select("t", None, "math").system == "v2" and lib.last_error is None
    assert metrics.registry.get_sample_value("tandem_template_reloads_total", {"result": "ok"}) == 1

    assert lib.check() is False  # unchanged file: nothing to do
    bad_cases = [
        "templates: [unclosed",  # not YAML
        {"templates": [{"name": "math", "version": 3}], "bindings": []},  # no system prompt or turns
        {"templates": [{"name": "math", "system": "x"}], "bindings": [{"task": "nope", "template": "math"}]},
        {"templates": [], "bindings": [{"task": "math", "template": "ghost"}]},
    ]
    for i, bad in enumerate(bad_cases):
        _write(f, bad)
        assert lib.check() is False
        assert lib.library.select("t", None, "math").system == "v2", f"case {i} replaced the library"
        assert lib.last_error, f"case {i} gave no reason"
    assert "unknown task type 'nope'" in lib.last_error or "ghost" in lib.last_error
    assert metrics.registry.get_sample_value("tandem_template_reloads_total", {"result": "invalid"}) == 4

    changed = dict(GOOD, templates=GOOD["templates"] + [{"name": "math", "version": 3, "system": "v3"}])
    _write(f, changed)
    assert lib.check() is True and lib.last_error is None
    assert lib.library.select("t", None, "math").system == "v3"

    f.unlink()  # the ConfigMap went away: keep what we have
    assert lib.check() is False and "cannot read" in lib.last_error
    assert lib.library.select("t", None, "math").system == "v3"


def test_a_bad_file_at_start_keeps_the_specs_inline_library(tmp_path: Path) -> None:
    f = tmp_path / "library.yaml"
    _write(f, "bindings: 7")
    inline = {
        "templates": [{"name": "math", "system": "inline"}],
        "bindings": [{"task": "math", "template": "math"}],
    }
    spec = TemplatesSpec.model_validate({"library": inline, "library_file": str(f)})
    lib = TemplateLibrary(spec, [], ["math"])
    assert lib.library.select("t", None, "math").system == "inline" and lib.source == "spec"
    assert "bindings" in lib.last_error


def test_parse_library_names_the_field() -> None:
    with pytest.raises(LibraryError, match=r"templates\.0: .*few_shot: user/assistant pairs"):
        parse_library(
            yaml.safe_dump(
                {
                    "templates": [
                        {"name": "m", "system": "s", "few_shot": [{"role": "assistant", "content": "x"}]}
                    ]
                }
            ),
            "f.yaml",
            [],
            [],
        )


def test_spec_validates_template_bindings_against_its_tiers_and_tasks() -> None:
    base = {"models": [{"name": "m", "source": "fake", "pools": [{"engine": "fake"}]}],
            "tiers": [{"name": "intent", "model": "m"}], "auth": {"enabled": False}}  # fmt: skip
    lib = {"templates": [{"name": "t", "system": "s"}], "bindings": [{"tier": "nope", "template": "t"}]}
    with pytest.raises(SpecError, match=r"templates\.library\.bindings\[0\]\.tier: unknown tier 'nope'"):
        parse_spec({**base, "templates": {"library": lib}})
    with pytest.raises(SpecError, match="also a tier"):
        parse_spec({**base, "routing": {"tasks": [{"name": "intent", "tier": "intent"}]}})
    with pytest.raises(SpecError, match="defined twice"):
        parse_spec({**base, "templates": {"library": {"templates": [{"name": "t", "system": "a"}] * 2}}})


def test_to_library_keeps_versions_and_sampling() -> None:
    spec = parse_library(yaml.safe_dump(dict(GOOD, templates=[
        {"name": "math", "version": 1, "system": "v1", "sampling": {"temperature": 0.2}, "stop": ["END"]},
    ])), "f", [], ["math"])  # fmt: skip
    t = to_library(spec).resolve("math@1")
    assert t.sampling == (("temperature", 0.2),) and t.stop == ("END",)


# -- on the request path ---------------------------------------------------------------------------


class Recording(CountingBackend):
    """Records every GenerateRequest it streams."""

    def __init__(self, name: str) -> None:
        super().__init__(FakeEngine(name, max_model_len=256))
        self.requests: list[GenerateRequest] = []

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        async for chunk in super().stream(request):
            yield chunk


LIBRARY = {
    "templates": [
        {"name": "math", "version": 1, "system": "solve carefully", "stop": ["END"],
         "sampling": {"temperature": 0.1, "max_tokens": 7}},
        {"name": "math", "version": 2, "system": "solve very carefully step by step",
         "few_shot": [{"role": "user", "content": "one plus one"}, {"role": "assistant", "content": "two"}]},
        {"name": "tiered", "system": "you serve the intent tier"},
    ],
    "bindings": [
        {"task": "math", "template": "math"},
        {"tier": "intent", "template": "tiered"},
        {"tenant": "old", "task": "math", "template": "math@1"},
    ],
}  # fmt: skip
ROUTING = {"tasks": [{"name": "math", "tier": "reasoning"}]}


async def _engines() -> dict[str, Recording]:
    out = {"small": Recording("small"), "big": Recording("big")}
    for b in out.values():
        await b.engine.start()
    return out


def _chat(model: str = "auto", **kw: Any) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "what is two plus two"}]}
    body.update(kw)
    return body


async def test_task_type_gets_its_template_first_and_the_route_says_so() -> None:
    b = await _engines()
    async with stack(b, templates={"library": LIBRARY}, routing=ROUTING) as s:
        r = await s.client.post(
            "/v1/chat/completions", json=_chat(max_tokens=4), headers={"x-tandem-task": "math"}
        )
        assert r.status_code == 200, r.text
        rt = route(r)
        assert rt["tier"] == "reasoning" and rt["task"] == "math" and rt["template"] == "math@2"
        req = b["big"].requests[-1]
        # The template's tokens lead the prompt: system, few-shot turns, then the request.
        # WordTokenizer: [1], then per message [2] + its words + [3], then [2]. The template alone ends with
        # that [2] too, and the request's own message starts with one: both count as shared.
        system, shot_q, shot_a, ask = 6 + 2, 3 + 2, 1 + 2, 5 + 2
        assert int(rt["template_tokens"]) == 1 + system + shot_q + shot_a + 1
        assert len(req.prompt_token_ids) == 1 + system + shot_q + shot_a + ask + 1
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == len(req.prompt_token_ids)  # the template's tokens are prompt tokens
        labels = {"model": "big", "template": "math@2", "applied": "true"}
        assert s.sample("tandem_template_requests_total", **labels) == 1


async def test_request_with_its_own_system_message_keeps_it_and_tenants_override() -> None:
    b = await _engines()
    async with stack(b, templates={"library": LIBRARY}, routing=ROUTING) as s:
        own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
        r = await s.client.post(
            "/v1/chat/completions", json=_chat(messages=own, max_tokens=4), headers={"x-tandem-task": "math"}
        )
        rt = route(r)
        assert "template" not in rt and rt["template_skipped"] == "math@2:own_system"
        assert len(b["big"].requests[-1].prompt_token_ids) == 1 + 3 + 3 + 1
        # Tenant `old` is pinned to math@1: its stop sequence and sampling defaults apply.
        r = await s.client.post(
            "/v1/chat/completions", json=_chat(), headers={"x-tandem-task": "math", "x-tandem-tenant": "old"}
        )
        assert route(r)["template"] == "math@1"
        sent = b["big"].requests[-1].sampling
        assert sent.stop == ["END"] and sent.temperature == 0.1 and sent.max_tokens == 7
        # ... but a field the client sets wins over the template's default.
        r = await s.client.post(
            "/v1/chat/completions",
            json=_chat(temperature=0.9, max_tokens=3, stop=["x"]),
            headers={"x-tandem-task": "math", "x-tandem-tenant": "old"},
        )
        sent = b["big"].requests[-1].sampling
        assert sent.temperature == 0.9 and sent.max_tokens == 3 and sent.stop == ["x", "END"]


async def test_tier_binding_applies_to_a_named_model_and_text_completions_get_none() -> None:
    b = await _engines()
    async with stack(b, templates={"library": LIBRARY}, routing=ROUTING) as s:
        r = await s.client.post("/v1/chat/completions", json=_chat("small", max_tokens=2))
        assert route(r)["template"] == "tiered@1" and route(r)["how"] == "model"
        r = await s.client.post("/v1/completions", json={"model": "small", "prompt": "a b", "max_tokens": 2})
        assert r.status_code == 200 and "template" not in route(r)
        assert b["small"].requests[-1].prompt_token_ids == [1, *b["small"].requests[-1].prompt_token_ids[1:]]
        assert len(b["small"].requests[-1].prompt_token_ids) == 3


async def test_degraded_request_keeps_its_template_on_the_fallback_model() -> None:
    b: dict[str, Any] = await _engines()
    b["big"] = FlakyBackend()  # every attempt fails with a 503: the request goes down the chain
    async with stack(b, templates={"library": LIBRARY}, routing=ROUTING) as s:
        r = await s.client.post(
            "/v1/chat/completions", json=_chat(max_tokens=2), headers={"x-tandem-task": "math"}
        )
        assert r.status_code == 200, r.text
        rt = route(r)
        assert rt["model"] == "small" and rt["template"] == "math@2" and "degraded_from" in rt
        assert b["small"].requests[-1].prompt_token_ids[:2] == [1, 2]  # the template's system message


def test_tandem_templates_check_validates_a_file_against_a_spec(tmp_path: Path, capsys) -> None:
    from serving.cli import main
    from serving.config import default_config_path, load_spec

    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(load_spec(default_config_path()).templates.library.model_dump(mode="json"))
    )
    assert main(["templates", "check", str(good)]) == 0
    assert "ok (4 templates: classify@1, code@1, extract@1, math@1; 4 bindings)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"templates": [{"name": "m", "system": "s"}], "bindings": [{"task": "poetry", "template": "m"}]}
        )
    )
    assert main(["templates", "check", str(bad)]) == 2
    assert "bindings[0].task: unknown task type 'poetry'" in capsys.readouterr().err


async def test_a_templates_default_max_tokens_is_an_upper_bound_on_a_fallback_model_too() -> None:
    lib = {
        "templates": [{"name": "long", "system": "answer at length", "sampling": {"max_tokens": 100}}],
        "bindings": [{"task": "math", "template": "long"}],
    }
    b: dict[str, Any] = await _engines()
    b["big"] = FlakyBackend()
    async with stack(b, max_len={"small": 64}, templates={"library": lib}, routing=ROUTING) as s:
        r = await s.client.post("/v1/chat/completions", json=_chat(), headers={"x-tandem-task": "math"})
        assert r.status_code == 200, r.text
        assert route(r)["model"] == "small"  # 100 output tokens do not fit its 64: fewer, not a skip
        sent = b["small"].requests[-1]
        assert sent.sampling.max_tokens == 64 - len(sent.prompt_token_ids)
