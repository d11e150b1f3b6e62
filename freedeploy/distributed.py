"""Multi-process training through PyTorch's own DDP, started by ``torchrun``.

``torchrun --nproc_per_node=N -m freedeploy train ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
each rank takes its slice of every global batch and DDP averages the gradients (gloo on CPUs,
nccl on GPUs). Without those variables everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["DistContext"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str) -> "DistContext":
        """Join the process group torchrun describes, or run alone; ``device`` is cpu, cuda or auto."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if world <= 1:
            return cls(0, 1, torch.device(device))
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(),
                   torch.device(f"cuda:{local}") if device == "cuda" else torch.device("cpu"))

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch (every rank sees the same global order)."""
        return batch[self.rank::self.world_size]

    def wrap(self, module: nn.Module) -> nn.Module:
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    def all_gather(self, obj: object) -> list[object]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
