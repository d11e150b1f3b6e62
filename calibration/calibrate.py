"""``calibrate_runtime``: record, certify, and write thresholds with their certificate into the bundle.

The certificate says what was promised and on what: with probability at least ``1 - epsilon`` over
the draw of the calibration set, the early-exit model's disagreement with the full model (or its
accuracy drop, with labels) is at most ``delta``, for inputs distributed like the calibration set,
on the backend and precision it was measured on. With ``select_exits`` the exits kept and the
path are chosen on a random part of the calibration set and certified on the rest
(``calibration.exit_selection``); the certificate records the split.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import numpy as np

from calibration.costs import measure_costs
from calibration.exit_selection import RULE, select_and_certify
from calibration.thresholds import Candidate, Selection, certify, exit_decisions, expected_cost, within_budget
from runtimes.atomic import exclusive
from runtimes.bundle import by_exit, load_bundle, save_bundle
from runtimes.records import Certificate, ExitChoice, StageCosts
from runtimes.errors import CalibrationError, ConfigError
from runtimes.classifier import Classifier

__all__ = ["calibrate_runtime", "write_calibration"]


def calibrate_runtime(rt: Classifier, inputs: dict[str, np.ndarray], delta: float, epsilon: float,
                      labels: np.ndarray | None = None, latency_budget_ms: float | None = None,
                      data: dict[str, Any] | None = None, cost_samples: int = 32,
                      paths: tuple[str, ...] = ("shared",), select_exits: bool = False,
                      selection_fraction: float = 0.3, selection_seed: int = 0) -> Certificate:
    """Thresholds and certificate for this runtime's backend and precision; raises CalibrationError
    when the data cannot certify ``delta`` (early exit then stays as it was: off, if never calibrated).

    ``select_exits``: switch off the exits that do not pay for themselves, chosen on a
    ``selection_fraction`` of the samples (permutation seeded by ``selection_seed``) and certified
    on the rest."""
    if select_exits and latency_budget_ms is not None:
        raise ConfigError("selecting exits certifies a tolerance; it does not combine with a latency budget")
    record = rt.record(inputs)
    costs = measure_costs(rt.backend, inputs, samples=cost_samples)
    conf, pred = record.confidences, record.predictions
    common: dict[str, Any] = {
        "n": len(conf), "epsilon": epsilon, "mode": "labels" if labels is not None else "label-free",
        "loss": "accuracy drop vs the full model" if labels is not None else "disagreement with the full model",
        "key": rt.calibration_key, "backend": rt.backend.describe(), "data": data or {}, "costs_ms": costs,
        "calibrated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    if latency_budget_ms is not None:
        got = within_budget(conf, pred, latency_budget_ms, costs.segments, costs.exits, epsilon, labels)
        c = got["candidate"]
        cert = {"method": "latency-budget, Clopper-Pearson bound", "latency_budget_ms": latency_budget_ms,
                "risk_upper_bound": got["risk_upper_bound"], "delta": None}
    elif select_exits:
        c, cert = _select_exits(rt, conf, pred, delta, epsilon, costs, labels, paths, selection_fraction,
                                selection_seed)
    else:
        sel = certify(conf, pred, delta, epsilon, costs.segments, costs.exits, labels, paths)
        c = _certified(sel, delta, epsilon)
        cert = {"method": f"learn-then-test, fixed-sequence, {sel.method} p-values"
                          + (f", Bonferroni over {len(paths)} paths" if len(paths) > 1 else ""),
                "delta": delta, "pvalue": c.pvalue, "certified_candidates": sel.safe,
                "tightest_tolerance": sel.tightest_tolerance}
    return Certificate(**common, **cert, **_expected(rt, c.thresholds, conf, costs), thresholds=tuple(c.thresholds),
                       path=c.path, grid_index=c.index, calibration_risk=c.risk)


def _select_exits(rt: Classifier, conf: np.ndarray, pred: np.ndarray, delta: float, epsilon: float, costs: StageCosts,
                  labels: np.ndarray | None, paths: tuple[str, ...], fraction: float,
                  seed: int) -> tuple[Candidate, dict[str, Any]]:
    pick = select_and_certify(conf, pred, delta, epsilon, costs.segments, costs.exits, labels, paths, fraction, seed)
    c = _certified(pick.certified, delta, epsilon, "certification samples",
                   f", or drop --select-exits (it kept {pick.n_selection} samples back to choose the exits)")
    blocks = [e.block for e in rt.bundle.exits]
    off = tuple(b for k, b in enumerate(blocks) if k not in pick.exits)
    choice = ExitChoice(pick.seed, pick.selection_fraction, pick.n_selection, pick.n_certification,
                        tuple(blocks[k] for k in pick.exits), off, RULE, pick.target, pick.tightest_tolerance_all)
    return c, {"method": f"learn-then-test, fixed-sequence, {pick.certified.method} p-values on a certification split "
                         f"of {pick.n_certification}; exits and path chosen on a disjoint random selection split of "
                         f"{pick.n_selection} (seed {pick.seed})",
               "delta": delta, "pvalue": c.pvalue, "certified_candidates": pick.certified.safe,
               "tightest_tolerance": pick.certified.tightest_tolerance, "exit_selection": choice}


def _certified(sel: Selection, delta: float, epsilon: float, what: str = "samples", hint: str = "") -> Candidate:
    if sel.chosen is None:
        raise CalibrationError(
            f"cannot certify a tolerance of {100 * delta:g}% at epsilon {epsilon:g} with {sel.n} {what} "
            f"(the tightest this n can certify is {100 * sel.tightest_tolerance:.2f}%, and only with no "
            f"disagreements); early exit stays off. Use more calibration data or a looser --max-disagreement{hint}")
    return sel.chosen


def _expected(rt: Classifier, thresholds: tuple[float | None, ...], conf: np.ndarray, costs: StageCosts) -> dict[str, Any]:
    taken = exit_decisions(conf, thresholds)
    ms = expected_cost(taken, costs.segments, costs.exits, thresholds)
    share = np.bincount(taken, minlength=conf.shape[1]) / len(taken)
    return {"expected_latency_ms": ms, "expected_speedup": costs.full / ms,
            "exit_share": by_exit([e.block for e in rt.bundle.exits], share.tolist())}


def write_calibration(bundle_dir: str | os.PathLike, certificate: Certificate) -> None:
    """Store the thresholds (as the bundle's defaults and under the certificate's key), atomically.

    Writers of one bundle take turns: a second calibrate waits for the first, then adds its
    certificate to what the first wrote, so none is lost (the same key: the later one stands)."""
    with exclusive(bundle_dir, waiting=f"waiting for another calibrate of {bundle_dir} to finish writing"):
        bundle = load_bundle(bundle_dir)
        calibrations = dict(bundle.calibration or {})
        calibrations[certificate.key] = certificate
        save_bundle(bundle.with_thresholds(tuple(certificate.thresholds), calibrations), bundle_dir)
