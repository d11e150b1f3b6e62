"""Tokens per second of a generative bundle at batch 1: the monolithic decode step against early exit
and self-speculation, interleaved in one process (ONNX Runtime, no torch).

    python benchmarks/generate_bench.py BUNDLE --run RUN_DIR [--rows 100] [--threshold 0.9]
        [--drafts 0:4,1:4] [--threads 1]

Decodes the same test rows (the run dir's test split) with every variant, variant order shuffled
per row; reports mean tokens per second over rows (tokens / decode time, prefill included), the
speed-up over the monolithic decoder, calls per token, mean exit block, and how many sequences
equal the monolithic decoder's (self-speculation must give all of them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.data import load_dataset  # noqa: E402
from runtimes import Runtime  # noqa: E402
from runtimes.decoding import DecodePlan, full_decode, greedy_decode, speculative_decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--run", type=Path, required=True, help="the run dir: its test split and tokenizer")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--threshold", type=float, default=0.9, help="early exit: one threshold at every exit")
    ap.add_argument("--drafts", default="0:4,1:4", help="self-speculation variants: draft exit index:length, ...")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new", type=int, default=24)
    args = ap.parse_args()
    rt = Runtime.load(args.bundle, backend="onnxruntime", threads=args.threads)
    b, be, plan = rt.bundle, rt.backend, DecodePlan(rt.bundle)
    manifest = json.loads((args.run / "freedeploy.json").read_text())
    data = load_dataset(manifest["data"]["spec"])
    test = json.loads((args.run / "splits.json").read_text())["test"][:args.rows]
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(args.run / manifest["preprocess"]["tokenizer_file"]))
    k = len(b.exits)
    variants = {"monolithic": lambda x, p: full_decode(be, b, x, p, args.max_new, plan),
                f"early exit at {args.threshold:g}": lambda x, p: greedy_decode(be, b, x, p, args.max_new,
                                                                               [args.threshold] * k, plan),
                "chain, exits off": lambda x, p: greedy_decode(be, b, x, p, args.max_new, [None] * k, plan)}
    for spec in args.drafts.split(","):
        j, n = (int(v) for v in spec.split(":"))
        variants[f"speculative, exit {b.exits[j].block} drafts {n}"] = \
            (lambda j, n: lambda x, p: speculative_decode(be, b, x, p, args.max_new, j, n, plan))(j, n)
    stats = {name: {"tps": [], "tokens": 0, "calls": 0, "blocks": [], "same": 0} for name in variants}
    rows = []
    for i in test:
        image, prompt = data.items[i]
        ids = [b.decoder.bos_id, *(tok.encode(prompt, add_special_tokens=False).ids if prompt else [])]
        rows.append((rt.encode([image])[plan.image_input], ids))
    for x, p in rows[:5]:  # warm up
        for fn in variants.values():
            fn(x, p)
    rng = random.Random(0)
    order = list(variants)
    for x, p in rows:
        rng.shuffle(order)
        outs = {}
        for name in order:
            t0 = time.perf_counter()
            out = variants[name](x, p)
            dt = time.perf_counter() - t0
            outs[name] = out
            s = stats[name]
            s["tps"].append(len(out.tokens) / dt)
            s["tokens"] += len(out.tokens)
            s["calls"] += out.calls
            s["blocks"] += [int(b.exits[e].block) if e < k else b.num_blocks for e in out.exits]
        for name, out in outs.items():
            stats[name]["same"] += out.tokens == outs["monolithic"].tokens
    base = float(np.mean(stats["monolithic"]["tps"]))
    print(f"{b.name}: {len(rows)} test rows, batch 1, ONNX Runtime {args.threads} thread(s)")
    print("| variant | tokens/s (mean) | speed-up | calls per token | mean exit block | sequences equal to monolithic |")
    print("|---|---|---|---|---|---|")
    for name, s in stats.items():
        tps = float(np.mean(s["tps"]))
        print(f"| {name} | {tps:.0f} | {tps / base:.2f}x | {s['calls'] / s['tokens']:.2f} | "
              f"{np.mean(s['blocks']):.2f} | {s['same']} / {len(rows)} |")


if __name__ == "__main__":
    main()
