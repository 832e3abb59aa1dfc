"""FAT's early-stopped PGD (Zhang et al. 2020, Alg. 1): the training attack of ``--method fat``."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..rng import BatchRNG
from ..threat import ThreatModel
from .base import ce_loss, frozen_eval, unwrap

Tensor = torch.Tensor


def fat_pgd(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, tau: int = 0,
            omega: float = 0.0, rng: Optional[BatchRNG] = None) -> tuple[Tensor, Tensor]:
    """Early-stopped CE-PGD (FAT, Zhang et al. 2020, Alg. 1): returns ``(x_adv, steps taken)``.

    At each of the K iterates, an example that the model misclassifies spends one unit of its
    budget ``tau``; a misclassified example with no budget left stops, and its current iterate
    is returned unchanged from then on. So an example first misclassified at iterate m (the start
    is iterate 0) takes ``min(m + tau, K)`` steps when it stays misclassified. Each step adds
    ``omega * N(0, 1)`` noise to the step before projection (FAT's ``omega``); the step is the
    threat model's (sign for L-inf, L2-normalised gradient for L2). Model in eval
    mode with frozen weights; any input shape. Every step runs the whole batch (fixed shapes, no
    host synchronisation) where the reference shrinks it; the stopped examples just stay put.

    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    >>> x, y = torch.rand(5, 3, 2, 2), torch.randint(0, 3, (5,))
    >>> x_adv, steps = fat_pgd(m, x, y, ThreatModel(eps=0.1, steps=4), tau=1)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6), bool((steps <= 4).all())
    (True, True)
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    net = unwrap(model)
    x = x.detach()
    x_adv = threat.init(x, rng)
    budget = torch.full((len(x),), tau, dtype=torch.long, device=x.device)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    steps = torch.zeros(len(x), dtype=torch.long, device=x.device)
    expand = (-1,) + (1,) * (x.dim() - 1)
    bounds = threat.bounds(x)  # L-inf: x -/+ eps once per attack, not at every step
    with frozen_eval(net), torch.enable_grad():
        for _ in range(threat.steps):
            x_adv.requires_grad_(True)
            logits = net(x_adv)
            wrong = active & (logits.argmax(1) != y)
            stop = wrong & (budget == 0)
            budget = budget - (wrong & ~stop).long()
            active = active & ~stop
            (grad,) = torch.autograd.grad(ce_loss(logits, y).sum(), x_adv)
            moved = x_adv.detach() + threat.step_size * threat.direction(grad)
            if omega > 0:  # drawn for the whole batch every step: the stream never depends on who stopped
                moved = moved + omega * (rng.randn_like(x) if rng is not None else torch.randn_like(x))
            x_adv = torch.where(active.view(expand), threat.project(moved, x, bounds), x_adv.detach())
            steps += active.long()
    return x_adv.detach(), steps
