"""HAT (Rade & Moosavi-Dezfooli 2022), docs/method.md#hat."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from .. import losses
from ..threat import ThreatModel
from .base import Hparam, MethodOutput, Passes
from .common import forward_pair
from .registry import METHODS
from .trades import TRADES
from ..runs.records import model_from_checkpoint
from ..runs.checkpoint import CheckpointError
from ..runs.records import load_checkpoint

log = logging.getLogger(__name__)
Tensor = torch.Tensor


def helper_points(x: Tensor, x_adv: Tensor, h: float = 2.0) -> Tensor:
    """HAT's helper examples ``x + h (x_adv - x)``, clamped to [0, 1].

    >>> helper_points(torch.tensor([0.9, 0.1]), torch.tensor([0.98, 0.02])).tolist()
    [1.0, 0.0]
    """
    return ThreatModel.clamp(x + h * (x_adv - x))


def load_helper(helper: Union[str, Path, nn.Module]) -> nn.Module:
    """HAT's helper: a frozen, eval-mode model from a run folder / checkpoint (or a module as is)."""

    if isinstance(helper, nn.Module):
        model = helper
    else:
        try:
            ckpt = load_checkpoint(helper)  # read once, without running code from the file
            model = model_from_checkpoint(ckpt)
        except CheckpointError as e:
            raise CheckpointError(f"HAT --helper: {e}") from None
        trained_with = (ckpt.get("config") or {}).get("method")
        if trained_with != "natural":
            log.warning("HAT helper %s was trained with method %r; HAT expects a `natural` model",
                        helper, trained_with)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@METHODS.register("hat")
class HAT(TRADES):
    """HAT (Rade & Moosavi-Dezfooli 2022): TRADES + gamma CE(f(x + h (x_adv - x)), helper(x_adv)).

    "Reducing excessive margin to achieve a better accuracy vs. robustness trade-off" (ICLR 2022).
    x_adv from TRADES' KL-PGD (start x + 0.001 N(0, 1)); the helper label is the argmax of a
    separately, normally trained model on x_adv (``helper``: a run folder of
    ``arow train --method natural``; frozen, eval mode, moved to the input's device). h = 2.
    beta = 2.5 is the HAT paper's CIFAR-10 setting (its README: ``--beta 2.5 --gamma 0.5``);
    gamma = 0.25 follows the ARoW reference code, not HAT's 0.5. Deviation from both
    reference codes: the helper input is clamped to [0, 1], as an image must be (docs/method.md#hat).
    The KL term is our TRADES one, ``log(q + 1e-12)`` as in the ARoW reference.
    The attack returns ``(x_adv, helper labels)`` so AWP can reuse it without a second helper call.
    ``helper`` has no usable default: tests pass a model for every hyper-parameter that
    ``accepts`` an ``nn.Module``.
    """

    hparams = {
        "beta": Hparam(2.5, "HAT: weight beta of its TRADES KL term (2.5, the HAT paper's CIFAR-10 setting; 0 to 100)",
                        min=0, max=100),
        "hat_gamma": Hparam(0.25, "HAT: weight of the helper loss (0.25 as the ARoW reference; the HAT paper: 0.5; 0 to 100)",
                             min=0, max=100),
        "hat_h": Hparam(2.0, "HAT: helper examples are x + h (x_adv - x), clamped to [0, 1] (h: 0 to 100)",
                         min=0, max=100),
        "helper": Hparam(None, "HAT: run folder or checkpoint of a normally trained model (arow train --method "
                               "natural) whose predictions on x_adv label the helper examples", str,
                         accepts=(nn.Module, os.PathLike)),
    }
    paper = ("Rade, Moosavi-Dezfooli: Reducing Excessive Margin to Achieve a Better Accuracy vs. Robustness "
             "Trade-off, ICLR 2022")
    url = "https://openreview.net/forum?id=Azh9QBQ4tR7"
    passes = Passes(target=1, attack=1, train=3, helper=1)
    test_settings = {}

    def __init__(self, threat: ThreatModel, **kwargs) -> None:
        super().__init__(threat, **kwargs)
        hp = self.hp
        if hp.helper is None:
            raise ValueError("HAT needs --helper RUN_DIR: train one with `arow train --method natural --out RUN_DIR`")
        if hp.hat_gamma < 0 or hp.beta < 0:
            raise ValueError(f"HAT needs beta >= 0 and gamma >= 0, got {hp.beta} and {hp.hat_gamma}")
        self.helper_model = load_helper(hp.helper)
        if isinstance(hp.helper, nn.Module):  # keep the config JSON-serialisable
            self.config["helper"] = f"<{type(hp.helper).__name__} module>"

    def helper_labels(self, x_adv: Tensor) -> Tensor:
        """The helper model's predictions on ``x_adv`` (no gradient)."""
        param = next(self.helper_model.parameters(), None)
        if param is not None and param.device != x_adv.device:
            self.helper_model.to(x_adv.device)
        with torch.no_grad():
            logits = self.helper_model(x_adv)
        self.helper_classes = logits.shape[1]
        return logits.argmax(1)

    def attack(self, model, x, y, rng=None) -> tuple[Tensor, Tensor]:
        x_adv = super().attack(model, x, y, rng)
        return x_adv, self.helper_labels(x_adv)

    def objective(self, model, x, y, adv) -> MethodOutput:
        x_adv, y_help = adv
        hp = self.hp
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        if getattr(self, "helper_classes", logits_clean.shape[1]) != logits_clean.shape[1]:
            raise ValueError(f"HAT helper predicts {self.helper_classes} classes, the model {logits_clean.shape[1]}")
        logits_help = model(helper_points(x, x_adv, hp.hat_h))
        out = losses.hat_parts(logits_clean, logits_adv, logits_help, y, y_help, beta=hp.beta, gamma=hp.hat_gamma)
        return MethodOutput(out.loss, logits_clean, logits_adv, out.parts)
