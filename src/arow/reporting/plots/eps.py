"""Robust accuracy against the attack radius: :func:`eps_curve_table` prints what
:func:`arow.evaluation.curve.eps_curve` computed (``eps_curve.json``; re-exported here for
``arow plot --eps-curve``) and :func:`plot_eps_curve` draws ``eps_curve.png`` from the file."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Union

from ...evaluation.curve import EPS_FACTORS, eps_curve  # noqa: F401  (re-exported: arow plot --eps-curve)
from ...runs.rundir import RunDir
from ...threat import format_eps
from ..labels import attack_label
from ..tables import load_run, markdown_table
from . import common
from .common import C_OTHER, C_ROBUST

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def eps_curve_table(curve: dict[str, Any]) -> str:
    """The result of :func:`eps_curve` as text: a title line, then a Markdown table of the points."""

    rows = [[f"{p['eps']:.4g}", f"{p['factor']:g}", f"{100 * p['accuracy']:.2f}%"] for p in curve["points"]]
    return (f"{curve['attack']} accuracy vs eps on {curve['n']} of {curve['test_set_size']} test images"
            f"{' (SUBSET)' if curve['subset'] else ''}\n" + markdown_table(rows, ["eps", "x train eps", "accuracy"]))


def plot_eps_curve(run_dir: PathLike) -> Path:
    """``eps_curve.png`` from the run's ``eps_curve.json`` (see :func:`eps_curve`).

    >>> plot_eps_curve("runs/fmnist-arow-s0")  # doctest: +SKIP
    PosixPath('runs/fmnist-arow-s0/eps_curve.png')
    """
    run = load_run(run_dir)
    d = run.record.eps_curve if run.record is not None else None
    if d is None:
        path = RunDir(run.path).file(RunDir.EPS_CURVE)
        raise FileNotFoundError(f"{path} does not exist; compute it with `arow plot {run.path} --eps-curve`")
    pts = d["points"]
    xs, ys = [p["eps"] for p in pts], [100 * p["accuracy"] for p in pts]
    attack = attack_label(d["attack"])
    fig = common.figure(8.5, 5.2)
    ax = fig.subplots()
    ax.plot(xs, ys, color=C_ROBUST, marker="o", lw=2, label=f"{attack} accuracy (eps = 0: clean)")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.axvline(d["train_eps"], color=C_OTHER, ls="--", lw=1, label=f"training eps = {format_eps(d['train_eps'])}")
    ax.set(xlabel=f"{'L2' if d.get('norm') == 'l2' else 'L-inf'} radius eps of the evaluation attack",
           ylabel="test accuracy (%)", ylim=(0, 105))
    top = ax.secondary_xaxis("top", functions=(lambda e: e / d["train_eps"], lambda f: f * d["train_eps"]))
    top.set_xlabel("eps / training eps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    n = f"{d['n']} of {d['test_set_size']} test images" + (" (SUBSET)" if d.get("subset") else "")
    ax.set_title(f"Robust accuracy vs eps: {common.protocol(run, 'trained at eps')}\n"
                 f"{attack} (CE, step eps/4, random start) on {n}, {d['checkpoint']} checkpoint", fontsize=9)
    return common.save(fig, RunDir(run.path).file(RunDir.EPS_CURVE_PNG))
