"""FAT (Zhang et al. 2020), docs/method.md#fat; its attack is :func:`arow.attacks.fat.fat_pgd`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks.fat import fat_pgd
from ..threat import ThreatModel
from .base import Hparam, Method, MethodOutput, Passes
from .common import scaled_epoch
from .registry import METHODS

Tensor = torch.Tensor


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
    Every attack step runs the whole batch, so ``passes`` is an upper bound in time.
    """

    hparams = {
        "fat_tau": Hparam(None, "FAT: steps an example may still take after it is misclassified; default: "
                                "the reference's dynamic tau 0 -> 1 -> 2 (epochs 50, 90 of 120)", int,
                          min=0, max=10_000),
        "fat_omega": Hparam(0.001, "FAT: std of the Gaussian noise added to every attack step, in pixel units "
                                        "(FAT: 0.001; 0 to 1, the pixel range)", min=0, max=1),
    }
    paper = ("Zhang, Xu, Han, Niu, Cui, Sugiyama, Kankanhalli: Attacks Which Do Not Kill Training Make "
             "Adversarial Learning Stronger, ICML 2020")
    url = "https://arxiv.org/abs/2002.11242"
    passes = Passes(target=0, attack=1, train=1)
    test_settings = {}

    def __init__(self, threat: ThreatModel, **kwargs) -> None:
        super().__init__(threat, **kwargs)
        if self.hp.fat_tau is not None and self.hp.fat_tau < 0:
            raise ValueError(f"--fat-tau must be >= 0, got {self.hp.fat_tau}")
        if self.hp.fat_omega < 0:
            raise ValueError(f"--fat-omega must be >= 0, got {self.hp.fat_omega}")

    def tau(self) -> int:
        """This epoch's tau: ``fat_tau`` if given, else FAT's dynamic schedule."""
        if self.hp.fat_tau is not None:
            return self.hp.fat_tau
        epoch = self.epoch + 1  # the reference's adjust_tau(epoch + 1)
        if epoch <= scaled_epoch(50, self.total_epochs):
            return 0
        return 1 if epoch <= scaled_epoch(90, self.total_epochs) else 2

    def attack(self, model, x, y, rng=None) -> tuple[Tensor, Tensor]:
        return fat_pgd(model, x, y, self.threat, tau=self.tau(), omega=self.hp.fat_omega, rng=rng)

    def objective(self, model, x, y, adv) -> MethodOutput:
        x_adv, steps = adv
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv.float(), y)
        return MethodOutput(loss, logits_adv=logits_adv,
                            parts={"robust": loss.detach(), "attack_steps": steps.float().mean()})
