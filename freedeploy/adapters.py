"""Backbone adapters: where each Hugging Face family keeps its embeddings, blocks, norm, pooler
and classifier, and how one block is called.

Adding an architecture is one small class here plus a tiny preset and a parity test. Every
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


class Adapter(ABC):
    """Describes one family; holds no modules, so it is free to share and to copy."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # transformers ``config.model_type`` values served
    model_class: ClassVar[str]  # the transformers class with a classification head
    modality: ClassVar[str]  # "image" or "text"
    pooling: ClassVar[str]  # "cls": the pooled feature reads token 0 only; "mean": all tokens
    input_names: ClassVar[tuple[str, ...]]

    @abstractmethod
    def embed(self, hf: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs -> hidden states before block 0, (B, T, C)."""

    @abstractmethod
    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        """The backbone's transformer blocks, in order."""

    def final_norm(self, hf: nn.Module) -> nn.Module:
        return nn.Identity()

    def pool(self, hf: nn.Module) -> nn.Module:
        return ClsPool()

    def classifier(self, hf: nn.Module) -> nn.Module:
        return hf.classifier

    def call_block(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One block; ``mask`` is the additive (B, 1, 1, T) float mask or None."""
        return block(hidden, mask)

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
