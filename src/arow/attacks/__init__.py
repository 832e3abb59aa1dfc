"""Evaluation attacks by name: ``clean``, ``fgsm``, ``pgd20``, ``pgd50r5``, ``cw``, ``cw100``, ...

``pgd<K>`` is PGD on cross-entropy with K steps of eps/4 and one random start (``r<R>``
adds restarts); ``cw<K>`` is the same search on the Carlini-Wagner margin (CW-inf); ``cw``
alone is ``cw30``. Every evaluation attack keeps, per example, the first iterate that fooled
the model. Each runs in the L-inf ball (``norm="linf"``, the default) or the L2 ball
(``norm="l2"``: steps along the L2-normalised gradient, see :class:`arow.threat.ThreatModel`).
AutoAttack lives in :mod:`arow.attacks.autoattack`.

A new named attack is one file in this folder: a factory ``make(eps: float, norm: str = "linf")
-> Attack`` registered with ``@ATTACKS.register("name", help=...)``; :func:`get_attack` calls it
with the radius, and with ``norm`` for the L2 ball (a factory without ``norm`` is refused there with
one line). The :class:`Attack` it returns carries the registered name and runs
``attack(model, x, y) -> x_adv`` inside the ball (e.g. :func:`pgd` with ``keep_best=True``).
This package imports every module in its folder except the support modules in
:data:`SUPPORT_MODULES`, so the attack then shows up in ``arow list``, ``--eval-attacks``/
``--attacks``, :func:`get_attack` and the reports (labelled by its registered name) with no other
edit.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..registry import Registry
from ..threat import ThreatModel, check_norm, norm_label
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
    ``meta``: settings worth recording next to its number (version, seed, ...). ``norm``: the
    threat model it searches (``"linf"`` or ``"l2"``). ``per_example_rng``: ``run`` takes ``rng=``
    (an :class:`arow.rng.ExampleRNG`) for its random start, which evaluation passes so that an
    example's verdict does not depend on the batch it was attacked in.
    """

    name: str
    run: Callable[..., Tensor]
    description: str = ""
    cascade: bool = False
    resumable: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    norm: str = "linf"
    per_example_rng: bool = False

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        return self.run(model, x, y, **kwargs)


ATTACKS: Registry[Callable[..., Attack]] = Registry("attack")


@ATTACKS.register("clean", help="no attack: natural accuracy")
def _clean(eps: float, name: str = "clean", norm: str = "linf") -> Attack:
    return Attack(name, lambda model, x, y: x, "natural inputs", norm=norm)


@ATTACKS.register("fgsm", help="one signed-gradient step of size eps on CE from x (no random start; "
                               "L2: one step of length eps along the normalised gradient)")
def _fgsm(eps: float, name: str = "fgsm", norm: str = "linf") -> Attack:
    tm = ThreatModel(eps=eps, steps=1, step=eps if eps > 0 else None, start="none", norm=norm)
    desc = "FGSM" if norm == "linf" else "FGM-L2 (one step of length eps along the L2-normalised CE gradient)"
    return Attack(name, lambda m, x, y: pgd(m, x, y, tm, ce_loss, keep_best=True), desc, norm=norm)


@ATTACKS.register("pgd<K>[r<R>]", help="PGD on cross-entropy, K steps of eps/4, random start, R restarts")
def _pgd(eps: float, steps: int = 20, restarts: int = 1, name: Optional[str] = None, norm: str = "linf") -> Attack:
    desc = f"PGD-{steps} (CE, step eps/4, random start, {restarts} restart(s))"
    if norm != "linf":
        desc = f"PGD-{steps} {norm_label(norm)} (CE, step eps/4 along the L2-normalised gradient, random start " \
               f"in the ball, {restarts} restart(s))"
    return _pgd_search(name or f"pgd{steps}", eps, steps, restarts, ce_loss, desc, norm)


@ATTACKS.register("cw<K>[r<R>]", help="CW-inf: PGD on the Carlini-Wagner margin, K steps (cw = cw30; "
                                      "CW-L2 with norm l2)")
def _cw(eps: float, steps: int = 30, restarts: int = 1, name: Optional[str] = None, norm: str = "linf") -> Attack:
    desc = f"CW-inf (margin loss, {steps} steps of eps/4, random start, {restarts} restart(s))"
    if norm != "linf":
        desc = f"CW-{norm_label(norm)} (PGD on the margin loss, {steps} steps of eps/4 along the L2-normalised " \
               f"gradient, random start in the ball, {restarts} restart(s))"
    return _pgd_search(name or f"cw{steps}", eps, steps, restarts, cw_loss, desc, norm)


def _pgd_search(name: str, eps: float, steps: int, restarts: int, loss: AttackLoss, desc: str,
                norm: str = "linf") -> Attack:
    """PGD on ``loss`` with ``steps`` steps of eps/4 from a random start, the first fooling iterate kept."""
    tm = ThreatModel(eps=eps, steps=steps, norm=norm)
    return Attack(name, lambda m, x, y, rng=None: pgd(m, x, y, tm, loss, restarts=restarts, keep_best=True, rng=rng),
                  desc, norm=norm, per_example_rng=True)


MAX_STEPS, MAX_RESTARTS = 10_000, 1_000  # far beyond any published evaluation; a typo must not hang a run
_PATTERN = re.compile(r"^(pgd|cw)(\d+)?(?:r(\d+))?$")


def get_attack(name: str, eps: float, *, norm: str = "linf", **kwargs: Any) -> Attack:
    """Build the attack called ``name`` at radius ``eps`` in the ``norm`` ball (``"linf"`` or ``"l2"``).

    >>> get_attack("pgd20", 8 / 255).name
    'pgd20'
    >>> get_attack("pgd20", 0.5, norm="l2").norm
    'l2'
    """
    if not eps >= 0:  # also NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    if check_norm(norm) != "linf":  # an attack registered without a norm argument stays usable in L-inf
        kwargs["norm"] = norm
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
        factory = ATTACKS.get(name)
        if "norm" in kwargs and "norm" not in inspect.signature(factory).parameters:
            raise ValueError(f"attack {name!r} supports the L-inf threat model only, not norm={norm!r}")
        return factory(eps, **kwargs)
    raise ValueError(f"unknown attack {name!r}; choose from: clean, fgsm, pgd<K>[r<R>] (e.g. pgd20), "
                     f"cw<K>[r<R>] (e.g. cw30), {', '.join(n for n in ATTACKS.names() if '<' not in n and n not in ('clean', 'fgsm'))}")


#: modules of this package that define no named attack (every other one registers its attacks when
#: imported: ``autoattack`` registers "autoattack" and "apgd-monitor")
SUPPORT_MODULES = frozenset({"base", "pgd", "fat"})

# last, so that an attack's module may use anything defined above (ATTACKS, Attack, pgd, ...)
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module}")
