"""Training methods by name. ``build_method("arow", threat, lam=3.5)``."""
from __future__ import annotations

from typing import Any

from ..threat import ThreatModel
from . import core  # noqa: F401  (registers natural, pgd-at, trades, mart, arow)
from . import extra  # noqa: F401  (registers gair-at, fat, hat)
from . import awp  # noqa: F401  (registers pgd-at-awp, trades-awp, mart-awp, arow-awp)
from .awp import AWP
from .base import Hparam, Method, MethodOutput
from .registry import METHODS

__all__ = ["METHODS", "Method", "MethodOutput", "Hparam", "build_method", "AWP"]


def build_method(name: str, threat: ThreatModel, **hparams: Any) -> Method:
    """A training method with its hyper-parameters (unset ones take the method's defaults).

    AWP variants are methods of their own (``trades-awp``, ``arow-awp``, ...) taking the inner
    method's hyper-parameters plus ``awp_gamma``/``awp_start``; ``AWP(threat, inner=m)`` wraps any
    other method ``m``.

    >>> build_method("arow", ThreatModel(eps=0.1)).lam
    3.5
    >>> build_method("trades-awp", ThreatModel(eps=0.1), beta=3.0).inner.beta
    3.0
    """
    return METHODS.get(name)(threat, **hparams)
