"""What every attack shares: a frozen eval-mode model, and the losses an attack can ascend."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import cw_margin, kl_per_example

Tensor = torch.Tensor
#: an attack objective: per-example loss to MAXIMISE, from the logits of x_adv and the labels
AttackLoss = Callable[[Tensor, Tensor], Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DistributedDataParallel / DataParallel wrapper.

    Attacks run on the unwrapped module: DDP's forward broadcasts buffers, which would put a
    collective call inside every attack step.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BatchNorm statistics frozen) and parameters without gradients, restored on exit.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    >>> with frozen_eval(m): assert not m.training
    >>> m.training and all(p.requires_grad for p in m.parameters())
    True
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")


def cw_loss(logits: Tensor, y: Tensor) -> Tensor:
    return cw_margin(logits, y)


def kl_loss(logits_clean: Tensor) -> AttackLoss:
    """KL(p(x) || p(x')) as an attack objective; p(x) is computed once, outside the attack loop."""
    target = logits_clean.detach()

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        return kl_per_example(target, logits)

    return loss
