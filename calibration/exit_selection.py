"""Switching off exits that do not pay for themselves, without weakening the guarantee.

Every sample that reaches an exit pays for its head, whether or not it leaves there; an exit that
few samples leave at costs more than it saves. ``select_and_certify`` splits the calibration set
once, by a seeded random permutation of the row indices fixed before any loss is seen, into a
*selection split* and a *certification split*:

1. On the selection split, every non-empty subset of exits (the final head is always on) on every
   threshold path is scored. Walking the grid from conservative to aggressive, the points whose
   selection risk stays at or below a *target* form the sequence's predicted safe prefix; its
   predicted cost is the lowest expected cost in that prefix (exits off charge nothing: their
   heads are not run). The (subset, path) with the lowest predicted cost wins; among equal costs
   (later exits no selection sample reaches), the one with the fewest head costs on, since a
   sample that never exits pays for every head that is on.
2. On the certification split, which the choice never saw, that one grid sequence is tested with
   the usual fixed-sequence Learn-then-Test at the full ``epsilon`` (``thresholds.certify``), and
   the cheapest certified point is returned.

Why the guarantee holds: given the selection split, the tested sequence is fixed, and the
certification split is an independent sample from the same distribution (the samples are i.i.d.
and the permutation depends on n and the seed only), so fixed-sequence testing bounds the
probability that any point it declares safe has risk above ``delta`` by ``epsilon``,
conditionally on the selection split and therefore also over the whole draw. Only one sequence is
tested, so no Bonferroni over subsets or paths. The price is data: only the certification split
certifies, so the tightest certifiable tolerance rises (reported beside the one all n would give).

The target: the certification split certifies a grid point only if its loss rate there is at most
``r_max = max_certifiable_rate(n_cert, delta, epsilon)``. Taking the cheapest of many sequences
favours those whose selection risk came out optimistically low, so the target is ``r_max`` less one
standard error of the difference of the two splits' estimates at that rate,
``sqrt(r_max (1 - r_max) (1 / n_sel + 1 / n_cert))``, floored at 0: a point whose selection risk
lies at the target then has a certification risk within ``r_max`` with probability about 0.84
(normal approximation). The margin affects power only, never validity.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from calibration.ltt import certifiable_tolerance, max_certifiable_rate
from calibration.thresholds import Selection, candidates, certify, check_inputs, check_paths
from runtimes.errors import CalibrationError, ConfigError

__all__ = ["MAX_SELECTABLE_EXITS", "RULE", "ExitSelection", "exit_subsets", "split_calibration", "selection_target",
           "select_and_certify"]

MAX_SELECTABLE_EXITS = 6  # 2^6 - 1 = 63 subsets per path, each a 64-point grid: about a second
RULE = ("lowest expected cost on the selection split among (exit subset, path) sequences, over the grid "
        "points whose selection risk stays within the certifiable rate less one standard error")


@dataclass(frozen=True)
class ExitSelection:
    """What the selection split chose and what the certification split certified."""

    certified: Selection  # fixed-sequence LTT on the certification split (its n); chosen None: nothing certified
    exits: tuple[int, ...]  # exits left on, 0-based in chain order; every other exit is off
    path: str
    seed: int
    selection_fraction: float
    n_selection: int
    n_certification: int
    target: float  # the selection-split risk a grid point had to stay at or below
    predicted_cost: float | None  # the choice's expected cost on the selection split (stage-cost unit); None: no
    # sequence looked certifiable, so all exits on the first path were tested
    tightest_tolerance_all: float  # what all n samples could certify without the split (same paths)


def exit_subsets(num_exits: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of exits, largest first (the first is the fallback: every exit on)."""
    if not 1 <= num_exits <= MAX_SELECTABLE_EXITS:
        raise ConfigError(f"exit selection tries every subset of at most {MAX_SELECTABLE_EXITS} exits; "
                          f"this model has {num_exits}. Calibrate without selecting exits")
    return [s for size in range(num_exits, 0, -1) for s in itertools.combinations(range(num_exits), size)]


def selection_target(n_sel: int, n_cert: int, delta: float, epsilon: float, method: str = "binomial") -> float:
    """The selection-split risk a chosen point may have (see the module's note on the target): the
    certifiable rate on the certification split less one standard error of the two splits' difference."""
    r_max = max_certifiable_rate(n_cert, delta, epsilon, method)
    return max(0.0, r_max - math.sqrt(max(r_max, 0.0) * (1.0 - r_max) * (1.0 / n_sel + 1.0 / n_cert)))


def split_calibration(n: int, selection_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (selection, certification) row indices covering ``range(n)``, from a seeded
    random permutation: they depend on n, the fraction and the seed, never on the data."""
    if not 0.0 < selection_fraction < 1.0:
        raise ConfigError(f"selection_fraction must lie strictly between 0 and 1, found {selection_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"the split's seed must be an integer >= 0, found {seed!r}")
    n_sel = int(round(selection_fraction * n))
    if n_sel < 1 or n - n_sel < 1:
        raise CalibrationError(f"{n} calibration samples cannot be split {selection_fraction:g} / "
                               f"{1 - selection_fraction:g} with at least one sample on each side")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_sel]), np.sort(perm[n_sel:])


def select_and_certify(conf: np.ndarray, pred: np.ndarray, delta: float, epsilon: float,
                       stage_costs: Sequence[float], exit_costs: Sequence[float], labels: np.ndarray | None = None,
                       paths: Sequence[str] = ("shared",), selection_fraction: float = 0.3,
                       seed: int = 0) -> ExitSelection:
    """Choose the exits to keep and the path on the selection split, certify them on the other."""
    check_inputs(conf, pred, labels, stage_costs, exit_costs)
    check_paths(paths)
    subsets = exit_subsets(conf.shape[1] - 1)
    sel_rows, cert_rows = split_calibration(len(conf), selection_fraction, seed)
    n_sel, n_cert = len(sel_rows), len(cert_rows)
    certifiable = max_certifiable_rate(n_cert, delta, epsilon) >= 0.0  # False: zero losses certify nothing
    target = selection_target(n_sel, n_cert, delta, epsilon)
    sel_labels = None if labels is None else labels[sel_rows]
    best: tuple[float, float, float] | None = None
    exits, path = subsets[0], paths[0]  # nothing looks certifiable: certify all exits, and say what failed
    for subset, p in itertools.product(subsets, paths):
        cands, _ = candidates(conf[sel_rows], pred[sel_rows], sel_labels, p, stage_costs, exit_costs, subset)
        prefix = list(itertools.takewhile(lambda c: c.risk <= target, cands)) if certifiable else []
        if prefix:
            cheapest = min(prefix, key=lambda c: (c.cost, c.risk))
            # ties (later exits nobody reaches cost nothing on average) go to the fewest heads: a
            # sample that never exits pays for every head it passes
            worst = float(sum(exit_costs[k] for k in subset))
            if best is None or (cheapest.cost, cheapest.risk, worst) < best:
                best, exits, path = (cheapest.cost, cheapest.risk, worst), subset, p
    certified = certify(conf[cert_rows], pred[cert_rows], delta, epsilon, stage_costs, exit_costs,
                        None if labels is None else labels[cert_rows], paths=(path,), exits=exits)
    return ExitSelection(certified, exits, path, seed, selection_fraction, n_sel, n_cert, target,
                         None if best is None else best[0],
                         certifiable_tolerance(len(conf), epsilon / len(paths)))
