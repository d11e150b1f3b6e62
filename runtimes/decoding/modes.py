"""The decoding modes, each a short loop over a session's parts: greedy decoding with early exit
(``greedy_decode``, either KV rule), the monolithic baseline (``full_decode``) and lossless
self-speculation (``speculative_decode``). Every mode starts from encode + prefill (or a ``Prefilled``
sample) and stops at the end-of-sequence token or after ``max_new`` tokens.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from runtimes.bundle import Bundle
from runtimes.decoding.plan import DecodePlan
from runtimes.decoding.session import DecodeSession, Prefilled, open_session
from runtimes.decoding.walk import ALWAYS, MAX_WAITING, Recompute, StageWalk, policy
from runtimes.errors import ConfigError
from runtimes.genconfig import KVRule

__all__ = ["Decoded", "greedy_decode", "full_decode", "speculative_decode", "prefill", "KV_MODES"]

KV_MODES = tuple(r.value for r in KVRule)


@dataclass
class Decoded:
    tokens: list[int]
    # per token: the block of the exit that emitted it (num_blocks: the final head)
    blocks: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    calls: int = 0  # graph calls made, encode and prefill included
    graph_calls: Counter = field(default_factory=Counter)  # the same, per graph key
    prefill_seconds: float = 0.0  # encode and prefill
    seconds: float = 0.0  # the whole sample, prefill included
    # early exit: the highest confidence of an exit that was asked and did not fire (0 if none was). Any
    # thresholds above it that keep the same exits on decode exactly the same tokens (calibration uses it)
    slack: float = 0.0
    exit_blocks: tuple[int, ...] = field(default=(), repr=False, compare=False)  # the bundle's, for ``exits``

    @property
    def exits(self) -> list[int]:
        """Deprecated: per token the exit's index (the number of exits for the final head); use ``blocks``."""
        warnings.warn("Decoded.exits is deprecated: use Decoded.blocks (exits by block)", DeprecationWarning,
                      stacklevel=2)
        index = {b: i for i, b in enumerate(self.exit_blocks)}
        return [index.get(b, len(self.exit_blocks)) for b in self.blocks]

    def add(self, token: int, block: int, confidence: Any) -> None:
        self.tokens.append(token)
        self.blocks.append(block)
        self.confidences.append(float(confidence))


def _plan(bundle: Bundle, plan: DecodePlan | None) -> DecodePlan:
    return plan if plan is not None else DecodePlan(bundle)


def _decode(backend: Any, plan: DecodePlan, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
            loop: Callable[[DecodeSession, Decoded], None], prefilled: Prefilled | None) -> Decoded:
    with open_session(plan, backend) as s:
        t0 = time.perf_counter()
        if prefilled is None:
            token, confidence = s.prefill(image, prompt_ids, max_new)
        else:
            s.restore(prefilled, max_new)
            token, confidence = prefilled.token, prefilled.confidence
        result = Decoded([token], [plan.num_blocks], [confidence], exit_blocks=plan.exit_blocks)
        result.prefill_seconds = time.perf_counter() - t0
        loop(s, result)
        result.seconds = time.perf_counter() - t0
        result.graph_calls = Counter(s.runner.counts)
        result.calls = sum(s.runner.counts.values())
    return result


def prefill(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
            plan: DecodePlan | None = None) -> Prefilled:
    """encode + prefill of one sample, to decode it several times (``prefilled=``) without redoing them."""
    with open_session(_plan(bundle, plan), backend) as s:
        return s.snapshot(*s.prefill(image, prompt_ids, max_new))


def greedy_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                  thresholds: Sequence[float | None] | None = None, plan: DecodePlan | None = None,
                  prefilled: Prefilled | None = None, kv: KVRule | str = KVRule.RECOMPUTE,
                  max_waiting: int = MAX_WAITING) -> Decoded:
    """Decode one sample with early exit: ``image`` is the model input (1, C, H, W), ``prompt_ids``
    starts with BOS; ``thresholds`` per exit (None: off), the bundle's by default. ``kv``: how the
    layers a token skipped get its keys and values, recomputation by default (``runtimes.decoding.walk``
    says what each rule does); ``max_waiting``: recomputation's bound on the rows an exit carries."""
    p = _plan(bundle, plan)
    n_exits = len(p.exit_blocks)
    thresholds = list(bundle.thresholds if thresholds is None else thresholds)
    if len(thresholds) != n_exits:
        raise ConfigError(f"{len(thresholds)} thresholds for {n_exits} exits")
    rule = KVRule.parse(kv)

    def loop(s: DecodeSession, result: Decoded) -> None:
        walk = StageWalk(s.runner, policy(rule, p, s.store, s.runner, max_waiting), thresholds)
        walk.cache.begin(s.store.lengths[s.row])
        token, eos, blocks = result.tokens[0], p.eos, p.blocks
        while len(result.tokens) < max_new and token != eos:
            token, conf, k = walk.step(token)
            result.add(token, blocks[k], conf)
        result.slack = walk.slack
    return _decode(backend, p, image, prompt_ids, max_new, loop, prefilled)


