"""Generative bundles: the rows of a split, quality and tokens per second.

The decode-row measurement itself (every mode on the rows, each graph's time, predicted times) is
``calibration.decode_rows``, which calibration shares; this module builds the rows from a data set
and reports. ``freedeploy calibrate``, ``eval`` and ``bench`` call it for generative bundles.

Speed is reported for the decode phase (the tokens after the first, which early exit and
self-speculation change) and end to end (encode and prefill included, which every mode shares).
Exits are named by block; a speculative ``draft`` is (draft block, draft length).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from analysis.data import load_dataset
from analysis.evaluation import certificate_dict, split_of
from analysis.plots import exit_histogram_png
from calibration.decode_rows import (GenRows, decode_rows, graph_times, mode_fn, predicted_seconds, prefill_rows,
                                     token_mismatch)
from calibration.generative import GRID, sweep
from runtimes.bundle import Bundle, by_exit
from runtimes.decoding import Decoded, DecodePlan
from runtimes.errors import ConfigError, DataError
from runtimes.records import VALIDATION_FILE, ValidationReport, read_json_record
from runtimes.thresholds import NEVER
from runtimes.generator import Generator

__all__ = ["GenRows", "generation_rows", "recorded_macs", "quality", "evaluate_generation", "bench_generation",
           "plot_generation"]



def generation_rows(rt: Generator, spec: str | None, split: str, limit: int | None = None, seed: int = 0) -> GenRows:
    """Rows of ``split`` of the bundle's own image-to-text data (the exact split its model was trained
    with, checked by fingerprint) or of ``spec``; ``limit``: a fixed, seeded subset of at most that many."""
    bundle = rt.bundle
    plan, tok = rt.decoding()  # a ConfigError for a bundle that classifies
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
    images, prompts, refs = [], [], []
    for i in idx:
        image, prompt = data.items[i]
        words = tok.encode(prompt, add_special_tokens=False).ids if prompt and prompt.strip() else []
        prompts.append([plan.bos, *words])
        images.append(rt.encode([image])[plan.image_input])
        if data.targets is not None:
            refs.append([*tok.encode(data.targets[i], add_special_tokens=False).ids, plan.eos])
    longest = max(len(p) for p in prompts)
    max_new = plan.max_positions - plan.num_query_tokens - longest
    if max_new < 1:
        raise DataError(f"a prompt of {longest} tokens leaves no room to generate in {plan.max_positions} positions")
    return GenRows(spec, split, np.asarray(idx), images, prompts, refs if data.targets is not None else None, max_new)


def recorded_macs(bundle: Bundle) -> dict[str, float]:
    """Multiply-adds per new token of each decoding graph, as export counted them (from the weight
    matrices; ``DecodeCheck.graph_macs`` in the bundle's validation record); empty when the bundle's
    export did not count them."""
    path = bundle.path(VALIDATION_FILE)
    if not path.is_file():
        return {}
    check = read_json_record(ValidationReport, path).decoding
    return dict(check.graph_macs) if check is not None else {}


def quality(outs: Sequence[Decoded], full: Sequence[Decoded], refs: Sequence[Sequence[int]] | None,
            blocks: Sequence[int], num_blocks: int) -> dict[str, Any]:
    """Agreement with the full model's greedy text, accuracy against the references, and where the
    tokens after the first left (by block; ``blocks``: the exits', ``num_blocks``: the final head)."""
    n = len(outs)
    same = [o.tokens == f.tokens for o, f in zip(outs, full)]
    token_agree = 1.0 - float(np.mean([token_mismatch(o.tokens, f.tokens) for o, f in zip(outs, full)]))
    taken = [blk for o in outs for blk in o.blocks[1:]]
    share = [taken.count(blk) / max(1, len(taken)) for blk in (*blocks, num_blocks)]
    m: dict[str, Any] = {
        "n": n, "tokens": int(sum(len(o.tokens) for o in outs)),
        "sequence_agreement": float(np.mean(same)) if n else 0.0,
        "sequence_disagreement": 1.0 - float(np.mean(same)) if n else 0.0,
        "token_agreement": token_agree,
        "mean_exit_block": float(np.mean(taken)) if taken else float(num_blocks),
        "token_share": by_exit(blocks, share)}
    if refs is not None:
        m["token_accuracy"] = 1.0 - float(np.mean([token_mismatch(o.tokens, r) for o, r in zip(outs, refs)]))
        m["exact_match"] = float(np.mean([o.tokens == list(r) for o, r in zip(outs, refs)]))
    return m


def evaluate_generation(rt: Generator, rows: GenRows, thresholds: Sequence[float | None] | None = None,
                        draft: tuple[int, int] | None = None) -> dict[str, Any]:
    """Quality of the three modes on ``rows``: the full model, early exit at ``thresholds`` (the
    bundle's by default) and self-speculation (``draft``: block and length, calibration's by default)."""
    b = rt.bundle
    blocks = [e.block for e in b.exits]
    th = list(rt.thresholds if thresholds is None else thresholds)
    draft = tuple(draft or rt.speculative_defaults())
    pre = prefill_rows(rt, rows)
    full = decode_rows(rt, rows, "full", prefilled=pre)
    early = decode_rows(rt, rows, "exit", th, prefilled=pre)
    spec = decode_rows(rt, rows, "speculative", draft=draft, prefilled=pre)
    return {"n": len(rows), "data": {"spec": rows.spec, "split": rows.split}, "thresholds": th,
            "draft": {"block": int(draft[0]), "length": int(draft[1])},
            "full": quality(full, full, rows.refs, blocks, b.num_blocks),
            "exit": quality(early, full, rows.refs, blocks, b.num_blocks),
            "speculative": quality(spec, full, rows.refs, blocks, b.num_blocks),
            "certificate": certificate_dict(rt), "key": rt.calibration_key}


def _stats(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def _variants(rt: Generator, rows: GenRows, th: list[float | None],
              draft: tuple[int, int]) -> dict[str, Callable[..., Decoded]]:
    n, exits = rows.max_new, len(rt.bundle.exits)
    variants = {"monolithic": mode_fn(rt, "full", None, None, n),
                "early exit": mode_fn(rt, "exit", th, None, n),
                f"speculative (exit {draft[0]}, drafts {draft[1]})": mode_fn(rt, "speculative", None, draft, n),
                "chain, exits off": mode_fn(rt, "exit", [None] * exits, None, n)}
    if any(t is not None for t in th):  # the worst case: every exit that is on is asked, none fires
        variants["never exits"] = mode_fn(rt, "exit", [None if t is None else NEVER for t in th], None, n)
    return variants


def bench_generation(rt: Generator, rows: GenRows, thresholds: Sequence[float | None] | None = None,
                     draft: tuple[int, int] | None = None, repeats: int = 1, seed: int = 0,
                     macs: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Batch-1 decoding, every variant on every row, interleaved in a seeded random order per row, in
    one process on the same cache and bound buffers: tokens per second (decode phase and end to end),
    milliseconds per sequence, prefill separately, calls and layers per token, analytic and
    predicted-from-graph-times beside measured. ``draft``: block and length; ``macs``: multiply-adds
    per graph (``recorded_macs`` by default; without them the analytic columns are None)."""
    b = rt.bundle
    th = list(rt.thresholds if thresholds is None else thresholds)
    draft = tuple(draft or rt.speculative_defaults())
    variants = _variants(rt, rows, th, draft)
    ms = graph_times(rt, verify_sizes=range(2, draft[1] + 2))
    macs = dict(recorded_macs(b) if macs is None else macs)
    runs: dict[str, list[Decoded]] = {name: [] for name in variants}
    for i in range(min(3, len(rows))):  # warm up: bind every graph at the lengths the rows reach
        for fn in variants.values():
            fn(rows.images[i], rows.prompts[i], None)
    rng = random.Random(seed)
    for _ in range(repeats):
        for i in range(len(rows)):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                runs[name].append(variants[name](rows.images[i], rows.prompts[i], None))
    report: dict[str, Any] = {"n": len(rows), "repeats": repeats, "data": {"spec": rows.spec, "split": rows.split},
                              "thresholds": th, "draft": {"block": int(draft[0]), "length": int(draft[1])},
                              "graph_ms": ms, "graph_macs": macs, "variants": {}}
    base = runs["monolithic"]
    refs = None if rows.refs is None else [rows.refs[i % len(rows)] for i in range(len(base))]
    scale = (macs.get(b.full.key, 0.0), _layer_macs(rt.decoding()[0], macs))
    for name, outs in runs.items():
        report["variants"][name] = v = _variant(outs, base, refs, ms, macs, scale, b)
        first = report["variants"]["monolithic"]
        v["decode_speedup"] = v["decode_tokens_per_s"] / first["decode_tokens_per_s"] \
            if first["decode_tokens_per_s"] else None
        v["speedup"] = v["tokens_per_s"] / first["tokens_per_s"] if first["tokens_per_s"] else None
        v["analytic_speedup"] = 1.0 / v["analytic_cost"] if v["analytic_cost"] else None
    report["certificate"] = certificate_dict(rt)
    report["backend"] = rt.backend.describe()
    return report


def _variant(outs: list[Decoded], base: list[Decoded], refs: list[list[int]] | None, ms: dict[str, float],
             macs: dict[str, float], scale: tuple[float, float], b: Bundle) -> dict[str, Any]:
    """One variant's row of the bench report; ``scale``: the monolithic step's and one layer's work."""
    full_macs, layer_macs = scale
    once = ("encode", "prefill")
    new = sum(len(o.tokens) - 1 for o in outs)
    decode_s = sum(o.seconds - o.prefill_seconds for o in outs)
    total_s = sum(o.seconds for o in outs)
    tokens = sum(len(o.tokens) for o in outs)
    predicted = sum(predicted_seconds(o, ms) for o in outs)
    work = sum(c * macs.get(k.split("@")[0], 0.0) * (int(k.split("@")[1]) if "@" in k else 1)
               for o in outs for k, c in o.graph_calls.items() if k not in once)
    calls = sum(c for o in outs for k, c in o.graph_calls.items() if k not in once)
    return {"decode_tokens_per_s": new / decode_s if decode_s > 0 else 0.0,
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
            "quality": quality(outs, base, refs, [e.block for e in b.exits], b.num_blocks)}


def _layer_macs(plan: DecodePlan, macs: dict[str, float]) -> float:
    """Multiply-adds of one decoder layer per token: the segments' work over their layers."""
    per = [macs[s.segment.key] / len(plan.new[s.segment.key]) for s in plan.stages
           if s.exit is not None and plan.new[s.segment.key] and s.segment.key in macs]
    return float(np.median(per)) if per else 0.0


def plot_generation(rt: Generator, rows: GenRows, out_dir: str | Path, limit: int = 100) -> list[Path]:
    """``speedup_agreement.png`` (a threshold sweep with the exits the bundle keeps on: predicted
    decode speed-up from each graph's time against sequence agreement with the full model) and
    ``exit_histogram.png`` (where tokens leave at the bundle's thresholds)."""
    try:
        import matplotlib  # optional: the plot extra

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
    return [first, exit_histogram_png(out_dir, q["token_share"], "generated tokens")]
