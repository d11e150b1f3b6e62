"""Offline exit decisions, losses, costs and the certified selection."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.thresholds import GRID, certify, exit_decisions, expected_cost, losses, within_budget
from runtimes.backends.fake import FakeBackend, fake_bundle
from runtimes.chain import run_chain
from runtimes.errors import CalibrationError, ConfigError


def test_offline_decisions_are_the_runtime_decisions() -> None:
    rng = np.random.default_rng(1)
    conf, pred = rng.random((200, 4)).astype(np.float32), rng.integers(0, 10, (200, 4))
    backend = FakeBackend(fake_bundle(3), confidences=conf, predictions=pred)
    for thresholds in ([0.3, 0.6, 0.9], [None, 0.5, None], [0.95, 0.95, 0.95], [float(GRID[40])] * 3):
        out = run_chain(backend, backend.bundle, {"x": np.arange(200, dtype=np.float32).reshape(200, 1, 1, 1)}, thresholds)
        assert np.array_equal(out.exits, exit_decisions(conf, thresholds))


def test_losses() -> None:
    pred = np.array([[1, 2], [3, 3], [0, 1]])
    taken = np.array([0, 0, 1])
    assert losses(pred, taken).tolist() == [1.0, 0.0, 0.0]
    labels = np.array([2, 3, 1])
    assert losses(pred, taken, labels).tolist() == [1.0, 0.0, 0.0]  # early wrong, full right: a drop
    assert losses(pred, taken, np.array([5, 3, 1])).tolist() == [0.0, 0.0, 0.0]  # both wrong: no drop


def test_expected_cost_counts_passed_heads() -> None:
    stages, heads = [1.0, 2.0, 3.0], [0.5, 0.5]
    th = [0.9, 0.9]
    assert expected_cost(np.array([0]), stages, heads, th) == 1.5
    assert expected_cost(np.array([2]), stages, heads, th) == 7.0
    assert expected_cost(np.array([2]), stages, heads, [None, None]) == 6.0
    assert expected_cost(np.array([0, 2]), stages, heads, th) == pytest.approx((1.5 + 7.0) / 2)


def _synthetic(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exit 0 agrees with the final head whenever its confidence is high."""
    rng = np.random.default_rng(seed)
    conf = np.stack([rng.random(n), rng.random(n), np.ones(n)], 1).astype(np.float32)
    full = rng.integers(0, 10, n)
    wrong = rng.random(n) < noise * (1 - conf[:, 0])
    pred = np.stack([np.where(wrong, (full + 1) % 10, full), full, full], 1)
    return conf, pred


def test_certify_picks_a_safe_cheap_point_and_stays_off_when_it_cannot() -> None:
    conf, pred = _synthetic(3000, noise=0.5)
    sel = certify(conf, pred, delta=0.02, epsilon=0.05, stage_costs=[1, 1, 1], exit_costs=[0.2, 0.2])
    c = sel.chosen
    assert c is not None and c.pvalue <= 0.05 and c.risk <= 0.02 and 0 < c.exit_rate < 1
    taken = exit_decisions(conf, c.thresholds)
    assert losses(pred, taken).mean() == pytest.approx(c.risk)
    small = certify(conf[:100], pred[:100], delta=0.01, epsilon=0.05, stage_costs=[1, 1, 1], exit_costs=[0.2, 0.2])
    assert small.chosen is None and small.tightest_tolerance > 0.01
    with pytest.raises(ConfigError, match="path"):
        certify(conf, pred, 0.02, 0.05, [1, 1, 1], [0.2, 0.2], paths=("diagonal",))


def test_latency_budget_mode() -> None:
    conf, pred = _synthetic(2000, noise=0.2)
    got = within_budget(conf, pred, budget=2.0, stage_costs=[1, 1, 1], exit_costs=[0.2, 0.2], epsilon=0.05)
    c = got["candidate"]
    assert c.cost <= 2.0 and 0 < got["risk_upper_bound"] < 1
    with pytest.raises(CalibrationError, match="budget"):
        within_budget(conf, pred, budget=0.1, stage_costs=[1, 1, 1], exit_costs=[0.2, 0.2], epsilon=0.05)
