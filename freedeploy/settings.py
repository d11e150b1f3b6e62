"""Training settings, defined once: ``TrainConfig`` with every default, the choices its fields take,
and the rule for the stage-1 defaults that depend on the backbone.

Torch-free on purpose: the CLI reads its option defaults and choice lists from here while
``freedeploy --help`` runs on a box without torch. ``freedeploy.train`` and ``freedeploy.free``
import from here; nothing here imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from runtimes.bundle import HEADS as EXIT_HEADS  # the exit head forms a bundle can hold

__all__ = ["TrainConfig", "AUTO", "OBJECTIVES", "EXIT_HEADS", "EXIT_INITS", "AUGMENTS", "DEVICES",
           "TRAIN_PRECISIONS", "PRETRAINED_FINETUNE", "SCRATCH_FINETUNE", "finetune_defaults"]

AUTO = "auto"  # resolved per model or machine when the run starts; recorded resolved in the run dir
OBJECTIVES = ("free", "ce+kd", "ce")  # exit loss: FREE (CE + distillation + adversarial), or an ablation
EXIT_INITS = ("copy", "random")  # exit block from a copy of the next backbone block, or freshly initialised
AUGMENTS = ("shift", "none")  # training augmentation; auto: shift for images, none for text
DEVICES = ("cpu", "cuda")  # auto: cuda where torch sees one
TRAIN_PRECISIONS = ("fp32", "bf16")  # training compute; auto: bf16 autocast where the hardware has it

# Stage 1 (epochs, learning rate) when not given: short for pretrained weights, long from scratch.
# A preset's recipe (freedeploy.backbones.PRESET_RECIPES) replaces the from-scratch pair.
PRETRAINED_FINETUNE = (3, 5e-5)
SCRATCH_FINETUNE = (60, 5e-4)


@dataclass(frozen=True)
class TrainConfig:
    model: str = "vit-tiny"  # preset, local Hugging Face dir or hub id, or an earlier run dir
    data: str = "digits"  # a data spec, see analysis.data
    out: str = "runs/run"
    exits: tuple[int, ...] | None = None  # 1-based blocks; None: the quarter points of the depth
    objective: str = "free"  # one of OBJECTIVES
    labelled_fraction: float = 1.0  # the rest of the training split is used without labels
    finetune_epochs: int | None = None  # stage 1; None: finetune_defaults()
    exit_epochs: int = 10  # stage 2, in passes over the whole training split
    batch_size: int = 32  # global, summed over DDP ranks
    finetune_lr: float | None = None  # stage 1; None: finetune_defaults()
    exit_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of each stage's steps with a linear learning-rate warm-up
    temperature: float = 2.0  # distillation temperature; T^2 keeps the gradient scale independent of T
    kd_weight: float = 1.0
    adv_weight: float = 0.1  # adversarial (FREE) weight once ramped in
    adv_warmup: float = 0.2  # fraction of stage-2 steps trained without the adversarial term
    exit_init: str = "copy"  # one of EXIT_INITS
    exit_head: str = AUTO  # one of EXIT_HEADS (cls-query: same function, ~1/6 of the work) or auto
    augment: str = AUTO  # one of AUGMENTS or auto
    max_length: int | None = None  # text: tokens per sequence; None: 99th percentile of the data
    seed: int = 0  # model init, labelled subset and batch order
    split_seed: int = 0  # train/val/test split; keep it fixed across runs that are compared
    device: str = AUTO  # one of DEVICES or auto
    precision: str = AUTO  # one of TRAIN_PRECISIONS or auto
    preset_config: tuple[tuple[str, Any], ...] = ()  # config overrides for presets, e.g. hidden_size
    overwrite: bool = False
    resume: bool = False  # continue an interrupted run from <out>.checkpoint
    progress: bool = True


def finetune_defaults(head_is_new: bool, pretrained: bool, recipe: Mapping[str, Any]) -> tuple[int, float]:
    """Stage 1 (epochs, learning rate) for a backbone when the user gave neither: no epochs when its
    classifier is trained for these labels already, else PRETRAINED_FINETUNE for pretrained weights and
    the preset's recipe or SCRATCH_FINETUNE from scratch."""
    epochs, lr = PRETRAINED_FINETUNE if pretrained else (recipe.get("finetune_epochs", SCRATCH_FINETUNE[0]),
                                                         recipe.get("finetune_lr", SCRATCH_FINETUNE[1]))
    return (epochs if head_is_new else 0), lr
