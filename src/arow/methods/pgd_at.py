"""PGD-AT (Madry et al. 2018), docs/method.md#pgd-at."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks import ce_loss, pgd
from .base import Method, MethodOutput, Passes
from .registry import METHODS

Tensor = torch.Tensor


@METHODS.register("pgd-at")
class PGDAT(Method):
    """PGD-AT (Madry et al. 2018): CE on x_adv from CE-PGD with a random start."""

    paper = ("Madry, Makelov, Schmidt, Tsipras, Vladu: Towards Deep Learning Models Resistant to "
             "Adversarial Attacks, ICLR 2018")
    url = "https://arxiv.org/abs/1706.06083"
    passes = Passes(target=0, attack=1, train=1)
    test_settings = {}

    def attack(self, model, x, y, rng=None) -> Tensor:
        return pgd(model, x, y, self.threat, ce_loss, rng=rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv.float(), y)
        return MethodOutput(loss, logits_adv=logits_adv, parts={"robust": loss.detach()})
