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


class EMA(SWA):
    """An exponential moving average of a model's weights, updated after every optimiser step:
    ``avg <- d * avg + (1 - d) * w``, starting from the weights at creation.

    ``warmup`` uses the decay ``min(d, (1 + t) / (10 + t))`` at update ``t`` (0-based), as Gowal et
    al. (2020), so the average forgets the random initial weights quickly. ``bn="copy"`` copies the
    trained model's BatchNorm statistics at every update (the ARoW authors' semi-supervised script);
    ``bn="recompute"`` (default) recomputes them for the averaged weights before the average is
    evaluated, as for SWA: the trained model's running statistics describe its own activations,
    not those of weights that lag behind it.

    >>> net = nn.Linear(1, 1, bias=False); ema = EMA(net, 0.5)
    >>> _ = net.weight.data.fill_(ema.model.weight.item() + 2.0); ema.update(net)
    >>> round(ema.model.weight.item() - (net.weight.item() - 1.0), 6)
    0.0
    """

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = False, bn: str = "recompute") -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if bn not in ("recompute", "copy"):
            raise ValueError(f"EMA BatchNorm handling must be 'recompute' or 'copy', got {bn!r}")
        super().__init__(model)
        self.decay, self.warmup, self.bn = decay, warmup, bn
        self.calibrated = True  # the copy of the model: its statistics match its weights

    def decay_at(self, t: int) -> float:
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay_at(self.n_averaged)
        avg = [p for p in self.model.parameters()]
        cur = [p.detach() for p in model.parameters()]
        if avg:
            torch._foreach_lerp_(avg, cur, 1.0 - d)  # avg + (1 - d)(w - avg) = d avg + (1 - d) w
        if self.bn == "copy":
            for b_avg, b in zip(self.model.buffers(), model.buffers()):
                b_avg.copy_(b)
        self.n_averaged += 1
        self.calibrated = self.bn == "copy"

    def recalibrate(self, batches: Iterable, amp: bool = False) -> None:
        if self.bn == "copy":
            self.calibrated = True
            return
        super().recalibrate(batches, amp)

    def initial_share(self, updates: int) -> float:
        """The weight the average still gives the weights it started from after ``updates`` updates:
        the product of the decays, ``decay ** updates`` without warm-up.

        >>> round(EMA(nn.Linear(1, 1), 0.99).initial_share(100), 3)
        0.366
        """
        if not self.warmup:
            return self.decay ** max(updates, 0)
        share = 1.0
        for t in range(max(updates, 0)):
            share *= self.decay_at(t)
            if share < 1e-12:
                break
        return share


#: the EMA model is flagged when the weights it started from keep more than this share of it at the end
EMA_INITIAL_SHARE_WARNING = 0.05


def short_ema_warning(ema: EMA, updates: int) -> str:
    """A warning for an EMA that ``updates`` updates in all leave close to the weights it started
    from (the random initial ones): more than :data:`EMA_INITIAL_SHARE_WARNING` of the average, when
    the run is short against the EMA's horizon ``1 / (1 - decay)``. Empty when it is not."""
    share = ema.initial_share(updates)
    if share <= EMA_INITIAL_SHARE_WARNING:
        return ""
    return (f"--ema {ema.decay:g}: after this run's {updates} optimiser steps the EMA model, which is validated and "
            f"saved as the run's model (final.pt), still holds {100 * share:.0f}% of the initial weights (the "
            f"average's horizon is about {1 / (1 - ema.decay):.0f} optimiser steps). Turn on --ema-warmup "
            f"(ema_warmup=True), lower --ema, or train longer")
