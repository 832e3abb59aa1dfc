"""GAIR-AT (Zhang et al. 2021), docs/method.md#gair-at."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import losses
from ..attacks import ce_loss, pgd
from ..rng import BatchRNG
from ..threat import ThreatModel
from .base import Hparam, Method, MethodOutput, Passes
from .common import scaled_epoch
from .registry import METHODS

Tensor = torch.Tensor


def gair_attack(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel,
                rng: Optional[BatchRNG] = None) -> tuple[Tensor, Tensor]:
    """CE-PGD (uniform random start) that also returns GAIR's ``kappa`` per example.

    ``kappa`` counts the iterates, among the K the attack takes a gradient at (the random start
    included, the final iterate excluded, as GAIR's ``GA_PGD``), that the model classified
    correctly. It is counted in eval mode, like the attack itself.

    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    >>> x_adv, kappa = gair_attack(m, x, y, ThreatModel(eps=0.1, steps=3))
    >>> bool(((kappa >= 0) & (kappa <= 3)).all())
    True
    """
    kappa = torch.zeros(len(x), dtype=torch.long, device=x.device)

    def count(t: int, logits: Tensor) -> None:
        kappa.add_((logits.argmax(1) == y).long())

    return pgd(model, x, y, threat, ce_loss, rng=rng, on_step=count), kappa


@METHODS.register("gair-at")
class GAIRAT(Method):
    """GAIR-AT (Zhang et al. 2021): PGD-AT with CE reweighted by w(kappa), from epoch 50 of 120 on.

    "Geometry-aware instance-reweighted adversarial training" (ICLR 2021). The weight is
    ``w = (1 + tanh(Lambda + 5 (1 - 2 kappa / K))) / 2`` normalised to mean 1 over the batch
    (:func:`arow.losses.gair_weights`), Lambda = -1 fixed ("fixed" Lambda schedule, Tanh weight).
    Before ``gair_start`` (1-based; default round(epochs * 50/120), the ARoW reference's epoch 50 of
    120) the method is plain PGD-AT. Deviations: the reference writes the exponent as
    ``(K//2 - kappa) * 5 / (K//2)``, equal to ours for even K only; under torchrun the weights
    are normalised over each rank's shard of the batch (the shard is the rank's batch).
    ``MethodOutput.weight`` holds the per-example weights (``None`` before the start epoch).
    """

    hparams = {
        "gair_lambda": Hparam(-1.0, "GAIR-AT: Lambda of the weight (1 + tanh(Lambda + 5 (1 - 2 kappa/K))) / 2 "
                                      "(-100 to 100; tanh saturates long before)", min=-100, max=100),
        "gair_start": Hparam(None, "GAIR-AT: first epoch (1-based) with reweighting; default: epoch 50 of 120, "
                                   "scaled to --epochs", int, min=1, max=10_000),
    }
    paper = ("Zhang, Zhu, Niu, Han, Sugiyama, Kankanhalli: Geometry-aware Instance-reweighted Adversarial "
             "Training, ICLR 2021")
    url = "https://arxiv.org/abs/2010.01736"
    passes = Passes(target=0, attack=1, train=1)
    test_settings = {"gair_start": 1}  # reweight from the first epoch

    def __init__(self, threat: ThreatModel, **kwargs) -> None:
        super().__init__(threat, **kwargs)
        if threat.steps < 1:
            raise ValueError("gair-at needs at least one attack step (kappa counts PGD steps)")
        if self.hp.gair_start is not None and self.hp.gair_start < 0:
            raise ValueError(f"--gair-start must be >= 0, got {self.hp.gair_start}")

    @property
    def start_epoch(self) -> int:
        start = self.hp.gair_start
        return start if start is not None else scaled_epoch(50, self.total_epochs)

    def reweighting(self) -> bool:
        """Whether the current epoch (set by :meth:`set_epoch`) reweights the examples."""
        return self.epoch + 1 >= self.start_epoch

    def attack(self, model, x, y, rng=None) -> tuple[Tensor, Tensor]:
        return gair_attack(model, x, y, self.threat, rng)

    def objective(self, model, x, y, adv) -> MethodOutput:
        x_adv, kappa = adv
        logits_adv = model(x_adv)
        parts = {"kappa": kappa.float().mean()}
        if not self.reweighting():
            loss = F.cross_entropy(logits_adv.float(), y)
            return MethodOutput(loss, logits_adv=logits_adv, parts={"robust": loss.detach(), **parts})
        out = losses.gair_at_parts(logits_adv, y, kappa, self.threat.steps, lam=self.hp.gair_lambda)
        return MethodOutput(out.loss, logits_adv=logits_adv, parts={"robust": out.parts["robust"], **parts},
                            weight=out.parts["weight"])
