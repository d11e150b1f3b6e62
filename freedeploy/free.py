"""The FREE objective (Bajpai & Hanawal, ACL Findings 2025) for exit heads on a frozen backbone.

Per exit k, with pooled exit feature ``f_k`` and the final layer's pooled feature ``f_L``:

    loss_k = w_ce * CE(y, exit logits)                  labelled rows only
           + w_kd * T^2 * KL(final || exit at T)        every row: needs no labels
           + w_adv(t) * BCE(D(f_k), real)               non-saturating GAN loss, every row

One discriminator D, shared by all exits, learns ``D(f_L) -> real`` and ``D(f_k) -> fake`` in
alternation with the heads. A naive GAN term was seen to overwhelm the exits (reference/free.md),
so D is stabilised: spectral norm on its layers, one-sided label smoothing for "real", and the
adversarial weight ramps in linearly after a distillation-only warm-up. ``objective`` selects
the terms for ablations: ``ce``, ``ce+kd`` or ``free`` (all three).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from freedeploy.settings import OBJECTIVES, TrainConfig
from runtimes.errors import ConfigError

__all__ = ["OBJECTIVES", "LossWeights", "Discriminator", "ExitObjective"]

REAL_TARGET = 0.9  # one-sided label smoothing: D never gets to be certain about "real"


@dataclass(frozen=True)
class LossWeights:
    """The loss terms' weights; defaults are TrainConfig's (freedeploy.settings)."""

    ce: float = 1.0
    kd: float = TrainConfig.kd_weight
    adv: float = TrainConfig.adv_weight  # full weight of the adversarial term once the ramp is over
    temperature: float = TrainConfig.temperature  # distillation temperature
    adv_warmup: float = TrainConfig.adv_warmup  # fraction of exit-training steps before the ramp starts

    @classmethod
    def for_objective(cls, objective: str, **kw: float) -> "LossWeights":
        if objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        w = cls(**kw)
        if objective == "ce":
            return cls(ce=w.ce, kd=0.0, adv=0.0, temperature=w.temperature, adv_warmup=w.adv_warmup)
        if objective == "ce+kd":
            return cls(ce=w.ce, kd=w.kd, adv=0.0, temperature=w.temperature, adv_warmup=w.adv_warmup)
        return w

    def adv_at(self, progress: float) -> float:
        """Adversarial weight at training progress p in [0, 1]: 0 while p <= w (w = adv_warmup),
        then a linear ramp that reaches full weight at p = 2w."""
        w = self.adv_warmup
        if self.adv == 0.0 or progress <= w:
            return 0.0
        return self.adv * min(1.0, (progress - w) / w) if w > 0 else self.adv


class Discriminator(nn.Module):
    """A small MLP over pooled features: (B, C) -> (B,) logits of "this came from the final layer"."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or min(256, dim)
        self.net = nn.Sequential(spectral_norm(nn.Linear(dim, hidden)), nn.LeakyReLU(0.2),
                                 spectral_norm(nn.Linear(hidden, 1)))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature).squeeze(-1)


class ExitObjective(nn.Module):
    """Holds the exit heads and the discriminator so one DDP wrapper syncs both.

    ``forward(phase="heads", ...)`` returns the heads' loss; ``phase="disc"`` the discriminator's.
    """

    def __init__(self, heads: nn.ModuleList, feature_dim: int, weights: LossWeights) -> None:
        super().__init__()
        self.heads = heads
        self.weights = weights
        self.disc = Discriminator(feature_dim) if weights.adv > 0 else None

    def forward(self, phase: str, hidden: list[torch.Tensor] | None = None, mask: torch.Tensor | None = None,
                teacher: torch.Tensor | None = None, real: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, labelled: torch.Tensor | None = None,
                fakes: list[torch.Tensor] | None = None, adv_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
        if phase == "disc":
            return self._disc_loss(real, fakes)
        return self._heads_loss(hidden, mask, teacher, labels, labelled, adv_weight)

    def _heads_loss(self, hidden: list[torch.Tensor], mask: torch.Tensor | None, teacher: torch.Tensor,
                    labels: torch.Tensor, labelled: torch.Tensor, adv_weight: float) -> tuple[torch.Tensor, dict]:
        soft_teacher = F.log_softmax(teacher / self.weights.temperature, dim=-1)
        total = teacher.new_zeros(())
        stats: dict = {"features": []}
        for head, h in zip(self.heads, hidden):
            logits, feature = head(h, mask)  # (B, classes), (B, C)
            stats["features"].append(feature.detach())
            total = total + self.exit_terms(logits.float(), feature, soft_teacher, labels, labelled, adv_weight)
        return total / len(self.heads), stats

    def exit_terms(self, logits: torch.Tensor, feature: torch.Tensor, soft_teacher: torch.Tensor, labels: torch.Tensor,
                   labelled: torch.Tensor, adv_weight: float) -> torch.Tensor:
        """One exit's loss over rows (samples, or tokens for a decoder): cross-entropy on the labelled
        rows, distillation from the teacher's log-probabilities at temperature T, and the adversarial
        term against the shared discriminator. ``logits`` in fp32 (losses stay fp32 under autocast)."""
        w, t = self.weights, self.weights.temperature
        total = logits.new_zeros(())
        if w.ce and labelled.any():
            total = total + w.ce * F.cross_entropy(logits[labelled], labels[labelled])
        if w.kd:
            kl = F.kl_div(F.log_softmax(logits / t, dim=-1), soft_teacher, log_target=True, reduction="batchmean")
            total = total + w.kd * t * t * kl
        if self.disc is not None and adv_weight > 0:
            d_fake = self.disc(feature)
            total = total + adv_weight * F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        return total

    def _disc_loss(self, real: torch.Tensor, fakes: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        d_real = self.disc(real)
        loss = F.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, REAL_TARGET))
        for f in fakes:
            d_fake = self.disc(f)
            loss = loss + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)) / len(fakes)
        return loss, {}
