"""Resumable training: a batch stream that is a pure function of the step, and atomic checkpoints.

Every random choice of a training step (which rows, the augmentation, dropout) is derived from
``(seed, stage, step, rank)``, so training can restart at any saved step and continue exactly as
if it had never stopped. Checkpoints hold the weights and the optimizer and scheduler states
(safetensors for tensors, JSON for the rest: no pickle), written into ``<out>.checkpoint``
atomically; ``freedeploy train --resume`` continues from there and the directory goes away once
the run dir is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtimes.atomic import Replaceable, atomic_directory
from runtimes.errors import ConfigError

__all__ = ["BatchStream", "step_seed", "Checkpoints", "Saved", "pack_optimizer", "unpack_optimizer"]

log = logging.getLogger(__name__)


def step_seed(seed: int, stage: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for one step of one stage on one rank."""
    return int(np.random.SeedSequence([seed, stage, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class BatchStream:
    """Global batch ``s`` of a stage: positions ``[s*B, (s+1)*B)`` of an endless sequence of seeded
    permutations of the pool (every batch full; passes follow each other)."""

    def __init__(self, pool: np.ndarray, batch_size: int, seed: int, stage: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < world_size:
            raise ConfigError(f"batch size {batch_size} is smaller than the {world_size} training processes")
        if len(pool) == 0:
            raise ConfigError("no training rows to draw batches from")
        self.pool, self.batch_size, self.seed, self.stage = np.asarray(pool), batch_size, seed, stage
        self.rank, self.world_size = rank, world_size
        self._cache: dict[int, np.ndarray] = {}

    def _pass(self, p: int) -> np.ndarray:
        if p not in self._cache:
            self._cache = {p: np.random.default_rng([self.seed, self.stage, p]).permutation(self.pool)}
        return self._cache[p]

    def batch(self, step: int) -> np.ndarray:
        """This rank's rows of global batch ``step``."""
        n = len(self.pool)
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        rows = np.empty(len(pos), dtype=np.int64)
        for p in np.unique(pos // n):
            sel = pos // n == p
            rows[sel] = self._pass(int(p))[pos[sel] % n]
        return rows[self.rank::self.world_size]


def pack_optimizer(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state -> (tensors for safetensors, JSON-able rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unpack_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                     meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            pid, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class Saved:
    stage: int  # 1 or 2
    step: int  # steps of that stage already done
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


CHECKPOINT = Replaceable("a freedeploy training checkpoint", "state.json", "settings")


class Checkpoints:
    """``<out>.checkpoint/``: state.safetensors + state.json, replaced atomically at every save."""

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any], enabled: bool = True) -> None:
        self.path = Path(f"{os.fspath(out).rstrip('/')}.checkpoint")
        self.digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.enabled = enabled

    def save(self, stage: int, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from safetensors.torch import save_file

        with atomic_directory(self.path, overwrite=True, kind=CHECKPOINT) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.fspath(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"settings": self.digest, "stage": stage, "step": step, **meta}))
        log.info("checkpoint: stage %d, step %d", stage, step)

    def load(self) -> Saved | None:
        if not (self.path / "state.json").is_file():
            return None
        from safetensors.torch import load_file

        meta = json.loads((self.path / "state.json").read_text())
        if meta.pop("settings") != self.digest:
            raise ConfigError(f"{self.path} was written by a run with other settings; resume with the same options "
                              "or delete it")
        return Saved(meta.pop("stage"), meta.pop("step"), load_file(os.fspath(self.path / "state.safetensors")), meta)

    def clear(self) -> None:
        if self.enabled and self.path.exists():
            if not CHECKPOINT.holds(self.path):
                raise ConfigError(f"refusing to remove {self.path}: it is not {CHECKPOINT.what} (no "
                                  f"{CHECKPOINT.marker} of ours); move it away or choose another --out")
            shutil.rmtree(self.path, ignore_errors=True)
