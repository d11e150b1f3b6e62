"""Backbone adapters: where each Hugging Face family keeps its embeddings, blocks, norm, pooler
and classifier, and how one block is called.

Adding an architecture is one small class here plus a tiny preset and a parity test (the
vision-language adapter, ViLT, lives in ``freedeploy.vision_language``). Every
adapter is checked by ``tests/freedeploy/test_model.py``: the segmented forward must reproduce
the Hugging Face forward exactly at every exit and at the final logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from runtimes.errors import ModelError

__all__ = ["Adapter", "register", "get_adapter", "adapter_for_config", "ADAPTERS", "ClsPool", "MeanPool"]

ADAPTERS: dict[str, type["Adapter"]] = {}


def register(cls: type["Adapter"]) -> type["Adapter"]:
    ADAPTERS[cls.name] = cls
    return cls


def get_adapter(name: str) -> "Adapter":
    try:
        return ADAPTERS[name]()
    except KeyError:
        raise ModelError(f"unknown adapter {name!r}; known: {sorted(ADAPTERS)}") from None


def adapter_for_config(config: object) -> "Adapter":
    """The adapter serving a transformers config, found by its ``model_type``."""
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls()
    raise ModelError(
        f"no freedeploy adapter for model_type {model_type!r}; supported: "
        f"{sorted(t for c in ADAPTERS.values() for t in c.model_types)}"
    )


class ClsPool(nn.Module):
    """The first token's hidden state: (B, T, C) -> (B, C)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, 0]


class MeanPool(nn.Module):
    """Mean over tokens ``start:`` (CLIP's classifier skips the class token)."""

    def __init__(self, start: int = 1) -> None:
        super().__init__()
        self.start = start

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.mean(hidden[:, self.start:, :], dim=1)


def attend_one_query(query_in: torch.Tensor, kv_in: torch.Tensor, q_proj: nn.Linear, k_proj: nn.Linear,
                     v_proj: nn.Linear, heads: int, head_dim: int, scaling: float, mask: torch.Tensor | None,
                     dropout: float, training: bool) -> torch.Tensor:
    """Multi-head attention for one query row against every token: (B, 1, C), (B, T, C) -> (B, 1, H*d).

    The key and value projections are folded into the one query instead of being applied to all T
    tokens: per head, q . (W_k x_t + b_k) = (W_k^T q) . x_t + const, and the constant cancels in the
    softmax; sum_t p_t (W_v x_t + b_v) = W_v (sum_t p_t x_t) + (sum_t p_t) b_v. The same function as
    eager attention's row for that query, at O(T C + C^2) instead of O(T C^2) multiply-adds.
    """
    b, t, c = kv_in.shape
    q = q_proj(query_in).view(b, 1, heads, head_dim).transpose(1, 2)  # (B, H, 1, d)
    w_k = k_proj.weight.view(heads, head_dim, c)  # (H, d, C)
    scores = torch.matmul(torch.matmul(q, w_k), kv_in.unsqueeze(1).transpose(2, 3)) * scaling  # (B, H, 1, T)
    if mask is not None:
        scores = scores + mask  # (B, 1, 1, T) broadcasts over heads
    probs = nn.functional.dropout(torch.softmax(scores, dim=-1), p=dropout, training=training)
    mixed = torch.matmul(probs, kv_in.unsqueeze(1))  # (B, H, 1, C): attention-weighted inputs
    ctx = torch.matmul(mixed, v_proj.weight.view(heads, head_dim, c).transpose(1, 2))  # (B, H, 1, d)
    if v_proj.bias is not None:
        ctx = ctx + probs.sum(dim=-1, keepdim=True) * v_proj.bias.view(1, heads, 1, head_dim)
    return ctx.transpose(1, 2).reshape(b, 1, heads * head_dim)


