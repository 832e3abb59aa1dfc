"""How reports, figures and study results name things: attacks and metrics, methods and their papers.

One owner for every label, so a column of ``arow report``, a legend of ``arow plot`` and a bar of
a study figure say the same: ``pgd20`` is "PGD-20" everywhere, ``cw`` is "CW-30" (``cw`` alone is
30 steps), ``autoattack`` "AutoAttack". Method names and papers come from the method classes'
``paper`` and ``url`` (:mod:`arow.methods`): a new method file is named and cited with no edit here.

>>> attack_label("pgd20"), attack_label("cw"), attack_label("pgd50r5"), attack_label("autoattack")
('PGD-20', 'CW-30', 'PGD-50 (5 restarts)', 'AutoAttack')
>>> metric_label("autoattack", n=1000), metric_label("val_robust")
('AutoAttack (first 1000)', 'validation robust')
>>> method_label("pgd-at"), method_label("arow-awp"), method_label("natural")
('PGD-AT', 'ARoW-AWP', 'natural')
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from ..methods import METHODS

#: the attacks in the paper's column order; any other attack comes after these, by name
ATTACK_ORDER = ("clean", "fgsm", "pgd20", "cw", "autoattack", "worst_case")
#: names that are not ``pgd<K>``/``cw<K>``
_FIXED = {"clean": "clean", "fgsm": "FGSM", "autoattack": "AutoAttack", "apgd-monitor": "APGD monitor (not AutoAttack)",
          "worst_case": "worst case", "val_robust": "validation robust", "val_clean": "validation clean"}
_SEARCH = re.compile(r"^(pgd|cw)(\d+)?(?:r(\d+))?$")
_CW_STEPS = 30  # ``cw`` alone: arow.attacks' default


def attack_label(name: str) -> str:
    """The display name of an evaluation attack (``pgd20`` -> ``PGD-20``); an unknown name as it is."""
    if name in _FIXED:
        return _FIXED[name]
    m = _SEARCH.match(name)
    if m is None:
        return name
    kind, steps, restarts = m.groups()
    label = f"{kind.upper()}-{steps or (_CW_STEPS if kind == 'cw' else 20)}"
    return label + (f" ({restarts} restarts)" if restarts and int(restarts) > 1 else "")


def metric_label(name: str, *, n: Optional[int] = None) -> str:
    """The display name of a metric of a report or study (an attack's accuracy, ``val_robust``, ...);
    ``n``: it was measured on the first ``n`` test images only, said in the label."""
    return attack_label(name) + (f" (first {n})" if n is not None else "")


def attack_order(names: Sequence[str]) -> list[str]:
    """``names`` in the paper's column order (:data:`ATTACK_ORDER`), the others after them by name."""
    first = [a for a in ATTACK_ORDER if a in names]
    return first + sorted(set(names) - set(first))


def subset_text(n: Optional[int], full: Optional[int]) -> str:
    """How a number on part of the test set is marked next to it: ``"(n=20)"``; empty for a full test set."""
    if n is None or (full is not None and n >= full):
        return ""
    return f"(n={n})"


# --------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Paper:
    """A method's paper, read from its class's ``paper`` (``"Authors: Title, Venue Year"``) and ``url``."""

    authors: str
    title: str
    venue: str
    url: str


def method_label(name: str) -> str:
    """The display name of a training method: its class name hyphenated as its registered name
    (``pgd-at`` -> ``PGD-AT``, ``arow`` -> ``ARoW``); the registered name for a plain word or an
    unknown method."""
    if name not in METHODS:
        return name
    display = METHODS.get(name).__name__  # AWP variants are built classes named <Inner>AWP
    if display.lower() != name.replace("-", "").lower() or display == name.capitalize():
        return name
    out, i = [], 0
    for part in name.split("-"):
        out.append(display[i:i + len(part)])
        i += len(part)
    return "-".join(out)


def method_paper(name: str) -> Optional[Paper]:
    """The paper of training method ``name`` (None for an unknown method or one without a paper)."""
    if name not in METHODS:
        return None
    cls = METHODS.get(name)
    cite, url = getattr(cls, "paper", None), getattr(cls, "url", None)
    if not cite:
        return None
    authors, _, rest = cite.partition(": ")
    title, _, venue = rest.rpartition(", ") if ", " in rest else (rest, "", "")
    if not rest:  # no "Authors: " part: the whole citation is the title
        authors, title, venue = "", cite, ""
    return Paper(authors.strip(), title.strip(), venue.strip(), url or "")


def method_names() -> list[str]:
    """Every registered training method."""
    return list(METHODS.names())
