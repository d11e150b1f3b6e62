"""``freedeploy train``: stage 1 fine-tunes backbone + final head (optional), stage 2 trains the
FREE exit heads on the frozen backbone. Reads top to bottom: config, resolve, stages, evaluate, run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from analysis.data import Dataset, labelled_subset, load_dataset, make_splits, split_digest, SPLIT_FRACTIONS
from analysis.metrics import exit_metrics
from freedeploy.backbones import Backbone, load_backbone
from freedeploy.checkpoint import BatchStream, Checkpoints, Saved, pack_optimizer, step_seed, unpack_optimizer
from freedeploy.distributed import DistContext
from freedeploy.free import ExitObjective, LossWeights
from freedeploy.inputs import Encoder, make_preprocess
from freedeploy.model import EarlyExitModel, additive_mask, check_exits
from freedeploy.rundir import RUN_DIR, save_run
from freedeploy.settings import AUGMENTS, AUTO, TrainConfig, finetune_defaults
from freedeploy.training import (TrainResult, default_exits, lr_schedule, notify, progress_bar, random_shift,
                                 read_paths, resolve_precision, versions)
from runtimes.preprocess import ImageSpec
from runtimes.atomic import atomic_directory, check_target
from runtimes.errors import ConfigError

__all__ = ["TrainConfig", "TrainResult", "train", "default_exits"]

log = logging.getLogger(__name__)


def _resolve(cfg: TrainConfig, backbone: Backbone) -> TrainConfig:
    """Fill every 'auto' setting; the result is what the run dir records."""
    num_blocks = backbone.adapter.num_blocks(backbone.hf)
    exits = check_exits(cfg.exits, num_blocks) if cfg.exits is not None else default_exits(num_blocks)
    default_epochs, default_lr = finetune_defaults(backbone.head_is_new, backbone.pretrained, backbone.recipe)
    epochs = default_epochs if cfg.finetune_epochs is None else cfg.finetune_epochs
    augment = cfg.augment
    if augment == AUTO:
        augment = "shift" if backbone.adapter.modality == "image" else "none"
    elif augment not in AUGMENTS:
        raise ConfigError(f"augment must be {AUTO} or one of {', '.join(AUGMENTS)}, got {augment!r}")
    elif augment == "shift" and backbone.adapter.modality != "image":
        raise ConfigError("--augment shift applies to image models only")
    if epochs < 0 or cfg.exit_epochs < 1 or cfg.batch_size < 1:
        raise ConfigError("epochs must be >= 0 (stage 1) and >= 1 (stage 2), batch size >= 1")
    if epochs == 0 and backbone.head_is_new:
        raise ConfigError(f"{backbone.source} has no trained classifier for these labels: stage 1 is needed "
                          "(--finetune-epochs > 0)")
    lr = default_lr if cfg.finetune_lr is None else cfg.finetune_lr
    return replace(cfg, exits=exits, finetune_epochs=epochs, finetune_lr=lr, augment=augment,
                   precision=resolve_precision(cfg.precision, cfg.device))


def _autocast(cfg: TrainConfig, ctx: DistContext) -> Any:
    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


class _Batches:
    """Encodes rows, moves them to the device and applies the training augmentation."""

    def __init__(self, encode: Encoder, augment: str, device: torch.device) -> None:
        self.encode, self.device = encode, device
        spec = encode.spec
        self.fill = None
        if augment == "shift" and isinstance(spec, ImageSpec):
            self.fill = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std)], dtype=torch.float32)
            self.key = spec.input_name

    def __call__(self, idx: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        tensors = {k: torch.from_numpy(v) for k, v in self.encode(idx).items()}
        if self.fill is not None:
            tensors[self.key] = random_shift(tensors[self.key], self.fill, torch.Generator().manual_seed(seed))
        return {k: v.to(self.device) for k, v in tensors.items()}


def _to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}


def finetune(model: EarlyExitModel, encode: Encoder, labels: np.ndarray, pool: np.ndarray, cfg: TrainConfig,
             ctx: DistContext, ckpt: Checkpoints, saved: Saved | None) -> None:
    """Stage 1: backbone + final head on the labelled rows, plain cross-entropy."""
    steps_per_epoch = math.ceil(len(pool) / cfg.batch_size)
    steps = cfg.finetune_epochs * steps_per_epoch
    hf = model.hf.train()
    net = ctx.wrap(hf)
    opt = torch.optim.AdamW(hf.parameters(), lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, steps, cfg.warmup)
    start = _restore(saved, 1, model, {"opt": opt}, sched)
    stream = BatchStream(pool, cfg.batch_size, cfg.seed, 1, ctx.rank, ctx.world_size)
    batch = _Batches(encode, cfg.augment, ctx.device)
    y_all = torch.from_numpy(labels)
    with progress_bar(steps, "stage 1: fine-tune", cfg.progress and ctx.is_main) as bar:
        bar.update(start)
        for step in range(start, steps):
            torch.manual_seed(step_seed(cfg.seed, 1, step, ctx.rank))  # dropout: a function of the step
            idx = stream.batch(step)
            with _autocast(cfg, ctx):
                logits = net(**batch(idx, step_seed(cfg.seed, 11, step, ctx.rank))).logits
            loss = F.cross_entropy(logits.float(), y_all[idx].to(ctx.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
            if (step + 1) % steps_per_epoch == 0 and step + 1 < steps:
                _checkpoint(ckpt, 1, step + 1, model, {"opt": opt}, sched)
    hf.eval()


def train_exits(model: EarlyExitModel, encode: Encoder, labels: np.ndarray, pool: np.ndarray, labelled: np.ndarray,
                train_rows: int, cfg: TrainConfig, ctx: DistContext, ckpt: Checkpoints, saved: Saved | None) -> None:
    """Stage 2: exit heads (and the discriminator) on the frozen backbone. Every objective runs the
    same number of steps (``exit_epochs`` passes' worth over the training split), whatever its pool."""
    weights = LossWeights.for_objective(cfg.objective, kd=cfg.kd_weight, adv=cfg.adv_weight,
                                        temperature=cfg.temperature, adv_warmup=cfg.adv_warmup)
    model.hf.eval().requires_grad_(False)
    objective = ExitObjective(model.heads, model.feature_dim, weights).to(ctx.device).train()
    net = ctx.wrap(objective)
    steps_per_epoch = math.ceil(train_rows / cfg.batch_size)
    steps = cfg.exit_epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.heads.parameters(), lr=cfg.exit_lr, weight_decay=cfg.weight_decay)
    sched = lr_schedule(opt, steps, cfg.warmup)
    optimizers = {"opt": opt}
    if objective.disc is not None:
        optimizers["opt_d"] = torch.optim.AdamW(objective.disc.parameters(), lr=cfg.exit_lr, betas=(0.5, 0.999))
    state = torch.nn.ModuleDict({"model": model, **({"disc": objective.disc} if objective.disc is not None else {})})
    start = _restore(saved, 2, state, optimizers, sched)
    is_labelled = np.zeros(len(labels), dtype=bool)
    is_labelled[labelled] = True
    stream = BatchStream(pool, cfg.batch_size, cfg.seed, 2, ctx.rank, ctx.world_size)
    batch = _Batches(encode, cfg.augment, ctx.device)
    with progress_bar(steps, f"stage 2: exits ({cfg.objective})", cfg.progress and ctx.is_main) as bar:
        bar.update(start)
        for step in range(start, steps):
            torch.manual_seed(step_seed(cfg.seed, 2, step, ctx.rank))
            idx = stream.batch(step)
            inputs = batch(idx, step_seed(cfg.seed, 12, step, ctx.rank))
            with torch.no_grad(), _autocast(cfg, ctx):
                out = model(inputs, run_heads=False)
            mask = additive_mask(model.token_mask(inputs), torch.float32)
            with _autocast(cfg, ctx):
                loss, stats = net("heads", hidden=out.exit_hidden, mask=mask, teacher=out.logits.float(),
                                  labels=torch.from_numpy(labels[idx]).to(ctx.device),
                                  labelled=torch.from_numpy(is_labelled[idx]).to(ctx.device),
                                  adv_weight=weights.adv_at(step / steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            postfix = {"loss": f"{loss.item():.3f}"}
            if "opt_d" in optimizers:
                d_loss, _ = net("disc", real=out.feature.float(), fakes=[f.float() for f in stats["features"]])
                optimizers["opt_d"].zero_grad(set_to_none=True)
                d_loss.backward()
                optimizers["opt_d"].step()
                postfix["d_loss"] = f"{d_loss.item():.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update()
            if (step + 1) % steps_per_epoch == 0 and step + 1 < steps:
                _checkpoint(ckpt, 2, step + 1, state, optimizers, sched)
    model.eval()


def _checkpoint(ckpt: Checkpoints, stage: int, step: int, module: torch.nn.Module,
                optimizers: dict[str, torch.optim.Optimizer], sched: Any) -> None:
    tensors = {f"module.{k}": v for k, v in module.state_dict().items()}
    meta: dict[str, Any] = {"scheduler": sched.state_dict()}
    for name, opt in optimizers.items():
        t, m = pack_optimizer(opt, name)
        tensors.update(t)
        meta[name] = m
    ckpt.save(stage, step, tensors, meta)


def _restore(saved: Saved | None, stage: int, module: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
             sched: Any) -> int:
    """Load a checkpoint of this stage into the module and optimizers; returns the step to start at."""
    if saved is None or saved.stage != stage:
        return 0
    module.load_state_dict({k[len("module."):]: v for k, v in saved.tensors.items() if k.startswith("module.")})
    for name, opt in optimizers.items():
        unpack_optimizer(opt, name, saved.tensors, saved.meta[name])
    sched.load_state_dict(saved.meta["scheduler"])
    return saved.step


@torch.no_grad()
def predict(model: EarlyExitModel, encode: Encoder, indices: np.ndarray, device: torch.device,
            batch_size: int = 256) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-exit and final predicted classes for the given rows."""
    exit_preds: list[list[np.ndarray]] = [[] for _ in model.exits]
    final = []
    for i in range(0, len(indices), batch_size):
        out = model(_to_device(encode(indices[i:i + batch_size]), device))
        for k, logits in enumerate(out.exit_logits):
            exit_preds[k].append(logits.argmax(-1).cpu().numpy())
        final.append(out.logits.argmax(-1).cpu().numpy())
    return [np.concatenate(p) for p in exit_preds], np.concatenate(final)


def evaluate(model: EarlyExitModel, encode: Encoder, labels: np.ndarray, indices: np.ndarray,
             device: torch.device) -> dict[str, Any]:
    exit_preds, final = predict(model, encode, indices, device)
    return exit_metrics(exit_preds, final, labels[indices], model.exits)


def _weights_digest(model: EarlyExitModel) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train(cfg: TrainConfig, on_stage: Callable[[str], None] | None = None) -> TrainResult:
    """Run both stages and write the run dir atomically; returns the test metrics."""
    t0 = time.perf_counter()
    check_target(Path(cfg.out), cfg.overwrite, RUN_DIR, read_paths(cfg))  # before minutes of work
    ctx = DistContext.start(cfg.device)
    try:
        torch.manual_seed(cfg.seed)
        data = load_dataset(cfg.data)
        backbone = load_backbone(cfg.model, data.label_names, dict(cfg.preset_config))
        cfg = _resolve(cfg, backbone)
        splits = make_splits(data.labels, seed=cfg.split_seed, groups=data.groups)
        labelled = labelled_subset(splits["train"], data.labels, cfg.labelled_fraction, cfg.seed)
        model = EarlyExitModel(backbone.hf, backbone.adapter, cfg.exits, exit_init=cfg.exit_init,
                               exit_head=cfg.exit_head).to(ctx.device)
        ckpt, saved = _checkpoints(cfg, ctx)
        with (atomic_directory(cfg.out, overwrite=cfg.overwrite, kind=RUN_DIR, inputs=read_paths(cfg))
              if ctx.is_main else _scratch()) as out_dir:
            spec = make_preprocess(backbone, data, splits["train"], out_dir, cfg.max_length)
            encode = Encoder(data, spec, out_dir)
            if cfg.finetune_epochs and (saved is None or saved.stage == 1):
                notify(on_stage, f"stage 1: fine-tuning {backbone.source} on {len(labelled)} labelled samples")
                finetune(model, encode, data.labels, labelled, cfg, ctx, ckpt, saved)
                model.reset_heads()  # exit blocks start from the fine-tuned next block
                model.to(ctx.device)
            pool = labelled if cfg.objective == "ce" else splits["train"]
            notify(on_stage, f"stage 2: training exits {list(cfg.exits)} with objective {cfg.objective}")
            train_exits(model, encode, data.labels, pool, labelled, len(splits["train"]), cfg, ctx, ckpt, saved)
            ranks = [str(d) for d in ctx.all_gather(_weights_digest(model))]
            metrics = {"test": evaluate(model, encode, data.labels, splits["test"], ctx.device),
                       "val": evaluate(model, encode, data.labels, splits["val"], ctx.device)}
            resolved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
            resolved["preset_config"] = dict(cfg.preset_config)
            if ctx.is_main:
                metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
                if ctx.enabled:
                    metrics["ddp"] = {"world_size": ctx.world_size, "rank_weight_digests": ranks}
                save_run(out_dir, model.cpu(), _manifest(cfg, backbone, data, spec, splits, labelled, resolved),
                         {**{k: v for k, v in splits.items()}, "labelled": labelled}, metrics)
        ckpt.clear()  # the run dir is complete: nothing left to resume
        ctx.barrier()
        return TrainResult(Path(cfg.out), metrics, resolved, time.perf_counter() - t0, ranks)
    finally:
        ctx.close()


def _checkpoints(cfg: TrainConfig, ctx: DistContext) -> tuple[Checkpoints, Saved | None]:
    """Where this run checkpoints, and the state to resume from (``--resume``)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "progress", "resume")}
    ckpt = Checkpoints(cfg.out, settings, enabled=ctx.is_main)
    if not cfg.resume:
        if ckpt.path.exists() and ctx.is_main:
            if not cfg.overwrite:
                raise ConfigError(f"{ckpt.path} holds an interrupted run: pass --resume to continue it, or "
                                  "--overwrite to start over")
            ckpt.clear()
        return ckpt, None
    saved = ckpt.load()
    if saved is None:
        raise ConfigError(f"--resume: no checkpoint at {ckpt.path}")
    log.info("resuming from stage %d, step %d", saved.stage, saved.step)
    return ckpt, saved


def _manifest(cfg: TrainConfig, backbone: Backbone, data: Dataset, spec: Any, splits: dict[str, np.ndarray],
              labelled: np.ndarray, resolved: dict[str, Any]) -> dict[str, Any]:
    return {
        "labels": list(data.label_names),
        "preprocess": spec.to_dict(),
        "data": {"spec": data.spec, "modality": data.modality, "size": len(data), "split_seed": cfg.split_seed,
                 "split_fractions": list(SPLIT_FRACTIONS), "labelled": len(labelled),
                 "split_sizes": {k: int(len(v)) for k, v in splits.items()},
                 "split_digests": {k: split_digest(v) for k, v in splits.items()}},
        "source_model": backbone.source,
        "train_config": resolved,
        "versions": versions(),
    }


class _scratch:
    """Non-main DDP ranks write nothing: a throwaway directory stands in for the run dir."""

    def __enter__(self) -> Path:
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="freedeploy-rank-")
        return Path(self._tmp.name)

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()
