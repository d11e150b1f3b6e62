"""Certified exit thresholds from one recorded pass (Learn-then-Test, fixed-sequence testing).

Inputs are what ``Runtime.record`` returns for the calibration set: every exit's confidence and
prediction and the final head's, measured on the deployed backend and precision. Every candidate
is then evaluated offline with ``exit_decisions`` (the runtime's own rule: the first exit whose
confidence reaches its threshold; a test checks the runtime agrees).

Candidates lie on one-dimensional paths fixed before any loss is seen: along path p, grid point
j gives exit k the threshold ``1 - (1 - g_j) * s_pk`` for a fixed grid ``g`` (conservative ->
aggressive) and fixed per-exit scales ``s_p``. Each path is tested with fixed-sequence testing at
``epsilon / len(paths)`` (Bonferroni), so the union of their safe points is certified at
``epsilon``; among the safe points the one with the lowest expected latency wins. Exits left out
of ``exits`` are off on every candidate: threshold None, so they never fire and their heads are
not run (``calibration.exit_selection`` chooses which to leave out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from calibration.ltt import certifiable_tolerance, learn_then_test
from runtimes.errors import CalibrationError, ConfigError

__all__ = ["GRID", "PATHS", "exit_decisions", "losses", "path_costs", "expected_cost", "path_thresholds", "candidates",
           "Candidate", "Selection", "certify", "within_budget", "check_inputs", "check_paths",
           "check_exits"]

# 1 - g spans 1e-4 .. 1 geometrically: dense where max-softmax confidences of good exits live
GRID = 1.0 - np.geomspace(1e-4, 1.0, 64)
# per-exit scales of (1 - g); index k is clipped to the last entry for deeper exits
PATHS: dict[str, tuple[float, ...]] = {
    "shared": (1.0,),  # one threshold for every exit
    "strict-early": (0.25, 0.5, 1.0),  # earlier exits need more confidence
}


def exit_decisions(confidences: np.ndarray, thresholds: Sequence[float | None]) -> np.ndarray:
    """(N, K + 1) confidences -> (N,) index of the exit taken (K = the final head)."""
    n, k1 = confidences.shape
    taken = np.full(n, k1 - 1, dtype=np.int64)
    undecided = np.ones(n, dtype=bool)
    for k, t in enumerate(thresholds):
        if t is None:
            continue
        fire = undecided & (confidences[:, k] >= t)
        taken[fire] = k
        undecided &= ~fire
    return taken


def losses(predictions: np.ndarray, taken: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Per-sample loss of the early-exit answer: disagreement with the full model (label-free) or,
    with labels, the accuracy drop ``max(0, err_early - err_full)``; both are 0/1."""
    early = predictions[np.arange(len(taken)), taken]
    full = predictions[:, -1]
    if labels is None:
        return (early != full).astype(np.float64)
    return np.maximum(0, (early != labels).astype(np.int64) - (full != labels).astype(np.int64)).astype(np.float64)


def path_costs(stage_costs: Sequence[float], exit_costs: Sequence[float],
               thresholds: Sequence[float | None]) -> np.ndarray:
    """Cost of a sample leaving at exit k (the last entry: the final head): the segments up to it
    plus every enabled head passed on the way."""
    k1 = len(stage_costs)
    per_exit = np.empty(k1)
    for k in range(k1):
        heads = sum(exit_costs[i] for i in range(min(k + 1, k1 - 1)) if thresholds[i] is not None)
        per_exit[k] = sum(stage_costs[:k + 1]) + heads
    return per_exit


def expected_cost(taken: np.ndarray, stage_costs: Sequence[float], exit_costs: Sequence[float],
                  thresholds: Sequence[float | None]) -> float:
    """Mean cost of the chain over the exits ``taken``."""
    return float(path_costs(stage_costs, exit_costs, thresholds)[taken].mean())


def path_thresholds(path: str, j: int, num_exits: int, exits: Sequence[int] | None = None) -> tuple[float | None, ...]:
    """Grid point ``j`` of ``path``; exits not in ``exits`` (default: all on) are off (None)."""
    scales = PATHS[path]
    on = range(num_exits) if exits is None else exits
    return tuple(float(1.0 - (1.0 - GRID[j]) * scales[min(k, len(scales) - 1)]) if k in on else None
                 for k in range(num_exits))


@dataclass(frozen=True)
class Candidate:
    path: str
    index: int
    thresholds: tuple[float | None, ...]  # None: exit off
    risk: float  # empirical loss on the calibration set
    pvalue: float
    cost: float  # expected cost, in the unit of the stage costs
    exit_rate: float  # share of samples leaving before the final head


@dataclass(frozen=True)
class Selection:
    chosen: Candidate | None  # None: nothing certified, early exit stays off
    n: int
    delta: float
    epsilon: float
    method: str
    safe: int  # number of certified candidates over all paths
    tightest_tolerance: float  # the smallest delta this n could certify (zero losses)