def full_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                plan: DecodePlan | None = None, prefilled: Prefilled | None = None) -> Decoded:
    """The baseline: greedy decoding with the monolithic decode step, on the same cache and buffers."""
    p = _plan(bundle, plan)

    def loop(s: DecodeSession, result: Decoded) -> None:
        runner, store, row, full, final = s.runner, s.store, s.row, p.full, p.num_blocks
        token = result.tokens[0]
        while len(result.tokens) < max_new and token != p.eos:
            at = store.lengths[row]
            runner.place([token])
            runner.run(full)
            runner.commit(full, 1, at)
            token, conf = runner.last(full)
            store.advance(row)
            result.add(token, final, conf)
    return _decode(backend, p, image, prompt_ids, max_new, loop, prefilled)


def _draft_block(p: DecodePlan, draft_block: Any, draft_exit: Any) -> int:
    """The drafting exit's stage, from ``draft_block`` (or the deprecated index ``draft_exit``)."""
    if draft_exit is not None:
        warnings.warn("speculative_decode(draft_exit=...) is deprecated: pass draft_block=, the exit's block",
                      DeprecationWarning, stacklevel=3)
        if draft_block is not None:
            raise ConfigError("give draft_block or the deprecated draft_exit, not both")
        if isinstance(draft_exit, bool) or not isinstance(draft_exit, int) or not 0 <= draft_exit < len(p.exit_blocks):
            raise ConfigError(f"draft exit must be 0..{len(p.exit_blocks) - 1}, got {draft_exit!r}")
        return draft_exit
    block = p.exit_blocks[0] if draft_block is None else draft_block
    if isinstance(block, bool) or not isinstance(block, int) or block not in p.exit_blocks:
        raise ConfigError(f"draft block must be one of the exits' blocks {list(p.exit_blocks)}, got {draft_block!r}")
    return p.exit_blocks.index(block)


def speculative_decode(backend: Any, bundle: Bundle, image: np.ndarray, prompt_ids: Sequence[int], max_new: int,
                       *legacy: Any, draft_block: int | None = None, draft_len: int = 4,
                       plan: DecodePlan | None = None, prefilled: Prefilled | None = None,
                       draft_exit: int | None = None) -> Decoded:
    """Lossless self-speculation: the exit at ``draft_block`` (the first exit's by default) drafts up to
    ``draft_len`` tokens (the stage walk up to it, recomputing: its head carries the drafts' rows of
    the layer it shares), then the monolithic step checks the last token and every draft in one call;
    the drafts that match the full model's own greedy tokens are kept, with the full model's next
    token after them. The text is the full model's greedy text; ``Decoded.blocks`` marks each token's
    source: the draft block for an accepted draft, ``num_blocks`` for a token the full model wrote.

    ``legacy``: the deprecated positional ``draft_exit, draft_len, plan, prefilled`` (``draft_exit``:
    the exit's index), as the keyword ``draft_exit`` is."""
    if legacy:
        names = ("draft_exit", "draft_len", "plan", "prefilled")
        if len(legacy) > len(names):
            raise TypeError(f"speculative_decode takes at most {5 + len(names)} positional arguments")
        given = dict(zip(names, legacy))
        draft_exit = given.get("draft_exit", draft_exit)
        draft_len = given.get("draft_len", draft_len)
        plan, prefilled = given.get("plan", plan), given.get("prefilled", prefilled)
    p = _plan(bundle, plan)
    j = _draft_block(p, draft_block, draft_exit)
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or draft_len < 1:
        raise ConfigError(f"draft length must be 1 or more, got {draft_len!r}")
    block, final, full = p.exit_blocks[j], p.num_blocks, p.full

    def loop(s: DecodeSession, result: Decoded) -> None:
        runner, store, row = s.runner, s.store, s.row
        drafter = Recompute(p, store, runner, max_waiting=None)
        walk = StageWalk(runner, drafter, [ALWAYS if e == j else None for e in range(len(p.exit_blocks))],
                         p.stages[:j + 1])
        token = result.tokens[0]
        while len(result.tokens) < max_new and token != p.eos:
            start = store.lengths[row]
            drafter.begin(start)
            room = min(draft_len, max_new - len(result.tokens) - 1, p.max_positions - start - 2)
            drafts: list[int] = []
            while len(drafts) < room and (not drafts or drafts[-1] != p.eos):
                drafts.append(walk.step(drafts[-1] if drafts else token)[0])
            # verify: the full model over the last token and every draft, in one call
            store.rewind(row, start)
            n = runner.place([token, *drafts])
            runner.run(full, n)
            runner.commit(full, n, start)
            tokens, confs = runner.decision(full, n)
            accepted, m = _accepted(drafts, tokens.tolist(), p.eos)
            for i, t in enumerate(accepted):
                if len(result.tokens) >= max_new:
                    break
                result.add(t, block if i < m else final, confs[i])
                if t == p.eos:
                    break
            store.advance(row, len(accepted))  # the keys and values of the last token and the accepted drafts
            token = result.tokens[-1]
    return _decode(backend, p, image, prompt_ids, max_new, loop, prefilled)


def _accepted(drafts: list[int], verified: list[int], eos: int) -> tuple[list[int], int]:
    """The tokens a verification keeps and how many of them are drafts before the first the full model
    wrote: the drafts its greedy tokens confirm, then its own next token (an end-of-sequence both agree
    on ends it, counted as the full model's)."""
    m = 0
    while m < len(drafts) and drafts[m] == verified[m] and drafts[m] != eos:
        m += 1
    if m < len(drafts) and drafts[m] == eos and verified[m] == eos:
        return drafts[:m + 1], m
    return drafts[:m] + [verified[m]], m
