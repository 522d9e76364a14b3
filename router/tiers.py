"""Model-routing tier: which tier (and so which model) serves a request, and its degradation chain.

A request picks its tier, in this order:

1. an explicit model name: that model (and the first tier it serves, if any);
2. the alias `auto` (``routing.auto_model``) with ``x-tandem-task: <tier>``, or with
   ``x-tandem-task: <task type>`` (``routing.tasks``: a named kind of call, such as math or code, served
   by a tier);
3. `auto` alone: the first ``routing.rules`` entry whose conditions the request's shape meets
   (reasoning effort, tools, prompt length, max_tokens); a rule may also name the task type;
4. otherwise ``routing.default_tier`` (the first tier when unset).

The task type a request ends up with (`Resolution.task`) picks its prompt template
(router.templates); a request that names a model keeps a task type its header names.

`chain()` lists the targets to try: the tier itself, then its ``fallback`` tiers in order.
Pure: no I/O; the ingress applies health and context-window checks along the chain. The router's
inputs are its own dataclasses (`Tier`, `Rule`, `RuleMatch`, `Routing`); the deployment spec's
`tiers:` and `routing:` sections validate into them (`serving.config.ServingSpec.tier_router`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TierError(ValueError):
    """A request that names an unknown model or task; `param` is what the client should fix."""

    def __init__(self, message: str, param: str, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """Conditions on a request's shape; every condition given (not None) must hold."""

    reasoning_effort: tuple[str, ...] | None = None
    tools: bool | None = None
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    min_max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """Send `auto` requests whose shape matches `when` to `tier` (as task type `task`, if given)."""

    tier: str
    when: RuleMatch = field(default_factory=RuleMatch)
    task: str | None = None


@dataclass(frozen=True, slots=True)
class Task:
    """A task type (math, code, classify, ...): a kind of call, served by `tier`."""

    name: str
    tier: str


