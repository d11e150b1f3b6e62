"""Greedy decoding in torch with the segmented decoder: the reference every exported chain is
checked against, and what training reports its sequence metrics with.

The early-exit rule (the one the runtime implements on ONNX graphs):

- the prompt (image prefix, BOS, prompt tokens) runs through every layer at once (prefill); the
  first new token comes from the final head, since every layer ran anyway;
- each later token runs segment by segment; after segment k, if exit k is on, its head reads the
  token's hidden state and layer ``e_k``'s cache; when its confidence (max softmax, fp32) reaches
  the threshold, its greedy token is emitted and the token's keys and values for every layer above
  are filled from that hidden state (state propagation); otherwise the next segment runs;
- decoding stops at the end-of-sequence token or after ``max_new`` tokens.

``only_exit=j`` decodes with exit j alone: every token leaves there (whole-sequence agreement of an
exit with the final head is measured this way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from freedeploy.generative.model import KV, EarlyExitDecoder, position_ids, step_mask
from runtimes.errors import ModelError

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
           thresholds: Sequence[float | None] | None = None, only_exit: int | None = None) -> Decoded:
    """Decode one sample (``pixel_values`` (1, 3, H, W); ``prompt_ids`` starting with BOS)."""
    k_exits = len(model.exits)
    thresholds = list(thresholds) if thresholds is not None else [None] * k_exits
    if model.own_kv and (only_exit is not None or any(t is not None for t in thresholds)):
        raise ModelError("exits with keys and values of their own (a training comparison) need caches of their "
                         "own, which this decoder does not keep: decode with exits off")
    if len(thresholds) != k_exits:
        raise ValueError(f"{len(thresholds)} thresholds for {k_exits} exits")
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=pixel_values.device)
    prefix = model.image_prefix(pixel_values)
    mask = torch.ones(1, prefix.shape[1] + ids.shape[1], dtype=torch.long, device=ids.device)
    hidden = model.embed(ids, position_ids(mask), prefix)
    empty = hidden.new_zeros(1, 0, hidden.shape[-1])
    hidden, cache = model.run_layers(hidden, 0, model.num_blocks, [(empty, empty)] * model.num_blocks,
                                     step_mask(mask, mask.shape[1], hidden.dtype))
    token, conf = _confident(model.lm_head(model.final_norm(hidden[:, -1:]))[0, -1])
    out = Decoded([token], [k_exits], [conf])
    while len(out.tokens) < max_new and token != eos_id:
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        add = step_mask(mask, 1, hidden.dtype)
        hidden = model.embed(torch.tensor([[token]], device=ids.device), position_ids(mask)[:, -1:])
        for k, (start, end) in enumerate(model.bounds):
            hidden, new = model.run_layers(hidden, start, end, cache[start:end], add)
            _append(cache, start, new)
            if k == k_exits:
                token, conf = _confident(model.lm_head(model.final_norm(hidden))[0, -1])
                out.exits.append(k_exits)
                break
            if only_exit is None and thresholds[k] is None or only_exit is not None and only_exit != k:
                continue
            logits, _ = model.exit_forward(k, hidden, cache[end], add)
            token, conf = _confident(logits[0, -1])
            if only_exit == k or conf >= thresholds[k]:
                _append(cache, end, model.fill(hidden, end, model.num_blocks))
                out.exits.append(k)
                break
        out.tokens.append(token)
        out.confidences.append(conf)
    return out


def _append(cache: list[KV], start: int, new: list[KV]) -> None:
    for i, (k, v) in enumerate(new):
        past_k, past_v = cache[start + i]
        cache[start + i] = (torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1))
