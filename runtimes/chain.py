"""The early-exit loop, written once for every backend: one stage walk (``_walk``), and small
policies that say what happens at its exits.

The walk runs segment k, then exit k's head unless its threshold is None, hands the head's decision
(graphs and tensors as the bundle's plan names them) to the policy, and runs the next segment on the
rows the policy keeps; the last segment ends in the final head. The policies:

- ``_One``, one row (the camera case): the first exit that fires ends the walk;
- ``_PerSample`` (``per_sample``, default): rows that exit are dropped before the next segment
  (compaction), so later segments run on the remaining rows only;
- ``_Batch`` (``batch``): rows keep their first exit's answer, but the whole batch continues until
  every row has exited; nothing is compacted (what a single ONNX ``If`` or TensorRT conditional can do);
- ``_Record``: every head on every row, no decision (calibration, validation);
- ``_Watched``: each row's history, for the rows the drift monitor checks (``runtimes.monitor``) and
  for a deadline (``runtimes.deadline.DeadlineGate``, which the walk asks before each graph).

Batch 1 has the least overhead: ``_One`` holds no state (one instance; the decision that ends the
walk is the answer), so a call allocates nothing the hand-written loop did not, and the hooks cost
one call per exit head. Only calls with a check or a deadline pay for a row history.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from time import perf_counter  # a module global: two lookups fewer per graph call than time.perf_counter
from typing import Callable, Sequence

import numpy as np

from runtimes.backends.base import Backend
from runtimes.bundle import Bundle, StageSpec
from runtimes.deadline import Deadline, DeadlineGate
from runtimes.errors import ConfigError

__all__ = ["POLICIES", "ChainOutput", "RecordOutput", "run_chain", "run_guarded", "record_chain", "run_full"]

POLICIES = ("per_sample", "batch")

_DONE = np.zeros(0, dtype=np.int64)  # rows to keep: none, so the walk ends here

# the decision that ended a walk: the stage, and the (B,) confidences and predictions of its head
_Ending = tuple[StageSpec, np.ndarray, np.ndarray]


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


class _Exits(ABC):
    """What happens at the exits of one walk: ``exit`` gets each head's decision and ``final`` the
    final head's ((B,) confidences and predictions of the rows in the state)."""

    reads = True  # False: the walk runs the heads and reads nothing (the caller fetches after it)

    @abstractmethod
    def exit(self, stage: StageSpec, threshold: float, conf: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        """The stage's exit head ran: decide. Returns the rows of the state to keep (sorted indices;
        none: the walk ends here), or None to keep them all."""

    def final(self, stage: StageSpec, conf: np.ndarray, pred: np.ndarray) -> None:
        """The last stage's segment and the final head ran on the rows still in the state."""


def _walk(backend: Backend, bundle: Bundle, state: object, thresholds: Sequence[float | None],
          timings: dict[str, float], at: _Exits, gate: DeadlineGate | None = None) -> _Ending | None:
    """The one stage walk: segment k, exit k's head unless its threshold is None, ``at``'s decision,
    the rows it keeps; the last segment and the final head. ``gate`` (a deadline) is asked before
    each graph. Returns the decision that ended the walk (None: the gate stopped it, or ``at`` reads
    nothing)."""
    reads = at.reads
    run = _timed if gate is None else _observed(gate)
    for stage in bundle.stages[:-1]:
        if gate is not None and not gate.segment(stage):
            return None
        run(backend, stage.segment.key, state, timings)
        threshold = thresholds[stage.index]
        if threshold is None:
            continue
        head = stage.exit
        if gate is not None and not gate.head(head.graph.key):
            return None
        run(backend, head.graph.key, state, timings)
        if not reads:
            continue
        conf_name, pred_name = names = head.decision
        out = backend.fetch(state, names)
        conf, pred = out[conf_name], out[pred_name]
        keep = at.exit(stage, threshold, conf, pred)
        if keep is not None:
            if not len(keep):
                return stage, conf, pred
            backend.compact(state, keep)
    last = bundle.stages[-1]
    if gate is not None and not gate.segment(last):
        return None
    run(backend, last.segment.key, state, timings)
    if not reads:
        return None
    conf_name, pred_name = names = bundle.final_decision
    out = backend.fetch(state, names)
    conf, pred = out[conf_name], out[pred_name]
    at.final(last, conf, pred)
    return last, conf, pred


def _timed(backend: Backend, key: str, state: object, timings: dict[str, float]) -> float:
    t0 = perf_counter()
    backend.run(key, state)
    seconds = perf_counter() - t0
    timings[key] = timings.get(key, 0.0) + seconds
    return seconds


def _observed(gate: DeadlineGate) -> Callable[[Backend, str, object, dict[str, float]], float]:
    """``_timed`` that also tells the deadline what each graph cost, on how many rows."""
    def run(backend: Backend, key: str, state: object, timings: dict[str, float]) -> float:
        seconds = _timed(backend, key, state, timings)
        gate.observe(key, seconds)
        return seconds
    return run


def _run(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray], thresholds: Sequence[float | None],
         timings: dict[str, float], at: _Exits, one: bool, gate: DeadlineGate | None = None) -> _Ending | None:
    """Start a state, walk it, hand it back. ``one``: a backend may offer a state of its own for one row
    (``start_one``, handed back with ``release``): ONNX Runtime's graphs bound once to preallocated buffers."""
    start_one = getattr(backend, "start_one", None) if one else None
    state = start_one(inputs) if start_one is not None else backend.start(inputs)
    try:
        return _walk(backend, bundle, state, thresholds, timings, at, gate)
    finally:
        if start_one is not None:
            backend.release(state)  # type: ignore[attr-defined]


