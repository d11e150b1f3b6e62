"""Certified thresholds for generative bundles, evaluated by decoding; self-speculation's defaults.

**What is certified** (FREE's and CALM's sense): with probability at least ``1 - epsilon`` over the
draw of the calibration rows, the share of generated sequences that differ from the full model's
greedy sequence (``level="sequence"``), or the mean share of tokens that differ
(``level="token"``, position by position, a missing token counting as different), is at most
``delta`` when decoding with early exit at the certified thresholds, on this backend and precision.

**Why by decoding.** A token that leaves early is part of every later token's input (and, with state
propagation, the keys and values of the layers it skipped are approximations; with recomputation,
the default KV rule, they are the full model's own), so the loss of a threshold cannot be read off
one recorded pass. Every candidate is
decoded. To do that efficiently the grid is fixed in advance (``GRID``, one shared threshold for
the exits that are on, from conservative to aggressive, as Learn-then-Test requires), and each
decode reports its *slack*: the highest confidence of an exit that was asked and did not fire.
Every lower grid point above the slack takes exactly the same decisions, hence the same tokens, so
a row is decoded again only at the first grid point at or below its slack. Encode and prefill run
once per row.

**Exits kept** (``select_exits``, on by default for decoders: each FREE exit is a whole block, so an
exit that rarely fires costs a block per token): as ``calibration.exit_selection`` does for
classifiers, a seeded random split of the rows chooses, on its *selection* part, the subset of
exits whose predicted decode time per token is lowest among the grid points whose selection risk
stays at a target below the certifiable rate; the disjoint *certification* part then tests that
one subset's grid by fixed-sequence testing (binomial p-values for sequences, Hoeffding-Bentkus for
token shares). The predicted time comes from each graph's measured time and the calls decoding made.

**Self-speculation** is lossless whatever its settings, so its draft exit (by block) and draft length
are chosen purely by speed: the pair with the lowest predicted time per token on the selection rows.

The decode rows, graph times and predicted times come from ``calibration.decode_rows``.
"""

from __future__ import annotations

import datetime as _dt
from enum import Enum
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from calibration.decode_rows import GenRows, decode_rows, graph_times, predicted_seconds, prefill_rows, token_mismatch
from calibration.exit_selection import exit_subsets, selection_target, split_calibration
from calibration.ltt import certifiable_tolerance, learn_then_test, max_certifiable_rate
from runtimes.bundle import by_exit
from runtimes.decoding import Decoded, Prefilled, greedy_decode
from runtimes.errors import CalibrationError, ConfigError
from runtimes.records import Certificate, ExitChoice, SpeculativeChoice, StageCosts

if TYPE_CHECKING:
    from runtimes.generator import Generator

__all__ = ["GRID", "Level", "LEVELS", "DRAFT_LENGTHS", "certify_generation", "choose_speculative", "sweep"]

GRID = (0.9999, 0.9995, 0.999, 0.998, 0.996, 0.993, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.87, 0.85,
        0.8, 0.75, 0.7, 0.6, 0.5)


class Level(str, Enum):
    """What a certified disagreement counts: whole sequences that differ from the full model's greedy
    text, or the mean share of tokens that differ per sequence."""

    SEQUENCE = "sequence"
    TOKEN = "token"


LEVELS = tuple(m.value for m in Level)
DRAFT_LENGTHS = (1, 2, 3, 4, 6, 8)
RULE = ("subset of exits with the lowest predicted decode time per token among the grid points whose "
        "selection-split risk stays at or below the target")


def sweep(rt: "Generator", rows: GenRows, prefilled: Sequence[Prefilled], on: Sequence[int],
          grid: Sequence[float] = GRID) -> list[list[Decoded]]:
    """``out[j][i]``: row ``i`` decoded with the exits ``on`` at threshold ``grid[j]`` (the others off),
    each distinct decode run once (see the module's note on slack)."""
    plan, _ = rt.decoding()
    b, be = rt.bundle, rt.backend
    k = len(b.exits)
    out: list[list[Decoded | None]] = [[None] * len(rows) for _ in grid]
    for i in range(len(rows)):
        j = 0
        while j < len(grid):
            th = [grid[j] if e in on else None for e in range(k)]
            got = greedy_decode(be, b, rows.images[i], rows.prompts[i], rows.max_new, th, plan, prefilled[i])
            out[j][i] = got
            j += 1
            while j < len(grid) and grid[j] > got.slack:  # the same decisions, so the same tokens
                out[j][i] = got
                j += 1
    return out  # type: ignore[return-value]


