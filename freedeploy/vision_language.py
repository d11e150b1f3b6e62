"""Vision-language backbones: Hugging Face ViLT (``ViltForQuestionAnswering``).

ViLT is single-stream: the question's tokens and the image's patches go through one transformer
as one sequence, ``[CLS] question [SEP] <pad>... | [IMG] patch_1 ... patch_P``, and the answer is
a class read from the first token (pooler + MLP classifier). FREE exits sit on these joint blocks.

Two departures from Hugging Face's own embedding code, both forced by deployment and both
function-preserving:

- Images have one fixed size (the preprocessing resizes to ``config.image_size``), so the pixel
  mask is all ones and is not an input; Hugging Face's position-embedding interpolation is then the
  identity and is skipped.
- Hugging Face draws a random order of the (all valid) image patches on every call
  (``torch.multinomial`` in ``ViltEmbeddings.visual_embed``); the adapter keeps them in raster
  order. Each patch carries its own position embedding and attention does not depend on the order
  of the tokens, so the answer is the same function; the hidden states equal Hugging Face's
  exactly once its draw is the identity (``tests/freedeploy/test_model.py`` checks both).

A question is one text segment, so ``token_type_ids`` are all zeros and are built in the graph.
The blocks' token mask is the question's ``attention_mask`` followed by ones for the image
tokens; segment 0 outputs it as ``token_mask`` for the later graphs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from freedeploy.adapters import Adapter, attend_one_query, register
from runtimes import naming

__all__ = ["ViltAdapter", "vilt_tiny"]


@register
class ViltAdapter(Adapter):
    """``ViltForQuestionAnswering``: pre-LN blocks over text + patch tokens, pooler over token 0, MLP classifier."""

    name = "vilt"
    model_types = ("vilt",)
    model_class = "ViltForQuestionAnswering"
    modality = "image-text"
    pooling = "cls"
    input_names = ("input_ids", "attention_mask", "pixel_values")

    @property
    def mask_name(self) -> str | None:
        return naming.TOKEN_MASK  # text mask + image tokens: computed by segment 0, not a model input

    def embed(self, hf: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        emb = hf.vilt.embeddings
        text = emb.text_embeddings(input_ids=inputs["input_ids"])  # (B, Tt, C), token types 0
        patches = emb.patch_embeddings(inputs["pixel_values"]).flatten(2).transpose(1, 2)  # (B, P, C)
        b = patches.shape[0]
        image = torch.cat((emb.cls_token.expand(b, -1, -1), patches), dim=1)  # (B, 1 + P, C)
        pos = emb.position_embeddings  # (1, 1 + P, C): the image's own grid, so no interpolation
        image = emb.dropout(image + pos.expand(b, -1, -1))
        types = emb.token_type_embeddings.weight  # modality types: 0 text, 1 image
        return torch.cat((text + types[0], image + types[1]), dim=1)  # (B, Tt + 1 + P, C)

    def token_mask(self, hf: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        text = inputs["attention_mask"]  # (B, Tt)
        image_tokens = 1 + hf.vilt.embeddings.patch_embeddings.num_patches
        ones = torch.ones(text.shape[0], image_tokens, dtype=text.dtype, device=text.device)
        return torch.cat((text, ones), dim=1)  # (B, Tt + 1 + P)

    def blocks(self, hf: nn.Module) -> nn.ModuleList:
        return hf.vilt.encoder.layer

    def final_norm(self, hf: nn.Module) -> nn.Module:
        return hf.vilt.layernorm

    def pool(self, hf: nn.Module) -> nn.Module:
        return hf.vilt.pooler  # dense + tanh over token 0

    def feature_dim(self, hf: nn.Module) -> int:
        return int(hf.classifier[0].in_features)  # Linear(C, 2C), LayerNorm, GELU, Linear(2C, answers)

    def call_block(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return block(hidden, mask)[0]  # ViltLayer returns a tuple

    def call_block_query(self, block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        sa = block.attention.attention  # pre-LN: x + attn(LN(x)), then h + MLP(LN(h))
        x = block.layernorm_before(hidden)
        ctx = attend_one_query(x[:, :1], x, sa.query, sa.key, sa.value, sa.num_attention_heads,
                               sa.attention_head_size, 1.0 / math.sqrt(sa.attention_head_size), mask,
                               sa.dropout.p, block.training)
        h = block.attention.output(ctx, hidden[:, :1]) + hidden[:, :1]
        return block.output(block.intermediate(block.layernorm_after(h)), h)


def vilt_tiny(num_labels: int, **over: Any) -> Any:
    """A small ViLT: 6 blocks, hidden 128, 32 px images in 8 px patches (17 image tokens) and
    questions of up to 40 tokens."""
    from transformers import ViltConfig

    cfg = dict(vocab_size=512, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
               max_position_embeddings=40, image_size=32, patch_size=8, num_channels=3, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, num_labels=num_labels)
    cfg.update(over)
    return ViltConfig(**cfg)
