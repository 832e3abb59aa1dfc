"""Stochastic weight averaging (equal weights over epochs) with BatchNorm recalibration.

As in the paper's recipe: average the weights after every epoch from ``swa_start`` on, and recompute
BatchNorm statistics on the training data before the averaged model is evaluated. Under DDP
the model uses SyncBatchNorm, so the recalibration pass already sees global batch statistics.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn


class SWA:
    """An equal-weight running average of a model's parameters.

    >>> net = nn.Linear(2, 2); swa = SWA(net)
    >>> swa.update(net); swa.n_averaged
    1
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.n_averaged = 0
        self.calibrated = False

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = self.n_averaged
        for avg, p in zip(self.model.parameters(), model.parameters()):
            if n == 0:
                avg.copy_(p)
            else:
                avg.mul_(n / (n + 1)).add_(p.detach(), alpha=1 / (n + 1))
        self.n_averaged += 1
        self.calibrated = False

    @torch.no_grad()
    def recalibrate(self, batches: Iterable, amp: bool = False) -> None:
        """Recompute BatchNorm running statistics with one pass over ``batches`` of (x, y)."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            self.calibrated = True
            return
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
        self.model.train()
        for x, _ in batches:
            dev = x.device.type
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                self.model(x)
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        self.model.eval()
        self.calibrated = True

    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "n_averaged": self.n_averaged, "calibrated": self.calibrated}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.n_averaged = state["n_averaged"]
        self.calibrated = state.get("calibrated", False)
