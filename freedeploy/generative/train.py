"""``freedeploy train`` for generative FREE: a BLIP-2 (OPT) decoder that writes text about an image,
with token-level exits. Reads top to bottom: recipe, routing, model, resolve, stages, metrics, run.

- **stage 1** trains the whole BLIP-2 (from scratch for ``blip2-tiny``, a fine-tune for a local
  checkpoint) as a language model: cross-entropy on the target tokens, teacher forced, labelled
  rows only;
- **stage 2** freezes it and trains the exits (built after stage 1, so each starts from a copy of
  the trained layer that runs next) per token at the target positions: cross-entropy on the
  labelled rows, distillation from the final head (temperature T) on every row of the pool, and
  FREE's adversarial term on per-token features: the classifier's ``LossWeights``, ramp, label
  smoothing and ``Discriminator`` (``freedeploy.free``), applied to tokens instead of samples.

Metrics (val and test): the final head's teacher-forced token accuracy and its greedy exact-match
rate (``decode.greedy``, exits off, against target + [EOS]); per exit its token accuracy, its
agreement with the final head's teacher-forced token, and the whole-sequence agreement of decoding
with that exit alone (``greedy(..., only_exit=j)``) with the final head's greedy sequence.
Greedy decoding runs one row at a time, so it covers a fixed, seeded subset of at most
``DECODE_ROWS`` rows per split (its size is recorded as ``decoded``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from analysis.captions import caption_texts
from analysis.data import SPLIT_FRACTIONS, Dataset, labelled_subset, load_dataset, make_splits, split_digest
from freedeploy.checkpoint import BatchStream, step_seed
from freedeploy.free import ExitObjective, LossWeights
from freedeploy.generative.data import DEFAULT_MAX_LENGTH, CaptionEncoder, SpecialIds, learn_tokenizer, tokenizer_ids
from freedeploy.generative.decode import greedy
from freedeploy.generative.model import DecoderOutput, EarlyExitDecoder, blip2_tiny_config
from freedeploy.inputs import TOKENIZER_FILE
from freedeploy.model import check_exits
from freedeploy.rundir import MANIFEST, RUN_DIR, RUN_FORMAT_VERSION, WEIGHTS, load_weights, read_manifest
from freedeploy.settings import AUGMENTS, AUTO, PRETRAINED_FINETUNE, SCRATCH_FINETUNE, TrainConfig
from freedeploy.training import (TrainResult, default_exits, lr_schedule, notify, progress_bar, random_shift,
                                 read_paths, resolve_precision, versions)
from runtimes.atomic import atomic_directory, check_target
from runtimes.errors import ConfigError, ModelError
from runtimes.preprocess import ImageSpec

__all__ = ["GENERATIVE_PRESETS", "GENERATIVE_RECIPES", "DECODE_ROWS", "is_generative", "train_generative",
           "load_generative_run", "TokenExitObjective", "stage2_pool", "evaluate_generative"]

log = logging.getLogger(__name__)

MODALITY = "image-to-text"
MODEL_CLASS = "Blip2ForConditionalGeneration"
GENERATIVE_PRESETS = ("blip2-tiny",)
# The preset's recipe, measured on captions-digits on 2 CPU cores (see the module's tests and the
# issue's report): from scratch, stage 1 needs a higher rate than the classifiers' and ~25 epochs.
GENERATIVE_RECIPES: dict[str, dict[str, Any]] = {
    "blip2-tiny": {"finetune_epochs": 20, "finetune_lr": 1e-3},
}
DECODE_ROWS = 256  # greedy decoding per split: a fixed, seeded subset of at most this many rows


# -- routing -------------------------------------------------------------------------------------------
def _is_blip2_dir(spec: str) -> bool:
    config = Path(spec) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "blip-2"
    except (OSError, ValueError):
        return False


def _is_generative_run(spec: str) -> bool:
    try:
        return read_manifest(Path(spec)).get("task") == "generate"
    except (ModelError, OSError):
        return False


def is_generative_model(model: str) -> bool:
    return model in GENERATIVE_PRESETS or _is_blip2_dir(model) or _is_generative_run(model)


def is_generative(model: str, data: str) -> bool:
    """Whether ``--model`` / ``--data`` ask for generative training (decided without loading either:
    the combination is checked by :func:`train_generative`)."""
    kind = data.partition("?")[0].partition(":")[0]
    return is_generative_model(model) or kind in ("captions-digits", "captions")


def _check_combination(cfg: TrainConfig, data: Dataset) -> None:
    generative_model = is_generative_model(cfg.model)
    if generative_model and data.modality != MODALITY:
        raise ConfigError(f"model {cfg.model!r} writes text about an image, but data set {data.spec!r} holds "
                          f"{data.modality} data for classification; use an image-to-text set such as "
                          "'captions-digits' or 'captions:PATH'")
    if not generative_model and data.modality == MODALITY:
        raise ConfigError(f"data set {data.spec!r} holds image-to-text data, which only a generative model "
                          f"trains on: --model {GENERATIVE_PRESETS[0]} or a local BLIP-2 (OPT) directory, not "
                          f"{cfg.model!r}")


# -- model and tokenizer -------------------------------------------------------------------------------------
class _Source:
    """Where the decoder comes from: the model, its tokenizer, special ids, image defaults."""

    def __init__(self, hf: Any, tokenizer: Any, special: SpecialIds, pretrained: bool, recipe: dict[str, Any],
                 image_defaults: dict[str, Any]) -> None:
        self.hf, self.tokenizer, self.special, self.pretrained = hf, tokenizer, special, pretrained
        self.recipe, self.image_defaults = recipe, image_defaults


def _build(config: Any) -> Any:
    from transformers import Blip2ForConditionalGeneration

    config._attn_implementation = "eager"  # what the export traces; see freedeploy.architectures.build_from_config
    return Blip2ForConditionalGeneration(config).eval()


def _load_source(cfg: TrainConfig, train_texts: Sequence[str]) -> _Source:
    overrides = dict(cfg.preset_config)
    if cfg.model in GENERATIVE_PRESETS:
        tok = learn_tokenizer(train_texts)
        try:
            config = blip2_tiny_config(tok.get_vocab_size(), **overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--preset-config for {cfg.model}: {exc}") from None
        return _Source(_build(config), tok, tokenizer_ids(tok), False, dict(GENERATIVE_RECIPES.get(cfg.model, {})), {})
    if overrides:
        raise ModelError(f"--preset-config only applies to presets: {', '.join(GENERATIVE_PRESETS)}")
    if _is_generative_run(cfg.model):
        raise ConfigError(f"{cfg.model} is a generative run dir; training from an earlier generative run is not "
                          "supported yet: train from the preset or a local BLIP-2 directory")
    return _load_local(cfg.model)


def _load_local(spec: str) -> _Source:
    """A local Hugging Face directory holding a Blip2ForConditionalGeneration with an OPT decoder."""
    import transformers
    from tokenizers import Tokenizer

    from freedeploy.backbones import _image_defaults

    try:
        config = transformers.Blip2Config.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read a BLIP-2 config from {spec}: {str(exc).splitlines()[0]}") from None
    if getattr(config.text_config, "model_type", None) != "opt":
        raise ModelError(f"{spec}: generative FREE supports BLIP-2 with an OPT language model, this one has "
                         f"{getattr(config.text_config, 'model_type', None)!r}")
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(spec, local_files_only=True,
                                                                    attn_implementation="eager").eval()
    file = Path(spec) / TOKENIZER_FILE
    if file.is_file():
        tok = Tokenizer.from_file(str(file))
    else:
        tok = transformers.AutoTokenizer.from_pretrained(spec, local_files_only=True).backend_tokenizer
    text = config.text_config
    if text.bos_token_id is None or text.eos_token_id is None:
        raise ModelError(f"{spec}: the text config names no bos_token_id / eos_token_id")
    special = SpecialIds(pad=int(text.pad_token_id if text.pad_token_id is not None else text.eos_token_id),
                         bos=int(text.bos_token_id), eos=int(text.eos_token_id),
                         image=getattr(config, "image_token_index", None))
    return _Source(hf, tok, special, True, {}, _image_defaults(spec, config))


def _image_spec(source: _Source) -> ImageSpec:
    vision = source.hf.config.vision_config
    size = int(vision.image_size)
    d = source.image_defaults
    return ImageSpec(size=tuple(d.get("size", (size, size))), mean=tuple(d.get("mean", (0.5, 0.5, 0.5))),
                     std=tuple(d.get("std", (0.5, 0.5, 0.5))), channels=int(getattr(vision, "num_channels", 3)))


# -- settings ------------------------------------------------------------------------------------------------
def _resolve(cfg: TrainConfig, source: _Source) -> TrainConfig:
    """Fill every 'auto' setting for a decoder; the result is what the run dir records."""
    hf = source.hf
    num_blocks = int(hf.config.text_config.num_hidden_layers)
    exits = check_exits(cfg.exits, num_blocks) if cfg.exits is not None else default_exits(num_blocks)
    if source.pretrained:
        default_epochs, default_lr = PRETRAINED_FINETUNE
    else:
        default_epochs = source.recipe.get("finetune_epochs", SCRATCH_FINETUNE[0])
        default_lr = source.recipe.get("finetune_lr", SCRATCH_FINETUNE[1])
    epochs = default_epochs if cfg.finetune_epochs is None else cfg.finetune_epochs
    if epochs < 0 or cfg.exit_epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("epochs must be >= 0 (stage 1) and >= 1 (stage 2), batch size >= 1")
    if epochs == 0 and not source.pretrained:
        raise ConfigError(f"{cfg.model} starts from random weights: stage 1 is needed (--finetune-epochs > 0)")
    augment = "none" if cfg.augment == AUTO else cfg.augment
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be {AUTO} or one of {', '.join(AUGMENTS)}, got {augment!r}")
    if cfg.exit_init != "copy":
        raise ConfigError("decoder exits start from a copy of the next layer: --exit-init random is not supported")
    if cfg.exit_head not in (AUTO, "full-block"):
        raise ConfigError("decoder exits are whole layers over every token: --exit-head must be auto or full-block")
    if cfg.resume:
        raise ConfigError("--resume is not supported for generative training yet")
    limit = int(hf.config.text_config.max_position_embeddings) - int(hf.config.num_query_tokens)
    max_length = min(DEFAULT_MAX_LENGTH, limit) if cfg.max_length is None else cfg.max_length
    if not 3 <= max_length <= limit:
        raise ConfigError(f"--max-length must be in 3..{limit} for this model ({hf.config.num_query_tokens} of "
                          f"its {hf.config.text_config.max_position_embeddings} positions hold the image), "
                          f"got {max_length}")
    lr = default_lr if cfg.finetune_lr is None else cfg.finetune_lr
    return replace(cfg, exits=exits, finetune_epochs=epochs, finetune_lr=lr, augment=augment, exit_head="full-block",
                   max_length=max_length, precision=resolve_precision(cfg.precision, cfg.device))


def _device(requested: str) -> torch.device:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("generative training runs in one process: DDP (torchrun) is not supported yet")
    if requested == AUTO:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


# -- batches -------------------------------------------------------------------------------------------------
class _Batches:
    """Encoded rows on the device, with the training augmentation on the images."""

    def __init__(self, enc: CaptionEncoder, augment: str, device: torch.device) -> None:
        self.enc, self.device = enc, device
        spec = enc.image_spec
        self.fill = (torch.tensor([-m / s for m, s in zip(spec.mean, spec.std)], dtype=torch.float32)
                     if augment == "shift" else None)

    def __call__(self, idx: np.ndarray, seed: int | None = None) -> dict[str, torch.Tensor]:
        t = {k: torch.from_numpy(v) for k, v in self.enc(idx).items()}
        if self.fill is not None and seed is not None:
            t["pixel_values"] = random_shift(t["pixel_values"], self.fill, torch.Generator().manual_seed(seed))
        return {k: v.to(self.device) for k, v in t.items()}


def _forward(model: EarlyExitDecoder, b: dict[str, torch.Tensor], with_exits: bool) -> DecoderOutput:
    return model(b["pixel_values"], b["input_ids"], b["attention_mask"], with_exits=with_exits)


# -- stage 1 -------------------------------------------------------------------------------------------------
def finetune(model: EarlyExitDecoder, batches: _Batches, pool: np.ndarray, cfg: TrainConfig,
             device: torch.device) -> None:
    """Stage 1: the whole BLIP-2 as a language model, cross-entropy on the target tokens."""
    steps = cfg.finetune_epochs * math.ceil(len(pool) / cfg.batch_size)
    hf = model.hf.train()
    model.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, steps, cfg.warmup)
    stream = BatchStream(pool, cfg.batch_size, cfg.seed, 1)
    with progress_bar(steps, "stage 1: language model", cfg.progress) as bar:
        for step in range(steps):
            torch.manual_seed(step_seed(cfg.seed, 1, step))
            b = batches(stream.batch(step), step_seed(cfg.seed, 11, step))
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = _forward(model, b, with_exits=False).logits
            sel = b["target_mask"].bool()
            loss = F.cross_entropy(logits[sel].float(), b["labels"][sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    model.eval()


# -- stage 2 -------------------------------------------------------------------------------------------------
class TokenExitObjective(ExitObjective):
    """FREE per token: ``ExitObjective``'s weights, discriminator and discriminator loss, over the
    target positions of a teacher-forced decoder pass instead of pooled samples."""

    def forward(self, phase: str, out: DecoderOutput | None = None, labels: torch.Tensor | None = None,
                target_mask: torch.Tensor | None = None, labelled: torch.Tensor | None = None,
                real: torch.Tensor | None = None, fakes: list[torch.Tensor] | None = None,
                adv_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
        if phase == "disc":
            return self._disc_loss(real, fakes)
        return self._tokens_loss(out, labels, target_mask, labelled, adv_weight)

    def _tokens_loss(self, out: DecoderOutput, labels: torch.Tensor, target_mask: torch.Tensor,
                     labelled: torch.Tensor, adv_weight: float) -> tuple[torch.Tensor, dict]:
        t = self.weights.temperature
        sel = target_mask.bool()  # (B, T) positions whose next token is a target token or EOS
        y = labels[sel]
        labelled_tokens = labelled[:, None].expand_as(sel)[sel]
        soft_teacher = F.log_softmax(out.logits[sel].detach().float() / t, dim=-1)
        total = soft_teacher.new_zeros(())
        stats: dict = {"features": [], "real": out.feature[sel].detach()}
        for logits, feature in zip(out.exit_logits, out.exit_features):
            logits, feature = logits[sel].float(), feature[sel]  # (N, V), (N, C): one row per token
            stats["features"].append(feature.detach())
            total = total + self.exit_terms(logits, feature, soft_teacher, y, labelled_tokens, adv_weight)
        return total / len(out.exit_logits), stats


def stage2_pool(objective: str, train_rows: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """The rows stage 2 draws from: the labelled ones for ``ce`` (it has no use for the others),
    the whole training split for the objectives that distil."""
    return np.asarray(labelled if objective == "ce" else train_rows)


def train_exits(model: EarlyExitDecoder, batches: _Batches, pool: np.ndarray, labelled: np.ndarray,
                num_rows: int, train_rows: int, cfg: TrainConfig, device: torch.device) -> None:
    """Stage 2: the exits (and the discriminator) on the frozen decoder; every objective runs
    ``exit_epochs`` passes' worth of steps over the training split, whatever its pool."""
    weights = LossWeights.for_objective(cfg.objective, kd=cfg.kd_weight, adv=cfg.adv_weight,
                                        temperature=cfg.temperature, adv_warmup=cfg.adv_warmup)
    model.hf.eval().requires_grad_(False)
    model.heads.requires_grad_(True)  # copies of frozen layers come out frozen
    model.eval()  # no dropout anywhere; the heads still train
    objective = TokenExitObjective(model.heads, model.hidden_size, weights).to(device).train()
    steps = cfg.exit_epochs * math.ceil(train_rows / cfg.batch_size)
    opt = torch.optim.AdamW(model.heads.parameters(), lr=cfg.exit_lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, steps, cfg.warmup)
    opt_d = (torch.optim.AdamW(objective.disc.parameters(), lr=cfg.exit_lr, betas=(0.5, 0.999))
             if objective.disc is not None else None)
    is_labelled = np.zeros(num_rows, dtype=bool)
    is_labelled[labelled] = True
    stream = BatchStream(pool, cfg.batch_size, cfg.seed, 2)
    with progress_bar(steps, f"stage 2: exits ({cfg.objective})", cfg.progress) as bar:
        for step in range(steps):
            torch.manual_seed(step_seed(cfg.seed, 2, step))
            idx = stream.batch(step)
            b = batches(idx, step_seed(cfg.seed, 12, step))
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = _forward(model, b, with_exits=True)
                loss, stats = objective("heads", out=out, labels=b["labels"], target_mask=b["target_mask"],
                                        labelled=torch.from_numpy(is_labelled[idx]).to(device),
                                        adv_weight=weights.adv_at(step / steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            postfix = {"loss": f"{loss.item():.3f}"}
            if opt_d is not None:
                d_loss, _ = objective("disc", real=stats["real"].float(),
                                      fakes=[f.float() for f in stats["features"]])
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                postfix["d_loss"] = f"{d_loss.item():.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update()
    model.eval()


# -- metrics -------------------------------------------------------------------------------------------------
def decode_subset(indices: np.ndarray, seed: int, limit: int = DECODE_ROWS) -> np.ndarray:
    """The rows a split's greedy decoding covers: all of them, or a fixed seeded subset of ``limit``."""
    indices = np.asarray(indices)
    if len(indices) <= limit:
        return indices
    return np.sort(np.random.default_rng([seed, 3]).choice(indices, size=limit, replace=False))


@torch.no_grad()
def evaluate_generative(model: EarlyExitDecoder, enc: CaptionEncoder, indices: np.ndarray, device: torch.device,
                        seed: int = 0, decode_rows: int = DECODE_ROWS, batch_size: int = 128) -> dict[str, Any]:
    model.eval()
    k_exits = len(model.exits)
    tokens, final_ok = 0, 0
    exit_ok, exit_agree = np.zeros(k_exits), np.zeros(k_exits)
    batches = _Batches(enc, "none", device)
    for i in range(0, len(indices), batch_size):
        b = batches(indices[i:i + batch_size])
        out = _forward(model, b, with_exits=True)
        sel = b["target_mask"].bool()
        y, final = b["labels"][sel], out.logits[sel].argmax(-1)
        tokens += int(sel.sum())
        final_ok += int((final == y).sum())
        for k, logits in enumerate(out.exit_logits):
            pred = logits[sel].argmax(-1)
            exit_ok[k] += int((pred == y).sum())
            exit_agree[k] += int((pred == final).sum())
    rows = decode_subset(indices, seed, decode_rows)
    exact, exit_exact, exit_seq = 0, np.zeros(k_exits), np.zeros(k_exits)
    for i in rows:
        pixels = torch.from_numpy(enc.pixels([i])).to(device)
        prompt, target = enc.prompt_ids(int(i)), enc.target_ids(int(i))
        max_new = enc.max_length - len(prompt)
        final_seq = greedy(model, pixels, prompt, max_new, enc.special.eos).tokens
        exact += final_seq == target
        for k in range(k_exits):
            seq = greedy(model, pixels, prompt, max_new, enc.special.eos, only_exit=k).tokens
            exit_seq[k] += seq == final_seq
            exit_exact[k] += seq == target
    n_dec = max(1, len(rows))
    return {
        "n": int(len(indices)),
        "tokens": tokens,
        "decoded": int(len(rows)),
        "final_token_accuracy": final_ok / max(1, tokens),
        "final_exact_match": exact / n_dec,
        "exits": [{"block": int(e), "token_accuracy": float(exit_ok[k] / max(1, tokens)),
                   "token_agreement": float(exit_agree[k] / max(1, tokens)),
                   "sequence_agreement": float(exit_seq[k] / n_dec), "exact_match": float(exit_exact[k] / n_dec)}
                  for k, e in enumerate(model.exits)],
    }


# -- run -----------------------------------------------------------------------------------------------------
def train_generative(cfg: TrainConfig, on_stage: Callable[[str], None] | None = None) -> TrainResult:
    """Both stages for a BLIP-2 decoder; writes the run dir atomically and returns val/test metrics."""
    t0 = time.perf_counter()
    check_target(Path(cfg.out), cfg.overwrite, RUN_DIR, read_paths(cfg))  # before minutes of work
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data)
    _check_combination(cfg, data)
    splits = make_splits(data.labels, seed=cfg.split_seed, groups=data.groups)
    labelled = labelled_subset(splits["train"], data.labels, cfg.labelled_fraction, cfg.seed)
    texts = caption_texts(data)
    source = _load_source(cfg, [texts[i] for i in splits["train"]])
    cfg = _resolve(cfg, source)
    image_spec = _image_spec(source)
    enc = CaptionEncoder(data.items, data.targets, image_spec, source.tokenizer, source.special, cfg.max_length)
    enc.check()  # a too-long text fails now, not after stage 1
    batches = _Batches(enc, cfg.augment, device)
    hf = source.hf.to(device)
    with atomic_directory(cfg.out, overwrite=cfg.overwrite, kind=RUN_DIR, inputs=read_paths(cfg)) as out_dir:
        if cfg.finetune_epochs:
            notify(on_stage, f"stage 1: training {cfg.model} as a language model on {len(labelled)} labelled rows")
            finetune(EarlyExitDecoder(hf, cfg.exits), batches, labelled, cfg, device)
        model = EarlyExitDecoder(hf, cfg.exits).to(device)  # exits copy the trained next layers
        pool = stage2_pool(cfg.objective, splits["train"], labelled)
        notify(on_stage, f"stage 2: training exits {list(cfg.exits)} with objective {cfg.objective}")
        train_exits(model, batches, pool, labelled, len(data), len(splits["train"]), cfg, device)
        notify(on_stage, "evaluating (teacher forcing and greedy decoding)")
        metrics: dict[str, Any] = {"test": evaluate_generative(model, enc, splits["test"], device, cfg.seed),
                                   "val": evaluate_generative(model, enc, splits["val"], device, cfg.seed)}
        resolved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
        resolved["preset_config"] = dict(cfg.preset_config)
        metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
        source.tokenizer.save(str(out_dir / TOKENIZER_FILE))
        manifest = _manifest(cfg, model, data, image_spec, enc, splits, labelled, pool, resolved)
        _save(out_dir, model.cpu(), manifest, {**splits, "labelled": labelled}, metrics)
    return TrainResult(Path(cfg.out), metrics, resolved, time.perf_counter() - t0)


def _manifest(cfg: TrainConfig, model: EarlyExitDecoder, data: Dataset, image_spec: ImageSpec, enc: CaptionEncoder,
              splits: dict[str, np.ndarray], labelled: np.ndarray, pool: np.ndarray,
              resolved: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "freedeploy-run",
        "format_version": RUN_FORMAT_VERSION,
        "task": "generate",
        "model_class": MODEL_CLASS,
        "hf_config": model.hf.config.to_dict(),
        "exits": list(model.exits),
        "exit_init": "copy",
        "exit_head": "full-block",
        "preprocess": {"kind": MODALITY, "image": image_spec.to_dict(), "tokenizer_file": TOKENIZER_FILE,
                       "max_length": enc.max_length, **enc.special.to_dict(),
                       "num_query_tokens": model.num_query_tokens},
        "data": {"spec": data.spec, "modality": data.modality, "size": len(data), "split_seed": cfg.split_seed,
                 "split_fractions": list(SPLIT_FRACTIONS), "labelled": len(labelled), "stage2_rows": len(pool),
                 "split_sizes": {k: int(len(v)) for k, v in splits.items()},
                 "split_digests": {k: split_digest(v) for k, v in splits.items()}},
        "source_model": cfg.model,
        "train_config": resolved,
        "versions": versions(),
    }


def _save(directory: Path, model: EarlyExitDecoder, manifest: dict[str, Any], splits: dict[str, Any],
          metrics: dict[str, Any]) -> None:
    from safetensors.torch import save_model

    save_model(model, os.fspath(directory / WEIGHTS))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    (directory / "splits.json").write_text(json.dumps({k: [int(i) for i in v] for k, v in splits.items()}) + "\n")
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def load_generative_run(path: str | os.PathLike) -> tuple[EarlyExitDecoder, dict[str, Any]]:
    """Rebuild a trained decoder with its exits from a run dir's files alone; eval mode."""
    from transformers import Blip2Config

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("task") != "generate" or manifest.get("model_class") != MODEL_CLASS:
        raise ModelError(f"{path} is not a generative run dir (task {manifest.get('task', 'classify')!r}, "
                         f"model {manifest.get('model_class')!r})")
    hf = _build(Blip2Config.from_dict(dict(manifest["hf_config"])))
    model = EarlyExitDecoder(hf, manifest["exits"])
    load_weights(model, path)
    return model.eval(), manifest