@dataclass(frozen=True, slots=True)
class Tier:
    """A task tier: one model, its degradation chain (`fallback` tiers) and its first-token limits."""

    name: str
    model: str
    fallback: tuple[str, ...]
    ttft_slo_s: float
    first_token_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Routing:
    """How an `auto` request picks its tier."""

    auto_model: str
    default_tier: str | None = None
    rules: tuple[Rule, ...] = ()
    tasks: tuple[Task, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What tier rules look at."""

    prompt_tokens: int
    max_tokens: int | None = None
    reasoning_effort: str | None = None
    tools: bool = False


@dataclass(frozen=True, slots=True)
class Resolution:
    """The tier chosen for a request and how: model | task | rule:<index> | default; and its task
    type (None: the request named none)."""

    model: str
    tier: str | None
    how: str
    task: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """One step of a degradation chain."""

    tier: str | None
    model: str


def matches(when: RuleMatch, shape: RequestShape) -> bool:
    """Whether `shape` meets every condition of `when`."""
    if when.reasoning_effort is not None and shape.reasoning_effort not in when.reasoning_effort:
        return False
    if when.tools is not None and shape.tools != when.tools:
        return False
    if when.min_prompt_tokens is not None and shape.prompt_tokens < when.min_prompt_tokens:
        return False
    if when.max_prompt_tokens is not None and shape.prompt_tokens > when.max_prompt_tokens:
        return False
    if when.min_max_tokens is not None and (shape.max_tokens or 0) < when.min_max_tokens:
        return False
    return True


class TierRouter:
    """Resolves a request's tier and lists its degradation chain."""

    def __init__(self, tiers: list[Tier], routing: Routing, models: list[str]) -> None:
        self._tiers = {t.name: t for t in tiers}
        self._order = [t.name for t in tiers]
        self._routing = routing
        self._models = list(models)
        self._tier_of_model: dict[str, str] = {}
        for t in tiers:
            self._tier_of_model.setdefault(t.model, t.name)
        self._tasks = {t.name: t for t in routing.tasks}

    @property
    def auto_model(self) -> str:
        """The model alias that means 'pick a tier for me'."""
        return self._routing.auto_model

    @property
    def tasks(self) -> list[str]:
        """Task type names, in spec order."""
        return list(self._tasks)

    @property
    def tiers(self) -> list[str]:
        """Tier names, in spec order."""
        return list(self._order)

    def tier(self, name: str) -> Tier:
        """The tier `name` (KeyError if absent)."""
        return self._tiers[name]

    def allowed_models(self, allowed: frozenset[str] | None) -> list[str]:
        """The models a key limited to `allowed` (model and tier names; None: every one) may be
        served by: those it lists, and those of the tiers it lists. The model is what a key is
        limited to: a listed tier opens its model, so any tier served by that model too."""
        if allowed is None:
            return list(self._models)
        opened = {self._tiers[t].model for t in allowed if t in self._tiers} | set(allowed)
        return [m for m in self._models if m in opened]

    def allowed_tiers(self, allowed: frozenset[str] | None) -> list[str]:
        """The tiers whose model a key limited to `allowed` may be served by (see `allowed_models`)."""
        models = set(self.allowed_models(allowed))
        return [t for t in self._order if self._tiers[t].model in models]

    def check_allowed(self, resolution: Resolution, allowed: frozenset[str] | None) -> None:
        """TierError (403, naming `model`) unless a key limited to `allowed` may be served `resolution`.
        Only the resolved target is checked: a tier's degradation chain is the operator's policy."""
        models = self.allowed_models(allowed)
        if resolution.model in models:
            return
        asked = f"`{resolution.model}`"
        if resolution.tier:
            asked = f"tier `{resolution.tier}` (model `{resolution.model}`)"
        tiers = self.allowed_tiers(allowed)
        may = ", ".join(models + ([f"{self.auto_model} (tiers {', '.join(tiers)})"] if tiers else []))
        hint = f"; with model {self.auto_model}, pick one of its tiers with x-tandem-task" if tiers else ""
        raise TierError(
            f"this API key may not call {asked}; it may call: {may or 'nothing'}{hint}", "model", 403
        )

    def needs_shape(self, model: str, task: str | None) -> bool:
        """Whether resolving this request looks at its shape (rules), i.e. needs its prompt length."""
        return model == self.auto_model and not task and bool(self._routing.rules)

    def default_tier(self) -> str | None:
        """The tier of an `auto` request nothing else places."""
        return self._routing.default_tier or (self._order[0] if self._order else None)

    def resolve(self, model: str, task: str | None, shape: RequestShape | None = None) -> Resolution:
        """The tier and model for a request (TierError naming the field when it cannot be served)."""
        if model != self.auto_model:
            if model not in self._models:
                available = sorted(self._models) + [self.auto_model]
                raise TierError(
                    f"The model `{model}` does not exist. Available: {available}",
                    "model",
                    404,
                )
            named = task.strip().lower() if task else None
            kind = named if named in self._tasks else None
            return Resolution(model, self._tier_of_model.get(model), "model", kind)
        if not self._order:
            raise TierError(
                f"model `{self.auto_model}` needs tiers in the deployment spec; name a model instead", "model"
            )
        if task:
            name = task.strip().lower()
            kind = self._tasks.get(name)
            if kind is not None:
                return Resolution(self._tiers[kind.tier].model, kind.tier, "task", kind.name)
            tier = self._tiers.get(name)
            if tier is None:
                types = f" or a task type of {list(self._tasks)}" if self._tasks else ""
                raise TierError(
                    f"header x-tandem-task: {task!r} is not a tier; choose one of {self._order}{types}",
                    "x-tandem-task",
                )
            return Resolution(tier.model, tier.name, "task")
        if shape is not None:
            for i, rule in enumerate(self._routing.rules):
                if matches(rule.when, shape):
                    return Resolution(self._tiers[rule.tier].model, rule.tier, f"rule:{i}", rule.task)
        name = self.default_tier()
        assert name is not None
        return Resolution(self._tiers[name].model, name, "default")

    def chain(self, resolution: Resolution) -> list[Target]:
        """Targets to try in order: the resolved one, then the tier's fallbacks (each model once)."""
        out = [Target(resolution.tier, resolution.model)]
        if resolution.tier is None:
            return out
        seen = {resolution.model}
        for name in self._tiers[resolution.tier].fallback:
            t = self._tiers[name]
            if t.model not in seen:
                seen.add(t.model)
                out.append(Target(t.name, t.model))
        return out
