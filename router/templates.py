"""Prompt templates: which template a request gets, and the messages it puts before the request's.

Small specialised models answer well only in the role they were trained for (a math model that gets
no system prompt loses much of its accuracy), so the gateway puts a template's system prompt and
few-shot turns in front of a request that has none. The template goes FIRST: its tokens are then the
same leading blocks for every request that uses it, which the engines' prefix caches and the router's
block index share (within a tenant: blocks are salted per tenant).

Pure: no I/O. The spec's `templates.library` (or the mounted file that replaces it) validates into a
`Library` (serving.http.templates); `Library.select` picks by binding; `compose` builds the messages.

Selection: a binding matches a request when every field it gives (tenant, task, tier) equals the
request's; the most specific match wins (tenant 4, task 2, tier 1: a tenant's own binding beats any
shared one, a task type's beats its tier's); ties go to the first listed. A binding to `none` means
no template.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

M = TypeVar("M")

#: Roles whose message counts as the request's own system prompt.
SYSTEM_ROLES = ("system", "developer")
#: A binding's template meaning "no template".
NO_TEMPLATE = "none"


class Inject(StrEnum):
    """When a template's messages go in (serving.config.InjectMode)."""

    IF_MISSING = "if_missing"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class Template:
    """One version of a template."""

    name: str
    version: int
    system: str = ""
    few_shot: tuple[tuple[str, str], ...] = ()
    stop: tuple[str, ...] = ()
    #: Sampling defaults (field -> value) for the fields a request does not set.
    sampling: tuple[tuple[str, Any], ...] = ()
    inject: Inject = Inject.IF_MISSING

    @property
    def ref(self) -> str:
        """`name@version`: what x-tandem-route, the metrics and the session record show."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True, slots=True)
class Binding:
    """`template` (a name, `name@version`, or `none`) for requests matching every field given."""

    template: str
    tier: str | None = None
    task: str | None = None
    tenant: str | None = None

    def specificity(self, tenant: str, tier: str | None, task: str | None) -> int | None:
        """How specific a match this binding is for the request (None: it does not match)."""
        score = 0
        for want, have, weight in ((self.tenant, tenant, 4), (self.task, task, 2), (self.tier, tier, 1)):
            if want is None:
                continue
            if want != have:
                return None
            score += weight
        return score


@dataclass(frozen=True, slots=True)
class Choice:
    """The template chosen for a request (None: none) and whether its messages went in."""

    template: Template | None
    applied: bool = False
    #: Why a chosen template was not applied (e.g. "own_system"); "" when applied or none chosen.
    skipped: str = ""


@dataclass(frozen=True, slots=True)
class Library:
    """Templates by name and version, and their bindings. `digest` identifies the content."""

    templates: dict[str, dict[int, Template]] = field(default_factory=dict)
    bindings: tuple[Binding, ...] = ()
    digest: str = ""

    def __len__(self) -> int:
        return sum(len(v) for v in self.templates.values())

    def resolve(self, ref: str) -> Template | None:
        """The template `ref` names: `name@version`, or `name` (its highest version); None for `none`
        or a name not in the library."""
        if ref == NO_TEMPLATE:
            return None
        name, _, version = ref.partition("@")
        versions = self.templates.get(name)
        if not versions:
            return None
        if version:
            return versions.get(int(version))
        return versions[max(versions)]

    def select(self, tenant: str, tier: str | None, task: str | None) -> Template | None:
        """The template of a request of `tenant`, served by `tier`, of task type `task`."""
        best: Binding | None = None
        best_score = -1
        for b in self.bindings:
            score = b.specificity(tenant, tier, task)
            if score is not None and score > best_score:
                best, best_score = b, score
        return self.resolve(best.template) if best is not None else None


def compose(
    template: Template | None,
    messages: Sequence[M],
    role: Callable[[M], str],
    text: Callable[[M], str],
    make: Callable[[str, str], M],
) -> tuple[list[M], Choice]:
    """The messages to send: the template's first (system prompt, then few-shot turns), then the
    request's; and what was done.

    - `if_missing`: only when the request has no system/developer message of its own;
    - `always`: the template's system prompt opens the one system message, the request's own system
      text follows it there (chat templates expect a single, leading system message);
    - `never`: nothing (a template that switches templates off, e.g. for one tenant).
    """
    if template is None:
        return list(messages), Choice(None)
    if template.inject is Inject.NEVER:
        return list(messages), Choice(template, False, "inject_never")
    own = [m for m in messages if role(m) in SYSTEM_ROLES]
    if own and template.inject is Inject.IF_MISSING:
        return list(messages), Choice(template, False, "own_system")
    head: list[M] = []
    system = template.system
    if own:  # inject: always
        system = "\n\n".join(p for p in [system, *(text(m) for m in own)] if p)
    if system:
        head.append(make("system", system))
    head += [make(r, c) for r, c in template.few_shot]
    rest = [m for m in messages if role(m) not in SYSTEM_ROLES] if own else list(messages)
    return head + rest, Choice(template, True)


def merged_stop(template: Template | None, stop: Sequence[str]) -> list[str]:
    """The request's stop sequences and the template's (each once, the request's first)."""
    out = list(stop)
    if template is not None:
        out += [s for s in template.stop if s not in out]
    return out


def sampling_defaults(template: Template | None, client_set: set[str] | frozenset[str]) -> dict[str, Any]:
    """The template's sampling defaults for the fields the client did not set."""
    if template is None:
        return {}
    return {k: v for k, v in template.sampling if k not in client_set}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id lists (the template's share of a prompt)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
