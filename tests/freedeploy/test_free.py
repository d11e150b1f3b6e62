from __future__ import annotations

import pytest
import torch
from torch import nn

from freedeploy.free import Discriminator, ExitObjective, LossWeights
from runtimes.errors import ConfigError


def test_objectives_switch_terms_off() -> None:
    assert LossWeights.for_objective("ce") == LossWeights(kd=0.0, adv=0.0)
    assert LossWeights.for_objective("ce+kd", kd=0.5) == LossWeights(kd=0.5, adv=0.0)
    assert LossWeights.for_objective("free", adv=0.3).adv == 0.3
    with pytest.raises(ConfigError, match="unknown objective"):
        LossWeights.for_objective("gan")


def test_adversarial_weight_ramps_in_after_warmup() -> None:
    w = LossWeights(adv=0.4, adv_warmup=0.2)
    assert w.adv_at(0.0) == w.adv_at(0.2) == 0.0
    assert w.adv_at(0.3) == pytest.approx(0.2)
    assert w.adv_at(0.4) == w.adv_at(1.0) == pytest.approx(0.4)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        feature = hidden[:, 0]
        return self.lin(feature), feature


def test_ce_uses_labelled_rows_only_and_kd_needs_no_labels() -> None:
    torch.manual_seed(0)
    head = _Head()
    obj = ExitObjective(nn.ModuleList([head]), 4, LossWeights.for_objective("ce"))
    hidden = [torch.randn(6, 2, 4)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    none = torch.zeros(6, dtype=torch.bool)
    loss, _ = obj("heads", hidden=hidden, teacher=torch.randn(6, 3), labels=labels, labelled=none)
    assert loss.item() == 0.0  # nothing labelled, nothing to learn from under plain CE
    kd = ExitObjective(nn.ModuleList([head]), 4, LossWeights.for_objective("ce+kd"))
    teacher = head(hidden[0], None)[0].detach()
    loss, _ = kd("heads", hidden=hidden, teacher=teacher, labels=labels, labelled=none)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # the exit already matches its teacher
    loss, _ = kd("heads", hidden=hidden, teacher=torch.randn(6, 3) * 5, labels=labels, labelled=none)
    assert loss.item() > 0.0


def test_discriminator_learns_to_tell_features_apart() -> None:
    torch.manual_seed(0)
    obj = ExitObjective(nn.ModuleList([_Head()]), 4, LossWeights.for_objective("free"))
    opt = torch.optim.Adam(obj.disc.parameters(), lr=1e-2)
    real, fake = torch.randn(64, 4) + 2.0, torch.randn(64, 4) - 2.0
    for _ in range(100):
        loss, _ = obj("disc", real=real, fakes=[fake])
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = obj.disc
    assert torch.sigmoid(d(real)).mean() > 0.8 and torch.sigmoid(d(fake)).mean() < 0.2


def test_generator_loss_pulls_exit_features_towards_real() -> None:
    torch.manual_seed(0)
    disc = Discriminator(4)
    x = torch.zeros(8, 4, requires_grad=True)
    with torch.no_grad():  # make "real" mean "large first coordinate"
        disc.net[0].parametrizations.weight.original.zero_()
        disc.net[0].parametrizations.weight.original[0, 0] = 1.0
    out = torch.nn.functional.binary_cross_entropy_with_logits(disc(x), torch.ones(8))
    out.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
