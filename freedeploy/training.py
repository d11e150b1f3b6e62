"""What both trainers share (the classifier's ``freedeploy.train`` and the decoder's
``freedeploy.generative.train``): the result record, default exits, precision, the learning-rate
schedule, the image augmentation, the progress bar, stage notices and provenance.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from freedeploy import __version__
from freedeploy.settings import AUTO, TRAIN_PRECISIONS, TrainConfig
from runtimes.errors import ConfigError

__all__ = ["TrainResult", "default_exits", "resolve_precision", "lr_schedule", "random_shift", "progress_bar",
           "notify", "versions", "read_paths"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]
    resolved: dict[str, Any]
    seconds: float
    ranks: list[str] = field(default_factory=list)  # per-rank weight digests (all equal under DDP)


def default_exits(num_blocks: int) -> tuple[int, ...]:
    """Quarter points of the depth (8 blocks -> 2, 4, 6), deduplicated and kept in range."""
    return tuple(sorted({min(num_blocks - 1, max(1, round(num_blocks * q / 4))) for q in (1, 2, 3)}))


def resolve_precision(requested: str, device: str) -> str:
    """bf16 autocast on GPUs that support it and on CPUs with AMX or AVX512-BF16 (1.8x faster for
    vit-tiny on such a CPU); fp32 elsewhere, where bf16 would be emulated and slow."""
    if requested != AUTO and requested not in TRAIN_PRECISIONS:
        raise ConfigError(f"precision must be {AUTO} or one of {', '.join(TRAIN_PRECISIONS)}, got {requested!r}")
    if requested != AUTO:
        return requested
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpu = torch.cpu
    fast = any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bf16" if fast else "fp32"


def lr_schedule(opt: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the fraction ``warmup`` of ``steps``, then cosine decay to zero."""
    w = max(1, int(steps * warmup))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / w if s < w else 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, steps - w))))


def random_shift(x: torch.Tensor, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pad-and-crop augmentation: shift each image by up to 1/16 of its size, filling with black.

    x: (B, C, H, W) normalised pixels; fill: (C,) the normalised value of a black pixel.
    """
    b, c, h, w = x.shape
    m = max(1, min(h, w) // 16)  # mild: 2 px at 32 px, 14 px at 224 px
    padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * m, w + 2 * m).clone()
    padded[:, :, m:m + h, m:m + w] = x
    offsets = torch.randint(0, 2 * m + 1, (b, 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar of ``total`` steps (a no-op bar when not ``enabled``)."""
    from tqdm.auto import tqdm

    # a terminal gets a live bar; a log file (CI, nohup) gets a line every 30 s instead of thousands
    live = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=0.1 if live else 30.0)


def notify(on_stage: Callable[[str], None] | None, message: str) -> None:
    """Log a stage's start and tell the caller's ``on_stage`` (the CLI prints it)."""
    log.info(message)
    if on_stage is not None:
        on_stage(message)


def versions() -> dict[str, str]:
    """The versions a run records in its manifest."""
    import transformers

    return {"freedeploy": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def read_paths(cfg: TrainConfig) -> list[str]:
    """The paths a run reads (an earlier run dir or local model, a data file or folder): its output
    may not be, contain or lie inside any of them."""
    data_path = cfg.data.partition("?")[0].partition(":")[2]
    return [p for p in (cfg.model, data_path) if p and Path(p).exists()]
