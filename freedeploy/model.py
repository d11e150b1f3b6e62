"""The early-exit model: a Hugging Face backbone cut into segments, with a FREE exit head after each.

The exit convention lives here and nowhere else:

- exits are named by 1-based block index; the exit at ``e`` reads the output of block ``e``
  (``hidden_states[e]`` in Hugging Face terms), so ``1 <= e < L`` for an L-block backbone;
- ``segment_bounds``: segment 0 = embeddings + blocks ``[0, e1)``, segment k = blocks
  ``[e_k, e_{k+1})``, the last segment = blocks ``[e_K, L)`` followed by the final head;
- an exit head is one block of the backbone's own kind (a copy of block ``e`` in 0-based terms,
  the block that would run next), the final norm, the pooler and the classifier, all copied.

Exit heads of adapters that pool the first token evaluate their block for that token only
(``cls-query``): keys and values over every token, the query, attention, output projection and MLP
for one row. It is the same function as the full block (``full-block``) up to float rounding, at
about a sixth of the work; mean-pooling adapters keep the full block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from freedeploy.adapters import Adapter
from freedeploy.settings import AUTO, EXIT_HEADS, EXIT_INITS, TrainConfig
from runtimes import plan
from runtimes.errors import ModelError

__all__ = ["EarlyExitModel", "ExitHead", "EarlyExitOutput", "check_exits", "segment_bounds", "additive_mask",
           "EXIT_HEADS", "resolve_exit_head"]


def resolve_exit_head(adapter: Adapter, requested: str = AUTO) -> str:
    """``auto`` -> cls-query where the adapter pools token 0, full-block otherwise."""
    if requested == AUTO:
        return "cls-query" if adapter.pooling == "cls" else "full-block"
    if requested not in EXIT_HEADS:
        raise ModelError(f"exit head must be {AUTO} or one of {', '.join(EXIT_HEADS)}, got {requested!r}")
    if requested == "cls-query" and adapter.pooling != "cls":
        raise ModelError(f"{adapter.name} pools over every token ({adapter.pooling} pooling): its exit heads need "
                         "the full block (--exit-head full-block)")
    return requested


def check_exits(exits: Sequence[int], num_blocks: int) -> tuple[int, ...]:
    """Validate 1-based exit positions: strictly increasing, each in ``[1, num_blocks - 1]``."""
    exits = tuple(int(e) for e in exits)
    if not exits:
        raise ModelError("at least one exit is needed, e.g. --exits 2,4,6")
    if any(b <= a for a, b in zip(exits, exits[1:])):
        raise ModelError(f"exits must be strictly increasing, got {','.join(map(str, exits))}")
    bad = [e for e in exits if not 1 <= e <= num_blocks - 1]
    if bad:
        raise ModelError(
            f"exit(s) {bad} out of range: this backbone has {num_blocks} blocks, so exits must lie in "
            f"1..{num_blocks - 1} (the exit at e reads block e's output; block {num_blocks} feeds the final head)"
        )
    return exits


def segment_bounds(exits: Sequence[int], num_blocks: int) -> list[tuple[int, int]]:
    """0-based half-open block ranges ``[start, end)`` of each segment, one more than there are exits."""
    return plan.segment_bounds(check_exits(exits, num_blocks), num_blocks)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) 0/1 attention mask -> (B, 1, 1, T) additive mask, as transformers' eager attention uses."""
    if mask is None:
        return None
    # `where`, not (1 - m) * min: the same values, and no 0 * -inf = NaN once the graph is fp16
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask[:, None, None, :] > 0, zero, torch.finfo(dtype).min)


