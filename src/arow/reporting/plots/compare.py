"""Runs side by side: :func:`compare_runs` draws several run folders into a folder of its own
(``compare_*.png``), and :func:`plot_runs` is ``arow plot``: each run's figures, then the comparison.

>>> compare_runs(["runs/fmnist-arow-s0", "runs/fmnist-trades-s0"], "figures")  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ...runs.rundir import RunDir
from ..labels import attack_label
from ..tables import Run, load_run
from . import common
from .common import C_OTHER
from .eps import eps_curve, eps_curve_table
from .run import plot_run

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

#: robust accuracy a comparison shows: the first of these every compared run has (then any other)
ROBUST_ORDER = ("autoattack", "worst_case", "pgd20", "cw", "fgsm")
COMPARE_CURVES, COMPARE_PER_CLASS, COMPARE_WEIGHTS, COMPARE_TRADEOFF = (
    "compare_curves.png", "compare_per_class.png", "compare_weights.png", "compare_tradeoff.png")


def compare_runs(paths: Sequence[PathLike], out_dir: PathLike) -> list[Path]:
    """Comparison figures of several run folders, written into ``out_dir`` (not one of the runs):

    ``compare_curves.png`` (validation clean and robust accuracy per epoch, one colour per run),
    ``compare_per_class.png`` (per-class robust test accuracy from each ``eval.json``),
    ``compare_weights.png`` (the per-example weight's distribution at the last epoch, for the runs
    that log one) and ``compare_tradeoff.png`` (final clean against robust test accuracy, one point
    per run). A run without the data a figure needs is left out of it, with a log line and a note
    in the figure; a figure no run has data for is not written.

    >>> compare_runs(["runs/fmnist-arow-s0", "runs/fmnist-trades-s0"], "figures")  # doctest: +SKIP
    [PosixPath('figures/compare_curves.png'), ...]
    """
    runs = [load_run(p) for p in paths]
    if not runs:
        raise ValueError("compare_runs needs at least one run folder")
    out = check_compare_out(out_dir, paths)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(runs)
    cmap = common.colormap("tab10" if len(runs) <= 10 else "tab20")
    colours = [cmap(i % cmap.N) for i in range(len(runs))]
    written = []
    for draw in (_compare_curves, _compare_per_class, _compare_weights, _compare_tradeoff):
        path = draw(runs, labels, colours, out)
        if path is not None:
            written.append(path)
    return written


def plot_runs(runs: Sequence[PathLike], out_dir: Optional[PathLike] = None, *,
              eps_curve_args: Optional[dict[str, Any]] = None, echo: Callable[[str], None] = print) -> list[Path]:
    """``arow plot``: every run's PNGs (:func:`plot_run`), each run's eps curve first when ``eps_curve_args``
    (for :func:`eps_curve`) are given, then with two or more runs the comparison figures (:func:`compare_runs`)
    in ``out_dir`` (default: the current directory). A wrong run folder or ``out_dir`` fails before any figure
    is drawn. ``echo`` gets each eps-curve table and one line per file written; returns the files.

    Args:
        runs: run folders
        out_dir: with two or more run folders: the folder for the comparison figures compare_*.png
            (default: the current directory; never one of the run folders)
        eps_curve_args: keyword arguments of :func:`eps_curve`
        echo: where the tables and the names of the files written go
    """
    if len(runs) == 1 and out_dir is not None:
        log.warning("--out is used with two or more run folders (the comparison figures); %s gets its own PNGs",
                    runs[0])
    out = Path(out_dir) if out_dir is not None else Path.cwd()
    if len(runs) > 1:
        for run in runs:
            load_run(run)
        check_compare_out(out, runs)
    written: list[Path] = []
    for run in runs:
        if eps_curve_args is not None:
            echo(f"\n{run}: " + eps_curve_table(eps_curve(run, **eps_curve_args)))
        paths = plot_run(run)
        for path in paths:
            echo(f"written {path}")
        written += paths
    if len(runs) > 1:
        paths = compare_runs(runs, out)
        for path in paths:
            echo(f"written {path}")
        if not paths:
            echo(f"no comparison figure: none of the {len(runs)} runs has the data for one (see the log)")
        written += paths
    return written


def check_compare_out(out_dir: PathLike, paths: Sequence[PathLike]) -> Path:
    """``out_dir`` as a Path, refused (ValueError) if it is a run folder, listed or not, or a file."""
    out = Path(out_dir)
    if out.resolve() in {Path(p).resolve() for p in paths} or (out / RunDir.CONFIG).is_file():
        raise ValueError(f"--out {out} is a run folder; the comparison figures go to a folder of their own "
                         f"(e.g. --out figures)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    return out


def run_labels(runs: Sequence[Run]) -> list[str]:
    """Legend names of runs: the folder names, else parent/folder, else method and seed as well."""
    names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        names = [f"{r.path.parent.name}/{r.path.name}" for r in runs]
    if len(set(names)) < len(names):
        names = [f"{n} ({r.config.get('method')}, seed {r.config.get('seed')}) #{i + 1}"
                 for i, (n, r) in enumerate(zip(names, runs))]
    return names


def _robust_key(dicts: Sequence[dict[str, Any]]) -> Optional[str]:
    """The robust accuracy every mapping in ``dicts`` has, in :data:`ROBUST_ORDER` (None if none is common)."""
    common = set.intersection(*(set(d) for d in dicts)) - {"clean"} if dicts else set()
    return next((k for k in ROBUST_ORDER if k in common), min(common) if common else None)


def _compare_curves(runs: Sequence[Run], labels: Sequence[str], colours: Sequence[Any], out: Path) -> Optional[Path]:
    from matplotlib.lines import Line2D

    shown = [(r, lab, c) for r, lab, c in zip(runs, labels, colours) if any("val_pgd_acc" in m for m in r.metrics)]
    missing = [lab for r, lab in zip(runs, labels) if all(r is not s for s, _, _ in shown)]
    for r, lab in zip(runs, labels):
        if lab in missing:
            log.info("%s: no validation records in metrics.jsonl; left out of %s", r.path, COMPARE_CURVES)
    if not shown:
        log.info("no run has validation records; no %s", COMPARE_CURVES)
        return None
    attacks = {r.val_attack for r, _, _ in shown}
    val = attack_label(next(iter(attacks))) if len(attacks) == 1 else "robust"
    fig = common.figure(11, 5.5)
    ax = fig.subplots()
    averaged = False
    for r, lab, c in shown:
        mk = dict(marker="o", markersize=3) if len(r.metrics) <= 30 else {}
        for key, ls, lw in (("val_pgd_acc", "-", 1.8), ("val_clean_acc", "--", 1.2)):
            pts = [(rec["epoch"], 100 * rec[key]) for rec in r.metrics if key in rec]
            if pts:
                ax.plot(*zip(*pts), color=c, ls=ls, lw=lw, label=lab if key == "val_pgd_acc" else None, **mk)
        for pre in ("swa_", "ema_"):
            pts = [(rec["epoch"], 100 * rec[f"{pre}val_pgd_acc"]) for rec in r.metrics if f"{pre}val_pgd_acc" in rec]
            if pts:
                averaged = True
                ax.plot(*zip(*pts), color=c, ls=":", lw=1.6)
    runs_legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                            title="run (colour)", title_fontsize=8)
    ax.add_artist(runs_legend)
    styles = [Line2D([], [], color="black", ls="-", lw=1.8, label=f"val {val}"),
              Line2D([], [], color="black", ls="--", lw=1.2, label="val clean")]
    if averaged:
        styles.append(Line2D([], [], color="black", ls=":", lw=1.6, label=f"SWA/EMA model val {val}"))
    ax.legend(handles=styles, fontsize=8, loc="lower left", bbox_to_anchor=(1.02, 0.0), borderaxespad=0,
              title="line", title_fontsize=8)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", ylim=(0, 100),
           title="validation accuracy per epoch (held-out split of each run's training set)"
                 + common.left_out("no validation records", missing))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    return common.save(fig, out / COMPARE_CURVES)


def _compare_per_class(runs: Sequence[Run], labels: Sequence[str], colours: Sequence[Any],
                       out: Path) -> Optional[Path]:
    have, missing = [], []
    for r, lab, c in zip(runs, labels, colours):
        pc = (r.eval or {}).get("per_class") or {}
        if pc:
            have.append((r, lab, c, pc))
        else:
            missing.append(lab)
            log.info("%s: no evaluation with per-class numbers (run `arow eval` first); left out of %s",
                     r.path, COMPARE_PER_CLASS)
    if not have:
        log.info("no run has per-class numbers; no %s", COMPARE_PER_CLASS)
        return None
    n_cls = len(next(iter(have[0][3].values())))
    other = [lab for _, lab, _, pc in have if len(next(iter(pc.values()))) != n_cls]
    have = [h for h in have if h[1] not in other]
    attack = _robust_key([pc for *_, pc in have])
    fig = common.figure(min(max(8.0, 0.35 * n_cls * len(have) + 3), 40), 5.0)
    ax = fig.subplots()
    x = np.arange(n_cls)
    width = 0.8 / len(have)
    for i, (r, lab, c, pc) in enumerate(have):
        key = attack or next((k for k in ROBUST_ORDER if k in pc),
                             min((k for k in pc if k != "clean"), default="clean"))
        vals = [100 * (v if v is not None else math.nan) for v in pc[key]]
        acc = (r.eval or {}).get("accuracy", {}).get(key)
        name = attack_label(key)
        label = lab + (f": {name}" if attack is None else "") + (f" ({100 * acc:.1f}% overall" if acc is not None
                                                                 else "")
        label += (f", n={r.eval.get('n')}, subset)" if r.subset else ")") if acc is not None else ""
        ax.bar(x + (i - (len(have) - 1) / 2) * width, vals, width, color=c, label=label)
    datasets = {str((r.eval or {}).get("dataset") or r.config.get("dataset")) for r, *_ in have}
    names = common.class_names(next(iter(datasets))) if len(datasets) == 1 else []
    ax.set_xticks(x, names if len(names) == n_cls else [str(i) for i in range(n_cls)],
                  rotation=30 if n_cls <= 20 else 90, ha="right" if n_cls <= 20 else "center")
    what = attack_label(attack) if attack else "each run's robust"
    ax.set(xlabel="class", ylabel=f"{what} test accuracy (%)", ylim=(0, 118))
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(have), 4), loc="upper left")
    ax.set_title(f"per-class {what} accuracy of each run's final model"
                 + (" (subset evaluations marked n=N)" if any(r.subset for r, *_ in have) else "")
                 + common.left_out("no per-class numbers", missing)
                 + common.left_out(f"not {n_cls} classes", other), fontsize=10)
    return common.save(fig, out / COMPARE_PER_CLASS)


def _compare_weights(runs: Sequence[Run], labels: Sequence[str], colours: Sequence[Any],
                     out: Path) -> Optional[Path]:
    have, missing = [], []
    for r, lab, c in zip(runs, labels, colours):
        last = r.metrics[-1] if r.metrics else {}
        if last.get("weight_hist"):
            have.append((r, lab, c, last))
        else:
            missing.append(lab)
            log.info("%s: no per-example weight at its last epoch (method %s); left out of %s", r.path,
                     r.config.get("method"), COMPARE_WEIGHTS)
    if not have:
        log.info("no run logs a per-example weight; no %s", COMPARE_WEIGHTS)
        return None
    fig = common.figure(10, 5.0)
    ax = fig.subplots()
    for r, lab, c, last in have:
        hist = np.asarray(last["weight_hist"], dtype=float)
        share = 100 * hist / max(hist.sum(), 1.0)
        centres = (np.arange(len(hist)) + 0.5) / len(hist)
        mean = last.get("train_weight_mean")
        ax.plot(centres, share, color=c, marker="o", markersize=3, lw=1.6,
                label=f"{lab}: {common.weight_label(r)}, epoch {last['epoch']}"
                      + (f", mean {mean:.2f}" if isinstance(mean, (int, float)) else ""))
    ax.axvline(0.5, color=C_OTHER, lw=0.8, ls="--")
    bins = len(have[0][3]["weight_hist"])
    ax.set(xlabel=f"per-example weight (centres of {bins} bins over [0, 1])", ylabel="% of training examples",
           xlim=(0, 1), title="distribution of the per-example weight at each run's last epoch"
                             + common.left_out("no per-example weight", missing))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return common.save(fig, out / COMPARE_WEIGHTS)


def _compare_tradeoff(runs: Sequence[Run], labels: Sequence[str], colours: Sequence[Any],
                      out: Path) -> Optional[Path]:
    """Final clean against robust test accuracy, one point per run; a run evaluated on a subset only
    (``eval_n<N>.json``) is a hollow point labelled ``n=N, subset``, never passed off as a full-test-set one."""
    have = [(r, lab, c) for r, lab, c in zip(runs, labels, colours)
            if r.eval is not None and "clean" in r.eval.get("accuracy", {}) and len(r.eval["accuracy"]) > 1]
    missing = [lab for r, lab in zip(runs, labels) if all(r is not s for s, _, _ in have)]
    for r, lab in zip(runs, labels):
        if lab in missing:
            log.info("%s: no evaluation with clean and robust accuracy (run `arow eval` first); left out of %s",
                     r.path, COMPARE_TRADEOFF)
    if not have:
        log.info("no run has an evaluation; no %s", COMPARE_TRADEOFF)
        return None
    attack = _robust_key([r.eval["accuracy"] for r, _, _ in have])
    fig = common.figure(7.5, 5.5)
    ax = fig.subplots()
    sizes = {(r.eval.get("n"), r.eval.get("test_set_size")) for r, _, _ in have}
    for r, lab, c in have:
        acc = r.eval["accuracy"]
        key = attack or next((k for k in ROBUST_ORDER if k in acc), min(k for k in acc if k != "clean"))
        x, y = 100 * acc["clean"], 100 * acc[key]
        extra = [] if attack else [attack_label(key)]
        if r.subset:
            extra.append(f"n={r.eval.get('n')}, subset")
        elif len(sizes) > 1:
            extra.append(f"n={r.eval.get('n')}")
        face = "white" if r.subset else c
        ax.scatter([x], [y], facecolor=face, edgecolor=c if r.subset else "black", linewidth=1.5 if r.subset else 0.5,
                   s=48, zorder=3, label=lab + (f" ({', '.join(extra)})" if extra else ""))
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    what = attack_label(attack) if attack else "robust (each run's first attack)"
    if len(sizes) == 1:
        n, full = next(iter(sizes))
        on = f"{n} of {full} test images" + (" (SUBSET)" if any(r.subset for r, _, _ in have) else "")
    else:
        on = "test sets of different sizes (n per run)"
    if any(r.subset for r, _, _ in have):
        on += "; hollow: evaluated on the first n test images only"
    ax.set(xlabel="clean test accuracy (%)", ylabel=f"{what} test accuracy (%)")
    ax.set_title(f"clean vs {what} accuracy of each run's final model\n{on}"
                 + common.left_out("no evaluation", missing), fontsize=10)
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return common.save(fig, out / COMPARE_TRADEOFF)
