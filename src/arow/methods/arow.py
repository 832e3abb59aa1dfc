"""ARoW (Yang, Kong, Kim 2023), docs/method.md#the-arow-objective."""
from __future__ import annotations

import torch

from .. import losses
from .base import Hparam, Method, MethodOutput, Passes
from .common import ATTACK_LOSS_HELP, SMOOTHING_HELP, SMOOTHING_MAX, forward_pair, training_attack
from .registry import METHODS

Tensor = torch.Tensor


@METHODS.register("arow")
class ARoW(Method):
    """ARoW (Yang, Kong, Kim 2023): LS_a(f(x)) + 2 lam KL(p(x)||p(x_adv)) (1 - p_y(x_adv)); KL-PGD.

    ``lam`` is the paper's lambda (reference code ``--lamb`` = 2 lam); ``weight="cow"`` is the
    CoW ablation; ``detach_weight`` is the stop-gradient ablation.
    """

    hparams = {
        "lam": Hparam(3.5, "ARoW: the paper's lambda, default 3.5 (Fashion-MNIST in L-inf: 2.5); the reference "
                           "code's --lamb is 2*lambda; 0 to 100", min=0, max=100),
        "smoothing": Hparam(0.2, SMOOTHING_HELP, min=0, max=SMOOTHING_MAX),
        "detach_weight": Hparam(False, "ARoW ablation: stop the gradient through 1 - p_y(x_adv)", bool),
        "weight": Hparam("arow", "ARoW: 'arow' weights by 1 - p_y(x_adv); 'cow' (ablation) by p_y(x)", str, choices=("arow", "cow")),
        "attack_loss": Hparam("kl", ATTACK_LOSS_HELP, str, choices=("kl", "ce")),
    }
    paper = ("Yang, Kong, Kim: Improving Adversarial Robustness by Putting More Regularizations on Less "
             "Robust Samples, ICML 2023")
    url = "https://arxiv.org/abs/2206.03353"
    passes = Passes(target=1, attack=1, train=2)
    test_settings = {}

    def __init__(self, threat, **kwargs):
        super().__init__(threat, **kwargs)
        # bad values fail when the method is built, not at the first training step
        losses.arow_parts(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), lam=self.hp.lam,
                          smoothing=self.hp.smoothing, weight=self.hp.weight)

    def attack(self, model, x, y, rng=None) -> Tensor:
        return training_attack(model, x, y, self.threat, rng, self.hp.attack_loss)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        hp = self.hp
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        out = losses.arow_parts(logits_clean, logits_adv, y, lam=hp.lam, smoothing=hp.smoothing,
                                detach_weight=hp.detach_weight, weight=hp.weight)
        parts = {k: v for k, v in out.parts.items() if k != "weight"}
        return MethodOutput(out.loss, logits_clean, logits_adv, parts, weight=out.parts["weight"])
