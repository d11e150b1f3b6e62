"""Measured per-stage costs: what each graph of a bundle costs at batch 1 on this backend.

Expected latency and speed-up are computed from these, so thresholds are chosen for the machine
they will run on. Each graph is timed on real calibration inputs, interleaved, median of runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtimes.backends.base import Backend

__all__ = ["StageCosts", "measure_costs"]


@dataclass(frozen=True)
class StageCosts:
    segments: tuple[float, ...]  # ms per segment, in chain order (the last ends in the final head)
    exits: tuple[float, ...]  # ms per exit head
    full: float  # ms of the monolithic graph

    def chain_without_exits(self) -> float:
        return float(sum(self.segments))


def measure_costs(backend: Backend, inputs: dict[str, np.ndarray], samples: int = 32, repeats: int = 3,
                  batch: int = 1) -> StageCosts:
    """Median milliseconds per call of every graph at ``batch`` rows, over ``samples`` calls x ``repeats``."""
    bundle = backend.bundle
    keys = bundle.graph_keys()
    times: dict[str, list[float]] = {k: [] for k in keys}
    total = len(next(iter(inputs.values())))
    n = samples
    for _ in range(repeats):
        for i in range(n):
            rows = np.arange(i * batch, (i + 1) * batch) % total
            row = {k: v[rows] for k, v in inputs.items()}
            state = backend.start(row)
            for key in keys[:-1]:
                t0 = time.perf_counter()
                backend.run(key, state)
                backend.fetch(state, [bundle.graph(key).outputs[-1].name])  # wait for asynchronous backends
                times[key].append(time.perf_counter() - t0)
            full = backend.start(row)
            t0 = time.perf_counter()
            backend.run("full", full)
            backend.fetch(full, ["prediction"])
            times["full"].append(time.perf_counter() - t0)
    ms = {k: 1000.0 * float(np.median(v)) for k, v in times.items()}
    return StageCosts(tuple(ms[f"segment_{s.index}"] for s in bundle.stages),
                      tuple(ms[f"exit_{s.index}"] for s in bundle.stages if s.exit is not None), ms["full"])
