"""loadtests.sim.fit: the least-squares fit of StepCost terms (no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.sim.fit import TERMS, Fit, StepSample, fit_step, fit_terms, nnls, predict, residuals
from loadtests.sim.profile import StepCost

TRUE = StepCost(
    base_s=4e-3,
    per_prefill_token_s=60e-6,
    per_decode_seq_s=150e-6,
    per_context_token_s=40e-9,
    per_prefill_attn_s=25e-3,
)


def _samples(step: StepCost | Fit, noise: float, seed: int = 0, chunk: int = 2048) -> list[StepSample]:
    rng = np.random.default_rng(seed)
    shapes = [StepSample.prefill(1.0, n, 0, chunk) for n in (64, 128, 256, 512, 1024, 1536, 2048, 3000)]
    shapes += [StepSample.decode(1.0, b, b * (c + 32)) for b in (1, 2, 4, 8, 16, 32) for c in (32, 1024)]
    shapes += [StepSample.decode(1.0, b, b * (2048 + 32)) for b in (1, 2, 4, 8)]
    out = []
    for s in shapes:
        t = predict(step, s) * (1 + rng.normal(0, noise))
        if s.kind == "prefill":
            out.append(StepSample.prefill(t, int(s.prefill_tokens), 0, chunk))
        else:
            out.append(StepSample.decode(t, int(s.decode_seqs), s.context_tokens))
    return out


def test_recovers_known_terms_within_a_few_percent():
    samples = _samples(TRUE, noise=0.003)
    got = fit_step(samples)
    for term in TERMS:
        want = getattr(TRUE, term)
        assert getattr(got, term) == pytest.approx(want, rel=0.05), term
    res = residuals(got, samples)
    assert res["all"]["r2"] > 0.999
    assert res["prefill"]["max_rel_err"] < 0.02 and res["decode"]["max_rel_err"] < 0.02


def test_recovers_the_request_overhead_of_a_ttft_apart_from_base_s():
    truth = Fit(TRUE, request_overhead_s=3e-3)
    fit = fit_terms(_samples(truth, noise=0.003, seed=1))
    assert fit.request_overhead_s == pytest.approx(3e-3, rel=0.05)
    for term in TERMS:
        assert getattr(fit.step, term) == pytest.approx(getattr(TRUE, term), rel=0.05), term
    # Without an overhead in the data the fit finds (almost) none.
    assert fit_terms(_samples(TRUE, noise=0.003)).request_overhead_s < 2e-4


def test_exact_samples_are_fitted_exactly():
    got = fit_step(_samples(TRUE, noise=0.0))
    for term in TERMS:
        assert getattr(got, term) == pytest.approx(getattr(TRUE, term), rel=1e-6), term


def test_terms_stay_non_negative_when_one_is_zero():
    no_attn = StepCost(4e-3, 60e-6, 150e-6, 40e-9, 0.0)
    got = fit_step(_samples(no_attn, noise=0.01, seed=3))
    assert all(getattr(got, t) >= 0 for t in TERMS)
    assert got.per_prefill_attn_s < 0.1 * TRUE.per_prefill_attn_s
    assert got.per_prefill_token_s == pytest.approx(60e-6, rel=0.05)


def test_chunked_prefill_counts_steps_and_attention_per_chunk():
    s = StepSample.prefill(1.0, 3000, 0, 2048)
    assert s.steps == 2
    assert s.prefill_attn == pytest.approx((2048 * 1024 + 952 * (2048 + 476)) / 1e6)
    one = StepSample.prefill(1.0, 100, cached_tokens=1000)
    # The same cost the simulator gives a prefill of 100 tokens on 1000 cached.
    assert predict(TRUE, one) == pytest.approx(TRUE.prefill_s(100, 1000))


def test_nnls_matches_a_known_constrained_solution():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([1.0, -1.0, 0.0])
    x = nnls(a, b)
    assert x[1] == 0.0 and x[0] == pytest.approx(0.5)


def test_too_few_prefill_lengths_name_the_prefill_terms():
    samples = [s for s in _samples(TRUE, 0.0) if s.kind == "decode"]
    samples += [StepSample.prefill(0.01, 64), StepSample.prefill(0.02, 128)]
    with pytest.raises(ValueError, match=r"per_prefill_token_s and per_prefill_attn_s .*got 2"):
        fit_step(samples)


def test_one_batch_size_names_per_decode_seq_s():
    samples = [s for s in _samples(TRUE, 0.0) if s.kind == "prefill"]
    samples += [StepSample.decode(0.005, 4, 4 * c) for c in (32, 1024)]
    with pytest.raises(ValueError, match=r"per_decode_seq_s .*2 batch sizes \(got 1\)"):
        fit_step(samples)


def test_context_tied_to_batch_names_per_context_token_s():
    samples = [s for s in _samples(TRUE, 0.0) if s.kind == "prefill"]
    samples += [StepSample.decode(0.005 + 1e-4 * b, b, b * 64) for b in (1, 2, 4, 8)]
    with pytest.raises(ValueError, match="per_context_token_s"):
        fit_step(samples)


def test_no_samples_name_every_missing_group():
    with pytest.raises(ValueError) as e:
        fit_step([])
    assert "per_prefill_token_s" in str(e.value) and "per_decode_seq_s" in str(e.value)


def test_a_non_positive_time_is_refused():
    samples = _samples(TRUE, 0.0)
    samples[0] = StepSample.prefill(0.0, 64)
    with pytest.raises(ValueError, match="positive"):
        fit_step(samples)
