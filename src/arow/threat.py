"""The L-inf threat model: the one place that knows the geometry of the eps-ball.

Every attack and training method starts, steps, projects and clamps through a
:class:`ThreatModel`; nobody else re-implements projection.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .rng import BatchRNG


@dataclass(frozen=True)
class ThreatModel:
    """An L-inf ball of radius ``eps`` around inputs in [0, 1], searched by sign-gradient steps.

    >>> tm = ThreatModel(eps=0.1, steps=10)      # step defaults to eps / 4
    >>> tm.step_size
    0.025
    """

    eps: float
    steps: int = 10
    step: Optional[float] = None
    start: str = "uniform"
    norm: str = "linf"

    def __post_init__(self) -> None:
        if self.norm != "linf":
            raise ValueError(f"only the L-inf threat model is implemented, got norm={self.norm!r}")
        if not (self.eps >= 0):
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.start not in ("uniform", "normal", "none"):
            raise ValueError(f"start must be 'uniform', 'normal' (TRADES' x + 0.001 N(0, 1)) or 'none', got {self.start!r}")
        if self.step is not None and not (self.step > 0):
            raise ValueError(f"step size must be > 0, got {self.step}")

    @property
    def step_size(self) -> float:
        return self.step if self.step is not None else self.eps / 4

    def with_(self, **changes) -> "ThreatModel":
        """A copy with some fields changed: ``tm.with_(steps=20)``."""
        return replace(self, **changes)

    def init(self, x: torch.Tensor, rng: Optional[BatchRNG] = None) -> torch.Tensor:
        """The attack's starting point: uniform in the ball, TRADES' ``x + 0.001 N(0, 1)``, or ``x``."""
        x = x.detach()
        if self.start == "none" or self.eps == 0:
            return x.clone()
        if self.start == "normal":
            n = rng.randn_like(x) if rng is not None else torch.randn_like(x)
            return self.project(x + 0.001 * n, x)
        u = rng.rand_like(x) if rng is not None else torch.rand_like(x)
        return self.clamp(x + (2 * u - 1) * self.eps)

    def ascend(self, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One sign-gradient ascent step, then projection onto the ball and clamp to [0, 1]."""
        return self.project(x_adv.detach() + self.step_size * grad.sign(), x)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x_adv = torch.min(torch.max(x_adv, x - self.eps), x + self.eps)
        return self.clamp(x_adv)

    @staticmethod
    def clamp(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)
