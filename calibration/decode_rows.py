"""The decode-row measurement calibration and analysis share: rows of a split (already encoded), every
mode decoded on them, each graph's time, and the decode time predicted from it.

Everything here drives the torch-free decoding parts (``runtimes.decoding``) through a runtime of a
generative bundle. The rows are built from a data set by ``analysis.generation.generation_rows``.
Exits are named by block: a speculative ``draft`` is (draft block, draft length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from runtimes.decoding import (Decoded, DecodePlan, Prefilled, StepRunner, full_decode, graph_key, greedy_decode,
                               open_session, prefill, speculative_decode)

if TYPE_CHECKING:
    from runtimes.generator import Generator

__all__ = ["GenRows", "decode_rows", "prefill_rows", "graph_times", "call_ms", "predicted_seconds", "token_mismatch",
           "mode_fn", "SIZES", "DecodeFn"]

SIZES = (1, 2, 4, 8, 16)  # new tokens per call at which every step graph is timed
DecodeFn = Callable[[np.ndarray, list[int], "Prefilled | None"], Decoded]


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


def _plan(rt: "Generator") -> DecodePlan:
    return rt.decoding()[0]


def mode_fn(rt: "Generator", mode: str, thresholds: Sequence[float | None] | None, draft: tuple[int, int] | None,
            max_new: int) -> DecodeFn:
    """Decoding of one row in ``mode`` (``full``, ``speculative`` at ``draft``, ``exit`` at ``thresholds``,
    the runtime's by default): (image, prompt, prefilled or None) -> Decoded."""
    plan = _plan(rt)
    b, be = rt.bundle, rt.backend
    if mode == "full":
        return lambda x, p, pre: full_decode(be, b, x, p, max_new, plan, pre)
    if mode == "speculative":
        block, n = draft or rt.speculative_defaults()
        return lambda x, p, pre: speculative_decode(be, b, x, p, max_new, draft_block=block, draft_len=n, plan=plan,
                                                    prefilled=pre)
    th = list(rt.thresholds if thresholds is None else thresholds)
    return lambda x, p, pre: greedy_decode(be, b, x, p, max_new, th, plan, pre)


def decode_rows(rt: "Generator", rows: GenRows, mode: str = "exit", thresholds: Sequence[float | None] | None = None,
                draft: tuple[int, int] | None = None, prefilled: Sequence[Prefilled] | None = None) -> list[Decoded]:
    """Every row decoded in ``mode`` (see ``mode_fn``); ``prefilled``: each row's encode + prefill."""
    fn = mode_fn(rt, mode, thresholds, draft, rows.max_new)
    return [fn(rows.images[i], rows.prompts[i], None if prefilled is None else prefilled[i]) for i in range(len(rows))]


def prefill_rows(rt: "Generator", rows: GenRows) -> list[Prefilled]:
    """Every row's encode + prefill, to decode the rows several times."""
    plan = _plan(rt)
    return [prefill(rt.backend, rt.bundle, rows.images[i], rows.prompts[i], rows.max_new, plan)
            for i in range(len(rows))]


def token_mismatch(a: Sequence[int], b: Sequence[int]) -> float:
    """The share of positions where two token sequences differ (a missing token differs), in [0, 1]."""
    n = max(len(a), len(b))
    if n == 0:
        return 0.0
    same = sum(x == y for x, y in zip(a, b))
    return (n - same) / n


def graph_times(rt: "Generator", verify_sizes: Sequence[int] = (), rounds: int = 15, calls: int = 20,
                past: int | None = None) -> dict[str, float]:
    """Milliseconds per call of every decoding graph at batch 1, each on the loop's own bound buffers
    with a past of ``past`` rows: ``key`` for one new token and ``key@n`` for ``n`` at once (a
    verification, or the waiting rows recomputation carries along), for n in ``SIZES`` and
    ``verify_sizes`` (the monolithic step); rounds interleave the graphs, the median round counts."""
    plan = _plan(rt)
    with open_session(plan, rt.backend) as s:
        runner, store = s.runner, s.store
        length = past if past is not None else min(24, plan.max_positions // 2)
        store.reset(s.row, length)
        try:
            jobs = _timing_jobs(plan, runner, plan.max_positions - 1 - length, verify_sizes)
            for _, n, job in jobs:  # bind and warm up
                runner.place([plan.eos] * n)
                job()
                job()
            times: dict[str, list[float]] = {key: [] for key, _, _ in jobs}
            for _ in range(rounds):
                for key, n, job in jobs:
                    runner.place([plan.eos] * n)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        job()
                    times[key].append((time.perf_counter() - t0) / calls * 1e3)
        finally:
            store.reset(s.row, 0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _timing_jobs(plan: DecodePlan, runner: StepRunner, room: int,
                 verify_sizes: Sequence[int]) -> list[tuple[str, int, Callable[[], None]]]:
    """(graph key as counted, new tokens, one call) of every graph ``graph_times`` measures."""
    jobs: list[tuple[str, int, Callable[[], None]]] = []
    source = plan.hidden_out[min(plan.hidden_out)] if plan.hidden_out else ""
    steps = [g for st in plan.stages for g in ((st.segment, st.exit.graph) if st.exit else (st.segment,))]
    for n in sorted({*SIZES, *verify_sizes}):
        if n > room:
            continue
        for g in [*steps, plan.full] if n in SIZES else [plan.full]:
            jobs.append((graph_key(g.key, n), n, lambda g=g, n=n: runner.run(g, n)))
    for fill in plan.fills.values():
        jobs.append((fill.key, 1, lambda g=fill: runner.run(g, 1, source=source)))
    return jobs


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
