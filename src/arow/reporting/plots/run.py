"""The figures of one run, written as PNGs into its folder: ``per_class.png`` (test accuracy per class
from its evaluation), ``weights.png`` (how the per-example weight of ARoW or MART is distributed
over training), and :func:`plot_run`: every figure the folder has data for (with ``curves.png``
and ``eps_curve.png``).

>>> paths = plot_run("runs/fmnist-arow-s0")  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ...runs.rundir import RunDir
from ..labels import attack_label, attack_order
from ..tables import load_run
from . import common
from .common import C_CLEAN, C_OTHER
from .curves import plot_curves
from .eps import plot_eps_curve

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- per-class accuracy
def plot_per_class(run_dir: PathLike) -> Optional[Path]:
    """``per_class.png``: per-class test accuracy, clean next to each attack of the run's evaluation
    (``eval.json``, else its largest subset evaluation, marked as such in the title).

    >>> plot_per_class("runs/fmnist-arow-s0")  # doctest: +SKIP
    PosixPath('runs/fmnist-arow-s0/per_class.png')
    """
    run = load_run(run_dir)
    ev = run.eval
    if ev is None or not ev.get("per_class"):
        log.debug("%s: no evaluation with per-class numbers; no per_class.png (run `arow eval` first)", run.path)
        return None
    pc = ev["per_class"]
    names = [k for k in attack_order(list(pc)) if k != "worst_case"]
    n_cls = len(next(iter(pc.values())))
    labels = common.class_names(str(ev.get("dataset") or run.config.get("dataset")))
    labels = labels if len(labels) == n_cls else [str(i) for i in range(n_cls)]
    fig = common.figure(min(max(8.0, 0.75 * n_cls + 2), 40), 4.8)
    ax = fig.subplots()
    x = np.arange(n_cls)
    width = 0.8 / len(names)
    cmap = common.colormap("Reds")
    for i, k in enumerate(names):
        color = C_CLEAN if k == "clean" else cmap(0.45 + 0.5 * (i / max(len(names) - 1, 1)))
        vals = [100 * (v if v is not None else math.nan) for v in pc[k]]
        acc = ev.get("accuracy", {}).get(k)
        name = attack_label(k)
        label = f"{name} ({100 * acc:.1f}% overall)" if acc is not None else name
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, color=color, label=label)
    ax.set_xticks(x, labels, rotation=30 if n_cls <= 20 else 90, ha="right" if n_cls <= 20 else "center")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 118), xlabel="class")  # headroom: the legend sits above 100
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(names), loc="upper left")
    n = f"{ev.get('n')} of {ev.get('test_set_size')} test images" + (
        f" (SUBSET: {run.eval_file.name if run.eval_file else RunDir.EVAL})" if run.subset else "")
    ax.set_title(f"Per-class accuracy: {common.protocol(run)}\n{n}", fontsize=10)
    return common.save(fig, RunDir(run.path).file(RunDir.PER_CLASS))


# --------------------------------------------------------------------------- the weight distribution
def plot_weights(run_dir: PathLike) -> Optional[Path]:
    """``weights.png``: where the per-example weight falls over training (ARoW, MART).

    Left: heat map of the share of training examples per weight bin and epoch. Right: the share
    of examples with weight > 0.5 and the share of the total weight they carry (for ARoW: the
    examples the training attack probably fools, i.e. the less robust ones). Returns None (with
    an info log) for methods without a per-example weight.

    >>> plot_weights("runs/fmnist-arow-s0")  # doctest: +SKIP
    PosixPath('runs/fmnist-arow-s0/weights.png')
    """
    run = load_run(run_dir)
    rows = [r for r in run.metrics if r.get("weight_hist")]
    if not rows:
        log.info("%s: method %s logs no per-example weight; no weights.png", run.path, run.config.get("method"))
        return None
    ep = np.array([r["epoch"] for r in rows])
    hist = np.array([r["weight_hist"] for r in rows], dtype=float)
    share = hist / np.maximum(hist.sum(1, keepdims=True), 1.0)
    bins = hist.shape[1]
    centres = (np.arange(bins) + 0.5) / bins
    mass = share * centres  # the weight the examples of each bin carry (bin centre * count)
    high = centres > 0.5
    frac_high = share[:, high].sum(1)
    mass_high = mass[:, high].sum(1) / np.maximum(mass.sum(1), 1e-12)
    label = common.weight_label(run)

    fig = common.figure(12, 4.8)
    ax_map, ax_share = fig.subplots(1, 2, width_ratios=[1.4, 1])
    extent = (ep[0] - 0.5, ep[-1] + 0.5, 0.0, 1.0)  # one column per epoch, bins over [0, 1]
    from matplotlib.colors import PowerNorm

    # empty bins white, so "a few examples" stays distinguishable from "none"; a square-root
    # colour scale keeps the thin tails (few examples, but heavily weighted) visible
    cmap = common.colormap("magma_r").with_extremes(bad="white")
    im = ax_map.imshow(np.ma.masked_equal(100 * share.T, 0), origin="lower", aspect="auto", extent=extent,
                       cmap=cmap, interpolation="nearest", norm=PowerNorm(0.5, vmin=0))
    mean = [r.get("train_weight_mean", math.nan) for r in rows]
    ax_map.plot(ep, mean, color="#00bfff", lw=1.8, marker="o" if len(ep) <= 30 else None, markersize=3,
                label="mean weight")
    ax_map.axhline(0.5, color=C_OTHER, lw=0.8, ls="--")
    ax_map.legend(fontsize=8, loc="lower left")
    ax_map.set(title=f"distribution of the {label}", xlabel="epoch", ylabel=f"weight ({bins} bins over [0, 1])")
    ax_map.xaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(im, ax=ax_map, label="% of training examples in the bin")

    mk = dict(marker="o", markersize=3) if len(ep) <= 30 else {}
    ax_share.plot(ep, 100 * frac_high, color=C_OTHER, label="% of examples with weight > 0.5", **mk)
    ax_share.plot(ep, 100 * mass_high, color="purple", lw=2, label="% of the total weight they carry", **mk)
    ax_share.set(ylim=(0, 105), xlabel="epoch", ylabel="%", title="share of the total weight on weight > 0.5")
    ax_share.xaxis.get_major_locator().set_params(integer=True)
    ax_share.grid(alpha=0.3)
    what = {"mart": "p_y(x) < 0.5: misclassified clean"}.get(str(run.config.get("method")), "p_y(x_adv) < 0.5: less robust")
    if (run.resolved.get("method_args") or {}).get("weight") == "cow":
        what = "p_y(x) > 0.5: well classified clean"
    leg = ax_share.legend(fontsize=8, loc="lower left", title=f"weight > 0.5 <=> {what}", title_fontsize=8)
    leg.get_title().set_color("#444444")
    fig.suptitle(f"Per-example weight over training: {common.protocol(run)}", fontsize=11)
    return common.save(fig, RunDir(run.path).file(RunDir.WEIGHTS))


def plot_run(run_dir: PathLike) -> list[Path]:
    """Every picture the run folder has data for: curves, per-class accuracy, weights, eps curve.

    >>> plot_run("runs/fmnist-arow-s0")  # doctest: +SKIP
    [PosixPath('runs/fmnist-arow-s0/curves.png'), ...]
    """
    run = load_run(run_dir)
    out = [plot_curves(run.path), plot_per_class(run.path), plot_weights(run.path)]
    if run.record is not None and run.record.eps_curve is not None:
        out.append(plot_eps_curve(run.path))
    return [p for p in out if p is not None]
