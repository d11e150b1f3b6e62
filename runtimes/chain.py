"""The early-exit loop, written once for every backend.

Run segment k, run exit k, read the confidences (graphs and tensors as the bundle's plan names
them), keep going only for the rows that have not
exited. Policies:

- ``per_sample`` (default): rows that exit are dropped before the next segment (compaction), so
  later segments run on the remaining rows only;
- ``batch``: rows keep their first exit's answer, but the whole batch continues until every row
  has exited; nothing is compacted (what a single ONNX ``If`` or TensorRT conditional can do).

An exit whose threshold is None never fires and its head is not run at all.

``run_guarded`` is the same loop with a deadline (``runtimes.deadline``) and rows checked by the
drift monitor (``runtimes.monitor``); ``run_chain`` stays free of both, for the batch-1 fast path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from runtimes.backends.base import Backend
from runtimes.bundle import Bundle
from runtimes.deadline import Deadline
from runtimes.errors import ConfigError

__all__ = ["POLICIES", "ChainOutput", "RecordOutput", "run_chain", "run_guarded", "record_chain", "run_full"]

POLICIES = ("per_sample", "batch")


@dataclass
class ChainOutput:
    classes: np.ndarray  # (B,) int64 predicted class
    confidences: np.ndarray  # (B,) float32 confidence at the exit taken
    exits: np.ndarray  # (B,) int64: exit index 0..K-1, or K for the final head
    timings: dict[str, float]  # graph key -> seconds spent in it during this call
    forced: np.ndarray | None = None  # (B,) bool under a deadline: rows answered by an exit that did not fire
    checks: tuple[np.ndarray, np.ndarray] | None = None  # watched rows: (early-exit answers, final head's answers)
    continued: int = 0  # watched rows that ran on past the exit that answered them, for their check


@dataclass
class RecordOutput:
    confidences: np.ndarray  # (B, K + 1) every exit's confidence, then the final head's
    predictions: np.ndarray  # (B, K + 1) every exit's predicted class, then the final head's


def _timed(backend: Backend, key: str, state: object, timings: dict[str, float]) -> None:
    t0 = time.perf_counter()
    backend.run(key, state)
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def run_chain(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray],
              thresholds: Sequence[float | None], policy: str = "per_sample") -> ChainOutput:
    """Early-exit inference for one batch (batch size <= the bundle's max)."""
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    n = len(next(iter(inputs.values())))
    if n == 1:  # the camera case: the same decisions with scalars, no per-row bookkeeping
        return _run_one(backend, bundle, inputs, thresholds)
    k_final = len(bundle.stages) - 1
    classes = np.zeros(n, dtype=np.int64)
    conf = np.zeros(n, dtype=np.float32)
    exits = np.full(n, k_final, dtype=np.int64)
    open_rows = np.ones(n, dtype=bool)  # `batch` policy: rows that have not exited yet
    alive = np.arange(n)  # original row index of every row in the state
    timings: dict[str, float] = {}
    state = backend.start(inputs)
    for stage in bundle.stages[:-1]:
        k = stage.index
        _timed(backend, stage.segment.key, state, timings)
        if thresholds[k] is None:
            continue
        _timed(backend, stage.exit.graph.key, state, timings)
        conf_name, pred_name = stage.exit.decision
        out = backend.fetch(state, [conf_name, pred_name])
        fire = out[conf_name] >= thresholds[k]
        if policy == "batch":
            fire &= open_rows[alive]
        rows = alive[fire]
        classes[rows], conf[rows], exits[rows] = out[pred_name][fire], out[conf_name][fire], k
        open_rows[rows] = False
        if policy == "per_sample" and fire.any():
            alive = alive[~fire]
            if len(alive) == 0:
                return ChainOutput(classes, conf, exits, timings)
            backend.compact(state, np.flatnonzero(~fire))
        elif policy == "batch" and not open_rows.any():
            return ChainOutput(classes, conf, exits, timings)
    _timed(backend, bundle.stages[-1].segment.key, state, timings)
    conf_name, pred_name = bundle.final_decision
    out = backend.fetch(state, [conf_name, pred_name])
    last = open_rows[alive]
    rows = alive[last]
    classes[rows], conf[rows] = out[pred_name][last], out[conf_name][last]
    return ChainOutput(classes, conf, exits, timings)


def _run_one(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray],
             thresholds: Sequence[float | None]) -> ChainOutput:
    """``run_chain`` for one row: both policies decide alike, and nothing needs compacting. A backend
    may offer a state of its own for one row (``start_one``, handed back with ``release``): ONNX
    Runtime's graphs bound once to preallocated buffers."""
    start_one = getattr(backend, "start_one", None)
    if start_one is None:
        return _decide_one(backend, bundle, backend.start(inputs), thresholds)
    state = start_one(inputs)
    try:
        return _decide_one(backend, bundle, state, thresholds)
    finally:
        backend.release(state)  # type: ignore[attr-defined]


