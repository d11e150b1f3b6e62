"""Switching off exits on a selection split, certifying on the rest: cheaper, and still certified."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.exit_selection import exit_subsets, select_and_certify, split_calibration
from calibration.thresholds import certify, exit_decisions, expected_cost, path_costs
from runtimes.errors import CalibrationError, ConfigError


def _one_useless_exit(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exits 0 and 2 agree with the final head when confident; exit 1 is never confident
    (confidence below 0.5) and mostly wrong."""
    rng = np.random.default_rng(seed)
    c0, c2 = rng.random(n), rng.random(n)
    c1 = 0.5 * rng.random(n)
    full = rng.integers(0, 10, n)
    wrong0 = rng.random(n) < 0.5 * (1 - c0)
    wrong2 = rng.random(n) < 0.2 * (1 - c2)
    conf = np.stack([c0, c1, c2, np.ones(n)], 1).astype(np.float32)
    pred = np.stack([np.where(wrong0, (full + 1) % 10, full), (full + 1 + rng.integers(0, 9, n)) % 10,
                     np.where(wrong2, (full + 1) % 10, full), full], 1)
    return conf, pred


def test_an_exit_that_never_fires_is_switched_off_and_the_expected_cost_drops() -> None:
    conf, pred = _one_useless_exit(4000)
    stages, heads = [1.0, 1.0, 1.0, 1.0], [0.2, 0.5, 0.2]
    pick = select_and_certify(conf, pred, delta=0.05, epsilon=0.05, stage_costs=stages, exit_costs=heads,
                              selection_fraction=0.3, seed=0)
    c = pick.certified.chosen
    assert c is not None and c.pvalue <= 0.05 and 1 not in pick.exits and 0 in pick.exits
    assert c.thresholds[1] is None and (pick.n_selection, pick.n_certification) == (1200, 2800)
    assert pick.certified.tightest_tolerance > pick.tightest_tolerance_all  # the split's price
    plain = certify(conf, pred, delta=0.05, epsilon=0.05, stage_costs=stages, exit_costs=heads).chosen
    assert plain is not None and all(t is not None for t in plain.thresholds)

    def cost(th: tuple[float | None, ...]) -> float:
        return expected_cost(exit_decisions(conf, th), stages, heads, th)

    # on the same (all) samples: dropping the head that never pays saves more than the split costs
    assert cost(c.thresholds) < cost(plain.thresholds) - 0.1


def test_an_off_exit_costs_nothing() -> None:
    assert path_costs([1.0, 1.0, 1.0], [0.5, 0.5], [None, 0.9]).tolist() == [1.0, 2.5, 3.5]
    assert path_costs([1.0, 1.0, 1.0], [0.5, 0.5], [0.9, None]).tolist() == [1.5, 2.5, 3.5]


def _true_risk(thresholds: tuple[float | None, ...], a: tuple[float, float]) -> float:
    """Exact risk of ``_draw``'s distribution: exit k errs with probability a_k (1 - c_k), c_k ~ U(0, 1)."""
    t0, t1 = thresholds
    risk, reach = 0.0, 1.0
    if t0 is not None:
        risk, reach = a[0] * (1 - t0) ** 2 / 2, t0
    if t1 is not None:
        risk += reach * a[1] * (1 - t1) ** 2 / 2
    return risk


def _draw(rng: np.random.Generator, n: int, a: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    c = rng.random((n, 2))
    wrong = rng.random((n, 2)) < np.asarray(a) * (1 - c)
    return np.column_stack([c, np.ones(n)]).astype(np.float64), np.column_stack([wrong, np.zeros(n)]).astype(np.int64)


def test_selection_then_certification_keeps_the_guarantee() -> None:
    """Many calibration draws from a known distribution: the true risk of what was certified
    exceeds delta in at most about epsilon of them."""
    rng = np.random.default_rng(7)
    a, delta, epsilon, trials = (0.3, 0.1), 0.05, 0.1, 300
    violations, certified = 0, 0
    for _ in range(trials):
        conf, pred = _draw(rng, 400, a)
        pick = select_and_certify(conf, pred, delta, epsilon, [1.0, 1.0, 1.0], [0.3, 0.3],
                                  seed=int(rng.integers(1 << 30)))
        if pick.certified.chosen is not None:
            certified += 1
            violations += _true_risk(pick.certified.chosen.thresholds, a) > delta
    assert certified >= 0.9 * trials  # not vacuous: nearly every draw certifies something
    assert violations / trials <= epsilon + 3 * np.sqrt(epsilon * (1 - epsilon) / trials)


def test_the_split_is_seeded_disjoint_and_complete() -> None:
    sel, cert = split_calibration(100, 0.3, seed=3)
    again = split_calibration(100, 0.3, seed=3)
    assert np.array_equal(sel, again[0]) and np.array_equal(cert, again[1])
    assert (len(sel), len(cert)) == (30, 70) and not set(sel) & set(cert) and set(sel) | set(cert) == set(range(100))
    assert not np.array_equal(sel, split_calibration(100, 0.3, seed=4)[0])
    conf, pred = _one_useless_exit(500)
    runs = [select_and_certify(conf, pred, 0.1, 0.05, [1, 1, 1, 1], [0.2, 0.5, 0.2], seed=3) for _ in range(2)]
    assert runs[0] == runs[1]
    with pytest.raises(ConfigError, match="selection_fraction"):
        split_calibration(100, 1.0, seed=0)
    with pytest.raises(CalibrationError, match="one sample on each side"):
        split_calibration(2, 0.1, seed=0)


def test_subsets_are_bounded() -> None:
    assert len(exit_subsets(3)) == 7 and exit_subsets(3)[0] == (0, 1, 2)
    assert len(exit_subsets(6)) == 63
    with pytest.raises(ConfigError, match="at most 6 exits"):
        exit_subsets(7)
