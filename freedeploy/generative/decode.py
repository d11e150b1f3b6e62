"""Greedy decoding in torch with the segmented decoder: the reference every exported chain is
checked against, and what training reports its sequence metrics with.

The early-exit rule (the one the runtime implements on ONNX graphs, ``runtimes.decoding``):

- the prompt (image prefix, BOS, prompt tokens) runs through every layer at once (prefill); the
  first new token comes from the final head, since every layer ran anyway;
- each later token runs segment by segment; after segment k, if exit k is on, its head reads the
  token's hidden state and layer ``e_k``'s cache; when its confidence (max softmax, fp32) reaches
  the threshold, its greedy token is emitted; otherwise the next segment runs;
- the layers an exited token skipped get its keys and values by the KV rule ``kv``:
  ``recompute`` (the runtime's default): they wait, and the next token that goes deeper carries the
  waiting rows through them (an exit head carries the rows its shared layer waits for; past
  ``max_waiting`` of them it is not asked), so every cache row is the full model's own;
  ``propagate`` (this function's default, what training measures with): at once, filled from the
  exited hidden state (CALM's state propagation);
- decoding stops at the end-of-sequence token or after ``max_new`` tokens.

``only_exit=j`` decodes with exit j alone: every token leaves there (whole-sequence agreement of an
exit with the final head is measured this way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from freedeploy.generative.model import KV, EarlyExitDecoder, position_ids, step_mask
from runtimes.decoding import MAX_WAITING
from runtimes.errors import ModelError
from runtimes.genconfig import KVRule

__all__ = ["Decoded", "greedy"]


@dataclass
class Decoded:
    tokens: list[int]  # generated ids, the end-of-sequence token included when it came
    exits: list[int] = field(default_factory=list)  # per token: the exit index that emitted it, K = final head
    confidences: list[float] = field(default_factory=list)


def _confident(logits: torch.Tensor) -> tuple[int, float]:
    p = torch.softmax(logits.float(), dim=-1)
    conf, token = p.max(dim=-1)
    return int(token), float(conf)


@torch.no_grad()
def greedy(model: EarlyExitDecoder, pixel_values: torch.Tensor, prompt_ids: Sequence[int], max_new: int, eos_id: int,
           thresholds: Sequence[float | None] | None = None, only_exit: int | None = None,
           kv: KVRule | str = KVRule.PROPAGATE, max_waiting: int = MAX_WAITING) -> Decoded:
    """Decode one sample (``pixel_values`` (1, 3, H, W); ``prompt_ids`` starting with BOS)."""
    k_exits = len(model.exits)
    thresholds = list(thresholds) if thresholds is not None else [None] * k_exits
    if model.own_kv and (only_exit is not None or any(t is not None for t in thresholds)):
        raise ModelError("exits with keys and values of their own (a training comparison) need caches of their "
                         "own, which this decoder does not keep: decode with exits off")
    if len(thresholds) != k_exits:
        raise ValueError(f"{len(thresholds)} thresholds for {k_exits} exits")
    if only_exit is not None:  # exit j alone, always taken
        thresholds = [float("-inf") if k == only_exit else None for k in range(k_exits)]
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=pixel_values.device)
    prefix = model.image_prefix(pixel_values)
    mask = torch.ones(1, prefix.shape[1] + ids.shape[1], dtype=torch.long, device=ids.device)
    hidden = model.embed(ids, position_ids(mask), prefix)
    empty = hidden.new_zeros(1, 0, hidden.shape[-1])
    hidden, cache = model.run_layers(hidden, 0, model.num_blocks, [(empty, empty)] * model.num_blocks,
                                     step_mask(mask, mask.shape[1], hidden.dtype))
    token, conf = _confident(model.lm_head(model.final_norm(hidden[:, -1:]))[0, -1])
    out = Decoded([token], [k_exits], [conf])
    step = _Propagate(model, cache) if KVRule.parse(kv) is KVRule.PROPAGATE else _Recompute(model, cache, max_waiting)
    while len(out.tokens) < max_new and token != eos_id:
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        hidden = model.embed(torch.tensor([[token]], device=ids.device), position_ids(mask)[:, -1:])
        token, conf, k = step(hidden, thresholds)
        out.tokens.append(token)
        out.exits.append(k)
        out.confidences.append(conf)
    return out


class _Propagate:
    """One token with state propagation: every layer's cache gains the token's row."""

    def __init__(self, model: EarlyExitDecoder, cache: list[KV]) -> None:
        self.model, self.cache = model, cache

    def __call__(self, hidden: torch.Tensor, thresholds: list[float | None]) -> tuple[int, float, int]:
        model, cache, k_exits = self.model, self.cache, len(self.model.exits)
        add = _mask(cache[0][0].shape[1] + 1, 1, hidden)
        for k, (start, end) in enumerate(model.bounds):
            hidden, new = model.run_layers(hidden, start, end, cache[start:end], add)
            _append(cache, start, new)
            if k == k_exits:
                return (*_confident(model.lm_head(model.final_norm(hidden))[0, -1]), k_exits)
            if thresholds[k] is None:
                continue
            logits, _ = model.exit_forward(k, hidden, cache[end], add)
            token, conf = _confident(logits[0, -1])
            if conf >= thresholds[k]:
                _append(cache, end, model.fill(hidden, end, model.num_blocks))
                return token, conf, k
        raise AssertionError("the last segment always decides")


class _Recompute:
    """One token with recomputation: ``pending[k]`` is the first row segment k's layers lack, and
    ``outputs[k]`` holds segment k's output of every row a deeper segment has not taken yet."""

    def __init__(self, model: EarlyExitDecoder, cache: list[KV], max_waiting: int) -> None:
        self.model, self.cache, self.max_waiting = model, cache, max_waiting
        length = cache[0][0].shape[1]
        self.pending = [length] * len(model.bounds)
        self.outputs: list[dict[int, torch.Tensor]] = [{} for _ in model.bounds]

    def _rows(self, k: int, lo: int, at: int) -> torch.Tensor:
        return torch.cat([self.outputs[k][r] for r in range(lo, at + 1)], dim=1)

    def __call__(self, hidden: torch.Tensor, thresholds: list[float | None]) -> tuple[int, float, int]:
        model, cache, pending, k_exits = self.model, self.cache, self.pending, len(self.model.exits)
        at = pending[0]
        for k, (start, end) in enumerate(model.bounds):
            lo = pending[k]
            x = hidden if k == 0 else self._rows(k - 1, lo, at)  # the waiting rows come along
            n = at + 1 - lo
            y, new = model.run_layers(x, start, end, cache[start:end], _mask(at + 1, n, x))
            _append(cache, start, new)
            pending[k] = at + 1
            if k == k_exits:
                return (*_confident(model.lm_head(model.final_norm(y[:, -1:]))[0, -1]), k_exits)
            for i in range(n):
                self.outputs[k][lo + i] = y[:, i:i + 1]
            lo2 = pending[k + 1]  # the head reads layer `end`'s cache: the rows it lacks come along
            if thresholds[k] is None or at + 1 - lo2 > self.max_waiting:
                continue
            logits, _ = model.exit_forward(k, self._rows(k, lo2, at), cache[end], _mask(at + 1, at + 1 - lo2, x))
            token, conf = _confident(logits[0, -1])
            if conf >= thresholds[k]:
                return token, conf, k
        raise AssertionError("the last segment always decides")


def _mask(total: int, new: int, like: torch.Tensor) -> torch.Tensor:
    """The additive mask of ``new`` tokens at the end of ``total`` rows, every row real."""
    return step_mask(torch.ones(1, total, dtype=torch.long, device=like.device), new, like.dtype)


def _append(cache: list[KV], start: int, new: list[KV]) -> None:
    for i, (k, v) in enumerate(new):
        past_k, past_v = cache[start + i]
        cache[start + i] = (torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1))