def candidates(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray | None, path: str,
               stage_costs: Sequence[float], exit_costs: Sequence[float],
               exits: Sequence[int] | None = None) -> tuple[list[Candidate], np.ndarray]:
    """Every grid point of ``path`` evaluated offline (p-values not yet computed: 1.0), and the
    (grid points, samples) losses."""
    k = conf.shape[1] - 1
    rows, out = [], []
    for j in range(len(GRID)):
        th = path_thresholds(path, j, k, exits)
        taken = exit_decisions(conf, th)
        rows.append(losses(pred, taken, labels))
        out.append(Candidate(path, j, th, float(rows[-1].mean()), 1.0, expected_cost(taken, stage_costs, exit_costs, th),
                             float((taken < k).mean())))
    return out, np.stack(rows)


def certify(conf: np.ndarray, pred: np.ndarray, delta: float, epsilon: float, stage_costs: Sequence[float],
            exit_costs: Sequence[float], labels: np.ndarray | None = None,
            paths: Sequence[str] = ("shared",), exits: Sequence[int] | None = None) -> Selection:
    """Certified thresholds with the lowest expected cost, or ``chosen=None`` when none certifies.

    More paths search more threshold shapes but split epsilon between them, which raises the
    tightest tolerance a given n can certify; one shared threshold is the default. ``exits``: the
    exits left on (0-based, chain order; default all), fixed before these losses were seen."""
    check_inputs(conf, pred, labels, stage_costs, exit_costs)
    check_paths(paths)
    check_exits(exits, conf.shape[1] - 1)
    n = len(conf)
    safe: list[Candidate] = []
    method = "binomial"
    for path in paths:
        cands, loss_rows = candidates(conf, pred, labels, path, stage_costs, exit_costs, exits)
        res = learn_then_test(loss_rows, delta, epsilon / len(paths))
        method = res.method
        safe += [Candidate(c.path, c.index, c.thresholds, c.risk, float(res.pvalues[c.index]), c.cost, c.exit_rate)
                 for c in cands[:res.index + 1]]
    chosen = min(safe, key=lambda c: (c.cost, c.risk)) if safe else None
    return Selection(chosen, n, delta, epsilon, method, len(safe), certifiable_tolerance(n, epsilon / len(paths)))


def within_budget(conf: np.ndarray, pred: np.ndarray, budget: float, stage_costs: Sequence[float],
                  exit_costs: Sequence[float], epsilon: float, labels: np.ndarray | None = None) -> dict[str, Any]:
    """The most accurate shared threshold whose expected cost fits ``budget``, with a Clopper-Pearson
    upper bound on its risk. The choice depends on confidences and costs only, never on the losses,
    so one test at ``epsilon`` certifies the bound."""
    check_inputs(conf, pred, labels, stage_costs, exit_costs)
    cands, loss_rows = candidates(conf, pred, labels, "shared", stage_costs, exit_costs)
    fitting = [c for c in cands if c.cost <= budget]
    if not fitting:
        cheapest = min(c.cost for c in cands)
        raise CalibrationError(f"no thresholds fit the latency budget: the cheapest expected cost is {cheapest:.3f}")
    best = fitting[0]  # the grid runs conservative -> aggressive: the first that fits exits least
    k = int(loss_rows[best.index].sum())
    bound = certifiable_tolerance(len(conf), epsilon, k) if k < len(conf) else 1.0
    return {"candidate": best, "risk_upper_bound": bound}


def check_paths(paths: Sequence[str]) -> None:
    unknown = set(paths) - set(PATHS)
    if unknown or not paths:
        raise ConfigError(f"unknown threshold path(s) {sorted(unknown)}; known: {', '.join(PATHS)}")


def check_exits(exits: Sequence[int] | None, num_exits: int) -> None:
    if exits is not None and (not exits or len(set(exits)) != len(exits)
                              or not all(isinstance(k, (int, np.integer)) and 0 <= k < num_exits for k in exits)):
        raise ConfigError(f"exits must be distinct exit indices in [0, {num_exits}), at least one; found {list(exits)}")


def check_inputs(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray | None, stage_costs: Sequence[float],
                 exit_costs: Sequence[float]) -> None:
    if conf.ndim != 2 or conf.shape != pred.shape or conf.shape[1] < 2 or len(conf) == 0:
        raise ConfigError(f"confidences and predictions must be (n, exits + 1) arrays, got {conf.shape}, {pred.shape}")
    if len(stage_costs) != conf.shape[1] or len(exit_costs) != conf.shape[1] - 1:
        raise ConfigError("need one cost per stage and one per exit head")
    if labels is not None and len(labels) != len(conf):
        raise ConfigError(f"{len(labels)} labels for {len(conf)} samples")
