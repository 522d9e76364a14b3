"""Engine profiles: what one replica of (model, accelerator, parallelism, dtype) costs in time and memory.

A profile is a data file (`loadtests/sim/profiles/*.yaml`, or any path) that the simulator's engine
model reads. Every term is either fitted from measurements of the real engine (`python -m loadtests
fit-profile`, which writes the file) or derived from published figures, cited in the file's `sources`.

**One engine step** (one forward pass over the batch vLLM's scheduler built) takes

    step_s = base_s
           + per_prefill_token_s  x new prompt tokens computed in the step (chunked prefill)
           + per_prefill_attn_s   x sum over those chunks of new tokens x context tokens (/ 1e6)
           + per_decode_seq_s     x sequences decoding one token in the step
           + per_context_token_s  x sum of those sequences' context lengths (KV read by attention)

which is the linear-plus-attention form Vidur and Frontier fit per operator, collapsed to the step.
Cached prompt tokens cost nothing to compute but count as context. The scheduler's limits are
vLLM's: `max_num_seqs` sequences and a `max_num_batched_tokens` token budget per step. KV memory is
`kv_blocks` blocks of `block_tokens`; P/D moves `kv_bytes_per_token` x prompt tokens over a link of
`link_gbps` (plus `link_latency_s`). `startup_s` is a new replica's time to serve (weights, graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

#: The shipped profiles.
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


class ProfileError(ValueError):
    """A profile that cannot be read or used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class StepCost:
    """Seconds one engine step takes, by term (see the module docstring)."""

    base_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    per_prefill_attn_s: float = 0.0

    def prefill_s(self, new_tokens: int, context_tokens: int) -> float:
        """A step that only prefills `new_tokens` on top of `context_tokens` already cached."""
        return (
            self.base_s
            + self.per_prefill_token_s * new_tokens
            + self.per_prefill_attn_s * new_tokens * (context_tokens + new_tokens / 2) / 1e6
        )

    def decode_s(self, batch: int, context_tokens: int) -> float:
        """A step that only decodes: `batch` sequences holding `context_tokens` in all."""
        return self.base_s + self.per_decode_seq_s * batch + self.per_context_token_s * context_tokens


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """One replica's costs and limits.

    Attributes:
        name: the profile's id (its file name without `.yaml`).
        model: the model it describes.
        accelerator: 'cpu', or a GPU type (H100, L4, ...): what a pool's `accelerator` names.
        tp, pp: parallelism of one replica; `gpus` = tp x pp.
        dtype: weights' type (bf16, fp8, int4-awq, float32).
        step: per-step cost terms.
        max_num_seqs, max_num_batched_tokens: vLLM scheduler limits.
        block_tokens, kv_blocks: KV cache block size and count.
        kv_bytes_per_token: KV bytes of one token (all layers), what a P/D hand-off moves.
        link_gbps, link_latency_s: the KV link between a prefill and a decode replica.
        startup_s: time from start to ready.
        gpu_hour_usd: price of one accelerator for an hour (the planner's cost).
        sources: where each figure came from (citations, or the fit command's run).
    """

    name: str
    model: str
    accelerator: str
    tp: int
    pp: int
    dtype: str
    step: StepCost
    max_num_seqs: int
    max_num_batched_tokens: int
    block_tokens: int
    kv_blocks: int
    kv_bytes_per_token: int
    link_gbps: float
    link_latency_s: float
    startup_s: float
    gpu_hour_usd: float
    sources: tuple[str, ...] = field(default=())
    notes: str = ""
    #: Other model ids this profile stands for (the same weights packaged another way, e.g. a BF16
    #: checkpoint that vLLM quantizes to FP8 at load).
    serves: tuple[str, ...] = field(default=())
    #: Time a request spends getting into and out of the engine outside any step (input
    #: processing, output handling): added to its first token, not to the engine's busy time.
    request_s: float = 0.0

    @property
    def gpus(self) -> int:
        """Accelerators one replica occupies."""
        return self.tp * self.pp

    @property
    def kv_tokens(self) -> int:
        """Tokens the KV cache holds."""
        return self.kv_blocks * self.block_tokens

    def transfer_s(self, tokens: int) -> float:
        """Time to move `tokens` of KV from a prefill replica to a decode replica."""
        return self.link_latency_s + tokens * self.kv_bytes_per_token * 8 / (self.link_gbps * 1e9)

    def as_dict(self) -> dict[str, Any]:
        """The profile as its file holds it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "step":
                v = {s.name: getattr(v, s.name) for s in fields(v)}
            elif f.name in ("sources", "serves"):
                v = list(v)
            out[f.name] = v
        return out


_POSITIVE = ("max_num_seqs", "max_num_batched_tokens", "block_tokens", "kv_blocks", "tp", "pp")
_NON_NEGATIVE = ("kv_bytes_per_token", "link_latency_s", "startup_s", "gpu_hour_usd", "request_s")


def parse_profile(data: Any, origin: str) -> EngineProfile:
    """Validate a profile given as a dict (ProfileError naming the field otherwise)."""
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: a profile must be a mapping")
    known = {f.name for f in fields(EngineProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(f"{origin}: unknown field(s) {unknown}; the fields are {sorted(known)}")
    d = dict(data)
    d.setdefault("name", Path(origin).stem)
    step = d.get("step")
    if not isinstance(step, dict):
        raise ProfileError(f"{origin}: step: a mapping of {[f.name for f in fields(StepCost)]}")
    step_fields = {f.name for f in fields(StepCost)}
    bad = sorted(set(step) - step_fields)
    if bad:
        raise ProfileError(f"{origin}: step: unknown term(s) {bad}; the terms are {sorted(step_fields)}")
    try:
        d["step"] = StepCost(**{k: float(v) for k, v in step.items()})
    except TypeError as e:
        raise ProfileError(f"{origin}: step: {e}") from None
    for k, v in vars_of(d["step"]).items():
        if v < 0:
            raise ProfileError(f"{origin}: step.{k} is {v}; a cost term must be >= 0")
    if d["step"].base_s <= 0 and d["step"].per_decode_seq_s <= 0:
        raise ProfileError(f"{origin}: step.base_s or step.per_decode_seq_s must be > 0 (a step takes time)")
    d["sources"] = tuple(str(s) for s in d.get("sources") or ())
    d["serves"] = tuple(str(s) for s in d.get("serves") or ())
    missing = sorted(known - set(d) - {"sources", "notes", "serves", "request_s"})
    if missing:
        raise ProfileError(f"{origin}: missing field(s) {missing}")
    for k in _POSITIVE:
        if not isinstance(d[k], int) or d[k] < 1:
            raise ProfileError(f"{origin}: {k} is {d[k]!r}; it must be a whole number >= 1")
    for k in _NON_NEGATIVE:
        if k in d and float(d[k]) < 0:
            raise ProfileError(f"{origin}: {k} is {d[k]!r}; it must be >= 0")
    if float(d["link_gbps"]) <= 0:
        raise ProfileError(f"{origin}: link_gbps is {d['link_gbps']!r}; it must be > 0")
    if d["max_num_batched_tokens"] < d["block_tokens"]:
        raise ProfileError(f"{origin}: max_num_batched_tokens must be at least block_tokens")
    if not d["sources"]:
        raise ProfileError(f"{origin}: sources: say where the figures come from (a citation or a fit run)")
    return EngineProfile(**d)


def vars_of(obj: Any) -> dict[str, Any]:
    """A slots dataclass's fields as a dict."""
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def load_profile(name_or_path: str | Path) -> EngineProfile:
    """A shipped profile by name (`l4-llama-3.1-8b-int4`), or a profile file by path."""
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = PROFILE_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        shipped = ", ".join(sorted(q.stem for q in PROFILE_DIR.glob("*.yaml")))
        raise ProfileError(f"no profile {name_or_path!r} (a path to a .yaml, or one of: {shipped})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: not valid YAML: {e}") from None
    return parse_profile(data, str(p))


def shipped_profiles() -> list[EngineProfile]:
    """Every profile in `PROFILE_DIR`."""
    return [load_profile(p) for p in sorted(PROFILE_DIR.glob("*.yaml"))]


def dump_profile(profile: EngineProfile, path: str | Path) -> None:
    """Write `profile` as a profile file."""
    Path(path).write_text(yaml.safe_dump(profile.as_dict(), sort_keys=False, width=110))
