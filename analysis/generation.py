"""Generative bundles: the rows of a split, each graph's time, quality and tokens per second.

Everything here drives the torch-free decoding loops (``runtimes.decoding``) through a ``Runtime``;
``freedeploy calibrate``, ``eval`` and ``bench`` call it for bundles whose task is ``generate``.

Speed is reported for the decode phase (the tokens after the first, which early exit and
self-speculation change) and end to end (encode and prefill included, which every mode shares).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from analysis.data import load_dataset
from analysis.evaluation import certificate_dict, split_of
from runtimes.decoding import (Decoded, Prefilled, full_decode, graph_key, greedy_decode, prefill,
                               speculative_decode)
from runtimes.errors import ConfigError, DataError

__all__ = ["GenRows", "generation_rows", "graph_times", "graph_macs", "decode_rows", "quality", "predicted_seconds",
           "evaluate_generation", "bench_generation", "call_ms", "SIZES", "plot_generation", "prefill_rows", "token_mismatch", "NEVER"]

NEVER = 2.0  # a threshold no confidence reaches: the exit is asked and never fires


@dataclass
class GenRows:
    spec: str
    split: str
    index: np.ndarray  # rows of the data set
    images: list[np.ndarray]  # each (1, C, H, W), preprocessed
    prompts: list[list[int]]  # each starts with BOS
    refs: list[list[int]] | None  # the reference text's tokens and EOS, where the data has targets
    max_new: int

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Sequence[int]) -> "GenRows":
        """These rows at positions ``idx``."""
        return GenRows(self.spec, self.split, self.index[list(idx)], [self.images[i] for i in idx],
                       [self.prompts[i] for i in idx], None if self.refs is None else [self.refs[i] for i in idx],
                       self.max_new)


def generation_rows(rt: Any, spec: str | None, split: str, limit: int | None = None, seed: int = 0) -> GenRows:
    """Rows of ``split`` of the bundle's own image-to-text data (the exact split its model was trained
    with, checked by fingerprint) or of ``spec``; ``limit``: a fixed, seeded subset of at most that many."""
    bundle = rt.bundle
    if bundle.decoder is None:
        raise ConfigError(f"bundle {bundle.name!r} classifies; this needs a generative bundle")
    source = (bundle.provenance.get("source") or {}).get("data") or {}
    spec = spec or source.get("spec")
    if not spec:
        raise DataError(f"bundle {bundle.name!r} does not record its data set: pass --data")
    data = load_dataset(spec)
    if data.modality != "image-to-text":
        raise DataError(f"data set {spec!r} is {data.modality} data; a generative bundle needs image-to-text data "
                        "(captions-digits or captions:PATH)")
    idx = split_of(bundle, data, split)
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).permutation(idx)[:limit])
    if len(idx) == 0:
        raise DataError(f"the {split} split of {spec!r} has no rows")
    plan, tok = rt.decoding()
    d = bundle.decoder
    images, prompts, refs = [], [], []
    for i in idx:
        image, prompt = data.items[i]
        words = tok.encode(prompt, add_special_tokens=False).ids if prompt and prompt.strip() else []
        prompts.append([d.bos_id, *words])
        images.append(rt.encode([image])[plan.image_input])
        if data.targets is not None:
            refs.append([*tok.encode(data.targets[i], add_special_tokens=False).ids, d.eos_id])
    longest = max(len(p) for p in prompts)
    max_new = d.max_positions - d.num_query_tokens - longest
    if max_new < 1:
        raise DataError(f"a prompt of {longest} tokens leaves no room to generate in {d.max_positions} positions")
    return GenRows(spec, split, np.asarray(idx), images, prompts, refs if data.targets is not None else None, max_new)


def graph_macs(rt: Any) -> dict[str, float]:
    """Multiply-adds per new token of each decoding graph, from its weight matrices (MatMul and Gemm
    with an initializer operand); attention over the cache is left out (small at these lengths)."""
    import onnx

    out: dict[str, float] = {}
    b = rt.bundle
    for g in b.graphs:
        if g.key in (b.decoder.encode.key, b.decoder.prefill.key):
            continue
        model = onnx.load(str(b.path(g.files[rt.backend.precision])), load_external_data=False)
        weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
        macs = 0.0
        for node in model.graph.node:
            if node.op_type in ("MatMul", "Gemm"):
                for name in node.input[1:2]:
                    dims = weights.get(name)
                    if dims is not None and len(dims) == 2:
                        macs += float(dims[0] * dims[1])
        out[g.key] = macs
    return out


SIZES = (1, 2, 4, 8, 16)  # new tokens per call at which every step graph is timed


def graph_times(rt: Any, verify_sizes: Sequence[int] = (), rounds: int = 15, calls: int = 20,
                past: int | None = None) -> dict[str, float]:
    """Milliseconds per call of every decoding graph at batch 1, each on the loop's own bound buffers
    with a past of ``past`` rows: ``key`` for one new token and ``key@n`` for ``n`` at once (a
    verification, or the waiting rows recomputation carries along), for n in ``SIZES`` and
    ``verify_sizes`` (the monolithic step); rounds interleave the graphs, the median round counts."""
    plan, _ = rt.decoding()
    b = rt.bundle
    s = plan.acquire(rt.backend)
    try:
        length = past if past is not None else min(24, plan.max_positions // 2)
        room = plan.max_positions - 1 - length
        s.reset(length)
        jobs: list[tuple[str, int, Callable[[], None]]] = []
        source = plan.hidden_out[min(plan.hidden_out)] if plan.hidden_out else ""
        steps = [g for st in b.stages for g in ((st.segment, st.exit.graph) if st.exit else (st.segment,))]
        for n in sorted({*SIZES, *verify_sizes}):
            if n > room:
                continue
            for g in [*steps, b.full] if n in SIZES else [b.full]:
                jobs.append((graph_key(g.key, n), n, lambda g=g, n=n: s.run(g, n)))
        for fill in plan.fills.values():
            jobs.append((fill.key, 1, lambda g=fill: s.run(g, 1, source)))
        for _, n, job in jobs:  # bind and warm up
            s.place([plan.eos] * n)
            job()
            job()
        times: dict[str, list[float]] = {key: [] for key, _, _ in jobs}
        for _ in range(rounds):
            for key, n, job in jobs:
                s.place([plan.eos] * n)
                t0 = time.perf_counter()
                for _ in range(calls):
                    job()
                times[key].append((time.perf_counter() - t0) / calls * 1e3)
    finally:
        s.reset(0)
        plan.release(s)
    return {k: float(np.median(v)) for k, v in times.items()}


def call_ms(ms: dict[str, float], key: str) -> float:
    """One call's time: measured (``key`` or ``key@n``), else interpolated linearly in n between the
    nearest measured sizes of that graph (extrapolated from the two largest beyond them)."""
    got = ms.get(key)
    if got is not None:
        return got
    base, _, n = key.partition("@")
    sizes = sorted((int(k.partition("@")[2] or 1), v) for k, v in ms.items() if k.partition("@")[0] == base)
    if not sizes:
        return 0.0
    if len(sizes) == 1:
        return sizes[0][1]
    x = int(n or 1)
    lo, hi = sizes[0], sizes[1]
    for a, c in zip(sizes, sizes[1:]):
        lo, hi = a, c
        if x <= c[0]:
            break
    return lo[1] + (hi[1] - lo[1]) * (x - lo[0]) / (hi[0] - lo[0])


def predicted_seconds(out: Decoded, ms: dict[str, float]) -> float:
    """The decode phase's time predicted from each graph's own time (``call_ms``) and the calls made."""
    return sum(c * call_ms(ms, k) for k, c in out.graph_calls.items() if k not in ("encode", "prefill")) / 1e3


def _mode_fn(rt: Any, mode: str, thresholds: Sequence[float | None] | None, draft: tuple[int, int] | None,
             max_new: int) -> Callable[[np.ndarray, list[int], Prefilled | None], Decoded]:
    plan, _ = rt.decoding()
    b, be = rt.bundle, rt.backend
    if mode == "full":
        return lambda x, p, pre: full_decode(be, b, x, p, max_new, plan, pre)
    if mode == "speculative":
        j, n = draft or rt.speculative_defaults()
        return lambda x, p, pre: speculative_decode(be, b, x, p, max_new, j, n, plan, pre)
    th = list(rt.thresholds if thresholds is None else thresholds)
    return lambda x, p, pre: greedy_decode(be, b, x, p, max_new, th, plan, pre)


def decode_rows(rt: Any, rows: GenRows, mode: str = "exit", thresholds: Sequence[float | None] | None = None,
                draft: tuple[int, int] | None = None, prefilled: Sequence[Prefilled] | None = None) -> list[Decoded]:
    fn = _mode_fn(rt, mode, thresholds, draft, rows.max_new)
    return [fn(rows.images[i], rows.prompts[i], None if prefilled is None else prefilled[i]) for i in range(len(rows))]


def prefill_rows(rt: Any, rows: GenRows) -> list[Prefilled]:
    plan, _ = rt.decoding()
    return [prefill(rt.backend, rt.bundle, rows.images[i], rows.prompts[i], rows.max_new, plan)
            for i in range(len(rows))]


def token_mismatch(a: Sequence[int], b: Sequence[int]) -> float:
    """The share of positions where two token sequences differ (a missing token differs), in [0, 1]."""
    n = max(len(a), len(b))
    if n == 0:
        return 0.0
    same = sum(x == y for x, y in zip(a, b))
    return (n - same) / n


def quality(outs: Sequence[Decoded], full: Sequence[Decoded], refs: Sequence[Sequence[int]] | None,
            blocks: Sequence[int], num_blocks: int) -> dict[str, Any]:
    """Agreement with the full model's greedy text, and accuracy against the references."""
    n = len(outs)
    same = [o.tokens == f.tokens for o, f in zip(outs, full)]
    token_agree = 1.0 - float(np.mean([token_mismatch(o.tokens, f.tokens) for o, f in zip(outs, full)]))
    exits = np.concatenate([np.asarray(o.exits[1:], np.int64) for o in outs]) if n else np.zeros(0, np.int64)
    depth = [blocks[e] if e < len(blocks) else num_blocks for e in exits]
    share = np.bincount(exits, minlength=len(blocks) + 1) / max(1, len(exits))
    m: dict[str, Any] = {
        "n": n, "tokens": int(sum(len(o.tokens) for o in outs)),
        "sequence_agreement": float(np.mean(same)) if n else 0.0,
        "sequence_disagreement": 1.0 - float(np.mean(same)) if n else 0.0,
        "token_agreement": token_agree,
        "mean_exit_block": float(np.mean(depth)) if len(depth) else float(num_blocks),
        "token_share": {("final" if k == len(blocks) else str(blocks[k])): float(v) for k, v in enumerate(share)}}
    if refs is not None:
        m["token_accuracy"] = 1.0 - float(np.mean([token_mismatch(o.tokens, r) for o, r in zip(outs, refs)]))
        m["exact_match"] = float(np.mean([o.tokens == list(r) for o, r in zip(outs, refs)]))
    return m


