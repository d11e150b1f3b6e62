"""Learn-then-Test: p-values, the fixed-sequence walk, the reference table and the coverage guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from calibration.ltt import (LTTResult, binomial_pvalue, certifiable_tolerance, fixed_sequence, hb_pvalue,
                             learn_then_test, max_certifiable_rate)
from runtimes.errors import CalibrationError, ConfigError


# ---------------------------------------------------------------- binomial p-value

@pytest.mark.parametrize("k,n,delta", [(0, 100, 0.01), (4, 1000, 0.01), (10, 1000, 0.01), (37, 5000, 0.01),
                                       (79, 5000, 0.02), (500, 1000, 0.3), (7, 7, 0.5)])
def test_binomial_pvalue_matches_scipy(k: int, n: int, delta: float) -> None:
    assert binomial_pvalue(k, n, delta) == pytest.approx(stats.binom.cdf(k, n, delta), rel=1e-12, abs=1e-300)


def test_binomial_pvalue_known_values() -> None:
    assert binomial_pvalue(0, 100, 0.01) == pytest.approx(0.99 ** 100)
    assert binomial_pvalue(5, 5, 0.3) == pytest.approx(1.0)


def test_binomial_pvalue_monotone() -> None:
    in_k = [binomial_pvalue(k, 1000, 0.01) for k in range(0, 30)]
    assert np.all(np.diff(in_k) > 0)
    in_delta = [binomial_pvalue(8, 1000, d) for d in np.linspace(0.001, 0.05, 40)]
    assert np.all(np.diff(in_delta) < 0)


@pytest.mark.parametrize("args", [(-1, 10, 0.1), (11, 10, 0.1), (0, 0, 0.1), (1, 10, 0.0), (1, 10, 1.0),
                                  (1.5, 10, 0.1)])
def test_binomial_pvalue_rejects_bad_input(args: tuple) -> None:
    with pytest.raises(ConfigError):
        binomial_pvalue(*args)


# ---------------------------------------------------------------- Hoeffding-Bentkus p-value

def _hb_by_hand(risk: float, n: int, delta: float) -> float:
    """The Hoeffding-Bentkus p-value written out with the math module only."""
    a = min(risk, delta)
    t1 = 0.0 if a == 0 else a * math.log(a / delta)
    h1 = t1 + (1 - a) * math.log((1 - a) / (1 - delta))
    k = math.ceil(round(n * risk, 9))
    cdf = sum(math.comb(n, i) * delta ** i * (1 - delta) ** (n - i) for i in range(k + 1))
    return min(1.0, math.exp(-n * h1), math.e * cdf)


@pytest.mark.parametrize("risk,n,delta", [(0.0, 500, 0.01), (0.003, 1000, 0.01), (0.0034, 1000, 0.01),
                                          (0.0125, 800, 0.02), (0.05, 200, 0.1), (0.2, 100, 0.3)])
def test_hb_pvalue_matches_hand_formula(risk: float, n: int, delta: float) -> None:
    assert hb_pvalue(risk, n, delta) == pytest.approx(_hb_by_hand(risk, n, delta), rel=1e-9)


@pytest.mark.parametrize("risk", [0.01, 0.011, 0.05, 0.5, 1.0])
def test_hb_pvalue_is_one_when_risk_reaches_tolerance(risk: float) -> None:
    assert hb_pvalue(risk, 1000, 0.01) == pytest.approx(1.0)


def test_hb_pvalue_bounded_by_bentkus_term_and_one() -> None:
    for n in (50, 1000, 5000):
        for delta in (0.01, 0.05, 0.2):
            for risk in np.linspace(0, 1, 101):
                p = hb_pvalue(float(risk), n, delta)
                assert 0.0 <= p <= 1.0
                assert p <= math.e * stats.binom.cdf(math.ceil(n * risk - 1e-9), n, delta) * (1 + 1e-12)


def test_hb_pvalue_is_more_conservative_than_exact_binomial() -> None:
    for k in range(0, 12):
        # At k = 0 both equal (1 - delta)^n, up to rounding.
        assert hb_pvalue(k / 1000, 1000, 0.01) >= binomial_pvalue(k, 1000, 0.01) * (1 - 1e-12)


def test_hb_pvalue_rejects_bad_input() -> None:
    for args in [(-0.1, 10, 0.1), (1.1, 10, 0.1), (float("nan"), 10, 0.1), (0.1, 0, 0.1), (0.1, 10, 1.5)]:
        with pytest.raises(ConfigError):
            hb_pvalue(*args)


# ---------------------------------------------------------------- fixed-sequence testing

def test_fixed_sequence_returns_last_safe_not_first_failing() -> None:
    assert fixed_sequence([0.01, 0.02, 0.2, 0.01], 0.05) == 1


def test_fixed_sequence_first_failure_means_none() -> None:
    assert fixed_sequence([0.3, 0.01], 0.05) == -1


def test_fixed_sequence_all_safe_and_boundary() -> None:
    assert fixed_sequence([0.0, 0.01, 0.05], 0.05) == 2
    assert fixed_sequence(np.array([0.049, 0.0500001]), 0.05) == 0
    assert fixed_sequence([], 0.05) == -1


def test_fixed_sequence_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        fixed_sequence([0.01, float("nan")], 0.05)
    with pytest.raises(ConfigError):
        fixed_sequence([0.01], 0.0)


# ---------------------------------------------------------------- learn_then_test

def test_learn_then_test_picks_binomial_for_zero_one_losses() -> None:
    losses = np.zeros((3, 1000))
    losses[1, :3] = 1
    losses[2, :40] = 1
    res = learn_then_test(losses, delta=0.01, epsilon=0.05)
    assert isinstance(res, LTTResult)
    assert res.method == "binomial" and res.index == 1 and res.certified
    assert res.n == 1000 and res.delta == 0.01 and res.epsilon == 0.05
    np.testing.assert_allclose(res.risks, [0.0, 0.003, 0.04])
    np.testing.assert_allclose(res.pvalues, stats.binom.cdf([0, 3, 40], 1000, 0.01))


def test_learn_then_test_picks_hb_for_fractional_losses() -> None:
    losses = np.zeros((2, 1000))
    losses[1, :6] = 0.5
    res = learn_then_test(losses, delta=0.01, epsilon=0.05)
    assert res.method == "hoeffding-bentkus" and res.index == 1
    assert res.pvalues[1] == pytest.approx(hb_pvalue(0.003, 1000, 0.01))


def test_learn_then_test_not_certified_and_forced_method() -> None:
    losses = np.ones((2, 100))
    res = learn_then_test(losses, delta=0.01, epsilon=0.05)
    assert res.index == -1 and not res.certified
    res = learn_then_test(np.zeros((2, 1000)), delta=0.01, epsilon=0.05, method="hoeffding-bentkus")
    assert res.method == "hoeffding-bentkus" and res.index == 1


@pytest.mark.parametrize("losses,kwargs", [
    (np.full((2, 10), np.nan), {}),
    (np.full((2, 10), 1.5), {}),
    (np.full((2, 10), -0.1), {}),
    (np.zeros((2, 10)), {"delta": 0.0}),
    (np.zeros((2, 10)), {"delta": 1.0}),
    (np.zeros((2, 10)), {"epsilon": 1.0}),
    (np.full((2, 10), 0.5), {"method": "binomial"}),
    (np.zeros((2, 10)), {"method": "hoeffding"}),
    (np.zeros(10), {}),
    (np.zeros((0, 10)), {}),
    (np.zeros((2, 0)), {}),
])
def test_learn_then_test_rejects_bad_input(losses: np.ndarray, kwargs: dict) -> None:
    args = {"delta": 0.01, "epsilon": 0.05} | kwargs
    with pytest.raises(ConfigError):
        learn_then_test(losses, **args)


# ---------------------------------------------------------------- how much data

# (n, delta, binomial rate, HB rate) at epsilon = 0.05, as documented for users.
REFERENCE = [(1000, 0.01, 0.0040, 0.0030), (5000, 0.01, 0.0076, 0.0070), (5000, 0.02, 0.0166, 0.0156)]


@pytest.mark.parametrize("n,delta,binom_rate,hb_rate", REFERENCE)
def test_reference_table(n: int, delta: float, binom_rate: float, hb_rate: float) -> None:
    b = max_certifiable_rate(n, delta, 0.05, "binomial")
    h = max_certifiable_rate(n, delta, 0.05, "hoeffding-bentkus")
    assert b == pytest.approx(binom_rate, abs=2e-4)
    assert h == pytest.approx(hb_rate, abs=5e-4)
    # The returned rates certify, and one more loss does not.
    assert binomial_pvalue(round(b * n), n, delta) <= 0.05 < binomial_pvalue(round(b * n) + 1, n, delta)
    assert hb_pvalue(h, n, delta) <= 0.05 < hb_pvalue(h + 1e-6, n, delta)


def test_max_certifiable_rate_when_nothing_certifies() -> None:
    assert max_certifiable_rate(100, 0.01, 0.05, "binomial") == -1.0
    assert max_certifiable_rate(100, 0.01, 0.05, "hoeffding-bentkus") == -1.0
    with pytest.raises(ConfigError):
        max_certifiable_rate(1000, 0.01, 0.05, "hoeffding")


@pytest.mark.parametrize("n,k,eps", [(359, 0, 0.05), (1000, 4, 0.05), (5000, 37, 0.1), (200, 20, 0.01)])
def test_certifiable_tolerance_identity(n: int, k: int, eps: float) -> None:
    d = certifiable_tolerance(n, eps, k)
    assert binomial_pvalue(k, n, d) == pytest.approx(eps, rel=1e-8)
    assert binomial_pvalue(k, n, d * (1 - 1e-6)) > eps
    assert binomial_pvalue(k, n, d * (1 + 1e-6)) < eps


def test_certifiable_tolerance_edges() -> None:
    # With no losses the bound has the closed form 1 - eps**(1/n) (the "rule of three" family).
    assert certifiable_tolerance(359, 0.05) == pytest.approx(1 - 0.05 ** (1 / 359), rel=1e-10)
    with pytest.raises(CalibrationError):
        certifiable_tolerance(10, 0.05, 10)
    with pytest.raises(ConfigError):
        certifiable_tolerance(0, 0.05)


# ---------------------------------------------------------------- the guarantee, by simulation

GRID = np.linspace(1.0, 0.0, 30)  # most conservative (exit almost never) to most aggressive


def _true_risk(t: np.ndarray) -> np.ndarray:
    """R(t) = integral over c in [t, 1] of g(c) = 0.3 (1 - c)^2, for c ~ Uniform(0, 1)."""
    return 0.1 * (1.0 - t) ** 3


def _draw_losses(rng: np.random.Generator, n: int) -> np.ndarray:
    """(G, n) 0/1 losses: exiting at confidence c >= t disagrees with the full model with probability g(c)."""
    c, u = rng.random(n), rng.random(n)
    wrong = u < 0.3 * (1.0 - c) ** 2
    return ((c[None, :] >= GRID[:, None]) & wrong[None, :]).astype(float)


def test_true_risk_formula_matches_a_large_sample() -> None:
    big = _draw_losses(np.random.default_rng(1), 200_000).mean(axis=1)
    np.testing.assert_allclose(big, _true_risk(GRID), atol=2e-3)


def test_guarantee_holds_and_off_by_one_breaks_it() -> None:
    delta, epsilon, splits = 0.02, 0.1, 400
    rng = np.random.default_rng(20220101)
    risk = _true_risk(GRID)
    chosen, buggy = [], []
    for _ in range(splits):
        res = learn_then_test(_draw_losses(rng, 1000), delta, epsilon)
        chosen.append(res.index)
        failed = np.flatnonzero(res.pvalues > epsilon)
        # The classic bug: stop at the first failing point and deploy it.
        buggy.append(int(failed[0]) if failed.size else len(GRID) - 1)
    chosen, buggy = np.array(chosen), np.array(buggy)
    assert np.all(chosen >= 0)
    correct_rate = np.mean(risk[chosen] > delta)
    buggy_rate = np.mean(risk[buggy] > delta)
    assert correct_rate <= epsilon + 0.05
    assert buggy_rate > correct_rate
    assert buggy_rate > epsilon + 0.05
    # Not trivially conservative: most splits exit early on at least 40 % of inputs (the oracle: 55 %).
    assert np.mean(1.0 - GRID[chosen] >= 0.4) > 0.8
