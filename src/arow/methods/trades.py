"""TRADES (Zhang et al. 2019), docs/method.md#trades."""
from __future__ import annotations

import torch

from .. import losses
from .base import Hparam, Method, MethodOutput, Passes
from .common import ATTACK_LOSS_HELP, SMOOTHING_HELP, SMOOTHING_MAX, forward_pair, training_attack
from .registry import METHODS

Tensor = torch.Tensor


@METHODS.register("trades")
class TRADES(Method):
    """TRADES (Zhang et al. 2019): CE(f(x)) + beta KL(p(x) || p(x_adv)); KL-PGD from x + 0.001 N(0,1)."""

    hparams = {"beta": Hparam(6.0, "TRADES: weight of the KL boundary term (0 to 100)", min=0, max=100),
               "smoothing": Hparam(0.0, SMOOTHING_HELP, min=0, max=SMOOTHING_MAX),
               "attack_loss": Hparam("kl", ATTACK_LOSS_HELP, str, choices=("kl", "ce"))}
    paper = ("Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan: Theoretically Principled Trade-off between "
             "Robustness and Accuracy, ICML 2019")
    url = "https://arxiv.org/abs/1901.08573"
    passes = Passes(target=1, attack=1, train=2)
    test_settings = {}

    def __init__(self, threat, **kwargs):
        super().__init__(threat, **kwargs)
        # subclasses (HAT) declare their own hyper-parameters: these two keep TRADES's defaults there
        self._smoothing = getattr(self.hp, "smoothing", 0.0)
        self._attack_loss = getattr(self.hp, "attack_loss", "kl")
        if not self._smoothing < 1:
            raise ValueError(f"TRADES smoothing must be in [0, 1), got {self._smoothing}")
        self.attack_threat = threat.with_(start="normal") if threat.start == "uniform" else threat

    def attack(self, model, x, y, rng=None) -> Tensor:
        return training_attack(model, x, y, self.attack_threat, rng, self._attack_loss)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        out = losses.trades_parts(logits_clean, logits_adv, y, beta=self.hp.beta,
                                  smoothing=self._smoothing)
        return MethodOutput(out.loss, logits_clean, logits_adv, out.parts)
