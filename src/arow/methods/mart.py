"""MART (Wang et al. 2020), docs/method.md#mart."""
from __future__ import annotations

import torch

from .. import losses
from ..attacks import ce_loss, pgd
from .base import Hparam, Method, MethodOutput, Passes
from .common import forward_pair
from .registry import METHODS

Tensor = torch.Tensor


@METHODS.register("mart")
class MART(Method):
    """MART (Wang et al. 2020): BCE(f(x_adv)) + lam KL(p(x)||p(x_adv)) (1 - p_y(x)); CE-PGD."""

    hparams = {"lam": Hparam(6.0, "MART: weight of the KL term (MART: 6.0; 0 to 100)", min=0, max=100)}
    paper = ("Wang, Zou, Yi, Bailey, Ma, Gu: Improving Adversarial Robustness Requires Revisiting "
             "Misclassified Examples, ICLR 2020")
    url = "https://openreview.net/forum?id=rklOg6EFwS"
    passes = Passes(target=0, attack=1, train=2)
    test_settings = {}

    def attack(self, model, x, y, rng=None) -> Tensor:
        return pgd(model, x, y, self.threat, ce_loss, rng=rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        out = losses.mart_parts(logits_clean, logits_adv, y, lam=self.hp.lam)
        parts = {k: v for k, v in out.parts.items() if k != "weight"}
        return MethodOutput(out.loss, logits_clean, logits_adv, parts, weight=out.parts["weight"])
