"""Training methods by name. ``build_method("arow", threat, lam=3.5)``.

One module per method (``natural``, ``pgd_at``, ``trades``, ``mart``, ``arow``, ``gair_at``, ``fat``,
``hat``, ``awp``); each registers its class with :data:`METHODS` when imported, and this package
imports every module in its folder except the support modules below. A new method is therefore one
file here plus one test; its class carries its facts (``hparams``, ``paper``, ``url``, ``passes``,
``test_settings``; see :mod:`arow.methods.base`).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ..threat import ThreatModel
from .base import Hparam, Method, MethodOutput, Passes
from .registry import METHODS

#: modules of this package that define no method
SUPPORT_MODULES = frozenset({"base", "registry", "common", "extra"})

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module}")

from .awp import AWP  # noqa: E402

__all__ = ["METHODS", "Method", "MethodOutput", "Hparam", "Passes", "build_method", "pass_table", "AWP"]


def build_method(name: str, threat: ThreatModel, **hparams: Any) -> Method:
    """A training method with its hyper-parameters (unset ones take the method's defaults).

    AWP variants are methods of their own (``trades-awp``, ``arow-awp``, ...) taking the inner
    method's hyper-parameters plus ``awp_gamma``/``awp_start``; ``AWP(threat, inner=m)`` wraps any
    other method ``m``. The values are in ``method.hp`` (``method.<name>`` reads them too).

    >>> build_method("arow", ThreatModel(eps=0.1)).hp.lam
    3.5
    >>> build_method("trades-awp", ThreatModel(eps=0.1), beta=3.0).inner.hp.beta
    3.0
    """
    return METHODS.get(name)(threat, **hparams)


def pass_table() -> str:
    """The Markdown table of every registered method's ``passes`` (docs/performance.md shows it;
    ``python scripts/update_docs.py`` rewrites it there and a test checks it is current).

    >>> pass_table().splitlines()[0]
    '| method | target | attack | train | helper | cost |'
    """
    def k(a: int) -> str:
        return "0" if a == 0 else ("K" if a == 1 else f"{a}K")

    def order(name: str) -> tuple:
        cls = METHODS.get(name)
        return (hasattr(cls, "inner_cls"), 2 * cls.passes.attack, cls.passes.for_steps(0).cost, name)

    rows = ["| method | target | attack | train | helper | cost |", "|---|---|---|---|---|---|"]
    for name in sorted(METHODS.names(), key=order):
        p = METHODS.get(name).passes
        const = p.target + 3 * p.train + p.helper
        cost = f"{k(2 * p.attack)}+{const}" if p.attack else str(const)
        rows.append(f"| {name} | {p.target} | {k(p.attack)} | {p.train} | {p.helper} | {cost} |")
    return "\n".join(rows)
