"""Training methods by name. ``build_method("arow", threat, lam=3.5)``."""
from __future__ import annotations

from typing import Any

from ..threat import ThreatModel
from . import core  # noqa: F401  (registers natural, pgd-at, trades, mart, arow)
from .base import Hparam, Method, MethodOutput
from .registry import METHODS

__all__ = ["METHODS", "Method", "MethodOutput", "Hparam", "build_method"]


def build_method(name: str, threat: ThreatModel, **hparams: Any) -> Method:
    """A training method with its hyper-parameters (unset ones take the method's defaults).

    >>> build_method("arow", ThreatModel(eps=0.1)).lam
    3.5
    """
    return METHODS.get(name)(threat, **hparams)