def _decide_one(backend: Backend, bundle: Bundle, state: object, thresholds: Sequence[float | None]) -> ChainOutput:
    timings: dict[str, float] = {}
    for stage in bundle.stages[:-1]:
        _timed(backend, stage.segment.key, state, timings)
        threshold = thresholds[stage.index]
        if threshold is None:
            continue
        _timed(backend, stage.exit.graph.key, state, timings)
        conf_name, pred_name = stage.exit.decision
        out = backend.fetch(state, [conf_name, pred_name])
        if out[conf_name][0] >= threshold:
            return ChainOutput(out[pred_name].astype(np.int64, copy=False), out[conf_name].astype(np.float32, copy=False),
                               np.array([stage.index], dtype=np.int64), timings)
    last = bundle.stages[-1]
    _timed(backend, last.segment.key, state, timings)
    conf_name, pred_name = bundle.final_decision
    out = backend.fetch(state, [conf_name, pred_name])
    return ChainOutput(out[pred_name].astype(np.int64, copy=False), out[conf_name].astype(np.float32, copy=False),
                       np.array([last.index], dtype=np.int64), timings)


def run_guarded(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray],
                thresholds: Sequence[float | None], policy: str = "per_sample", deadline: Deadline | None = None,
                watch: np.ndarray | None = None, serve: bool = True) -> ChainOutput:
    """``run_chain`` under a deadline and/or with rows the drift monitor checks.

    ``deadline``: before each graph, stop unless it fits, a segment together with the rest of the way
    to the next answer (the next exit head that runs, or the final head); the rows still open take
    the answer of their deepest exit computed so far and are marked in ``forced``. Until every open row has an exit's answer, graphs run whatever the time. ``watch``:
    (B,) bool, rows that also run on to the final head after their exit answered them (they keep the
    exit's answer). ``serve=False`` (the monitor's fallback): the final head answers every row, and
    the exits only say what early exit would have answered."""
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    n = len(next(iter(inputs.values())))
    k_final = len(bundle.stages) - 1
    classes, conf = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32)
    exits = np.full(n, k_final, dtype=np.int64)
    served = np.zeros(n, dtype=bool)  # rows whose answer is settled
    fired = np.zeros(n, dtype=bool)  # rows where an exit fired
    early = np.full(n, -1, dtype=np.int64)  # what early exit answers: the exit that fired, else the final head
    deepest = np.full(n, -1, dtype=np.int64)  # per row, the deepest exit computed so far (-1: none)
    head_class, head_conf = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32)
    watch = np.zeros(n, dtype=bool) if watch is None else watch
    alive = np.arange(n)  # original row index of every row in the state
    timings: dict[str, float] = {}
    start_one = getattr(backend, "start_one", None) if n == 1 else None
    state = start_one(inputs) if start_one is not None else backend.start(inputs)

    def done(final: np.ndarray | None = None) -> ChainOutput:
        forced = None if deadline is None else np.zeros(n, dtype=bool)
        if final is None and deadline is not None:  # out of time: open rows take their deepest exit
            rows = alive[~served[alive]]
            classes[rows], conf[rows], exits[rows], forced[rows] = head_class[rows], head_conf[rows], deepest[rows], True
        checked = np.flatnonzero(watch & (final >= 0)) if final is not None else np.zeros(0, dtype=np.int64)
        checks = (early[checked], final[checked]) if len(checked) else None
        return ChainOutput(classes, conf, exits, timings, forced, checks, int((watch & fired).sum()) if serve else 0)

    def late(keys: tuple[str, ...]) -> bool:
        return (deadline is not None and bool((deepest[alive[~served[alive]]] >= 0).all())
                and not deadline.fits(keys, len(alive)))

    try:
        for stage in bundle.stages[:-1]:
            k, threshold = stage.index, thresholds[stage.index]
            heads = not fired[alive].all()  # some row still waits for an exit to fire
            head = heads and threshold is not None
            if late(_way_to_answer(bundle, thresholds, k, heads)):  # a segment alone adds no answer
                return done()
            _guarded_step(backend, stage.segment.key, state, timings, deadline, len(alive))
            if not head:
                continue
            if late((stage.exit.graph.key,)):  # the segment took longer than expected: one graph past at most
                return done()
            _guarded_step(backend, stage.exit.graph.key, state, timings, deadline, len(alive))
            conf_name, pred_name = stage.exit.decision
            out = backend.fetch(state, [conf_name, pred_name])
            c, p = out[conf_name], out[pred_name]
            head_class[alive], head_conf[alive], deepest[alive] = p, c, k
            fire = (c >= threshold) & ~fired[alive]
            rows = alive[fire]
            fired[rows], early[rows] = True, p[fire]
            if serve:
                classes[rows], conf[rows], exits[rows], served[rows] = p[fire], c[fire], k, True
            stay = ~served[alive] | watch[alive]  # open rows, and rows going on for their check
            if not stay.any():
                return done()
            # the batch policy keeps its rows together while any is open; a check rides on alone
            if not stay.all() and (policy == "per_sample" or served[alive].all()):
                backend.compact(state, np.flatnonzero(stay))
                alive = alive[stay]
        last = bundle.stages[-1]
        if late((last.segment.key,)):
            return done()
        _guarded_step(backend, last.segment.key, state, timings, deadline, len(alive))
        conf_name, pred_name = bundle.final_decision
        out = backend.fetch(state, [conf_name, pred_name])
        c, p = out[conf_name], out[pred_name]
        open_ = ~served[alive]
        classes[alive[open_]], conf[alive[open_]] = p[open_], c[open_]
        reached = ~fired[alive]
        early[alive[reached]] = p[reached]
        final = np.full(n, -1, dtype=np.int64)
        final[alive] = p
        served[alive] = True
        return done(final)
    finally:
        if start_one is not None:
            backend.release(state)  # type: ignore[attr-defined]


