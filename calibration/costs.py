"""Measured per-stage costs: what each graph of a bundle costs at batch 1 on this backend.

Expected latency and speed-up are computed from these, so thresholds are chosen for the machine
they will run on. Each graph is timed on real calibration inputs, interleaved, median of runs.
"""

from __future__ import annotations

import time

import numpy as np

from runtimes.backends.base import Backend
from runtimes.records import StageCosts

__all__ = ["StageCosts", "measure_costs"]


def measure_costs(backend: Backend, inputs: dict[str, np.ndarray], samples: int = 32, repeats: int = 3,
                  batch: int = 1) -> StageCosts:
    """Median milliseconds per call of every graph at ``batch`` rows, over ``samples`` calls x ``repeats``."""
    bundle = backend.bundle
    chain = bundle.graphs[:-1]
    times: dict[str, list[float]] = {g.key: [] for g in bundle.graphs}
    total = len(next(iter(inputs.values())))
    for _ in range(repeats):
        for i in range(samples):
            rows = np.arange(i * batch, (i + 1) * batch) % total
            row = {k: v[rows] for k, v in inputs.items()}
            state = backend.start(row)
            for g in chain:
                t0 = time.perf_counter()
                backend.run(g.key, state)
                backend.fetch(state, [g.outputs[-1].name])  # any output: fetching it waits for asynchronous backends
                times[g.key].append(time.perf_counter() - t0)
            full = backend.start(row)
            t0 = time.perf_counter()
            backend.run(bundle.full.key, full)
            backend.fetch(full, [bundle.full.outputs[-1].name])
            times[bundle.full.key].append(time.perf_counter() - t0)
    ms = {k: 1000.0 * float(np.median(v)) for k, v in times.items()}
    return StageCosts(tuple(ms[s.segment.key] for s in bundle.stages),
                      tuple(ms[e.graph.key] for e in bundle.exits), ms[bundle.full.key])