class Adapter(ABC):
    """Describes one family; holds no modules, so it is free to share and to copy."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # transformers ``config.model_type`` values served
    model_class: ClassVar[str]  # the transformers class with a classification head
    modality: ClassVar[str]  # "image", "text" or "image-text" (an image and a question)
    pooling: ClassVar[str]  # "cls": the pooled feature reads token 0 only; "mean": all tokens
    input_names: ClassVar[tuple[str, ...]]

    @abstractmethod
    def embed(self, hf: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs -> hidden states before block 0, (B, T, C)."""

    @abstractmethod
    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        """The backbone's transformer blocks, in order."""

    @property
    def mask_name(self) -> str | None:
        """Name of the (B, T) 0/1 token mask every graph after the embeddings reads, or None.

        When the blocks' tokens are exactly the input tokens (text), it is the model input
        ``attention_mask``; otherwise segment 0 computes it (``token_mask``) and outputs it."""
        return "attention_mask" if "attention_mask" in self.input_names else None

    def token_mask(self, hf: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, T) 0/1 mask over the tokens the blocks see, or None when every token is always valid."""
        return inputs.get("attention_mask")

    def final_norm(self, hf: nn.Module) -> nn.Module:
        return nn.Identity()

    def pool(self, hf: nn.Module) -> nn.Module:
        return ClsPool()

    def classifier(self, hf: nn.Module) -> nn.Module:
        return hf.classifier

    def feature_dim(self, hf: nn.Module) -> int:
        """Width of the pooled feature the classifier reads."""
        return int(self.classifier(hf).in_features)

    def call_block(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One block; ``mask`` is the additive (B, 1, 1, T) float mask or None."""
        return block(hidden, mask)

    def call_block_query(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One block evaluated for token 0 only: (B, T, C) -> (B, 1, C), equal to ``call_block(...)[:, :1]``
        up to float rounding. Only for ``pooling == "cls"`` adapters."""
        raise ModelError(f"adapter {self.name!r} pools over every token: its exit heads need the full block")

    def num_blocks(self, hf: nn.Module) -> int:
        return len(self.blocks(hf))


class _VitLike(Adapter):
    modality = "image"
    pooling = "cls"
    input_names = ("pixel_values",)
    base: ClassVar[str]  # attribute holding the base model

    def embed(self, hf: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return getattr(hf, self.base).embeddings(inputs["pixel_values"])

    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        return getattr(hf, self.base).layers

    def final_norm(self, hf: nn.Module) -> nn.Module:
        return getattr(hf, self.base).layernorm

    def call_block_query(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = block.attention  # pre-LN: x + attn(LN(x)), then h + MLP(LN(h))
        x = block.layernorm_before(hidden)
        ctx = attend_one_query(x[:, :1], x, a.q_proj, a.k_proj, a.v_proj, a.num_attention_heads, a.head_dim,
                               a.scaling, mask, a.attention_dropout, block.training)
        h = block.dropout(a.o_proj(ctx)) + hidden[:, :1]
        return block.dropout(block.mlp(block.layernorm_after(h))) + h


@register
class VitAdapter(_VitLike):
    """``ViTForImageClassification``: CLS token after the final LayerNorm."""

    name = "vit"
    model_types = ("vit",)
    model_class = "ViTForImageClassification"
    base = "vit"


@register
class DeitAdapter(_VitLike):
    """``DeiTForImageClassification``: like ViT, with a distillation token after CLS."""

    name = "deit"
    model_types = ("deit",)
    model_class = "DeiTForImageClassification"
    base = "deit"


@register
class ClipVisionAdapter(Adapter):
    """``CLIPForImageClassification``: a CLIP vision tower with a linear head over mean-pooled patches."""

    name = "clip-vision"
    model_types = ("clip",)
    model_class = "CLIPForImageClassification"
    modality = "image"
    pooling = "mean"
    input_names = ("pixel_values",)

    def embed(self, hf: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        tower = hf.vision_model
        return tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"]))

    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        return hf.vision_model.encoder.layers

    def pool(self, hf: nn.Module) -> nn.Module:
        return MeanPool(start=1)


@register
class BertAdapter(Adapter):
    """``BertForSequenceClassification`` (BERT, MiniLM, ...): tanh pooler over [CLS], then the classifier."""

    name = "bert"
    model_types = ("bert",)
    model_class = "BertForSequenceClassification"
    modality = "text"
    pooling = "cls"
    input_names = ("input_ids", "attention_mask")

    def embed(self, hf: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return hf.bert.embeddings(input_ids=inputs["input_ids"])

    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        return hf.bert.encoder.layer

    def pool(self, hf: nn.Module) -> nn.Module:
        return hf.bert.pooler  # dense + tanh over token 0

    def call_block_query(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        sa = block.attention.self  # post-LN: LN(x + attn(x)), then LN(h + FFN(h))
        ctx = attend_one_query(hidden[:, :1], hidden, sa.query, sa.key, sa.value, sa.num_attention_heads,
                               sa.attention_head_size, sa.scaling, mask, sa.dropout.p, block.training)
        h = block.attention.output(ctx, hidden[:, :1])
        return block.output(block.intermediate(h), h)
