"""The threat models (L-inf and L2 balls): the one place that knows the geometry of the eps-ball.

Every attack and training method starts, steps, projects and clamps through a
:class:`ThreatModel`; nobody else re-implements projection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .rng import NoiseSource

#: the threat models: the L-inf ball (each pixel moves by at most eps) and the L2 ball (the
#: Euclidean length of the whole perturbation of one example is at most eps)
NORMS = ("linf", "l2")
#: how tables and reports write each norm
NORM_LABELS = {"linf": "L-inf", "l2": "L2"}


def check_norm(norm: str) -> str:
    """``norm`` if it names a threat model, else a one-line ValueError."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


def norm_label(norm: str) -> str:
    """How a table writes the norm: ``'L-inf'`` or ``'L2'``."""
    return NORM_LABELS[check_norm(norm)]


def max_eps(norm: str, dims: int) -> float:
    """The largest radius worth searching on inputs in [0, 1]^dims: a ball that holds the whole box
    around any input, 1 (L-inf) or sqrt(dims) (L2).

    >>> max_eps("linf", 784), max_eps("l2", 784)
    (1.0, 28.0)
    """
    return math.sqrt(dims) if check_norm(norm) == "l2" else 1.0


def check_eps(eps: object, norm: str, dims: int, *, what: str = "--eps", positive: bool = False) -> float:
    """``eps`` as a float if it is a finite radius within :func:`max_eps` (> 0 with ``positive``,
    else >= 0), else a one-line ValueError naming ``what``: the one check of a radius against its norm.

    >>> check_eps(8 / 255, "linf", 3072) == 8 / 255
    True
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"{what} must be a finite number, got {eps!r}")
    hi = max_eps(norm, dims)
    if eps > hi or eps < 0 or (positive and eps == 0):
        raise ValueError(f"{what} must be in {'(' if positive else '['}0, {hi:.4g}] for --norm {norm}, got {eps!r}")
    return float(eps)

def format_eps(eps: Optional[float]) -> str:
    """``k/255`` for the radii written that way (8/255: how CIFAR budgets and RobustBench spell
    them), else the plain number (0.1, 0.3, and 0.2 although it is 51/255); a dash for None.

    The fraction is shown when ``eps * 255`` is within 1e-6 of a whole ``k >= 1`` and ``k/255``
    is shorter than ``eps`` written out exactly (``repr``): 8/255 is 0.03137254901960784, while
    0.2 = 51/255 needs no fraction.

    >>> format_eps(8 / 255), format_eps(0.1), format_eps(0.2), format_eps(1 / 255)
    ('8/255', '0.1', '0.2', '1/255')
    """
    if eps is None:
        return "–"  # an en dash: no radius
    k = round(eps * 255) if math.isfinite(eps) else 0
    if k >= 1 and abs(eps * 255 - k) < 1e-6 and len(f"{k}/255") < len(repr(float(eps))):
        return f"{k}/255"
    return f"{eps:g}"


@dataclass(frozen=True)
class ThreatModel:
    """A ball of radius ``eps`` around inputs in [0, 1] (L-inf or L2), searched by projected gradient steps.

    L-inf (``norm="linf"``): the random start is uniform in the box, a step moves every pixel by
    the step size along the gradient's sign, projection clips each pixel to ``[x - eps, x + eps]``.
    L2 (``norm="l2"``): the random start is uniform in the ball (direction ~ N(0, I), radius
    ``eps * U^(1/d)`` with d the input size of one example), a step moves by the step size along
    the gradient divided by its L2 norm (per example; a zero gradient does not move), projection
    rescales ``delta = x_adv - x`` by ``min(1, eps / ||delta||_2)``. Both then clamp to [0, 1]
    (which only shortens delta, so the result stays in the ball). The start ``"normal"`` is
    TRADES' ``x + 0.001 N(0, 1)`` in both norms.

    The step size defaults to eps/4 in both norms: with the default 10 steps that is
    2.5 eps / steps, the step of Madry et al.'s ``robustness`` library for either norm.

    >>> tm = ThreatModel(eps=0.1, steps=10)      # step defaults to eps / 4
    >>> tm.step_size
    0.025
    >>> ThreatModel(eps=0.5, norm="l2").step_size
    0.125
    """

    eps: float
    steps: int = 10
    step: Optional[float] = None
    start: str = "uniform"
    norm: str = "linf"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got norm={self.norm!r}")
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

    @property
    def label(self) -> str:
        """``'L-inf'`` or ``'L2'``."""
        return NORM_LABELS[self.norm]

    def with_(self, **changes) -> "ThreatModel":
        """A copy with some fields changed: ``tm.with_(steps=20)``."""
        return replace(self, **changes)

    def init(self, x: torch.Tensor, rng: Optional[NoiseSource] = None) -> torch.Tensor:
        """The attack's starting point: uniform in the ball, TRADES' ``x + 0.001 N(0, 1)``, or ``x``."""
        x = x.detach()
        if self.start == "none" or self.eps == 0:
            return x.clone()
        if self.start == "normal":
            n = rng.randn_like(x) if rng is not None else torch.randn_like(x)
            return self.project(x + 0.001 * n, x)
        if self.norm == "l2":
            n = rng.randn_like(x) if rng is not None else torch.randn_like(x)
            first = x.new_empty(len(x))
            u = rng.rand_like(first) if rng is not None else torch.rand_like(first)
            d = x[0].numel() if len(x) else 1
            radius = self.eps * u.pow(1.0 / d)
            delta = n * (radius / _norms(n).clamp_min(1e-12)).view(_expand(x))
            return self.project(x + delta, x)
        u = rng.rand_like(x) if rng is not None else torch.rand_like(x)
        return self.clamp(x + (2 * u - 1) * self.eps)

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The unit step of ``grad``: its sign (L-inf), or ``grad / ||grad||_2`` per example (L2; zero stays zero)."""
        if self.norm == "l2":
            if grad.numel() == 0:
                return grad.clone()
            # divided by its largest entry first: a tiny gradient (1e-30) would underflow in ||grad||^2
            top = grad.detach().flatten(1).abs().amax(1)
            g = grad / torch.where(top > 0, top, torch.ones_like(top)).view(_expand(grad))
            n = _norms(g)
            return g / torch.where(n > 0, n, torch.ones_like(n)).view(_expand(grad))
        return grad.sign()

    def ascend(self, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
               bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """One ascent step of the step size along :meth:`direction`, then projection and clamp to [0, 1]
        (``bounds``: as :meth:`project`)."""
        return self.project(x_adv.detach() + self.step_size * self.direction(grad), x, bounds)

    def bounds(self, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """L-inf: ``(x - eps, x + eps)``, for an attack to compute once and pass to every
        :meth:`project` / :meth:`ascend` (the same numbers as computing them at each step); L2: None.

        >>> lo, hi = ThreatModel(eps=0.25).bounds(torch.full((1, 2), 0.5))
        >>> lo.tolist(), hi.tolist(), ThreatModel(eps=0.5, norm="l2").bounds(torch.zeros(1, 2))
        ([[0.25, 0.25]], [[0.75, 0.75]], None)
        """
        if self.norm == "l2":
            return None
        return x - self.eps, x + self.eps

    def project(self, x_adv: torch.Tensor, x: torch.Tensor,
                bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """The point of the ball around ``x`` for ``x_adv`` (clip, or rescale for L2), clamped to [0, 1].

        ``bounds``: :meth:`bounds` of ``x``, if the caller holds them (L-inf; ignored for L2).
        """
        if self.norm == "l2":
            delta = x_adv - x
            n = _norms(delta)
            factor = torch.where(n > self.eps, self.eps / torch.where(n > 0, n, torch.ones_like(n)),
                                 torch.ones_like(n))
            return self.clamp(x + delta * factor.view(_expand(x)))
        lo, hi = bounds if bounds is not None else (x - self.eps, x + self.eps)
        return self.clamp(torch.min(torch.max(x_adv, lo), hi))

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per example, the ``norm`` length of ``x_adv - x`` (what must stay <= eps)."""
        delta = (x_adv - x).flatten(1)
        if self.norm == "l2":
            return delta.norm(dim=1)
        return delta.abs().amax(1) if delta.shape[1] else delta.new_zeros(len(delta))

    def max_radius(self, x: torch.Tensor) -> float:
        """The radius of a ball that holds all of [0, 1]^d around any input: 1 (L-inf), sqrt(d) (L2)."""
        return math.sqrt(x[0].numel()) if self.norm == "l2" and len(x) else 1.0

    @staticmethod
    def clamp(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def _norms(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each example (row of the first dimension), computed in float32 or wider."""
    flat = t.flatten(1)
    return flat.float().norm(dim=1).to(t.dtype) if flat.dtype in (torch.float16, torch.bfloat16) else flat.norm(dim=1)


def _expand(t: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.dim() - 1)
