"""The remaining baselines (docs/method.md#baselines): GAIR-AT, FAT and HAT (AWP wraps methods in awp.py).

Their reference schedules are given for 120 epochs (GAIR-AT reweights from epoch 50, FAT raises
tau at epochs 50 and 90); we keep the same FRACTIONS of whatever ``--epochs`` a run uses.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import losses
from ..attacks import ce_loss, frozen_eval, pgd, unwrap
from ..rng import BatchRNG
from ..threat import ThreatModel
from .base import Hparam, Method, MethodOutput
from .core import TRADES, forward_pair
from .registry import METHODS

log = logging.getLogger(__name__)
Tensor = torch.Tensor

REFERENCE_EPOCHS = 120  # the length of the schedules in the GAIR-AT, FAT and ARoW reference code


def scaled_epoch(epoch_of_120: int, total_epochs: int) -> int:
    """A 1-based epoch of a 120-epoch reference schedule, moved to a run of ``total_epochs``.

    >>> scaled_epoch(50, 120), scaled_epoch(50, 12)
    (50, 5)
    """
    return round(total_epochs * epoch_of_120 / REFERENCE_EPOCHS)


# --------------------------------------------------------------------------- GAIR-AT
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

    name = "gair-at"
    hparams = {
        "gair_lambda": Hparam(-1.0, "GAIR-AT: Lambda of the weight (1 + tanh(Lambda + 5 (1 - 2 kappa/K))) / 2"),
        "gair_start": Hparam(None, "GAIR-AT: first epoch (1-based) with reweighting; default: epoch 50 of 120, "
                                   "scaled to --epochs", int, min=1),
    }

    def __init__(self, threat: ThreatModel, **kwargs) -> None:
        super().__init__(threat, **kwargs)
        if threat.steps < 1:
            raise ValueError("gair-at needs at least one attack step (kappa counts PGD steps)")
        if self.gair_start is not None and self.gair_start < 0:
            raise ValueError(f"--gair-start must be >= 0, got {self.gair_start}")

    @property
    def start_epoch(self) -> int:
        return self.gair_start if self.gair_start is not None else scaled_epoch(50, self.total_epochs)

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
        out = losses.gair_at_parts(logits_adv, y, kappa, self.threat.steps, lam=self.gair_lambda)
        return MethodOutput(out.loss, logits_adv=logits_adv, parts={"robust": out.parts["robust"], **parts},
                            weight=out.parts["weight"])


# --------------------------------------------------------------------------- FAT
def fat_pgd(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, *, tau: int = 0,
            omega: float = 0.0, rng: Optional[BatchRNG] = None) -> tuple[Tensor, Tensor]:
    """Early-stopped CE-PGD (FAT, Zhang et al. 2020, Alg. 1): returns ``(x_adv, steps taken)``.

    At each of the K iterates, an example that the model misclassifies spends one unit of its
    budget ``tau``; a misclassified example with no budget left stops, and its current iterate
    is returned unchanged from then on. So an example first misclassified at iterate m (the start
    is iterate 0) takes ``min(m + tau, K)`` steps when it stays misclassified. Each step adds
    ``omega * N(0, 1)`` noise to the sign step before projection (FAT's ``omega``). Model in eval
    mode with frozen weights; any input shape. Every step runs the whole batch (fixed shapes, no
    host synchronisation) where the reference shrinks it; the stopped examples just stay put.

    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    >>> x, y = torch.rand(5, 3, 2, 2), torch.randint(0, 3, (5,))
    >>> x_adv, steps = fat_pgd(m, x, y, ThreatModel(eps=0.1, steps=4), tau=1)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6), bool((steps <= 4).all())
    (True, True)
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    net = unwrap(model)
    x = x.detach()
    x_adv = threat.init(x, rng)
    budget = torch.full((len(x),), tau, dtype=torch.long, device=x.device)
    active = torch.ones(len(x), dtype=torch.bool, device=x.device)
    steps = torch.zeros(len(x), dtype=torch.long, device=x.device)
    expand = (-1,) + (1,) * (x.dim() - 1)
    with frozen_eval(net), torch.enable_grad():
        for _ in range(threat.steps):
            x_adv.requires_grad_(True)
            logits = net(x_adv)
            wrong = active & (logits.argmax(1) != y)
            stop = wrong & (budget == 0)
            budget = budget - (wrong & ~stop).long()
            active = active & ~stop
            (grad,) = torch.autograd.grad(ce_loss(logits, y).sum(), x_adv)
            moved = x_adv.detach() + threat.step_size * grad.sign()
            if omega > 0:  # drawn for the whole batch every step: the stream never depends on who stopped
                moved = moved + omega * (rng.randn_like(x) if rng is not None else torch.randn_like(x))
            x_adv = torch.where(active.view(expand), threat.project(moved, x), x_adv.detach())
            steps += active.long()
    return x_adv.detach(), steps


