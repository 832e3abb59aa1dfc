"""Projected gradient descent (Madry et al. 2018) on any objective, inside a ThreatModel."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..rng import ExampleRNG, NoiseSource
from ..threat import ThreatModel
from .base import AttackLoss, ce_loss, frozen_eval, unwrap

Tensor = torch.Tensor
StepCallback = Callable[[int, Tensor], None]


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    loss: AttackLoss = ce_loss,
    *,
    restarts: int = 1,
    keep_best: bool = False,
    rng: Optional[NoiseSource] = None,
    on_step: Optional[StepCallback] = None,
) -> Tensor:
    """Maximise ``loss`` over the ball with ``threat.steps`` steps (sign of the gradient for L-inf,
    the L2-normalised gradient for L2: :meth:`ThreatModel.ascend`).

    The model runs in eval mode with frozen parameters (restored afterwards); the returned
    ``x_adv`` is detached, inside the eps-ball and in [0, 1]. With ``keep_best`` (evaluation)
    an example keeps the first iterate that fooled the model, over all steps and restarts,
    which can only make the attack stronger. ``on_step(t, logits)`` sees each iterate's logits
    (GAIR-AT counts correct steps with it).

    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 1, 2, 2), torch.randint(0, 3, (5,))
    >>> xa = pgd(m, x, y, ThreatModel(eps=0.1, steps=3))
    >>> bool((xa - x).abs().max() <= 0.1 + 1e-6)
    True
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    net = unwrap(model)
    x = x.detach()
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    rows = (-1,) + (1,) * (x.dim() - 1)  # a per-example flag broadcast over the example's pixels
    bounds = threat.bounds(x)  # L-inf: x -/+ eps once per attack, not at every step
    # No host synchronisation in the loop: the first fooling iterate is kept with torch.where (a
    # boolean-mask assignment would read the mask's count back from the device at every step).
    rng = device_noise(rng, x.device)
    with frozen_eval(net), torch.enable_grad():
        for _ in range(restarts):
            x_adv = threat.init(x, rng)
            for t in range(threat.steps):
                x_adv.requires_grad_(True)
                logits = net(x_adv)
                if on_step is not None:
                    on_step(t, logits.detach())
                if keep_best:
                    fooled_now = (logits.argmax(1) != y) & ~fooled
                    best = torch.where(fooled_now.view(rows), x_adv.detach(), best)
                    fooled |= fooled_now
                (grad,) = torch.autograd.grad(loss(logits, y).sum(), x_adv)
                x_adv = threat.ascend(x_adv, grad, x, bounds)
            if not keep_best:
                return x_adv.detach()
            with torch.no_grad():
                fooled_now = (net(x_adv).argmax(1) != y) & ~fooled
            best = torch.where(fooled_now.view(rows), x_adv, best)
            fooled |= fooled_now
            best = torch.where(fooled.view(rows), best, x_adv)  # last iterate for the examples nothing fooled yet
    return best.detach()


class PinnedNoise:
    """An :class:`~arow.rng.ExampleRNG` whose rows reach a CUDA device without blocking the host.

    Each example's random start comes from its own CPU generator (its numbers do not depend on the
    batch, the batch size or the device, and a CPU run stays bit for bit what it was), so the
    noise is drawn on the CPU; here it is put in pinned (page-locked) memory and copied to the
    device with ``non_blocking=True``, instead of a pageable copy that makes the host wait for it.
    The numbers are the ExampleRNG's, unchanged.
    """

    def __init__(self, rng: ExampleRNG, device: torch.device) -> None:
        self.rng, self.device = rng, device

    def rand_like(self, x: Tensor) -> Tensor:
        """Uniform [0, 1) noise shaped like ``x``, one generator per row, on ``x``'s device."""
        return self._moved(self.rng.rand_like, x)

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal noise shaped like ``x``, one generator per row, on ``x``'s device."""
        return self._moved(self.rng.randn_like, x)

    def _moved(self, draw: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        host = draw(torch.empty(x.shape, dtype=x.dtype))  # drawn on the CPU, where the generators are
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(x.device, non_blocking=True)


def device_noise(rng: Optional[NoiseSource], device: torch.device) -> Optional[NoiseSource]:
    """``rng`` as an attack on ``device`` draws from it: an :class:`~arow.rng.ExampleRNG` through
    :class:`PinnedNoise` on CUDA (same numbers, no blocking copy); anything else as it is (a
    ``BatchRNG`` already draws on the device; None is torch's global generator of the device).

    >>> rng = ExampleRNG(0, torch.arange(3))
    >>> device_noise(rng, torch.device("cpu")) is rng
    True
    """
    if isinstance(rng, ExampleRNG) and device.type == "cuda":
        return PinnedNoise(rng, device)
    return rng
