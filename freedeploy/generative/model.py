"""A BLIP-2 decoder (OPT language model) cut into segments, with a FREE exit after each, per token.

The pieces, all written against the Hugging Face modules' own weights so that a real BLIP-2 OPT
checkpoint loads unchanged (``tests/freedeploy/test_generative_model.py`` checks the segmented
forward against Hugging Face's, and greedy decoding against ``generate``):

- **prefix**: vision encoder, Q-Former and the language projection turn an image into
  ``num_query_tokens`` embeddings that precede the text;
- **segments**: decoder layers ``[0, e1)``, ``[e1, e2)``, ..., ``[eK, L)``, each with its layers'
  keys and values as explicit tensors of shape (batch, tokens, hidden): the past goes in, the new
  tokens' keys and values come out;
- **exit j** (after block ``e_j``, 1-based as everywhere): one decoder layer initialised from the
  layer that runs next (0-based ``e_j``), the final layer norm and the language-model head, as FREE
  defines an exit. Its attention reads **the next backbone layer's cache**: the exit layer keeps
  that layer's pre-attention norm and key/value projections (shared and frozen), so for every past
  token the keys and values it would compute are exactly the ones layer ``e_j`` stored, and an exit
  needs no cache of its own. Its query, output projection, MLP and norms are its own and trained.
  The language-model head is shared (frozen) too: a copy per exit would cost vocabulary x hidden
  weights each (128 M for OPT-2.7B);
- **state fill** (CALM's state propagation): a token that leaves at exit j never runs the layers
  above; their keys and values for it are computed from the exit's hidden state, copied up.

The exit convention and segment bounds are the classifier's (``runtimes.plan.segment_bounds``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from runtimes import plan
from freedeploy.model import check_exits
from runtimes.errors import ModelError

__all__ = ["EarlyExitDecoder", "DecoderOutput", "step_mask", "position_ids", "blip2_tiny_config", "KV"]

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (batch, tokens, hidden)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """OPT's positions from a 0/1 mask over the whole sequence: the count of real tokens before
    each one (padding gets -1, as in Hugging Face, and is masked out anyway)."""
    return (torch.cumsum(mask, dim=1) * mask - 1).long()


def step_mask(mask: torch.Tensor, new: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask (batch, 1, new, past + new) for ``new`` tokens at the end of a
    sequence whose 0/1 mask (batch, past + new) marks padding: causal among the new tokens."""
    total = mask.shape[1]
    keys = torch.arange(total, device=mask.device)
    queries = torch.arange(new, device=mask.device) + (total - new)
    allowed = (keys[None, :] <= queries[:, None])[None, None] & (mask[:, None, None, :] > 0)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)


def _layer_kv(layer: nn.Module, hidden: torch.Tensor) -> KV:
    """The keys and values an OPT layer stores for ``hidden`` (its input)."""
    x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
    return layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)


def _layer_step(layer: nn.Module, kv_layer: nn.Module, hidden: torch.Tensor, past: KV, mask: torch.Tensor,
                training: bool = False) -> tuple[torch.Tensor, KV]:
    """One OPT decoder layer on new tokens with an explicit cache, as Hugging Face's eager path
    computes it. ``kv_layer`` supplies the pre-attention norm and key/value projections (the layer
    itself, or for an exit the backbone layer whose cache it shares). Returns the output and the new
    tokens' keys and values."""
    attn = layer.self_attn
    residual = hidden
    x = kv_layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
    q = _heads(attn.q_proj(x) * attn.scaling, attn.num_heads)
    k_new, v_new = kv_layer.self_attn.k_proj(x), kv_layer.self_attn.v_proj(x)
    k = _heads(torch.cat([past[0], k_new], dim=1), attn.num_heads)
    v = _heads(torch.cat([past[1], v_new], dim=1), attn.num_heads)
    weights = torch.matmul(q, k.transpose(2, 3)) + mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    weights = nn.functional.dropout(weights, p=attn.dropout, training=training)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(hidden.shape)
    out = nn.functional.dropout(attn.out_proj(out), p=layer.dropout, training=training)
    hidden = residual + out
    if not layer.do_layer_norm_before:
        hidden = layer.self_attn_layer_norm(hidden)
    residual = hidden
    x = layer.final_layer_norm(hidden) if layer.do_layer_norm_before else hidden
    x = nn.functional.dropout(layer.fc2(layer.activation_fn(layer.fc1(x))), p=layer.dropout, training=training)
    hidden = residual + x
    if not layer.do_layer_norm_before:
        hidden = layer.final_layer_norm(hidden)
    return hidden, (k_new, v_new)


