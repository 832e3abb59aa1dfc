"""TRADES (Zhang et al. 2019), docs/method.md#trades."""
from __future__ import annotations

import torch

from .. import losses
from .base import Hparam, Method, MethodOutput, Passes
from .common import forward_pair, kl_attack
from .registry import METHODS

Tensor = torch.Tensor


@METHODS.register("trades")
class TRADES(Method):
    """TRADES (Zhang et al. 2019): CE(f(x)) + beta KL(p(x) || p(x_adv)); KL-PGD from x + 0.001 N(0,1)."""

    hparams = {"beta": Hparam(6.0, "TRADES: weight of the KL boundary term", min=0),
               "smoothing": Hparam(0.0, "TRADES: label smoothing of the natural CE (ablation; the paper: 0)", min=0)}
    paper = ("Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan: Theoretically Principled Trade-off between "
             "Robustness and Accuracy, ICML 2019")
    url = "https://arxiv.org/abs/1901.08573"
    passes = Passes(target=1, attack=1, train=2)
    test_settings = {}

    def __init__(self, threat, **kwargs):
        super().__init__(threat, **kwargs)
        if not self.hp.smoothing < 1:
            raise ValueError(f"TRADES smoothing must be in [0, 1), got {self.hp.smoothing}")
        self.attack_threat = threat.with_(start="normal") if threat.start == "uniform" else threat

    def attack(self, model, x, y, rng=None) -> Tensor:
        return kl_attack(model, x, y, self.attack_threat, rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        out = losses.trades_parts(logits_clean, logits_adv, y, beta=self.hp.beta,
                                  smoothing=self.hp.smoothing)
        return MethodOutput(out.loss, logits_clean, logits_adv, out.parts)
