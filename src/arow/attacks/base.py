"""What every attack shares: a frozen eval-mode model, and the losses an attack can ascend."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import cw_margin, kl_per_example
from ..modules import unwrap

Tensor = torch.Tensor
#: an attack objective: per-example loss to MAXIMISE, from the logits of x_adv and the labels
AttackLoss = Callable[[Tensor, Tensor], Tensor]


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


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500, *, logits: bool = False,
            frozen: bool = True) -> Tensor:
    """Predicted labels of ``model`` on ``x`` (float32 logits with ``logits=True``), in batches, without gradients.

    The model runs unwrapped (:func:`unwrap`) in :func:`frozen_eval`; ``frozen=False`` calls
    ``model`` as it is, for a caller that already holds it unwrapped and frozen.

    >>> predict(nn.Linear(3, 4), torch.rand(5, 3), batch_size=2).shape
    torch.Size([5])
    """
    if frozen:
        with frozen_eval(unwrap(model)) as net:
            return predict(net, x, batch_size, logits=logits, frozen=False)

    def out(xb: Tensor) -> Tensor:
        z = model(xb)
        return z.float() if logits else z.argmax(1)

    outs = [out(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if outs:
        return torch.cat(outs)
    return torch.empty((0, 0), device=x.device) if logits else torch.empty(0, dtype=torch.long, device=x.device)


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