def _losses(decoded: list[list[Decoded]], full: Sequence[Decoded], level: Level) -> np.ndarray:
    if level is Level.SEQUENCE:
        return np.array([[float(o.tokens != f.tokens) for o, f in zip(row, full)] for row in decoded])
    return np.array([[token_mismatch(o.tokens, f.tokens) for o, f in zip(row, full)] for row in decoded])


def _cost(decoded: Sequence[Decoded], ms: dict[str, float]) -> float:
    """Predicted decode milliseconds per generated token (the first token, from prefill, excluded)."""
    new = sum(len(o.tokens) - 1 for o in decoded)
    return 1e3 * sum(predicted_seconds(o, ms) for o in decoded) / max(1, new)


def choose_speculative(rt: "Generator", rows: GenRows, prefilled: Sequence[Prefilled], ms: dict[str, float],
                       lengths: Sequence[int] = DRAFT_LENGTHS) -> SpeculativeChoice:
    """The draft exit (by block) and length with the lowest predicted decode time per token on ``rows``."""
    b = rt.bundle
    blocks = [e.block for e in b.exits]
    best: tuple[float, int, int, float] | None = None
    for exit_spec in b.exits:
        block, head = exit_spec.block, exit_spec.graph.key
        for n in lengths:
            if n >= rows.max_new:
                continue
            outs = decode_rows(rt, rows, "speculative", draft=(block, n), prefilled=prefilled)
            cost = _cost(outs, ms)
            drafted = sum(c for o in outs for k, c in o.graph_calls.items() if k.split("@")[0] == head)
            accepted = sum(sum(1 for e in o.blocks[1:] if e == block) for o in outs)
            if best is None or cost < best[0]:
                best = (cost, block, n, accepted / max(1, drafted))
    if best is None:
        raise CalibrationError("no draft length fits the rows' room to generate")
    cost, block, n, acceptance = best
    return SpeculativeChoice(int(block), int(n), len(rows), float(cost), float(ms[b.full.key]), float(acceptance),
                             "lowest predicted decode time per token (each graph's measured time x the calls "
                             f"decoding made) over draft exits {blocks} and lengths {list(lengths)}")