class ExitLayer(nn.Module):
    """A FREE exit on a decoder: one layer (its own query, output projection, MLP and norms) whose
    keys and values are those of the backbone layer it was copied from, then the final norm and the
    shared language-model head."""

    def __init__(self, layer: nn.Module, final_norm: nn.Module | None, own_kv: bool = False) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)
        self.own_kv = own_kv  # a training-time comparison only: the export needs the shared cache
        if not own_kv:  # the shared parts are not this module's parameters: the backbone's own layer serves them
            del self.layer.self_attn.k_proj, self.layer.self_attn.v_proj
            if self.layer.do_layer_norm_before:
                del self.layer.self_attn_layer_norm
        self.norm = copy.deepcopy(final_norm) if final_norm is not None else nn.Identity()


@dataclass
class DecoderOutput:
    exit_logits: list[torch.Tensor]  # (B, T, V) per exit
    exit_features: list[torch.Tensor]  # (B, T, C) per exit: the exit's normed hidden state
    logits: torch.Tensor  # final head, (B, T, V)
    feature: torch.Tensor  # final normed hidden state, (B, T, C)


class EarlyExitDecoder(nn.Module):
    """BLIP-2 (OPT) with token-level FREE exits. ``forward`` is the teacher-forced pass that trains the
    exits; the other methods are the pieces the export traces and the reference decoders chain."""

    # the sequence rules, for callers that only hold the model (the exporter's graphs)
    position_ids = staticmethod(position_ids)
    step_mask = staticmethod(step_mask)

    def __init__(self, hf: nn.Module, exits: Sequence[int], own_kv: bool = False) -> None:
        super().__init__()
        lm = getattr(hf, "language_model", None)
        decoder = getattr(getattr(lm, "model", None), "decoder", None)
        if decoder is None or not hasattr(decoder, "layers") or not hasattr(lm, "lm_head"):
            raise ModelError(f"{type(hf).__name__} is not a BLIP-2 model with an OPT language model "
                             "(Blip2ForConditionalGeneration with an OPTForCausalLM)")
        self.hf = hf
        self.num_blocks = len(decoder.layers)
        self.exits = check_exits(exits, self.num_blocks)
        self.bounds = plan.segment_bounds(self.exits, self.num_blocks)
        self.own_kv = own_kv
        self.heads = nn.ModuleList(ExitLayer(decoder.layers[e], decoder.final_layer_norm, own_kv) for e in self.exits)

    # -- the Hugging Face parts ---------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.hf.language_model.model.decoder

    @property
    def num_query_tokens(self) -> int:
        return int(self.hf.config.num_query_tokens)

    @property
    def hidden_size(self) -> int:
        return int(self.decoder.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.language_model.lm_head.out_features)

    def exit_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    # -- pieces ----------------------------------------------------------------------------------------
    def image_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, Q, C): the query tokens as the language model reads them."""
        return self.hf.get_image_features(pixel_values, return_dict=True).pooler_output

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Token (and optional image-prefix) embeddings plus OPT's learned positions; ``positions``
        covers the prefix too when there is one."""
        d = self.decoder
        x = d.embed_tokens(input_ids)
        if d.project_in is not None:
            x = d.project_in(x)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        return x + nn.Embedding.forward(d.embed_positions, positions + d.embed_positions.offset)

    def run_layers(self, hidden: torch.Tensor, start: int, end: int, past: Sequence[KV], mask: torch.Tensor) -> tuple[torch.Tensor, list[KV]]:
        """Layers ``[start, end)`` on new tokens; ``past`` holds one (keys, values) per layer."""
        new = []
        for i, layer in enumerate(self.decoder.layers[start:end]):
            hidden, kv = _layer_step(layer, layer, hidden, past[i], mask, self.training)
            new.append(kv)
        return hidden, new

    def fill(self, hidden: torch.Tensor, start: int, end: int) -> list[KV]:
        """State propagation: layers ``[start, end)``'s keys and values for tokens whose hidden state
        was copied up from an exit."""
        return [_layer_kv(layer, hidden) for layer in self.decoder.layers[start:end]]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        x = d.final_layer_norm(hidden) if d.final_layer_norm is not None else hidden
        return d.project_out(x) if d.project_out is not None else x

    def lm_head(self, feature: torch.Tensor) -> torch.Tensor:
        return self.hf.language_model.lm_head(feature)

    def exit_forward(self, j: int, hidden: torch.Tensor, past: KV, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exit ``j`` on new tokens: ``past`` is the cache of backbone layer ``exits[j]`` (shared).
        Returns logits (B, n, V) and the feature the discriminator sees (B, n, C)."""
        head = self.heads[j]
        kv_layer = head.layer if head.own_kv else self.decoder.layers[self.exits[j]]
        hidden, _ = _layer_step(head.layer, kv_layer, hidden, past, mask, self.training)
        feature = head.norm(hidden)
        d = self.decoder
        if d.project_out is not None:
            feature = d.project_out(feature)
        return self.lm_head(feature), feature

    # -- teacher forcing ---------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                with_exits: bool = True) -> DecoderOutput:
        """The whole sequence at once (image prefix, then ``input_ids`` with their 0/1 mask): every
        exit's and the final head's next-token logits at every text position."""
        b = input_ids.shape[0]
        prefix = self.image_prefix(pixel_values)
        mask = torch.cat([torch.ones(b, prefix.shape[1], dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
        hidden = self.embed(input_ids, position_ids(mask), prefix)
        add = step_mask(mask, mask.shape[1], hidden.dtype)
        empty = hidden.new_zeros(b, 0, hidden.shape[-1])
        exit_logits, exit_features, q = [], [], prefix.shape[1]
        for k, (start, end) in enumerate(self.bounds):
            hidden, _ = self.run_layers(hidden, start, end, [(empty, empty)] * (end - start), add)
            if k < len(self.exits) and with_exits:
                logits, feature = self.exit_forward(k, hidden, (empty, empty), add)
                exit_logits.append(logits[:, q:])
                exit_features.append(feature[:, q:])
        feature = self.final_norm(hidden)
        return DecoderOutput(exit_logits, exit_features, self.lm_head(feature)[:, q:], feature[:, q:])


def blip2_tiny_config(vocab_size: int, image_size: int = 32, max_positions: int = 64, **text: Any) -> Any:
    """``blip2-tiny``: a small vision tower (32x32 images in 8x8 patches), a one-layer Q-Former with 8
    query tokens and a 6-layer OPT decoder of hidden 128; built from configs, no download."""
    from transformers import Blip2Config, OPTConfig

    opt = dict(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=6, ffn_dim=512, num_attention_heads=4,
               word_embed_proj_dim=128, max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    opt.update(text)
    return Blip2Config(
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=128, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=256, attention_dropout=0.0),
        qformer_config=dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, intermediate_size=256,
                            encoder_hidden_size=128, vocab_size=8, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        text_config=OPTConfig(**opt).to_dict(), num_query_tokens=8, image_token_index=vocab_size - 1)