class ExitHead(nn.Module):
    """FREE exit: one transformer block, the final norm, the pooler and the classifier."""

    def __init__(self, adapter: Adapter, block: nn.Module, norm: nn.Module, pool: nn.Module,
                 classifier: nn.Module, query_only: bool = False) -> None:
        super().__init__()
        self.adapter, self.query_only = adapter, query_only
        self.block, self.norm, self.pool, self.classifier = block, norm, pool, classifier

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) hidden states, additive mask -> logits (B, classes), pooled feature (B, C)."""
        call = self.adapter.call_block_query if self.query_only else self.adapter.call_block
        feature = self.pool(self.norm(call(self.block, hidden, mask)))  # (B, 1 or T, C) -> (B, C)
        return self.classifier(feature), feature


@dataclass
class EarlyExitOutput:
    exit_logits: list[torch.Tensor]  # one (B, classes) per exit, in exit order
    exit_features: list[torch.Tensor]  # pooled (B, C) features the discriminator sees
    exit_hidden: list[torch.Tensor]  # backbone hidden states each exit reads, (B, T, C)
    logits: torch.Tensor  # final head, (B, classes)
    feature: torch.Tensor  # final pooled feature, (B, C)


class EarlyExitModel(nn.Module):
    """A backbone plus exit heads. ``forward`` runs everything; the segment methods run pieces."""

    additive_mask = staticmethod(additive_mask)  # for callers that only hold the model (exporters)

    def __init__(self, hf: nn.Module, adapter: Adapter, exits: Sequence[int], exit_init: str = TrainConfig.exit_init,
                 exit_head: str = TrainConfig.exit_head) -> None:
        super().__init__()
        self.hf = hf
        self.adapter = adapter
        self.exits = check_exits(exits, adapter.num_blocks(hf))
        self.exit_init = exit_init
        self.exit_head = resolve_exit_head(adapter, exit_head)
        self.heads = nn.ModuleList(self._new_head(e) for e in self.exits)

    def set_exit_head(self, kind: str) -> None:
        """Switch every head between cls-query and full-block evaluation (the weights are shared)."""
        self.exit_head = resolve_exit_head(self.adapter, kind)
        for head in self.heads:
            head.query_only = self.exit_head == "cls-query"

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks(self.hf)

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature the classifier (and the FREE discriminator) reads."""
        return self.adapter.feature_dim(self.hf)

    def _new_head(self, exit_at: int) -> ExitHead:
        if self.exit_init not in EXIT_INITS:
            raise ModelError(f"exit init must be one of {', '.join(EXIT_INITS)}, got {self.exit_init!r}")
        a, hf = self.adapter, self.hf
        block = copy.deepcopy(a.blocks(hf)[exit_at])  # 0-based index e = the block after exit e
        if self.exit_init == "random":
            block.apply(hf._init_weights)
        return ExitHead(a, block, copy.deepcopy(a.final_norm(hf)), copy.deepcopy(a.pool(hf)),
                        copy.deepcopy(a.classifier(hf)), query_only=self.exit_head == "cls-query")

    def reset_heads(self) -> None:
        """Re-initialise every head from the current backbone (after fine-tuning it)."""
        self.heads = nn.ModuleList(self._new_head(e) for e in self.exits)

    def segments(self) -> list[tuple[int, int]]:
        return segment_bounds(self.exits, self.num_blocks)

    def embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model inputs -> (hidden states before block 0, additive mask or None)."""
        hidden = self.adapter.embed(self.hf, inputs)
        return hidden, additive_mask(self.token_mask(inputs), hidden.dtype)

    def token_mask(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, T) 0/1 mask over the tokens the blocks see (None: every token is valid)."""
        return self.adapter.token_mask(self.hf, inputs)

    def run_blocks(self, hidden: torch.Tensor, mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        blocks = self.adapter.blocks(self.hf)
        for i in range(start, end):
            hidden = self.adapter.call_block(blocks[i], hidden, mask)
        return hidden

    def final_head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last block's output -> (logits, pooled feature), in the order Hugging Face applies them."""
        a = self.adapter
        feature = a.pool(self.hf)(a.final_norm(self.hf)(hidden))
        return a.classifier(self.hf)(feature), feature

    def forward(self, inputs: dict[str, torch.Tensor], run_heads: bool = True) -> EarlyExitOutput:
        hidden, mask = self.embed(inputs)
        out = EarlyExitOutput([], [], [], hidden, hidden)
        for k, (start, end) in enumerate(self.segments()):
            hidden = self.run_blocks(hidden, mask, start, end)
            if k < len(self.exits):
                out.exit_hidden.append(hidden)
                if run_heads:
                    logits, feature = self.heads[k](hidden, mask)
                    out.exit_logits.append(logits)
                    out.exit_features.append(feature)
        out.logits, out.feature = self.final_head(hidden)
        return out
