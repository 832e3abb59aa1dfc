"""ARoW and the first baselines: natural training, PGD-AT, TRADES, MART."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import losses
from ..attacks import ce_loss, frozen_eval, kl_loss, pgd, unwrap
from ..rng import BatchRNG
from .base import Hparam, Method, MethodOutput
from .registry import METHODS

Tensor = torch.Tensor


def kl_attack(model: nn.Module, x: Tensor, y: Tensor, threat, rng: Optional[BatchRNG]) -> Tensor:
    """KL-PGD: maximise KL(p(x) || p(x')); p(x) from ONE eval-mode forward, outside the loop."""
    with frozen_eval(unwrap(model)) as net, torch.no_grad():
        logits_clean = net(x)
    return pgd(model, x, y, threat, kl_loss(logits_clean), rng=rng)


def forward_pair(model: nn.Module, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """The two training forward passes, as separate calls so BatchNorm sees each batch alone."""
    return model(x), model(x_adv)


@METHODS.register("natural")
class Natural(Method):
    """Standard training: CE on clean inputs (no attack). Used as HAT's helper model."""

    default_steps = 0

    def objective(self, model, x, y, adv) -> MethodOutput:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        return MethodOutput(loss, logits_clean=logits, parts={"natural": loss.detach()})


@METHODS.register("pgd-at")
class PGDAT(Method):
    """PGD-AT (Madry et al. 2018): CE on x_adv from CE-PGD with a random start."""

    def attack(self, model, x, y, rng=None) -> Tensor:
        return pgd(model, x, y, self.threat, ce_loss, rng=rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv.float(), y)
        return MethodOutput(loss, logits_adv=logits_adv, parts={"robust": loss.detach()})


@METHODS.register("trades")
class TRADES(Method):
    """TRADES (Zhang et al. 2019): CE(f(x)) + beta KL(p(x) || p(x_adv)); KL-PGD from x + 0.001 N(0,1)."""

    hparams = {"beta": Hparam(6.0, "TRADES: weight of the KL boundary term", min=0)}

    def __init__(self, threat, **kwargs):
        super().__init__(threat, **kwargs)
        self.attack_threat = threat.with_(start="normal") if threat.start == "uniform" else threat

    def attack(self, model, x, y, rng=None) -> Tensor:
        return kl_attack(model, x, y, self.attack_threat, rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        out = losses.trades_parts(logits_clean, logits_adv, y, beta=self.beta)
        return MethodOutput(out.loss, logits_clean, logits_adv, out.parts)


@METHODS.register("mart")
class MART(Method):
    """MART (Wang et al. 2020): BCE(f(x_adv)) + lam KL(p(x)||p(x_adv)) (1 - p_y(x)); CE-PGD."""

    hparams = {"lam": Hparam(6.0, "MART: weight of the KL term (MART: 6.0)", min=0)}

    def attack(self, model, x, y, rng=None) -> Tensor:
        return pgd(model, x, y, self.threat, ce_loss, rng=rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        out = losses.mart_parts(logits_clean, logits_adv, y, lam=self.lam)
        parts = {k: v for k, v in out.parts.items() if k != "weight"}
        return MethodOutput(out.loss, logits_clean, logits_adv, parts, weight=out.parts["weight"])


@METHODS.register("arow")
class ARoW(Method):
    """ARoW (Yang, Kong, Kim 2023): LS_a(f(x)) + 2 lam KL(p(x)||p(x_adv)) (1 - p_y(x_adv)); KL-PGD.

    ``lam`` is the paper's lambda (reference code ``--lamb`` = 2 lam); ``weight="cow"`` is the
    CoW ablation; ``detach_weight`` is the stop-gradient ablation.
    """

    hparams = {
        "lam": Hparam(3.5, "ARoW: the paper's lambda (reference code's --lamb = 2*lam); MART: 6.0", min=0),
        "smoothing": Hparam(0.2, "ARoW: label smoothing alpha of the natural term", min=0),
        "detach_weight": Hparam(False, "ARoW ablation: stop the gradient through 1 - p_y(x_adv)", bool),
        "weight": Hparam("arow", "ARoW: 'arow' weights by 1 - p_y(x_adv); 'cow' (ablation) by p_y(x)", str, choices=("arow", "cow")),
    }

    def __init__(self, threat, **kwargs):
        super().__init__(threat, **kwargs)
        # bad values fail when the method is built, not at the first training step
        losses.arow_parts(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), lam=self.lam,
                          smoothing=self.smoothing, weight=self.weight)

    def attack(self, model, x, y, rng=None) -> Tensor:
        return kl_attack(model, x, y, self.threat, rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        out = losses.arow_parts(logits_clean, logits_adv, y, lam=self.lam, smoothing=self.smoothing,
                                detach_weight=self.detach_weight, weight=self.weight)
        parts = {k: v for k, v in out.parts.items() if k != "weight"}
        return MethodOutput(out.loss, logits_clean, logits_adv, parts, weight=out.parts["weight"])
