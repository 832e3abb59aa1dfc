"""Which of a run's models is the one it reports: the SWA average if SWA ran, else the EMA if it is on,
else the weights of the last epoch. The Trainer (``final.pt``, model selection for ``best.pt``), the
report, the study, the plots and the progress lines all ask here.

>>> reported_model(["ema"]), reported_model([])
('ema', 'last')
>>> reported_prefix({"val_pgd_acc": 0.4, "swa_val_pgd_acc": 0.5})
'swa_'
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

#: the weight averages a run may keep, in the order that decides which one it reports
AVERAGES = ("swa", "ema")


def reported_model(averaged: Iterable[str]) -> str:
    """``"swa"``, ``"ema"`` or ``"last"``: the model a run reports, given the averages that ran
    (hold weights: at least one update)."""
    ran = set(averaged)
    return next((name for name in AVERAGES if name in ran), "last")


def reported_prefix(record: Mapping[str, Any], key: str = "val_pgd_acc") -> str:
    """The prefix of the reported model's numbers in an epoch record of ``metrics.jsonl``: ``"swa_"`` or
    ``"ema_"`` when that average was validated that epoch (``<prefix>_<key>`` is in the record), else ``""``."""
    name = reported_model(a for a in AVERAGES if f"{a}_{key}" in record)
    return "" if name == "last" else f"{name}_"


def selection_key(record: Mapping[str, Any]) -> str:
    """The key of an epoch record that model selection (``best.pt``) scores: the reported model's
    robust validation accuracy (``swa_val_pgd_acc``, ``ema_val_pgd_acc`` or ``val_pgd_acc``)."""
    return reported_prefix(record) + "val_pgd_acc"