class _One(_Exits):
    """One row: the first exit that fires ends the walk, whose ending is the answer. No state, so one
    instance serves every call and thread."""

    def exit(self, stage: StageSpec, threshold: float, conf: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        return _DONE if conf[0] >= threshold else None


_ONE = _One()
_INDEX = tuple(np.array([k], dtype=np.int64) for k in range(64))  # copied: a third of np.array([k])'s cost


def _exit_index(k: int) -> np.ndarray:
    """(1,) int64 holding k: the exit a single row took."""
    return _INDEX[k].copy() if k < len(_INDEX) else np.array([k], dtype=np.int64)


class _PerSample(_Exits):
    """Rows that exit leave the state; the final head answers the rest."""

    def __init__(self, n: int, k_final: int) -> None:
        self.classes = np.zeros(n, dtype=np.int64)
        self.conf = np.zeros(n, dtype=np.float32)
        self.exits = np.full(n, k_final, dtype=np.int64)
        self.alive = np.arange(n)  # original row index of every row in the state

    def exit(self, stage: StageSpec, threshold: float, conf: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        fire = conf >= threshold
        if not fire.any():
            return None
        rows = self.alive[fire]
        self.classes[rows], self.conf[rows], self.exits[rows] = pred[fire], conf[fire], stage.index
        stay = ~fire
        self.alive = self.alive[stay]
        return np.flatnonzero(stay) if len(self.alive) else _DONE

    def final(self, stage: StageSpec, conf: np.ndarray, pred: np.ndarray) -> None:
        self.classes[self.alive], self.conf[self.alive] = pred, conf

    def output(self, timings: dict[str, float]) -> ChainOutput:
        return ChainOutput(self.classes, self.conf, self.exits, timings)


class _Batch(_PerSample):
    """Every row stays until all have exited; each keeps the answer of its first exit that fired."""

    def __init__(self, n: int, k_final: int) -> None:
        super().__init__(n, k_final)
        self.open = np.ones(n, dtype=bool)  # rows that have not exited yet (``alive`` stays every row)

    def exit(self, stage: StageSpec, threshold: float, conf: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        fire = (conf >= threshold) & self.open
        rows = self.alive[fire]  # every row: indexing is cheaper than np.flatnonzero
        self.classes[rows], self.conf[rows], self.exits[rows] = pred[fire], conf[fire], stage.index
        self.open[rows] = False
        return None if self.open.any() else _DONE

    def final(self, stage: StageSpec, conf: np.ndarray, pred: np.ndarray) -> None:
        rows = self.alive[self.open]
        self.classes[rows], self.conf[rows] = pred[self.open], conf[self.open]


class _Record(_Exits):
    """Every head on every row (thresholds all on) and no decision: the walk reads nothing, and
    ``record_chain`` fetches every head's answer after it in one call (on TensorRT: one sync)."""

    reads = False

    def exit(self, stage: StageSpec, threshold: float, conf: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        return None


_RECORD = _Record()


class _Watched(_Exits):
    """Each row's history, for the rows the drift monitor checks and for a deadline: what the exits
    computed so far said, which exit fired, which answer is settled. Watched rows ride on to the
    final head after their exit answered them and keep the exit's answer; ``serve=False``: the final
    head answers every row, and the exits only say what early exit would have answered."""

    def __init__(self, thresholds: Sequence[float | None], n: int, k_final: int, per_sample: bool,
                 watch: np.ndarray | None, serve: bool) -> None:
        self.thresholds = list(thresholds)  # the walk's: all off once no row waits for an exit (_off_when_fired)
        self.classes, self.conf = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32)
        self.exits = np.full(n, k_final, dtype=np.int64)
        self.served = np.zeros(n, dtype=bool)  # rows whose answer is settled
        self.fired = np.zeros(n, dtype=bool)  # rows where an exit fired
        self.early = np.full(n, -1, dtype=np.int64)  # what early exit answers: the exit that fired, else the final head
        self.deepest = np.full(n, -1, dtype=np.int64)  # per row, the deepest exit computed so far (-1: none)
        self.head_class, self.head_conf = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.float32)
        self.watch = np.zeros(n, dtype=bool) if watch is None else watch
        self.alive = np.arange(n)  # original row index of every row in the state
        self.per_sample, self.serve = per_sample, serve
        self.gate: DeadlineGate | None = None
        self.reached: np.ndarray | None = None  # (B,) the final head's class, -1 where it did not run
        self._off_when_fired()

    def answered(self) -> bool:
        """Has every open row in the state an exit's answer (one it could be forced to)?"""
        alive = self.alive
        return bool((self.deepest[alive[~self.served[alive]]] >= 0).all())

    def exit(self, stage: StageSpec, threshold: float, conf: np.ndarray, pred: np.ndarray) -> np.ndarray | None:
        alive, k = self.alive, stage.index
        self.head_class[alive], self.head_conf[alive], self.deepest[alive] = pred, conf, k
        fire = (conf >= threshold) & ~self.fired[alive]
        rows = alive[fire]
        self.fired[rows], self.early[rows] = True, pred[fire]
        if self.serve:
            self.classes[rows], self.conf[rows], self.exits[rows], self.served[rows] = pred[fire], conf[fire], k, True
        stay = ~self.served[alive] | self.watch[alive]  # open rows, and rows going on for their check
        if not stay.any():
            return _DONE
        keep = None
        # the batch policy keeps its rows together while any is open; a check rides on alone
        if not stay.all() and (self.per_sample or self.served[alive].all()):
            self.alive, keep = alive[stay], np.flatnonzero(stay)
        self._off_when_fired()
        return keep

    def _off_when_fired(self) -> None:
        """Every row in the state has fired: the rest ride on for their check only, and no head has
        anything left to decide, so every exit is off from here (rows only ever fire or leave)."""
        if self.fired[self.alive].all():
            self.thresholds[:] = [None] * len(self.thresholds)

    def final(self, stage: StageSpec, conf: np.ndarray, pred: np.ndarray) -> None:
        alive = self.alive
        open_ = ~self.served[alive]
        self.classes[alive[open_]], self.conf[alive[open_]] = pred[open_], conf[open_]
        reached = ~self.fired[alive]
        self.early[alive[reached]] = pred[reached]
        self.reached = np.full(len(self.classes), -1, dtype=np.int64)
        self.reached[alive] = pred
        self.served[alive] = True

    def output(self, timings: dict[str, float]) -> ChainOutput:
        forced = None if self.gate is None else np.zeros(len(self.classes), dtype=bool)
        final = self.reached
        if final is None and forced is not None:  # out of time: open rows take their deepest exit
            rows = self.alive[~self.served[self.alive]]
            self.classes[rows], self.conf[rows] = self.head_class[rows], self.head_conf[rows]
            self.exits[rows], forced[rows] = self.deepest[rows], True
        checked = np.flatnonzero(self.watch & (final >= 0)) if final is not None else np.zeros(0, dtype=np.int64)
        checks = (self.early[checked], final[checked]) if len(checked) else None
        continued = int((self.watch & self.fired).sum()) if self.serve else 0
        return ChainOutput(self.classes, self.conf, self.exits, timings, forced, checks, continued)


def run_chain(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray],
              thresholds: Sequence[float | None], policy: str = "per_sample") -> ChainOutput:
    """Early-exit inference for one batch (batch size <= the bundle's max)."""
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    n = len(next(iter(inputs.values())))
    timings: dict[str, float] = {}
    if n == 1:  # the camera case: the walk's ending is the answer
        stage, conf, pred = _run(backend, bundle, inputs, thresholds, timings, _ONE, True)
        return ChainOutput(pred.astype(np.int64, copy=False), conf.astype(np.float32, copy=False),
                           _exit_index(stage.index), timings)
    at = (_PerSample if policy == "per_sample" else _Batch)(n, len(bundle.stages) - 1)
    _run(backend, bundle, inputs, thresholds, timings, at, False)
    return at.output(timings)


def run_guarded(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray],
                thresholds: Sequence[float | None], policy: str = "per_sample", deadline: Deadline | None = None,
                watch: np.ndarray | None = None, serve: bool = True) -> ChainOutput:
    """``run_chain`` under a deadline and/or with rows the drift monitor checks.

    ``deadline``: the walk stops before a graph that cannot end in time (``DeadlineGate``); the rows
    still open take the answer of their deepest exit computed so far and are marked in ``forced``.
    ``watch``: (B,) bool, rows that also run on to the final head after their exit answered them
    (they keep the exit's answer). ``serve=False`` (the monitor's fallback): the final head answers
    every row, and the exits only say what early exit would have answered."""
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    n = len(next(iter(inputs.values())))
    at = _Watched(thresholds, n, len(bundle.stages) - 1, policy == "per_sample", watch, serve)
    if deadline is not None:
        at.gate = DeadlineGate(deadline, bundle, at.thresholds, at)
    timings: dict[str, float] = {}
    _run(backend, bundle, inputs, at.thresholds, timings, at, n == 1, at.gate)
    return at.output(timings)


def record_chain(backend: Backend, bundle: Bundle, inputs: dict[str, np.ndarray]) -> RecordOutput:
    """Every exit and the final head on every row: what calibration and validation evaluate offline."""
    state = backend.start(inputs)  # never a bound batch-1 state: every head's output is read after the walk
    _walk(backend, bundle, state, (0.0,) * (len(bundle.stages) - 1), {}, _RECORD)
    names = [s.exit.decision for s in bundle.stages if s.exit is not None] + [bundle.final_decision]
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
