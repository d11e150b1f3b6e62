"""Where a backbone comes from: a tiny preset built in code, a local Hugging Face directory or hub
id, or an earlier freedeploy run dir.

Presets need no download and no pretrained weights: they are the models the tests and the demo
train from scratch. ``vit-tiny`` mirrors the layout the project's measurements were taken on
(8 blocks, hidden 192, 65 tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from freedeploy.adapters import Adapter, adapter_for_config
from freedeploy.architectures import build_from_config
from freedeploy.rundir import load_run
from freedeploy.vision_language import vilt_tiny  # also registers the ViLT adapter
from runtimes.errors import ModelError

__all__ = ["Backbone", "PRESETS", "load_backbone", "build_from_config", "preset_names"]

log = logging.getLogger(__name__)


@dataclass
class Backbone:
    hf: nn.Module
    adapter: Adapter
    source: str  # what --model said
    pretrained: bool  # weights came from a checkpoint rather than a fresh init
    head_is_new: bool  # the classifier was (re)initialised for these labels
    image_defaults: dict[str, Any] = field(default_factory=dict)  # size/mean/std when known
    tokenizer_dir: str | None = None  # where the model's own tokenizer lives, for models that read text
    preprocess: dict[str, Any] | None = None  # a run dir's recorded preprocessing, reused as is
    recipe: dict[str, Any] = field(default_factory=dict)  # stage-1 defaults a preset was tested with


def _vit_like(kind: str) -> Callable[..., Any]:
    def make(num_labels: int, **over: Any) -> Any:
        import transformers

        cfg = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=8,
                   num_attention_heads=3, intermediate_size=768, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, num_labels=num_labels)
        cfg.update(over)
        return getattr(transformers, f"{kind}Config")(**cfg)
    return make


def _clip_tiny(num_labels: int, **over: Any) -> Any:
    from transformers import CLIPConfig

    vision = dict(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=8, num_attention_heads=3,
                  intermediate_size=768)
    vision.update(over)
    text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)  # unused text tower, kept minimal
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=32, num_labels=num_labels)


def _bert_tiny(num_labels: int, **over: Any) -> Any:
    from transformers import BertConfig

    cfg = dict(vocab_size=8192, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
               intermediate_size=512, max_position_embeddings=512, num_labels=num_labels)
    cfg.update(over)
    return BertConfig(**cfg)


# name -> config factory; every preset is trained from scratch (no weights exist for it)
PRESETS: dict[str, Callable[..., Any]] = {
    "vit-tiny": _vit_like("ViT"),
    "deit-tiny": _vit_like("DeiT"),
    "clip-tiny": _clip_tiny,
    "bert-tiny": _bert_tiny,
    "vilt-tiny": vilt_tiny,
}


# Stage-1 settings a preset needs instead of the from-scratch default (freedeploy.settings.SCRATCH_FINETUNE).
# vilt-tiny at 5e-4 learns what the question alone predicts and ignores the image; 1e-4 for 40 epochs reads both.
PRESET_RECIPES: dict[str, dict[str, Any]] = {
    "vilt-tiny": {"finetune_lr": 1e-4, "finetune_epochs": 40},
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _label_maps(label_names: tuple[str, ...]) -> dict[str, Any]:
    return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
            "label2id": {n: i for i, n in enumerate(label_names)}}


def load_backbone(spec: str, label_names: tuple[str, ...], overrides: dict[str, Any] | None = None) -> Backbone:
    """Resolve ``--model``: preset name, local HF directory or hub id (offline: a local directory)."""
    overrides = dict(overrides or {})
    if spec in PRESETS:
        config = PRESETS[spec](len(label_names), **overrides)
        for k, v in _label_maps(label_names).items():
            setattr(config, k, v)
        hf, adapter = build_from_config(config)
        return Backbone(hf, adapter, spec, pretrained=False, head_is_new=True,
                        recipe=dict(PRESET_RECIPES.get(spec, {})))
    if overrides:
        raise ModelError("--preset-config only applies to presets: " + ", ".join(preset_names()))
    if (Path(spec) / "freedeploy.json").is_file():
        return _load_run_backbone(spec, label_names)
    return _load_pretrained(spec, label_names)


def _load_run_backbone(spec: str, label_names: tuple[str, ...]) -> Backbone:
    """An earlier run's fine-tuned backbone and final head; its exit heads are rebuilt."""
    model, info = load_run(spec)
    if info.labels != label_names:
        raise ModelError(f"run dir {spec} was trained on labels {list(info.labels)[:5]}..., "
                         f"the data set has {list(label_names)[:5]}...; train from the backbone instead")
    return Backbone(model.hf, model.adapter, spec, pretrained=True, head_is_new=False, tokenizer_dir=spec,
                    preprocess=info.manifest["preprocess"])


def _load_pretrained(spec: str, label_names: tuple[str, ...]) -> Backbone:
    import transformers

    local = Path(spec).is_dir()
    if not local and (spec.startswith((".", "/", "~")) or Path(spec).exists()):
        raise ModelError(f"model path {spec} is not a directory with a config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"unknown model {spec!r}: not a preset ({', '.join(preset_names())}), not a local directory, "
            f"and not loadable from the hub ({str(exc).splitlines()[0]})"
        ) from None
    adapter = adapter_for_config(config)
    cls = getattr(transformers, adapter.model_class)
    hf, info = cls.from_pretrained(spec, attn_implementation="eager", ignore_mismatched_sizes=True,
                                   output_loading_info=True, **_label_maps(label_names))
    head_keys = ("classifier.",)
    head_is_new = any(k.startswith(head_keys) for k in [*info.get("missing_keys", []),
                                                        *[m[0] if isinstance(m, tuple) else m for m in
                                                          info.get("mismatched_keys", [])]])
    reads_text = adapter.modality in ("text", "image-text")
    image_defaults = _image_defaults(spec, config) if adapter.modality in ("image", "image-text") else {}
    log.info("loaded %s (%s), classifier %s", spec, adapter.model_class, "new" if head_is_new else "from checkpoint")
    return Backbone(hf.eval(), adapter, spec, pretrained=True, head_is_new=head_is_new,
                    image_defaults=image_defaults, tokenizer_dir=spec if reads_text else None)


def _image_defaults(spec: str, config: Any) -> dict[str, Any]:
    """Input size and normalisation from the checkpoint's preprocessor config when it has one."""
    import json

    vision = getattr(config, "vision_config", config)
    size = int(getattr(vision, "image_size", 224))
    out: dict[str, Any] = {"size": (size, size)}
    pp = Path(spec) / "preprocessor_config.json"
    if pp.is_file():
        data = json.loads(pp.read_text())
        if "image_mean" in data and "image_std" in data:
            out["mean"], out["std"] = tuple(data["image_mean"]), tuple(data["image_std"])
    return out
