"""The early-exit loop, written once for every backend.

Run segment k, run exit k, read the confidences (graphs and tensors as the bundle's plan names
them), keep going only for the rows that have not
exited. Policies:

- ``per_sample`` (default): rows that exit are dropped before the next segment (compaction), so
  later segments run on the remaining rows only;
- ``batch``: rows keep their first exit's answer, but the whole batch continues until every row
  has exited; nothing is compacted (what a single ONNX ``If`` or TensorRT conditional can do).

An exit whose threshold is None never fires and its head is not run at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from runtimes.backends.base import Backend
from runtimes.bundle import Bundle
from runtimes.errors import ConfigError

__all__ = ["POLICIES", "ChainOutput", "RecordOutput", "run_chain", "record_chain", "run_full"]

POLICIES = ("per_sample", "batch")


@dataclass
class ChainOutput:
    classes: np.ndarray  # (B,) int64 predicted class
    confidences: np.ndarray  # (B,) float32 confidence at the exit taken
    exits: np.ndarray  # (B,) int64: exit index 0..K-1, or K for the final head
    timings: dict[str, float]  # graph key -> seconds spent in it during this call


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
