"""Side-by-side latency and throughput of a bundle against its own monolithic graph.

Every variant runs in one process, on the same backend and settings, on real inputs, and the
variants are interleaved in a shuffled order round after round, so machine noise hits them all
alike. Reported figures are ratios of those measurements.

Variants: ``full`` (the monolithic ``full.onnx``), ``early_exit`` (the chain at the bundle's
thresholds), ``no_exit`` (the chain with every exit switched off: heads skipped),
``never_exits`` (every head that is on runs, at thresholds above 1: the worst case), and ``torch`` (eager torch,
when a run dir and torch are available). Torch is timed in rounds of its own after the others:
its OpenMP threads spin-wait after each call, and interleaved they slowed whichever ONNX Runtime
variant came next (the monolithic graph's p99 doubled).
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import numpy as np

from analysis import BURST
from analysis.evaluation import analytic_speedup
from analysis.metrics import exit_share
from calibration.thresholds import exit_decisions
from runtimes.classifier import Classifier
from runtimes.thresholds import NEVER

__all__ = ["BURST", "latency", "throughput", "summarise", "interleaved", "stats_ms", "head_costs", "cost_model"]


def _rows(inputs: dict[str, np.ndarray], start: int, n: int) -> dict[str, np.ndarray]:
    total = len(next(iter(inputs.values())))
    idx = (np.arange(start, start + n) % total)
    return {k: np.ascontiguousarray(v[idx]) for k, v in inputs.items()}


def _with_torch(times: dict[str, np.ndarray], torch_fn: Callable | None, inputs: dict[str, np.ndarray], batch: int,
                runs: int, warmup: int, seed: int) -> dict[str, np.ndarray]:
    if torch_fn is not None:
        times["torch"] = interleaved({"torch": torch_fn}, inputs, batch, runs, warmup, seed)["torch"]
    return times


def _variants(rt: Classifier, policy: str) -> dict[str, Callable[[dict], Any]]:
    thresholds = rt.thresholds
    k = len(rt.bundle.exits)

    def chain(th: list) -> Callable[[dict], Any]:
        return lambda x: rt.infer(x, policy=policy, thresholds=th)

    return {"full": rt.infer_full, "early_exit": chain(thresholds), "no_exit": chain([None] * k),
            # a sample no exit is confident about: it passes every head that is on, and only those
            "never_exits": chain([None if t is None else NEVER for t in thresholds])}


def interleaved(variants: dict[str, Callable[[dict], Any]], inputs: dict[str, np.ndarray], batch: int,
                 runs: int, warmup: int, seed: int, burst: int = 1) -> dict[str, np.ndarray]:
    """Seconds per call of every variant: each round feeds all variants the same real rows, in a
    shuffled order, ``burst`` consecutive calls each (on successive rows). With ``burst=1`` every
    call follows another variant's, so each starts with the others' weights in the caches; a
    longer burst measures the steady state of a loop that runs one model, for every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(seed)
    rounds = -(-runs // burst)
    for r in range(warmup + rounds):
        xs = [_rows(inputs, (r * burst + i) * batch, batch) for i in range(burst)]
        rng.shuffle(order)
        for name in order:
            for x in xs:
                t0 = time.perf_counter()
                variants[name](x)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
    return {k: np.asarray(v[:runs]) for k, v in times.items()}


def latency(rt: Classifier, inputs: dict[str, np.ndarray], runs: int = 200, warmup: int = 20,
            torch_fn: Callable | None = None, seed: int = 0, burst: int = BURST) -> dict[str, np.ndarray]:
    """Batch-1 seconds per call for every variant, ``runs`` calls over successive real samples, in
    interleaved bursts of ``burst`` consecutive calls (see ``interleaved``)."""
    times = interleaved(_variants(rt, "per_sample"), inputs, 1, runs, max(1, warmup // burst), seed, burst)
    return _with_torch(times, torch_fn, inputs, 1, runs, warmup, seed)


def throughput(rt: Classifier, inputs: dict[str, np.ndarray], batch: int, runs: int = 30, warmup: int = 3,
               torch_fn: Callable | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seconds per batch of ``batch`` real samples; the early-exit chain under both policies."""
    variants = _variants(rt, "per_sample")
    variants["early_exit/per_sample"] = variants.pop("early_exit")
    variants["early_exit/batch"] = _variants(rt, "batch")["early_exit"]
    return _with_torch(interleaved(variants, inputs, batch, runs, warmup, seed), torch_fn, inputs, batch, runs, warmup,
                       seed)


def head_costs(rt: Classifier, inputs: dict[str, np.ndarray], samples: int = 32, batch: int = 1) -> dict[str, Any]:
    """Each exit head's measured cost at ``batch`` rows as a fraction of one backbone block, and
    the ceiling that follows: the speed-up if every sample left at the first exit."""
    from calibration.costs import measure_costs

    costs = measure_costs(rt.backend, inputs, samples=samples, batch=batch)
    stages = rt.bundle.stages
    middle = [(costs.segments[s.index], s.blocks[1] - s.blocks[0]) for s in stages[1:-1]] or \
        [(costs.segments[s.index], s.blocks[1] - s.blocks[0]) for s in stages]
    per_block = sum(c for c, _ in middle) / sum(n for _, n in middle)  # segments of pure backbone blocks
    fractions = [c / per_block for c in costs.exits]
    first = rt.bundle.exits[0]
    return {"block_ms": per_block, "segment_ms": list(costs.segments), "full_ms": costs.full, "head_ms": list(costs.exits), "head_fraction_of_block": fractions,
            "head_kind": [e.head for e in rt.bundle.exits], "head_analytic_fraction": [e.cost for e in rt.bundle.exits],
            "ceiling_speedup": rt.bundle.num_blocks / (first.block + fractions[0])}


def cost_model(report: dict[str, Any], thresholds: list[float | None]) -> dict[str, float]:
    """The speed-up predicted from each graph's own measured time over the timed exit shares,
    and the measured speed-up against it. Between the analytic figure (multiply-adds) and this one
    lies what the graphs really cost on this machine; between this one and the measurement lies
    what chaining them costs (calls, copies, the runtime's own work)."""
    from calibration.thresholds import path_costs

    h = report["heads"]
    per_exit = path_costs(h["segment_ms"], h["head_ms"], thresholds)
    expected = h["full_ms"] / float(np.dot(list(report["exit_share"].values()), per_exit))  # exits in order, final last
    return {"expected_speedup": expected, "measured_over_expected": report["measured_speedup_mean"] / expected}


def stats_ms(t: np.ndarray) -> dict[str, float]:
    ms = 1000.0 * t
    return {"mean": float(ms.mean()), "p50": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "runs": int(len(ms))}


def summarise(rt: Classifier, inputs: dict[str, np.ndarray], lat: dict[str, np.ndarray],
              thr: dict[int, dict[str, np.ndarray]], labels: np.ndarray | None = None) -> dict[str, Any]:
    """Ratios against the monolithic graph, with the analytic speed-up on the same samples (the
    batch-1 rounds cycled through the inputs in order, so the first rows are the ones timed)."""
    n = len(lat["full"])
    record = rt.record(_rows(inputs, 0, n))
    taken = exit_decisions(record.confidences, rt.thresholds)
    analytic = analytic_speedup(rt.bundle, taken, rt.thresholds)
    full = lat["full"]
    out: dict[str, Any] = {
        "batch1_ms": {k: stats_ms(v) for k, v in lat.items()},
        "analytic_speedup": analytic,
        "measured_speedup_mean": float(full.mean() / lat["early_exit"].mean()),
        "measured_speedup_median": float(np.median(full) / np.median(lat["early_exit"])),
        "no_exit_over_full_median": float(np.median(lat["no_exit"]) / np.median(full)),
        "never_exits_over_full_mean": float(lat["never_exits"].mean() / full.mean()),
        "exit_share": exit_share(taken, [e.block for e in rt.bundle.exits]),
        "exit_blocks": [e.block for e in rt.bundle.exits],
    }
    if labels is not None:
        y = labels[np.arange(n) % len(labels)]
        early = record.predictions[np.arange(n), taken]
        out["accuracy"] = float((early == y).mean())
        out["full_accuracy"] = float((record.predictions[:, -1] == y).mean())
    out["measured_over_analytic"] = out["measured_speedup_mean"] / analytic
    if "torch" in lat:
        out["torch_over_full_median"] = float(np.median(lat["torch"]) / np.median(full))
    out["throughput"] = {}
    out["throughput_runs"] = min((len(v) for t in thr.values() for v in t.values()), default=0)
    for batch, times in thr.items():
        per_s = {k: batch / float(np.median(v)) for k, v in times.items()}
        out["throughput"][str(batch)] = {
            "samples_per_s": per_s, "no_exit_over_full_median": float(np.median(times["no_exit"]) / np.median(times["full"])),
            "per_sample_speedup": per_s["early_exit/per_sample"] / per_s["full"],
            "batch_policy_speedup": per_s["early_exit/batch"] / per_s["full"]}
    return out
