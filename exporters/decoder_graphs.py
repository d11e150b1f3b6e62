"""The torch modules a generative bundle's graphs are traced from, one per graph of
``runtimes.plan.decoder_layout``; each reads and returns tensors in its layout's order.

They wrap an early-exit decoder (``freedeploy.generative.model.EarlyExitDecoder``; duck-typed, so
this package does not import freedeploy) and compute every decision in fp32 in the graph: the
logits, the confidence (max softmax) and the greedy token.

Keys and values travel as (batch, tokens, hidden) per layer: the graphs take the past and return
only the new tokens' entries, and the caller keeps the cache (why: docs/generative.md, "The bundle").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["EncodeGraph", "PrefillGraph", "StepGraph", "ExitGraph", "FillGraph", "FullStepGraph", "decide",
           "past_step_mask"]


def decide(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits, max-softmax confidence and greedy token over the last axis."""
    logits = logits.float()
    conf, token = torch.softmax(logits, dim=-1).max(dim=-1)
    return logits, conf, token


def past_step_mask(model: Any, past_mask: torch.Tensor, new: int, dtype: torch.dtype) -> torch.Tensor:
    """The model's additive step mask (batch, 1, new, past + new) for ``new`` tokens after a past whose
    0/1 mask marks padding; the new tokens are all real."""
    ones = torch.ones(past_mask.shape[0], new, dtype=past_mask.dtype, device=past_mask.device)
    return model.step_mask(torch.cat([past_mask, ones], dim=1), new, dtype)


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _flat(kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return tuple(t for kv in kvs for t in kv)


class EncodeGraph(nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.image_prefix(pixel_values)


class PrefillGraph(nn.Module):
    """Prefix + prompt through every layer: the first token's decision, every layer's keys and values."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, prefix: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        b, q = prefix.shape[0], prefix.shape[1]
        mask = torch.cat([torch.ones(b, q, dtype=prompt_mask.dtype, device=prompt_mask.device), prompt_mask], dim=1)
        hidden = m.embed(prompt_ids, m.position_ids(mask), prefix)
        add = m.step_mask(mask, mask.shape[1], hidden.dtype)  # causal over the whole prompt, padding masked
        empty = hidden[:, :0]
        hidden, new = m.run_layers(hidden, 0, m.num_blocks, [(empty, empty)] * m.num_blocks, add)
        return (*decide(m.lm_head(m.final_norm(hidden[:, -1]))), *_flat(new))


class StepGraph(nn.Module):
    """Decode-step segment k: layers ``[lo, hi)`` on new tokens with their layers' past."""

    def __init__(self, model: Any, k: int) -> None:
        super().__init__()
        self.model, self.k = model, k
        self.lo, self.hi = model.bounds[k]
        self.last = k == len(model.exits)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        if self.k == 0:
            token_ids, positions, past_mask, *past = args
            hidden = m.embed(token_ids, positions)
        else:
            hidden, past_mask, *past = args
        mask = past_step_mask(m, past_mask, hidden.shape[1], hidden.dtype)
        hidden, new = m.run_layers(hidden, self.lo, self.hi, _pairs(tuple(past)), mask)
        head = decide(m.lm_head(m.final_norm(hidden))) if self.last else (hidden,)
        return (*head, *_flat(new))


class ExitGraph(nn.Module):
    """Exit j on new tokens, attending over the cache of the layer it shares keys and values with."""

    def __init__(self, model: Any, j: int) -> None:
        super().__init__()
        self.model, self.j = model, j

    def forward(self, hidden: torch.Tensor, past_mask: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = past_step_mask(self.model, past_mask, hidden.shape[1], hidden.dtype)
        logits, _ = self.model.exit_forward(self.j, hidden, (past_key, past_value), mask)
        return decide(logits)


class FillGraph(nn.Module):
    """State propagation for stage k: its layers' keys and values from a hidden state copied up."""

    def __init__(self, model: Any, k: int) -> None:
        super().__init__()
        self.model = model
        self.lo, self.hi = model.bounds[k]

    def forward(self, exit_hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _flat(self.model.fill(exit_hidden, self.lo, self.hi))


class FullStepGraph(nn.Module):
    """The monolithic decode step with a full cache: the baseline."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        token_ids, positions, past_mask, *past = args
        m = self.model
        hidden = m.embed(token_ids, positions)
        mask = past_step_mask(m, past_mask, hidden.shape[1], hidden.dtype)
        hidden, new = m.run_layers(hidden, 0, m.num_blocks, _pairs(tuple(past)), mask)
        return (*decide(m.lm_head(m.final_norm(hidden))), *_flat(new))
