"""Helpers shared by several methods: the KL training attack, the paired forward, schedule scaling."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..attacks import ce_loss, frozen_eval, kl_loss, pgd, unwrap
from ..rng import BatchRNG

Tensor = torch.Tensor

REFERENCE_EPOCHS = 120  # the length of the schedules in the GAIR-AT, FAT and ARoW reference code


def kl_attack(model: nn.Module, x: Tensor, y: Tensor, threat, rng: Optional[BatchRNG]) -> Tensor:
    """KL-PGD: maximise KL(p(x) || p(x')); p(x) from ONE eval-mode forward, outside the loop."""
    with frozen_eval(unwrap(model)) as net, torch.no_grad():
        logits_clean = net(x)
    return pgd(model, x, y, threat, kl_loss(logits_clean), rng=rng)


#: largest label smoothing alpha accepted: alpha must stay below 1 (alpha = 1 leaves only uniform targets)
SMOOTHING_MAX = 0.99
SMOOTHING_HELP = ("label smoothing alpha of the natural cross-entropy term (ARoW: 0.2, as its paper; TRADES: 0, "
                  "as its paper; TRADES with alpha > 0 is an ablation); 0 to 0.99")
ATTACK_LOSS_HELP = ("loss the training attack maximises: kl = KL(p(x) || p(x')) (the paper), ce = cross-entropy "
                    "(the ARoW authors' choice for CIFAR-100, for stability)")


def training_attack(model: nn.Module, x: Tensor, y: Tensor, threat, rng: Optional[BatchRNG], loss: str) -> Tensor:
    """The KL-PGD of TRADES-style methods, or CE-PGD when ``loss == "ce"``."""
    if loss == "ce":
        return pgd(model, x, y, threat, ce_loss, rng=rng)
    return kl_attack(model, x, y, threat, rng)


def forward_pair(model: nn.Module, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """The two training forward passes, as separate calls so BatchNorm sees each batch alone."""
    return model(x), model(x_adv)


def scaled_epoch(epoch_of_120: int, total_epochs: int) -> int:
    """A 1-based epoch of a 120-epoch reference schedule, moved to a run of ``total_epochs``.

    The GAIR-AT, FAT and AWP reference schedules are given for 120 epochs; we keep the same
    FRACTIONS of whatever ``--epochs`` a run uses.

    >>> scaled_epoch(50, 120), scaled_epoch(50, 12)
    (50, 5)
    """
    return round(total_epochs * epoch_of_120 / REFERENCE_EPOCHS)