def _way_to_answer(bundle: Bundle, thresholds: Sequence[float | None], k: int, heads: bool) -> tuple[str, ...]:
    """Graph keys from stage k's segment to the next answer: the next exit head that runs (``heads``:
    while some row waits for one), else the final head at the end of the chain."""
    keys = []
    for stage in bundle.stages[k:]:
        keys.append(stage.segment.key)
        if stage.exit is not None and heads and thresholds[stage.index] is not None:
            keys.append(stage.exit.graph.key)
            break
    return tuple(keys)


def _guarded_step(backend: Backend, key: str, state: object, timings: dict[str, float], deadline: Deadline | None,
                  rows: int) -> None:
    t0 = time.perf_counter()
    backend.run(key, state)
    seconds = time.perf_counter() - t0
    timings[key] = timings.get(key, 0.0) + seconds
    if deadline is not None:
        deadline.clock.observe(key, rows, seconds)


def record_chain(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray]) -> RecordOutput:
    """Every exit and the final head on every row: what calibration and validation evaluate offline."""
    state = backend.start(inputs)
    names = []
    for stage in bundle.stages:
        backend.run(stage.segment.key, state)
        if stage.exit is not None:
            backend.run(stage.exit.graph.key, state)
            names.append(stage.exit.decision)
    names.append(bundle.final_decision)
    out = backend.fetch(state, [n for pair in names for n in pair])
    return RecordOutput(np.stack([out[c] for c, _ in names], axis=1).astype(np.float32),
                        np.stack([out[p] for _, p in names], axis=1).astype(np.int64))


def run_full(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray]) -> ChainOutput:
    """The monolithic graph: the baseline every early-exit figure is compared with."""
    timings: dict[str, float] = {}
    state = backend.start(inputs)
    _timed(backend, bundle.full.key, state, timings)
    conf_name, pred_name = bundle.full.decision
    out = backend.fetch(state, [conf_name, pred_name])
    n = len(out[pred_name])
    return ChainOutput(out[pred_name].astype(np.int64), out[conf_name].astype(np.float32),
                       np.full(n, -1, dtype=np.int64), timings)
