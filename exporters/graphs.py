"""The torch modules that become the bundle's ONNX graphs. Which graphs there are, and the names
and roles of their tensors, come from the one builder's layout (``runtimes.plan``):

- ``segment_k``: model inputs (k = 0) or ``hidden_<e_k>`` -> ``hidden_<e_{k+1}>``; the last segment
  ends in the final head and returns ``logits``, ``confidence``, ``prediction``;
- ``exit_k``: ``hidden_<e_k>`` -> ``logits_k``, ``confidence_k``, ``prediction_k``;
- ``full``: model inputs -> ``logits``, ``confidence``, ``prediction`` (the monolithic baseline).

Models with a token mask feed it, (B, T) 0/1, to every graph after the embeddings and each graph
rebuilds the additive mask itself: for text it is the model input ``attention_mask``; where the
blocks' tokens are not the input tokens (an image with a question) ``segment_0`` and ``full``
compute it from the model inputs, and ``segment_0`` also outputs it (``token_mask``) for the later
graphs (the adapter's ``mask_name`` and ``token_mask``). Confidence and prediction are computed in
fp32 inside the graph, so the runtime only reads a few numbers per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from runtimes.plan import GraphLayout, classifier_layout

if TYPE_CHECKING:  # exporters never import freedeploy at run time: the model arrives as an object
    from freedeploy.model import EarlyExitModel

__all__ = ["GraphDef", "graph_defs", "CONFIDENCE_TORCH", "head_cost"]


def head_cost(kind: str, tokens: int, width: int, heads: int) -> float:
    """An exit head's block in backbone blocks of multiply-adds. A full block does 12 N d^2 + 2 N^2 d
    (projections and MLP for N tokens, attention); a cls-query block folds the key and value
    projections into its one query (freedeploy.adapters.attend_one_query): 12 d^2 + 2 H N d."""
    if kind == "full-block":
        return 1.0
    n, d = float(tokens), float(width)
    return (12 * d * d + 2 * heads * n * d) / (12 * n * d * d + 2 * n * n * d)


def _max_softmax(p: torch.Tensor) -> torch.Tensor:
    return p.max(dim=-1).values


def _margin(p: torch.Tensor) -> torch.Tensor:
    top = torch.topk(p, 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    h = -(p * torch.log(torch.clamp(p, min=1e-30))).sum(dim=-1)
    return 1.0 - h / torch.log(torch.tensor(float(p.shape[-1])))


# torch twins of runtimes.confidence.CONFIDENCE, applied to fp32 probabilities
CONFIDENCE_TORCH: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_softmax": _max_softmax, "margin": _margin, "entropy": _entropy}


def _head_outputs(logits: torch.Tensor, confidence: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return logits, CONFIDENCE_TORCH[confidence](probs), torch.argmax(logits, dim=-1)


class _Graph(nn.Module):
    """One piece of an EarlyExitModel; ``forward(*tensors)`` in the order of ``input_names``."""

    def __init__(self, model: "EarlyExitModel", kind: str, index: int, confidence: str,
                 input_names: tuple[str, ...], emit_mask: bool = False) -> None:
        super().__init__()
        self.model, self.kind, self.index, self.confidence = model, kind, index, confidence
        self.input_names, self.emit_mask = input_names, emit_mask

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple:
        m = self.model
        named = dict(zip(self.input_names, tensors))
        dtype = next(m.parameters()).dtype
        if self.kind == "full" or (self.kind == "segment" and self.index == 0):
            inputs = {n: named[n] for n in m.adapter.input_names}
            hidden, mask01 = m.adapter.embed(m.hf, inputs), m.token_mask(inputs)
        else:
            hidden, mask01 = tensors[0], named.get(m.adapter.mask_name)
        mask = m.additive_mask(mask01, dtype)
        if self.kind == "exit":
            logits, _ = m.heads[self.index](hidden, mask)
            return _head_outputs(logits, self.confidence)
        segments = m.segments()
        start, end = (0, m.num_blocks) if self.kind == "full" else segments[self.index]
        hidden = m.run_blocks(hidden, mask, start, end)
        if self.kind == "full" or self.index == len(segments) - 1:
            logits, _ = m.final_head(hidden)
            return _head_outputs(logits, self.confidence)
        return (hidden, mask01) if self.emit_mask else hidden


@dataclass(frozen=True)
class GraphDef:
    layout: GraphLayout  # key, kind, tensor names and roles, from the one builder (runtimes.plan)
    module: nn.Module

    @property
    def key(self) -> str:
        return self.layout.key

    @property
    def inputs(self) -> tuple[str, ...]:  # ONNX input names, in forward() order
        return self.layout.input_names

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.layout.output_names


def graph_defs(model: "EarlyExitModel", confidence: str = "max_softmax") -> list[GraphDef]:
    """Every graph of the bundle, in chain order, then the full graph."""
    if confidence not in CONFIDENCE_TORCH:
        raise ValueError(f"unknown confidence {confidence!r}")
    layout = classifier_layout(tuple(model.adapter.input_names), tuple(model.exits), model.num_blocks,
                               model.adapter.mask_name)
    return [GraphDef(g, _Graph(model, g.kind, g.stage or 0, confidence, g.input_names,
                               emit_mask=g.kind == "segment" and len(g.outputs) > 1)) for g in layout]