@METHODS.register("fat")
class FAT(Method):
    """FAT (Zhang et al. 2020): CE on friendly adversarial data from early-stopped PGD.

    "Attacks which do not kill training make adversarial learning stronger" (ICML 2020), FAT for
    standard AT as in the authors' FAT.py: uniform random start in the ball, ``omega = 0.001``
    noise per step, and the dynamic tau of its CIFAR-10 setting (tau = 0 up to epoch 50 of 120,
    1 up to epoch 90, 2 after; scaled to --epochs). ``fat_tau`` fixes tau instead (the ARoW
    reference code uses tau = 5, omega = 0). Deviations: the examples keep their order (the
    reference regroups them by when they stopped; the loss is the same mean), and nothing
    assumes 3x32x32 inputs (the reference does). Logs ``attack_steps``, the mean steps taken.
    """

    name = "fat"
    hparams = {
        "fat_tau": Hparam(None, "FAT: steps an example may still take after it is misclassified; default: "
                                "the reference's dynamic tau 0 -> 1 -> 2 (epochs 50, 90 of 120)", int, min=0),
        "fat_omega": Hparam(0.001, "FAT: std of the Gaussian noise added to every attack step (FAT: 0.001)", min=0),
    }

    def __init__(self, threat: ThreatModel, **kwargs) -> None:
        super().__init__(threat, **kwargs)
        if self.fat_tau is not None and self.fat_tau < 0:
            raise ValueError(f"--fat-tau must be >= 0, got {self.fat_tau}")
        if self.fat_omega < 0:
            raise ValueError(f"--fat-omega must be >= 0, got {self.fat_omega}")

    def tau(self) -> int:
        """This epoch's tau: ``fat_tau`` if given, else FAT's dynamic schedule."""
        if self.fat_tau is not None:
            return self.fat_tau
        epoch = self.epoch + 1  # the reference's adjust_tau(epoch + 1)
        if epoch <= scaled_epoch(50, self.total_epochs):
            return 0
        return 1 if epoch <= scaled_epoch(90, self.total_epochs) else 2

    def attack(self, model, x, y, rng=None) -> tuple[Tensor, Tensor]:
        return fat_pgd(model, x, y, self.threat, tau=self.tau(), omega=self.fat_omega, rng=rng)

    def objective(self, model, x, y, adv) -> MethodOutput:
        x_adv, steps = adv
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv.float(), y)
        return MethodOutput(loss, logits_adv=logits_adv,
                            parts={"robust": loss.detach(), "attack_steps": steps.float().mean()})


# --------------------------------------------------------------------------- HAT
def helper_points(x: Tensor, x_adv: Tensor, h: float = 2.0) -> Tensor:
    """HAT's helper examples ``x + h (x_adv - x)``, clamped to [0, 1].

    >>> helper_points(torch.tensor([0.9, 0.1]), torch.tensor([0.98, 0.02])).tolist()
    [1.0, 0.0]
    """
    return ThreatModel.clamp(x + h * (x_adv - x))


def load_helper(helper: Union[str, Path, nn.Module]) -> nn.Module:
    """HAT's helper: a frozen, eval-mode model from a run folder / checkpoint (or a module as is)."""
    from .. import model_from_checkpoint
    from ..checkpoint import CheckpointError, load_checkpoint

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
    """

    name = "hat"
    hparams = {
        "beta": Hparam(2.5, "TRADES / HAT: weight beta of the KL term (TRADES 6.0; HAT 2.5, its CIFAR-10 setting)", min=0),
        "hat_gamma": Hparam(0.25, "HAT: weight of the helper loss (0.25 as the ARoW reference; the HAT paper: 0.5)", min=0),
        "hat_h": Hparam(2.0, "HAT: helper examples are x + h (x_adv - x), clamped to [0, 1]", min=0),
        "helper": Hparam(None, "HAT: run folder or checkpoint of a normally trained model (arow train --method "
                               "natural) whose predictions on x_adv label the helper examples", str,
                         accepts=(nn.Module, os.PathLike)),
    }

    def __init__(self, threat: ThreatModel, **kwargs) -> None:
        super().__init__(threat, **kwargs)
        if self.helper is None:
            raise ValueError("HAT needs --helper RUN_DIR: train one with `arow train --method natural --out RUN_DIR`")
        if self.hat_gamma < 0 or self.beta < 0:
            raise ValueError(f"HAT needs beta >= 0 and gamma >= 0, got {self.beta} and {self.hat_gamma}")
        self.helper_model = load_helper(self.helper)
        if isinstance(self.helper, nn.Module):  # keep the config JSON-serialisable
            self.config["helper"] = f"<{type(self.helper).__name__} module>"

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
        logits_clean, logits_adv = forward_pair(model, x, x_adv)
        if getattr(self, "helper_classes", logits_clean.shape[1]) != logits_clean.shape[1]:
            raise ValueError(f"HAT helper predicts {self.helper_classes} classes, the model {logits_clean.shape[1]}")
        logits_help = model(helper_points(x, x_adv, self.hat_h))
        out = losses.hat_parts(logits_clean, logits_adv, logits_help, y, y_help, beta=self.beta, gamma=self.hat_gamma)
        return MethodOutput(out.loss, logits_clean, logits_adv, out.parts)
