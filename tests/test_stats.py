"""Paired accuracy comparison (bitalloc.report.stats) against independent references: numpy's standard deviation
of the per-sample differences, brute-force binomial tails, scipy's binomtest where installed, and Monte Carlo."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from bitalloc.report.stats import decode_mask, encode_mask, mcnemar_exact_p, paired_comparison


def _correlated(n: int, p_a: float, p_b: float, p_both: float, rng: np.random.Generator):
    """Outcomes with P(a)=p_a, P(b)=p_b, P(a and b)=p_both (a 2x2 joint distribution)."""
    probs = [p_both, p_a - p_both, p_b - p_both, 1 - p_a - p_b + p_both]  # (1,1), (1,0), (0,1), (0,0)
    cell = rng.choice(4, size=n, p=probs)
    return np.isin(cell, (0, 1)), np.isin(cell, (0, 2))


def test_difference_and_se_match_numpy():
    rng = np.random.default_rng(0)
    a, b = _correlated(5000, 0.86, 0.85, 0.83, rng)
    c = paired_comparison(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    assert c.n == 5000 and c.diff == pytest.approx(d.mean(), abs=1e-15)
    assert c.se == pytest.approx(d.std(ddof=0) / math.sqrt(d.size), rel=1e-12)
    assert c.accuracy_a == pytest.approx(a.mean()) and c.accuracy_b == pytest.approx(b.mean())
    assert c.only_a == int((a & ~b).sum()) and c.only_b == int((b & ~a).sum())
    # much smaller than the unpaired standard error of two independent binomials (that is the point)
    unpaired = math.sqrt(c.accuracy_a * (1 - c.accuracy_a) / c.n + c.accuracy_b * (1 - c.accuracy_b) / c.n)
    assert c.se < 0.6 * unpaired
    # antisymmetric
    r = paired_comparison(b, a)
    assert r.diff == -c.diff and r.se == c.se and r.p_value == c.p_value


def test_se_is_the_sampling_spread_of_the_difference_monte_carlo():
    rng = np.random.default_rng(1)
    diffs, ses = [], []
    for _ in range(2000):
        c = paired_comparison(*_correlated(2000, 0.80, 0.79, 0.76, rng))
        diffs.append(c.diff)
        ses.append(c.se)
    assert np.mean(diffs) == pytest.approx(0.01, abs=3 * np.std(diffs) / math.sqrt(len(diffs)))
    assert np.std(diffs) == pytest.approx(np.mean(ses), rel=0.05)


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (0, 1), (3, 3), (2, 9), (13, 4), (25, 40), (0, 30)])
def test_mcnemar_matches_brute_force_binomial(only_a, only_b):
    m, k = only_a + only_b, min(only_a, only_b)
    ref = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) * 0.5 ** m for i in range(k + 1)))
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(ref, rel=1e-12, abs=1e-300)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy not installed")
@pytest.mark.parametrize("only_a,only_b", [(180, 230), (1200, 1105), (4000, 4000), (60, 10)])
def test_mcnemar_matches_scipy_binomtest_for_large_counts(only_a, only_b):
    from scipy.stats import binomtest

    ref = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
    assert mcnemar_exact_p(only_a, only_b) == pytest.approx(ref, rel=1e-9)


def test_mcnemar_p_is_roughly_uniform_under_the_null():
    """Under the null (exchangeable disagreements) P(p < 0.05) is at most 0.05 (the exact test is conservative)."""
    rng = np.random.default_rng(2)
    m = rng.binomial(400, 0.5, size=4000)
    ps = np.array([mcnemar_exact_p(int(k), 400 - int(k)) for k in m])
    assert 0.02 < (ps < 0.05).mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / ps.size)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same samples"):
        paired_comparison([True, False], [True])
    with pytest.raises(ValueError, match="zero samples"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact_p(-1, 3)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 10000])
def test_mask_round_trip(n):
    mask = np.random.default_rng(n).random(n) < 0.8
    text = encode_mask(mask)
    assert text.startswith(f"{n}:")
    out = decode_mask(text)
    assert out.dtype == bool and np.array_equal(out, mask)
    assert np.array_equal(decode_mask(encode_mask(torch.as_tensor(mask))), mask)


def test_corrupt_masks_are_rejected():
    text = encode_mask(np.ones(100, dtype=bool))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        decode_mask(text[:-8])
    with pytest.raises(ValueError, match="not an encoded"):
        decode_mask("garbage")
    with pytest.raises(ValueError, match="not an encoded"):
        decode_mask("12:@@@@")
