"""The shipped engine profiles: each parses, and each reproduces the published figures it was built from.

`EngineProfile` has no field for anchors, so the anchors live here: for each profile, a scenario
(decode step, idle TTFT, vLLM `benchmark_latency`, or an offline max-throughput run), the published
figure, and where it comes from. The prediction uses only the profile's `StepCost` and limits.

A band other than +-25 % marks a published figure from a configuration strictly faster or slower than
the profile's (another engine, dtype or TP degree): the profile must land on the right side of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest

from loadtests.sim.profile import PROFILE_DIR, EngineProfile, ProfileError, load_profile, parse_profile

SHIPPED = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
PUBLISHED = (
    "l4-llama-3.1-8b-int4",
    "h100-llama-3.1-8b-int4",
    "h100-llama-3.3-70b-fp8-tp4",
    "h100-llama-3.3-70b-fp8-tp8",
)

# --- predictions from a profile ------------------------------------------------------------------


def ttft_idle(p: EngineProfile, prompt: int) -> float:
    """First token of a `prompt`-token request on an idle replica: its chunks, one step each."""
    t, done = 0.0, 0
    while done < prompt:
        n = min(p.max_num_batched_tokens, prompt - done)
        t += p.step.prefill_s(n, done)
        done += n
    return t


def itl(p: EngineProfile, batch: int, ctx: int) -> float:
    """One decode step of `batch` sequences holding `ctx` tokens each."""
    return p.step.decode_s(batch, batch * ctx)


def decode_tps(p: EngineProfile, batch: int, ctx: int) -> float:
    """Output tokens/s of a decode-only batch."""
    return batch / itl(p, batch, ctx)


def bench_latency(p: EngineProfile, batch: int, inp: int, out: int) -> float:
    """vLLM `benchmark_latency`: `batch` prompts of `inp` tokens prefilled together (in token-budget
    chunks, each sequence attending to its own prompt), then `out - 1` decode steps."""
    t, left = 0.0, batch * inp
    while left > 0:
        n = min(p.max_num_batched_tokens, left)
        t += p.step.base_s + p.step.per_prefill_token_s * n + p.step.per_prefill_attn_s * n * (inp / 2) / 1e6
        left -= n
    return t + sum(itl(p, batch, inp + i) for i in range(1, out))


def offline_tps(p: EngineProfile, isl: int, osl: int) -> float:
    """Output tokens/s of an offline max-throughput run (every request queued at t=0), in steady state:
    `batch` sequences decode each step, and the B/osl requests that finish are replaced by prefilling
    B*isl/osl prompt tokens in the same (chunked-prefill) steps. The batch is capped by `max_num_seqs`,
    by the KV cache at the average footprint isl + osl/2, and by the per-step token budget."""
    batch = min(p.max_num_seqs, p.kv_tokens // (isl + osl // 2))
    batch = min(batch, int(p.max_num_batched_tokens / (1 + isl / osl)))
    s = p.step
    step = (
        s.base_s
        + s.per_prefill_token_s * batch * isl / osl
        + s.per_prefill_attn_s * (batch / osl) * isl * isl / 2 / 1e6
        + s.per_decode_seq_s * batch
        + s.per_context_token_s * batch * (isl + osl / 2)
    )
    return batch / step


SCENARIOS = {
    "ttft_idle": ttft_idle,
    "itl": itl,
    "decode_tps": decode_tps,
    "bench_latency": bench_latency,
    "offline_tps": offline_tps,
}

# --- the anchors ---------------------------------------------------------------------------------

WITHIN = (0.75, 1.25)


@dataclass(frozen=True)
class Anchor:
    profile: str
    scenario: str
    args: tuple[int, ...]
    published: float
    source: str
    scale: float = 1.0  # published x scale is what the profile is compared with (a derived anchor)
    band: tuple[float, float] = WITHIN  # accepted prediction / (published x scale)
    why: str = ""

    @property
    def id(self) -> str:
        return f"{self.profile}:{self.scenario}{self.args}"


TRTLLM_017 = "TensorRT-LLM v0.17 perf overview (docs/source/performance/perf-overview.md)"
VLLM_23197 = "vLLM PR #23197 benchmark_latency on H100, --input-len 256 --output-len 32"
NIM_TP2 = "NVIDIA NIM 1.8.0 benchmarks, Llama-3.3-70b-instruct, 2 x H100 fp8 TP2, 5000 in/500 out, conc. 1"
FASTER = "published config is strictly faster"
SLOWER = "published config is strictly slower"

ANCHORS = [
    # L4, AWQ INT4 8B: no published figure of this exact replica; a floor and a spec-scaled anchor.
    Anchor("l4-llama-3.1-8b-int4", "offline_tps", (215, 198), 513.2,
           "arc53/llm-price-compass gpu-benchmarks.csv: vLLM, Llama-3.1-8B BF16, 1 x L4, ShareGPT 1000 "
           "prompts (215,196 in / 197,739 out tokens) at rate inf",
           band=(1.0, 4.0), why=f"{SLOWER}: BF16 streams 3.4x the weight bytes and leaves 3.5x less KV"),
    Anchor("l4-llama-3.1-8b-int4", "offline_tps", (2048, 128), 1066.52,
           f"{TRTLLM_017}: L40S FP8 Llama-3.1-8B TP1, ISL/OSL 2048/128",
           scale=121 / 733, why="prefill-bound run scaled by L4 FP16 / L40S FP8 dense tensor peak"),
    # H100, AWQ INT4 8B: vLLM's own w4a16 (Marlin) latency table; FP8 TRT-LLM as a ceiling.
    Anchor("h100-llama-3.1-8b-int4", "bench_latency", (1, 256, 32), 0.154,
           f"{VLLM_23197}, Llama3.1-8B new RTN Int4 (Marlin w4a16), batch 1"),
    Anchor("h100-llama-3.1-8b-int4", "bench_latency", (4, 256, 32), 0.194, f"{VLLM_23197}, ... batch 4"),
    Anchor("h100-llama-3.1-8b-int4", "bench_latency", (8, 256, 32), 0.216, f"{VLLM_23197}, ... batch 8"),
    Anchor("h100-llama-3.1-8b-int4", "bench_latency", (16, 256, 32), 0.267, f"{VLLM_23197}, ... batch 16"),
    Anchor("h100-llama-3.1-8b-int4", "offline_tps", (2048, 128), 3556.73,
           f"{TRTLLM_017}: H100 FP8 Llama-3.1-8B TP1, ISL/OSL 2048/128",
           band=(0.3, 1.0), why=f"{FASTER}: FP8 tensor cores prefill at ~2x the FP16 rate w4a16 uses"),
    # H100 x4, FP8 70B.
    Anchor("h100-llama-3.3-70b-fp8-tp4", "offline_tps", (2048, 128), 1302.6,
           f"{TRTLLM_017}: H100 FP8 LLaMA v3.1 70B TP4, ISL/OSL 2048/128"),
    Anchor("h100-llama-3.3-70b-fp8-tp4", "offline_tps", (128, 2048), 11511.93,
           f"{TRTLLM_017}: H100 FP8 LLaMA v3.1 70B TP4, ISL/OSL 128/2048"),
    Anchor("h100-llama-3.3-70b-fp8-tp4", "offline_tps", (1000, 1000), 7430.99,
           f"{TRTLLM_017}: H100 FP8 LLaMA v3.1 70B TP4, ISL/OSL 1000/1000"),
    Anchor("h100-llama-3.3-70b-fp8-tp4", "bench_latency", (1, 256, 32), 0.558,
           f"{VLLM_23197}, Llama3.3-70B BF16 on 4 GPUs, batch 1",
           band=(0.4, 1.0), why=f"{SLOWER}: BF16 streams twice the weight bytes on the same 4 x H100"),
    Anchor("h100-llama-3.3-70b-fp8-tp4", "itl", (1, 5000), 0.01858, f"{NIM_TP2}: ITL",
           band=(0.4, 1.0), why=f"{SLOWER}: TP2 streams twice the per-GPU weight bytes"),
    Anchor("h100-llama-3.3-70b-fp8-tp4", "ttft_idle", (5000,), 0.40677, f"{NIM_TP2}: TTFT",
           band=(0.3, 1.0), why=f"{SLOWER}: TP2 has half the FLOPS"),
    # H100 x8, FP8 70B.
    Anchor("h100-llama-3.3-70b-fp8-tp8", "offline_tps", (2048, 128), 1923.41,
           f"{TRTLLM_017}: H100 FP8 LLaMA v3.1 70B TP8, ISL/OSL 2048/128"),
    Anchor("h100-llama-3.3-70b-fp8-tp8", "offline_tps", (128, 2048), 17061.82,
           f"{TRTLLM_017}: H100 FP8 LLaMA v3.1 70B TP8, ISL/OSL 128/2048"),
    Anchor("h100-llama-3.3-70b-fp8-tp8", "offline_tps", (1000, 1000), 11451.16,
           f"{TRTLLM_017}: H100 FP8 LLaMA v3.1 70B TP8, ISL/OSL 1000/1000"),
    Anchor("h100-llama-3.3-70b-fp8-tp8", "itl", (1, 5000), 0.01858, f"{NIM_TP2}: ITL",
           band=(0.3, 1.0), why=f"{SLOWER}: TP2 streams 4x the per-GPU weight bytes"),
]  # fmt: skip


def test_the_published_profiles_ship():
    assert set(PUBLISHED) <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_parses_and_cites(name):
    p = load_profile(name)
    assert p.name == name
    assert len(p.sources) >= 2, "a profile cites at least two sources"
    assert p.notes.strip(), "notes show how each term was derived or fitted"
    assert load_profile(PROFILE_DIR / f"{name}.yaml") == p


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_profile_has_anchors(name):
    assert sum(a.profile == name for a in ANCHORS) >= 1
    assert sum(a.profile == name and a.band == WITHIN for a in ANCHORS) >= 1, "one anchor within 25 %"


@pytest.mark.parametrize("anchor", ANCHORS, ids=lambda a: a.id)
def test_profile_reproduces_published_anchor(anchor):
    p = load_profile(anchor.profile)
    predicted = SCENARIOS[anchor.scenario](p, *anchor.args)
    target = anchor.published * anchor.scale
    lo, hi = anchor.band
    ratio = predicted / target
    assert lo <= ratio <= hi, (
        f"{anchor.id}: predicted {predicted:.4g}, published {anchor.published:.4g} x {anchor.scale:.3g}"
        f" -> ratio {ratio:.2f} outside [{lo}, {hi}] ({anchor.why or 'within 25 %'}; {anchor.source})"
    )


def test_tensor_parallelism_speeds_up_the_70b_replica():
    tp4, tp8 = load_profile("h100-llama-3.3-70b-fp8-tp4"), load_profile("h100-llama-3.3-70b-fp8-tp8")
    assert tp8.gpus == 2 * tp4.gpus
    assert itl(tp8, 1, 1024) < itl(tp4, 1, 1024)
    assert ttft_idle(tp8, 2048) < ttft_idle(tp4, 2048)
    assert tp8.kv_tokens > 2 * tp4.kv_tokens  # half the weights per GPU frees more than half the memory


# --- parse_profile rejects broken profiles, naming the field -----------------------------------


@pytest.fixture
def valid() -> dict:
    return load_profile("h100-llama-3.1-8b-int4").as_dict()


def test_a_valid_dict_round_trips(valid):
    assert parse_profile(copy.deepcopy(valid), "h100-llama-3.1-8b-int4.yaml") == load_profile(
        "h100-llama-3.1-8b-int4"
    )


def test_rejects_unknown_field(valid):
    valid["tokens_per_joule"] = 3
    with pytest.raises(ProfileError, match="tokens_per_joule"):
        parse_profile(valid, "x.yaml")


def test_rejects_negative_step_term(valid):
    valid["step"]["per_context_token_s"] = -1e-9
    with pytest.raises(ProfileError, match=r"step\.per_context_token_s"):
        parse_profile(valid, "x.yaml")


@pytest.mark.parametrize("sources", [[], None])
def test_rejects_missing_sources(valid, sources):
    valid["sources"] = sources
    with pytest.raises(ProfileError, match="sources"):
        parse_profile(valid, "x.yaml")


def test_rejects_token_budget_below_block_size(valid):
    valid["max_num_batched_tokens"] = valid["block_tokens"] - 1
    with pytest.raises(ProfileError, match="max_num_batched_tokens"):
        parse_profile(valid, "x.yaml")