def certify_generation(rt: "Generator", rows: GenRows, delta: float, epsilon: float,
                       level: Level | str = Level.SEQUENCE,
                       select_exits: bool = True, selection_fraction: float = 0.3, seed: int = 0,
                       grid: Sequence[float] = GRID, speculative: bool = True,
                       say: Callable[[str], None] | None = None) -> Certificate:
    """Thresholds and certificate for this runtime's backend and precision, by decoding ``rows``;
    raises CalibrationError when they cannot certify ``delta``."""
    try:
        level = Level(level)
    except ValueError:
        raise ConfigError(f"level must be one of {', '.join(LEVELS)}, got {level!r}") from None
    if list(grid) != sorted(grid, reverse=True) or not all(0.0 < g <= 1.0 for g in grid):
        raise ConfigError("the threshold grid must run from conservative to aggressive, within (0, 1]")
    say = say or (lambda _: None)
    b = rt.bundle
    blocks = [e.block for e in b.exits]
    k, n = len(blocks), len(rows)
    method = "binomial" if level is Level.SEQUENCE else "hoeffding-bentkus"
    subsets = exit_subsets(k) if select_exits and k > 1 else [tuple(range(k))]
    if len(subsets) > 1:
        sel, cert_rows = split_calibration(n, selection_fraction, seed)
    else:
        sel, cert_rows = np.zeros(0, np.int64), np.arange(n)

    if max_certifiable_rate(len(cert_rows), delta, epsilon, method) < 0:  # before minutes of decoding
        raise CalibrationError(
            f"cannot certify {level.value}-level disagreement of {100 * delta:g}% at epsilon {epsilon:g} with "
            f"{len(cert_rows)} certifying rows even if none disagreed (the tightest they can certify is "
            f"{100 * certifiable_tolerance(len(cert_rows), epsilon):.2f}%); use more calibration rows or a looser "
            "--max-disagreement")
    say(f"measuring each graph's time on {rt.calibration_key}")
    ms = graph_times(rt, verify_sizes=range(2, max(DRAFT_LENGTHS) + 2))
    say(f"encode and prefill of {n} rows, and the full model's greedy text")
    pre = prefill_rows(rt, rows)
    full = decode_rows(rt, rows, "full", prefilled=pre)

    def part(idx: np.ndarray) -> tuple[GenRows, list[Prefilled], list[Decoded]]:
        return rows.subset(idx), [pre[i] for i in idx], [full[i] for i in idx]

    chosen, target = subsets[0], None
    if len(subsets) > 1:
        s_rows, s_pre, s_full = part(sel)
        target = selection_target(len(sel), len(cert_rows), delta, epsilon, method)
        best: tuple[float, int, tuple[int, ...]] | None = None
        for on in subsets:
            say(f"selection split ({len(sel)} rows): decoding exits at blocks {[blocks[e] for e in on]} over "
                f"{len(grid)} thresholds")
            dec = sweep(rt, s_rows, s_pre, on, grid)
            risk = _losses(dec, s_full, level).mean(axis=1)
            costs = [_cost(d, ms) for d in dec]
            prefix = 0
            while prefix < len(grid) and risk[prefix] <= target:
                prefix += 1
            if prefix:
                key = (min(costs[:prefix]), len(on), on)
                if best is None or key[:2] < best[:2]:
                    best = key
        if best is not None:
            chosen = best[2]
    c_rows, c_pre, c_full = part(cert_rows)
    say(f"certification ({len(cert_rows)} rows): decoding exits at blocks {[blocks[e] for e in chosen]} over "
        f"{len(grid)} thresholds")
    dec = sweep(rt, c_rows, c_pre, chosen, grid)
    losses = _losses(dec, c_full, level)
    ltt = learn_then_test(losses, delta, epsilon, method)
    tightest = certifiable_tolerance(len(cert_rows), epsilon)
    if ltt.index < 0:
        raise CalibrationError(
            f"cannot certify {level.value}-level disagreement of {100 * delta:g}% at epsilon {epsilon:g} with "
            f"{len(cert_rows)} rows: even threshold {grid[0]} disagrees on {100 * ltt.risks[0]:.2f}% of them "
            f"(the tightest this n can certify is {100 * tightest:.2f}%, with no disagreement); early exit stays "
            "as it was. Use more calibration rows or a looser --max-disagreement")
    costs = [_cost(d, ms) for d in dec[:ltt.index + 1]]
    j = int(np.argmin(costs))
    thresholds = tuple(grid[j] if e in chosen else None for e in range(k))
    taken = [blk for o in dec[j] for blk in o.blocks[1:]]
    share = [taken.count(blk) / max(1, len(taken)) for blk in (*blocks, b.num_blocks)]
    full_ms = float(ms[b.full.key])
    choice = None
    if len(subsets) > 1:
        choice = ExitChoice(int(seed), float(selection_fraction), len(sel), len(cert_rows),
                            tuple(blocks[e] for e in chosen), tuple(blocks[e] for e in range(k) if e not in chosen),
                            RULE, float(target), float(certifiable_tolerance(n, epsilon)))
    spec = None
    if speculative:
        say("choosing the draft exit and length for self-speculation")
        s_idx = sel if len(sel) else cert_rows
        s_rows, s_pre, _ = part(s_idx)
        spec = choose_speculative(rt, s_rows, s_pre, ms)
    what = "sequences" if level is Level.SEQUENCE else "tokens (mean share per sequence)"
    return Certificate(
        key=rt.calibration_key, thresholds=thresholds, n=n, epsilon=float(epsilon), mode="label-free",
        method=f"learn-then-test by decoding, fixed-sequence over {len(grid)} shared thresholds, {ltt.method} p-values"
               + (f" on a certification split of {len(cert_rows)}; exits chosen on a disjoint random selection split "
                  f"of {len(sel)} (seed {seed})" if choice is not None else ""),
        delta=float(delta), loss=f"{what} that differ from the full model's greedy decoding",
        pvalue=float(ltt.pvalues[j]), certified_candidates=int(ltt.index + 1), tightest_tolerance=float(tightest),
        calibration_risk=float(ltt.risks[j]), expected_latency_ms=float(costs[j]),
        expected_speedup=full_ms / costs[j] if costs[j] > 0 else None,
        exit_share=by_exit(blocks, share), path="shared", grid_index=j,
        costs_ms=StageCosts(tuple(float(ms[s.segment.key]) for s in b.stages),
                            tuple(float(ms[e.graph.key]) for e in b.exits), full_ms),
        backend=rt.backend.describe(), data={"spec": rows.spec, "split": rows.split},
        calibrated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        exit_selection=choice, level=level.value, speculative=spec)
