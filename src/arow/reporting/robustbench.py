"""Export an evaluation as a RobustBench model-info JSON (``model_info/<dataset>/<Linf|L2>/<Name>.json``).

RobustBench's files hold strings: accuracies in percent with two decimals, eps as ``"8/255"``
for the radii written that way (:func:`arow.threat.format_eps`: 0.2 stays ``"0.2"``). We add
``n_test_points``, ``threat_model`` and the AutoAttack settings, and mark the entry ``unreliable``
when a guard tripped or the AutoAttack budget was not the standard one.

>>> info = model_info({"accuracy": {"clean": 0.8492, "autoattack": 0.5308}, "eps": 8 / 255,
...                    "n": 10000, "test_set_size": 10000, "dataset": "cifar10", "method": "trades",
...                    "model": "wrn-34-10", "attack_settings": {"autoattack": {"standard": True,
...                    "version": "standard", "seed": 0, "pyautoattack_version": "0.2.0"}}})
>>> info["eps"], info["clean_acc"], info["autoattack_acc"], info["unreliable"]
('8/255', '84.92', '53.08', False)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

# RobustBench's spelling of eps ("8/255") is the report's
from ..threat import format_eps
from .labels import method_label, method_paper
from ..runs.checkpoint import atomic_write_text, dump_json


def paper_entry(method: str) -> dict[str, str]:
    """RobustBench's fields of the paper behind training ``method`` (``link``, ``name``: the title,
    ``authors``, ``venue``), read from the method class's ``paper`` and ``url`` when the entry is
    built (a new method file is cited with no edit here); empty for a method without a paper."""
    p = method_paper(method)
    return {} if p is None else {"link": p.url, "name": p.title, "authors": p.authors, "venue": p.venue}


ARCHITECTURES = {"small-cnn": "SmallCNN (4 conv + 3 fc)", "resnet18": "ResNet-18",
                 "preact-resnet18": "PreActResNet-18", "wrn-34-10": "WideResNet-34-10",
                 "wrn-28-10": "WideResNet-28-10", "wrn-70-16": "WideResNet-70-16"}


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def model_info(ev: dict[str, Any], *, name: Optional[str] = None, link: Optional[str] = None,
               authors: Optional[str] = None, venue: Optional[str] = None, architecture: Optional[str] = None,
               reported: Optional[float] = None, footnote: Optional[str] = None) -> dict[str, Any]:
    """RobustBench's model-info record for an ``eval.json`` dict holding an ``autoattack`` result.

    ``reported`` (a fraction) defaults to our own AutoAttack accuracy; the keyword arguments
    override what is looked up from the training method's paper.
    """
    acc = ev.get("accuracy") or {}
    if "autoattack" not in acc:
        raise ValueError("no AutoAttack result in this evaluation: run `arow eval ... --attacks clean,autoattack` "
                         "(RobustBench's robust accuracy is AutoAttack's)")
    if "clean" not in acc:
        raise ValueError("no clean accuracy in this evaluation: include 'clean' in --attacks")
    paper = paper_entry(str(ev.get("method")))
    aa = (ev.get("attack_settings") or {}).get("autoattack", {})
    n, full = int(ev.get("n", 0)), int(ev.get("test_set_size", ev.get("n", 0)))
    guards_failed = [g["name"] for g in ev.get("guards") or [] if not g.get("passed", True)]
    notes = [f"Reimplementation trained and evaluated with arow (method {ev.get('method')}), not the authors' "
             f"checkpoint."] if paper else []
    order = list(ev.get("attacks") or {})  # evaluation order: the cascade ran what came first
    before = [k for k in order[: order.index("autoattack")] if k != "clean"] if "autoattack" in order else []
    if before:
        notes.append(f"AutoAttack ran as the last stage of a cascade after {', '.join(before)}: the robust "
                     f"accuracy is the worst case per example over all of them (never above AutoAttack alone).")
    if not aa.get("standard", False):
        notes.append("NON-STANDARD AutoAttack settings: not comparable with leaderboard entries.")
    if n < full:
        notes.append(f"Evaluated on a SUBSET: {n} of {full} test points.")
    if guards_failed:
        notes.append(f"Robustness guards tripped: {', '.join(guards_failed)}.")
    if footnote:
        notes.insert(0, footnote)
    return {
        "link": link if link is not None else paper.get("link", ""),
        "name": name if name is not None else paper.get("name", f"{method_label(str(ev.get('method')))} "
                                                                f"({ev.get('model')})"),
        "authors": authors if authors is not None else paper.get("authors", ""),
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": ev.get("dataset"),
        "venue": venue if venue is not None else paper.get("venue", ""),
        "architecture": architecture or ARCHITECTURES.get(str(ev.get("model")), str(ev.get("model"))),
        "eps": format_eps(float(ev["eps"])),
        "clean_acc": _pct(acc["clean"]),
        "reported": _pct(reported if reported is not None else acc["autoattack"]),
        "autoattack_acc": _pct(acc["autoattack"]),
        "footnote": " ".join(notes) or None,
        "unreliable": bool(guards_failed) or not aa.get("standard", False),
        "n_test_points": n,
        "threat_model": "L2" if ev.get("norm") == "l2" else "Linf",  # RobustBench's leaderboards: Linf, L2
        "autoattack_version": aa.get("version"),
        "autoattack_seed": aa.get("seed"),
        "pyautoattack_version": aa.get("pyautoattack_version"),
    }


def write_model_info(info: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write ``info`` as indented JSON (atomically) and return the path."""

    path = Path(path)
    atomic_write_text(dump_json(info) + "\n", path)
    return path
