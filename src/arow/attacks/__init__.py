"""Evaluation attacks by name: ``clean``, ``fgsm``, ``pgd20``, ``pgd50r5``, ``cw``, ``cw100``, ...

``pgd<K>`` is PGD on cross-entropy with K steps of eps/4 and one random start (``r<R>``
adds restarts); ``cw<K>`` is the same search on the Carlini-Wagner margin (CW-inf); ``cw``
alone is ``cw30``. Every evaluation attack keeps, per example, the first iterate that fooled
the model. AutoAttack lives in :mod:`arow.attacks.autoattack`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..registry import Registry
from ..threat import ThreatModel
from .base import AttackLoss, ce_loss, cw_loss, frozen_eval, kl_loss, predict, unwrap
from .fat import fat_pgd
from .pgd import pgd

Tensor = torch.Tensor

__all__ = ["ATTACKS", "Attack", "get_attack", "pgd", "fat_pgd", "frozen_eval", "predict", "unwrap", "ce_loss",
           "cw_loss", "kl_loss", "AttackLoss"]


@dataclass
class Attack:
    """A named evaluation attack: ``attack(model, x, y) -> x_adv``.

    ``cascade``: evaluation runs it only on examples still robust after the attacks before it
    (AutoAttack). ``resumable``: ``run`` takes ``state_path=`` and continues from that file.
    ``meta``: settings worth recording next to its number (version, seed, ...).
    """

    name: str
    run: Callable[..., Tensor]
    description: str = ""
    cascade: bool = False
    resumable: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        return self.run(model, x, y, **kwargs)


ATTACKS: Registry[Callable[..., Attack]] = Registry("attack")


@ATTACKS.register("clean", help="no attack: natural accuracy")
def _clean(eps: float, name: str = "clean") -> Attack:
    return Attack(name, lambda model, x, y: x, "natural inputs")


@ATTACKS.register("fgsm", help="one signed-gradient step of size eps on CE from x (no random start)")
def _fgsm(eps: float, name: str = "fgsm") -> Attack:
    tm = ThreatModel(eps=eps, steps=1, step=eps if eps > 0 else None, start="none")
    return Attack(name, lambda m, x, y: pgd(m, x, y, tm, ce_loss, keep_best=True), "FGSM")


@ATTACKS.register("pgd<K>[r<R>]", help="PGD on cross-entropy, K steps of eps/4, random start, R restarts")
def _pgd(eps: float, steps: int = 20, restarts: int = 1, name: Optional[str] = None) -> Attack:
    desc = f"PGD-{steps} (CE, step eps/4, random start, {restarts} restart(s))"
    return _pgd_search(name or f"pgd{steps}", eps, steps, restarts, ce_loss, desc)


@ATTACKS.register("cw<K>[r<R>]", help="CW-inf: PGD on the Carlini-Wagner margin, K steps (cw = cw30)")
def _cw(eps: float, steps: int = 30, restarts: int = 1, name: Optional[str] = None) -> Attack:
    desc = f"CW-inf (margin loss, {steps} steps of eps/4, random start, {restarts} restart(s))"
    return _pgd_search(name or f"cw{steps}", eps, steps, restarts, cw_loss, desc)


def _pgd_search(name: str, eps: float, steps: int, restarts: int, loss: AttackLoss, desc: str) -> Attack:
    """PGD on ``loss`` with ``steps`` steps of eps/4 from a random start, the first fooling iterate kept."""
    tm = ThreatModel(eps=eps, steps=steps)
    return Attack(name, lambda m, x, y: pgd(m, x, y, tm, loss, restarts=restarts, keep_best=True), desc)


MAX_STEPS, MAX_RESTARTS = 10_000, 1_000  # far beyond any published evaluation; a typo must not hang a run
_PATTERN = re.compile(r"^(pgd|cw)(\d+)?(?:r(\d+))?$")


def get_attack(name: str, eps: float, **kwargs) -> Attack:
    """Build the attack called ``name`` at radius ``eps``.

    >>> get_attack("pgd20", 8 / 255).name
    'pgd20'
    """
    if not eps >= 0:  # also NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    m = _PATTERN.match(name)
    if m:
        kind, steps, restarts = m.group(1), m.group(2), m.group(3)
        factory = ATTACKS.get(f"{kind}<K>[r<R>]")
        kw = {"name": name}
        if steps:
            kw["steps"] = int(steps)
            if not 1 <= kw["steps"] <= MAX_STEPS:
                raise ValueError(f"attack {name!r}: steps must be in [1, {MAX_STEPS}]")
        if restarts:
            kw["restarts"] = int(restarts)
            if not 1 <= kw["restarts"] <= MAX_RESTARTS:
                raise ValueError(f"attack {name!r}: restarts must be in [1, {MAX_RESTARTS}]")
        return factory(eps, **kw, **kwargs)
    if name in ATTACKS and "<" not in name:
        return ATTACKS.get(name)(eps, **kwargs)
    raise ValueError(f"unknown attack {name!r}; choose from: clean, fgsm, pgd<K>[r<R>] (e.g. pgd20), "
                     f"cw<K>[r<R>] (e.g. cw30), {', '.join(n for n in ATTACKS.names() if '<' not in n and n not in ('clean', 'fgsm'))}")


from . import autoattack  # noqa: E402,F401  (registers "autoattack" and "apgd-monitor")
