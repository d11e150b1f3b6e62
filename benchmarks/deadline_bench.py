"""Deadline mode on a real bundle: how late calls return, and how good the forced answers are.

    python benchmarks/deadline_bench.py BUNDLE [--calls 1000] [--deadline-ms MS] [--json]

One row per call (batch 1, ONNX Runtime, the bundle's test split cycled, inputs encoded beforehand
so that the figures are the chain's). The deadline defaults to segment 0 + exit head 0 + half of
segment 1 at their measured median costs: between one and two segments' time, so that exit 0
always fits and segment 1 never does. Three threshold settings: the bundle's calibrated ones, 0.99
at every exit (more rows stay open), and above 1 (no exit ever fires: every answer is forced, pure
anytime prediction). For each: the worst and the 99th-percentile overrun past the deadline over
all calls (against the longest single graph call, the promised granularity), the calls that
returned late, the forced answers' accuracy and agreement with the full model, and what the other
rule (the most confident exit computed instead of the deepest) would have scored on the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.evaluation import bundle_split  # noqa: E402
from runtimes import Runtime  # noqa: E402


def _rows(arrays: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {k: v[i:i + 1] for k, v in arrays.items()}


def _median_costs(rt: Runtime, arrays: dict[str, np.ndarray], rows: int, n: int = 300) -> dict[str, float]:
    """Median seconds per graph call at batch 1, every graph of the chain run (no exit fires)."""
    seen: dict[str, list[float]] = {}
    never = [1.01] * len(rt.bundle.exits)
    for i in range(n):
        for key, s in rt.infer(_rows(arrays, i % rows), thresholds=never).timings.items():
            seen.setdefault(key, []).append(s)
    return {k: float(np.median(v)) for k, v in seen.items()}


def _scenario(rt: Runtime, arrays: dict[str, np.ndarray], labels: np.ndarray, record, th: list, ms: float,
              calls: int) -> dict:
    n = len(labels)
    first = {rt.bundle.stages[0].segment.key, rt.bundle.stages[0].exit.graph.key}  # always run
    over, forced, classes, exits, rows, longest, first_only = [], [], [], [], [], [], []
    for c in range(calls):
        i = c % n
        x = _rows(arrays, i)
        t0 = time.perf_counter()
        res = rt.infer(x, thresholds=th, deadline_ms=ms)
        over.append(1000 * (time.perf_counter() - t0) - ms)
        forced.append(bool(res.forced[0]))
        classes.append(int(res.classes[0]))
        exits.append(int(res.exits[0]))
        rows.append(i)
        longest.append(1000 * max(res.timings.values()))
        first_only.append(set(res.timings) <= first)
    over, forced, classes, exits, rows, longest, first_only = map(
        np.array, (over, forced, classes, exits, rows, longest, first_only))
    late = over > 0
    full = record.predictions[rows, -1]
    y = labels[rows]
    plain = rt.infer(arrays, thresholds=th)
    # the other rule on the same forced rows: the most confident exit among those computed
    conf = record.confidences[rows[forced]]
    upto = np.arange(conf.shape[1])[None, :] <= exits[forced][:, None]
    confident = record.predictions[rows[forced], np.where(upto, conf, -1.0).argmax(axis=1)]
    return {
        "thresholds": th, "deadline_ms": round(ms, 3), "calls": calls,
        "worst_overrun_ms": round(float(over.max()), 3), "p99_overrun_ms": round(float(np.percentile(over, 99)), 3),
        "late_calls": int(late.sum()), "late_calls_in_the_first_exit": int((late & first_only).sum()),
        # the promise: no later than the graph that was running at the deadline; beyond that, Python's own time
        "worst_overrun_beyond_the_call_longest_graph_ms": round(float((over - longest).max()), 3),
        "forced": int(forced.sum()), "forced_by_exit": np.bincount(exits[forced], minlength=len(th)).tolist(),
        "forced_accuracy": _share(classes[forced] == y[forced]),
        "forced_agreement_with_full": _share(classes[forced] == full[forced]),
        "forced_accuracy_most_confident_rule": _share(confident == y[forced]),
        "forced_agreement_most_confident_rule": _share(confident == full[forced]),
        "unforced_accuracy": _share(classes[~forced] == y[~forced]),
        "accuracy_with_deadline": _share(classes == y),
        "accuracy_without_deadline": _share(plain.classes[rows] == y),
        "full_model_accuracy": _share(full == y),
        "longest_graph_ms": round(rt.stats().deadline.longest_graph_ms, 3),
    }


def _share(mask: np.ndarray) -> float | None:
    return round(float(mask.mean()), 4) if len(mask) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--deadline-ms", type=float, help="[default: segment 0 + head 0 + half of segment 1]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rt = Runtime.load(args.bundle, backend="onnxruntime")
    data, idx = bundle_split(rt.bundle, None, "test")
    arrays = rt.encode([data.items[i] for i in idx])
    labels = data.labels[idx]
    record = rt.record(arrays)
    costs = _median_costs(rt, arrays, len(labels))
    s0, s1 = rt.bundle.stages[0], rt.bundle.stages[1]
    ms = args.deadline_ms or 1000 * (costs[s0.segment.key] + costs[s0.exit.graph.key] + 0.5 * costs[s1.segment.key])
    out = {"bundle": rt.bundle.name, "backend": rt.backend.describe(), "test_rows": int(len(labels)),
           "median_graph_ms": {k: round(1000 * v, 3) for k, v in costs.items()}, "scenarios": []}
    for th in (rt.thresholds, [0.99] * len(rt.bundle.exits), [1.01] * len(rt.bundle.exits)):
        out["scenarios"].append(_scenario(rt, arrays, labels, record, list(th), ms, args.calls))
    out["stats"] = rt.stats().to_dict()["deadline"]
    rt.close()
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['bundle']} on {out['backend']['backend']} ({out['backend'].get('threads')} threads), "
          f"{out['test_rows']} test rows; median ms per call: {out['median_graph_ms']}")
    for s in out["scenarios"]:
        th = ", ".join(f"{t:.3g}" for t in s["thresholds"])
        print(f"\nthresholds [{th}], deadline {s['deadline_ms']} ms, {s['calls']} calls at batch 1:")
        print(f"  overrun past the deadline: worst {s['worst_overrun_ms']} ms, 99th percentile "
              f"{s['p99_overrun_ms']} ms; {s['late_calls']} calls late, {s['late_calls_in_the_first_exit']} of them "
              f"while computing exit 0 (always run); longest graph call {s['longest_graph_ms']} ms; worst overrun "
              f"minus the call's own longest graph {s['worst_overrun_beyond_the_call_longest_graph_ms']} ms")
        print(f"  forced {s['forced']} of {s['calls']} (by exit {s['forced_by_exit']}): accuracy "
              f"{s['forced_accuracy']}, agreement with the full model {s['forced_agreement_with_full']} "
              f"(most-confident rule: {s['forced_accuracy_most_confident_rule']}, "
              f"{s['forced_agreement_most_confident_rule']})")
        print(f"  accuracy: unforced {s['unforced_accuracy']}, all with the deadline {s['accuracy_with_deadline']}, "
              f"without it {s['accuracy_without_deadline']}, full model {s['full_model_accuracy']}")


if __name__ == "__main__":
    main()