def evaluate_generation(rt: Any, rows: GenRows, thresholds: Sequence[float | None] | None = None,
                        draft: tuple[int, int] | None = None) -> dict[str, Any]:
    """Quality of the three modes on ``rows``: the full model, early exit at ``thresholds`` (the
    bundle's by default) and self-speculation (its recorded draft exit and length by default)."""
    b = rt.bundle
    blocks = [e.block for e in b.exits]
    th = list(rt.thresholds if thresholds is None else thresholds)
    draft = tuple(draft or rt.speculative_defaults())
    pre = prefill_rows(rt, rows)
    full = decode_rows(rt, rows, "full", prefilled=pre)
    early = decode_rows(rt, rows, "exit", th, prefilled=pre)
    spec = decode_rows(rt, rows, "speculative", draft=draft, prefilled=pre)
    return {"n": len(rows), "data": {"spec": rows.spec, "split": rows.split}, "thresholds": th,
            "draft": {"exit": int(draft[0]), "block": int(blocks[draft[0]]), "length": int(draft[1])},
            "full": quality(full, full, rows.refs, blocks, b.num_blocks),
            "exit": quality(early, full, rows.refs, blocks, b.num_blocks),
            "speculative": quality(spec, full, rows.refs, blocks, b.num_blocks),
            "certificate": certificate_dict(rt), "key": rt.calibration_key}


