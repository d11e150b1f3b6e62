"""What one graph call costs on this machine, and what fusing a stage's segment and exit head saves.

    python benchmarks/call_costs.py BUNDLE [--batch 1,32] [--rounds 30] [--json]

For every stage with an exit, on real inputs of the bundle's own test split, with ONNX Runtime set
up exactly as the runtime sets it up (``OrtBackend.open_session``): an identity graph on the
stage's input (the fixed cost of a call), the segment alone, the exit head alone, the two as two
calls (numpy in and out, as the runtime calls them; OrtValues passed from one call to the next;
outputs bound once to preallocated buffers with I/O binding), and the two fused into one graph
(``exporters.fuse.stage2onnx``) that outputs the hidden state and the exit decision. Variants are interleaved in a shuffled order, round after round;
each figure is the median over rounds of the mean time per call, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.evaluation import bundle_split  # noqa: E402
from exporters.fuse import identity2onnx, stage2onnx  # noqa: E402
from runtimes import Runtime  # noqa: E402

_ONNX_TYPES = {"float32": 1, "float16": 10, "int64": 7, "int32": 6, "bool": 9}


def _stage_inputs(rt: Runtime, batch: int) -> list[dict[str, np.ndarray]]:
    """The real feeds every segment receives, for ``batch`` test rows."""
    data, idx = bundle_split(rt.bundle, None, "test")
    rows = [data.items[i] for i in idx[:batch]] if len(idx) >= batch else [data.items[i % len(idx)] for i in range(batch)]
    backend, state = rt.backend, rt.backend.start(rt.encode(rows))
    feeds = []
    for stage in rt.bundle.stages:
        names = [t.name for t in stage.segment.inputs]
        feeds.append({n: np.ascontiguousarray(v) for n, v in backend.fetch(state, names).items()})
        backend.run(stage.segment.key, state)
    return feeds


def _variants(rt: Runtime, k: int, feeds: dict[str, np.ndarray], tmp: Path) -> dict[str, Callable[[], Any]]:
    stage, backend = rt.bundle.stages[k], rt.backend
    seg, head = backend.sessions[stage.segment.key], backend.sessions[stage.exit.graph.key]
    hidden = stage.segment.output("hidden")
    seg_out = [t.name for t in stage.segment.outputs]
    head_in = [t.name for t in stage.exit.graph.inputs]
    head_out = [t.name for t in stage.exit.graph.outputs]
    produced = dict(zip(seg_out, seg.run(seg_out, feeds)))
    head_feeds = {n: produced.get(n, feeds.get(n)) for n in head_in}
    first = stage.segment.inputs[0]
    ident = backend.open_session(identity2onnx(first.name, _ONNX_TYPES[first.dtype], list(first.shape),
                                               tmp / f"identity_{k}.onnx"))
    path = rt.bundle.path
    fused = backend.open_session(stage2onnx(path(stage.segment.files["fp32"]), path(stage.exit.graph.files["fp32"]),
                                            tmp / f"fused_{k}.onnx"))
    fused_out = [o.name for o in fused.get_outputs()]
    one_feed = {first.name: feeds[first.name]}

    def two_calls() -> None:
        out = dict(zip(seg_out, seg.run(seg_out, feeds)))
        head.run(head_out, {n: out.get(n, feeds.get(n)) for n in head_in})

    # the same two calls without numpy in between: OrtValues passed on, or outputs bound once to buffers
    import onnxruntime as ort

    ort_feeds = {n: ort.OrtValue.ortvalue_from_numpy(v) for n, v in feeds.items()}

    def two_calls_ortvalues() -> None:
        out = dict(zip(seg_out, seg.run_with_ort_values(seg_out, ort_feeds)))
        head.run_with_ort_values(head_out, {n: out.get(n, ort_feeds.get(n)) for n in head_in})

    buffers = {n: ort.OrtValue.ortvalue_from_numpy(np.empty_like(v)) for n, v in {**produced, **dict(
        zip(head_out, head.run(head_out, head_feeds)))}.items()}
    seg_bind, head_bind = seg.io_binding(), head.io_binding()
    for n, v in feeds.items():
        seg_bind.bind_ortvalue_input(n, ort_feeds[n])
    for n in seg_out:
        seg_bind.bind_ortvalue_output(n, buffers[n])
    for n in head_in:
        head_bind.bind_ortvalue_input(n, buffers[n] if n in buffers else ort_feeds[n])
    for n in head_out:
        head_bind.bind_ortvalue_output(n, buffers[n])

    def two_calls_bound() -> None:
        seg.run_with_iobinding(seg_bind)
        head.run_with_iobinding(head_bind)

    assert hidden.name in fused_out
    return {"identity": lambda: ident.run(None, one_feed), "segment": lambda: seg.run(seg_out, feeds),
            "head": lambda: head.run(head_out, head_feeds), "segment + head (2 calls)": two_calls,
            "2 calls, OrtValues": two_calls_ortvalues, "2 calls, bound buffers": two_calls_bound,
            "fused (1 call)": lambda: fused.run(fused_out, feeds)}


def measure(variants: dict[str, Callable[[], Any]], rounds: int, calls: int, seed: int = 0) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    order, rng = list(variants), random.Random(seed)
    for fn in variants.values():  # warm up
        for _ in range(3):
            fn()
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            for _ in range(calls):
                variants[name]()
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: 1000.0 * float(np.median(v)) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rt = Runtime.load(args.bundle, backend="onnxruntime")
    report: dict[str, Any] = {"bundle": rt.bundle.name, "backend": rt.backend.describe(), "stages": []}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batch.split(",")):
            feeds = _stage_inputs(rt, batch)
            for stage in rt.bundle.stages[:-1]:
                ms = measure(_variants(rt, stage.index, feeds[stage.index], Path(tmp)), args.rounds,
                             calls=20 if batch == 1 else 3)
                report["stages"].append({"batch": batch, "exit_block": stage.exit.block,
                                         "segment_blocks": list(stage.blocks), "head": stage.exit.head, "ms": ms})
    if args.json:
        print(json.dumps(report, indent=2))
        return
    names = list(report["stages"][0]["ms"])
    print(f"{rt.bundle.name}: ms per call (median of {args.rounds} interleaved rounds), "
          f"{report['backend']['threads']} threads, head threads {report['backend']['head_threads']}")
    print("| batch | stage (blocks) | " + " | ".join(names) + " | head / segment | fused saves |")
    print("|---|---|" + "---|" * (len(names) + 2))
    for s in report["stages"]:
        ms = s["ms"]
        saved = ms["segment + head (2 calls)"] - ms["fused (1 call)"]
        print(f"| {s['batch']} | exit at block {s['exit_block']} ({s['segment_blocks'][0]}..{s['segment_blocks'][1]}) | "
              + " | ".join(f"{ms[n]:.3f}" for n in names)
              + f" | {ms['head'] / ms['segment']:.2f} | {saved:+.3f} ms ({100 * saved / ms['segment + head (2 calls)']:.0f} %) |")


if __name__ == "__main__":
    main()
