"""Should a decode step return only the new tokens' keys and values, or the whole concatenated cache?

    python benchmarks/kv_layout.py RUN_DIR [--past 16,40] [--rounds 30] [--threads 1]

Exports the monolithic decode step of a generative run twice, as the bundle does (new keys and
values only; the caller writes them into a preallocated cache and passes views of its past) and
the other way (the graph concatenates past and new and returns whole caches, which the caller
keeps as its next past), and times one decode step of each with its cache handling, interleaved,
at batch 1 and a few past lengths. Prints ms per step (median over rounds).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from exporters.decoder_graphs import FullStepGraph  # noqa: E402
from exporters.onnx_export import module2onnx  # noqa: E402
from freedeploy.generative.train import load_generative_run  # noqa: E402
from runtimes import naming  # noqa: E402


class _Concat(torch.nn.Module):
    """The same step, returning past + new for every layer."""

    def __init__(self, model) -> None:
        super().__init__()
        self.step = FullStepGraph(model)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.step(*args)
        past = args[3:]
        return (*out[:3], *[torch.cat([p, n], dim=1) for p, n in zip(past, out[3:])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--past", default="16,40")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = ap.parse_args()
    model, _ = load_generative_run(args.run)
    layers, width = model.num_blocks, model.hidden_size
    cap = int(model.decoder.config.max_position_embeddings)
    names = [n for layer in range(layers) for n in naming.past_kv(layer)]
    outs = [n for layer in range(layers) for n in naming.new_kv(layer)]
    in_names = [naming.TOKEN_IDS, naming.POSITIONS, naming.PAST_MASK, *names]
    out_names = ["logits", "confidence", "prediction", *outs]
    rng = np.random.default_rng(0)
    example = [torch.tensor([[5, 6], [7, 8]]), torch.tensor([[10, 11], [10, 11]]), torch.ones(2, 10, dtype=torch.long),
               *[torch.randn(2, 10, width) for _ in names]]
    dims = {"new": (1, cap), "past": (1, cap)}
    in_axes = [{1: "new"}, {1: "new"}, {1: "past"}, *[{1: "past"}] * len(names)]
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        module2onnx(FullStepGraph(model), example, in_names, out_names, Path(tmp) / "new.onnx", dims=dims,
                    in_axes=in_axes, out_axes=[{1: "new"}] * 3 + [{1: "new"}] * len(outs))
        module2onnx(_Concat(model), example, in_names, out_names, Path(tmp) / "cat.onnx", dims=dims,
                    in_axes=in_axes, out_axes=[{1: "new"}] * 3 + [{1: "past+new"}] * len(outs))
        new = onnxruntime.InferenceSession(str(Path(tmp) / "new.onnx"), opts, providers=["CPUExecutionProvider"])
        cat = onnxruntime.InferenceSession(str(Path(tmp) / "cat.onnx"), opts, providers=["CPUExecutionProvider"])
    print(f"{args.run}: {layers} layers, hidden {width}; ms per decode step at batch 1, {args.threads} thread(s) "
          f"(median of {args.rounds})")
    print("| past | new only, preallocated cache | whole cache returned | difference |")
    print("|---|---|---|---|")
    for past in (int(p) for p in args.past.split(",")):
        keys = np.zeros((len(names), 1, cap, width), np.float32)
        keys[:, :, :past] = rng.normal(size=(len(names), 1, past, width))
        ones = np.ones((1, cap), np.int64)
        whole = {n: keys[i, :, :past].copy() for i, n in enumerate(names)}

        def step_new() -> None:  # views of the preallocated past in, new rows written in place
            at = past  # a fixed past length per measurement: every call writes the same row
            feeds = {naming.TOKEN_IDS: np.array([[5]]), naming.POSITIONS: np.array([[at]]),
                     naming.PAST_MASK: ones[:, :at], **{n: keys[i, :, :at] for i, n in enumerate(names)}}
            res = new.run(out_names, feeds)
            for i, r in enumerate(res[3:]):
                keys[i, :, at:at + 1] = r

        def step_cat() -> None:  # whole caches in, whole caches out, kept as the next past
            feeds = {naming.TOKEN_IDS: np.array([[5]]), naming.POSITIONS: np.array([[past]]),
                     naming.PAST_MASK: ones[:, :past], **whole}
            res = cat.run(out_names, feeds)
            nxt = dict(zip(names, res[3:]))  # past + 1 rows: what the next step would read
            assert next(iter(nxt.values())).shape[1] == past + 1

        times = {"new": [], "cat": []}
        fns = {"new": step_new, "cat": step_cat}
        for fn in fns.values():
            for _ in range(5):
                fn()
        order = list(fns)
        for _ in range(args.rounds):
            random.shuffle(order)
            for k in order:
                t0 = time.perf_counter()
                for _ in range(10):
                    fns[k]()
                times[k].append((time.perf_counter() - t0) / 10)
        a, b = (1000 * float(np.median(times[k])) for k in ("new", "cat"))
        print(f"| {past} | {a:.3f} | {b:.3f} | {b - a:+.3f} ms ({100 * (b - a) / a:+.0f} %) |")


if __name__ == "__main__":
    main()