def _stats(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def bench_generation(rt: Any, rows: GenRows, thresholds: Sequence[float | None] | None = None,
                     draft: tuple[int, int] | None = None, repeats: int = 1, seed: int = 0) -> dict[str, Any]:
    """Batch-1 decoding, every variant on every row, interleaved in a seeded random order per row, in
    one process on the same cache and bound buffers: tokens per second (decode phase and end to end),
    milliseconds per sequence, prefill separately, calls and layers per token, analytic and
    predicted-from-graph-times beside measured."""
    b = rt.bundle
    blocks = [e.block for e in b.exits]
    th = list(rt.thresholds if thresholds is None else thresholds)
    draft = tuple(draft or rt.speculative_defaults())
    variants: dict[str, Callable] = {
        "monolithic": _mode_fn(rt, "full", None, None, rows.max_new),
        "early exit": _mode_fn(rt, "exit", th, None, rows.max_new),
        f"speculative (exit {blocks[draft[0]]}, drafts {draft[1]})": _mode_fn(rt, "speculative", None, draft,
                                                                             rows.max_new),
        "chain, exits off": _mode_fn(rt, "exit", [None] * len(blocks), None, rows.max_new)}
    if any(t is not None for t in th):  # the worst case: every exit that is on is asked, none fires
        variants["never exits"] = _mode_fn(rt, "exit", [None if t is None else NEVER for t in th], None, rows.max_new)
    names = list(variants)
    verify = range(2, draft[1] + 2)
    ms = graph_times(rt, verify_sizes=verify)
    macs = graph_macs(rt)
    runs: dict[str, list[Decoded]] = {n: [] for n in names}
    for i in range(min(3, len(rows))):  # warm up: bind every graph at the lengths the rows reach
        for fn in variants.values():
            fn(rows.images[i], rows.prompts[i], None)
    rng = random.Random(seed)
    for _ in range(repeats):
        for i in range(len(rows)):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                runs[name].append(variants[name](rows.images[i], rows.prompts[i], None))
    base = runs["monolithic"]
    full_macs = macs.get(b.full.key, 0.0)
    layer_macs = _layer_macs(rt, macs)
    report: dict[str, Any] = {"n": len(rows), "repeats": repeats, "data": {"spec": rows.spec, "split": rows.split},
                              "thresholds": th, "draft": {"exit": int(draft[0]), "block": int(blocks[draft[0]]),
                                                          "length": int(draft[1])},
                              "graph_ms": ms, "graph_macs": macs, "variants": {}}
    base_decode = base_e2e = 0.0
    for name in names:
        outs = runs[name]
        new = sum(len(o.tokens) - 1 for o in outs)
        decode_s = sum(o.seconds - o.prefill_seconds for o in outs)
        total_s = sum(o.seconds for o in outs)
        tokens = sum(len(o.tokens) for o in outs)
        predicted = sum(predicted_seconds(o, ms) for o in outs)
        work = sum(c * macs.get(k.split("@")[0], 0.0) * (int(k.split("@")[1]) if "@" in k else 1)
                   for o in outs for k, c in o.graph_calls.items() if k not in ("encode", "prefill"))
        calls = sum(c for o in outs for k, c in o.graph_calls.items() if k not in ("encode", "prefill"))
        v = {"decode_tokens_per_s": new / decode_s if decode_s > 0 else 0.0,
             "tokens_per_s": tokens / total_s if total_s > 0 else 0.0,
             "ms_per_sequence": _stats([o.seconds for o in outs]),
             "prefill_ms": _stats([o.prefill_seconds for o in outs]),
             "decode_ms_per_token": 1e3 * decode_s / max(1, new),
             "calls_per_token": calls / max(1, new),
             "layers_per_token": work / max(1, new) / layer_macs if layer_macs else None,
             "analytic_cost": work / max(1, new) / full_macs if full_macs else None,
             "predicted_ms_per_token": 1e3 * predicted / max(1, new),
             "measured_over_predicted": decode_s / predicted if predicted > 0 else None,
             "identical_to_monolithic": int(sum(o.tokens == f.tokens for o, f in zip(outs, base))),
             "quality": quality(outs, base, None if rows.refs is None else [rows.refs[i % len(rows)]
                                                                             for i in range(len(outs))],
                                blocks, b.num_blocks)}
        if name == "monolithic":
            base_decode, base_e2e = v["decode_tokens_per_s"], v["tokens_per_s"]
        v["decode_speedup"] = v["decode_tokens_per_s"] / base_decode if base_decode else None
        v["speedup"] = v["tokens_per_s"] / base_e2e if base_e2e else None
        v["analytic_speedup"] = 1.0 / v["analytic_cost"] if v["analytic_cost"] else None
        report["variants"][name] = v
    report["certificate"] = certificate_dict(rt)
    report["backend"] = rt.backend.describe()
    return report


def _layer_macs(rt: Any, macs: dict[str, float]) -> float:
    """Multiply-adds of one decoder layer per token: the segments' work over their layers."""
    plan, _ = rt.decoding()
    per = [macs[s.segment.key] / len(plan.new[s.segment.key]) for s in rt.bundle.stages
           if s.exit is not None and plan.new[s.segment.key] and s.segment.key in macs]
    return float(np.median(per)) if per else 0.0


def plot_generation(rt: Any, rows: GenRows, out_dir: Any, limit: int = 100) -> list[Any]:
    """``speedup_agreement.png`` (a threshold sweep with the exits the bundle keeps on: predicted
    decode speed-up from each graph's time against sequence agreement with the full model) and
    ``exit_histogram.png`` (where tokens leave at the bundle's thresholds)."""
    from pathlib import Path

    from calibration.generative import GRID, sweep

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'freedeploy[plot]'") from exc
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    b = rt.bundle
    blocks = [e.block for e in b.exits]
    sub = rows.subset(range(min(limit, len(rows))))
    ms = graph_times(rt)
    pre = prefill_rows(rt, sub)
    full = decode_rows(rt, sub, "full", prefilled=pre)
    on = [k for k, t in enumerate(rt.thresholds) if t is not None] or list(range(len(blocks)))
    dec = sweep(rt, sub, pre, on, GRID)
    full_ms = ms[b.full.key]
    speed = [full_ms / (1e3 * sum(predicted_seconds(o, ms) for o in d) / max(1, sum(len(o.tokens) - 1 for o in d)))
             for d in dec]
    agree = [100 * float(np.mean([o.tokens == f.tokens for o, f in zip(d, full)])) for d in dec]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(speed, agree, "o-", label=f"shared threshold, exits at blocks {[blocks[k] for k in on]}")
    for g, x, y in zip(GRID, speed, agree):
        ax.annotate(f"{g:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.axvline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("predicted decode speed-up over the monolithic step (each graph's measured time)")
    ax.set_ylabel("sequences identical to the full model (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    first = out_dir / "speedup_agreement.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)
    q = quality(decode_rows(rt, sub, "exit", prefilled=pre), full, None, blocks, b.num_blocks)
    from analysis.plots import exit_histogram_png

    return [first, exit_histogram_png(out_dir, q["token_share"], "generated tokens")]
