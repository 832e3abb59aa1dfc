"""The figures of a study (:func:`arow.study.collect.collect`'s result dict), written into its folder.

``tradeoff.png`` (clean against robust accuracy, one point per run), ``frontier.png`` (when a method
has several rows that differ in one hyper-parameter: the means with their 95% intervals on both axes,
one line per method in the order of that hyper-parameter), ``bars.png`` (mean ± sample
std per metric), ``per_class.png`` and ``eps_curve.png`` (means over seeds). What holds in all of
them: one colour per row of the study, the same in every figure; a row without finished runs is
not drawn and has no legend entry; accuracy axes start at 0; a mean over one seed has no error
bar and says ``n=1``; AutoAttack on the first N test images is its own panel, named "first N",
never a bar beside the full-test-set attacks; and no metric is ever plotted against one measured on
other images: the clean/robust figures put AutoAttack against clean accuracy on the same first N
images (each cell's ``on_aa_images``), both axes saying "(first N)", and leave out, with a line in
the log and in the panel's title, a run whose evaluation stored no per-example verdicts to give it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ...methods import METHODS
from ...runs.studydir import StudyDir
from ..labels import attack_label, metric_label
from ..stats import summarize
from . import common
from .common import C_OTHER

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

#: study metrics measured on part of the test set only (the first ``aa_n`` images)
SUBSET_METRICS = ("autoattack",)


def study_plots(result: dict[str, Any], out_dir: PathLike) -> list[Path]:
    """The comparison figures of a study (:func:`arow.study.collect.collect`'s result), into ``out_dir``:
    ``tradeoff.png``, ``bars.png``, ``per_class.png`` and ``eps_curve.png`` (see the module docstring);
    a figure without data is not written."""
    out_dir = Path(out_dir)
    done = [c for c in result["cells"] if c["status"] != "failed" and "clean" in c["accuracy"]]
    if not done:
        return []
    colour = study_colours(result)
    written = [_tradeoff(result, done, colour, out_dir), _frontier(result, colour, out_dir), _bars(result, colour, out_dir),
               _per_class(result, done, colour, out_dir), _eps_curve(result, done, colour, out_dir)]
    return [p for p in written if p is not None]


def study_colours(result: dict[str, Any]) -> dict[str, Any]:
    """One colour per row of the study, by its place in the spec (the same in every figure)."""
    labels = [r["label"] for r in result["rows"]]
    cmap = common.colormap("tab10" if len(labels) <= 10 else "tab20")
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def metric_text(name: str, spec: dict[str, Any]) -> str:
    """How a study figure names a metric: AutoAttack with the number of test images it ran on."""
    return metric_label(name, n=spec.get("aa_n") if name in SUBSET_METRICS else None)


def _tradeoff(result: dict[str, Any], done: Sequence[dict[str, Any]], colour: dict[str, Any],
              out_dir: Path) -> Optional[Path]:
    """Clean against robust accuracy per run (X: the mean over seeds), one panel per :func:`robust_panels`
    entry: the first full-test-set attack against clean accuracy on the full test set, AutoAttack
    against clean accuracy on its own first N test images."""
    spec = result["spec"]
    drawn = []
    for panel in robust_panels(result, done):
        points = {c_name(c): p for c in done if (p := cell_point(c, panel)) is not None}
        missing = [c_name(c) for c in done if panel.metric in c["accuracy"] and c_name(c) not in points]
        if missing:
            panel.note("tradeoff.png", missing, spec)
        if points:
            drawn.append((panel, points, missing))
    if not drawn:
        return None
    fig = common.figure(6.5 * len(drawn), 5)
    for ax, (panel, points, missing) in zip(np.atleast_1d(fig.subplots(1, len(drawn))), drawn):
        for lab in colour:
            pts = [p for c in done if c["label"] == lab and (p := points.get(c_name(c))) is not None]
            if pts:
                ax.scatter(*zip(*pts), color=colour[lab], label=lab, s=36, alpha=0.85)
                mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
                ax.scatter([mx], [my], color=colour[lab], marker="X", s=110, edgecolor="black", linewidth=0.6)
        panel.finish(ax, missing)
    fig.suptitle(f"clean vs robust accuracy per run ({spec.get('preset') or 'default preset'}), X = mean over seeds",
                 fontsize=10)
    return common.save(fig, out_dir / "tradeoff.png")


@dataclass(frozen=True)
class RobustPanel:
    """One clean/robust panel of ``tradeoff.png`` and ``frontier.png``: the robust ``metric`` and
    whether both axes are on the first ``aa_n`` test images (``subset``) or on the full test set."""

    metric: str
    subset: bool
    n: Optional[int] = None

    @property
    def title(self) -> str:
        return f"first {self.n} test images (AutoAttack's)" if self.subset else "full test set"

    @property
    def xlabel(self) -> str:
        return f"clean accuracy (first {self.n}) (%)" if self.subset else "clean accuracy, full test set (%)"

    @property
    def ylabel(self) -> str:
        name = metric_label(self.metric, n=self.n if self.subset else None)
        return f"robust accuracy: {name}{'' if self.subset else ', full test set'} (%)"

    @property
    def missing(self) -> str:
        """Why a run is left out of the panel (said in its title and in the log)."""
        return "no clean accuracy on these images" if self.subset else f"no {attack_label(self.metric)} accuracy"

    def finish(self, ax: Any, missing: Sequence[str]) -> None:
        """Axis labels, the title (naming the runs left out), grid and legend of this panel on ``ax``."""
        ax.set(xlabel=self.xlabel, ylabel=self.ylabel, title=self.title + common.left_out(self.missing, missing))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    def note(self, figure: str, names: Sequence[str], spec: dict[str, Any]) -> None:
        """The log line for the runs left out of this panel of ``figure``."""
        why = (f"no clean accuracy on the first {self.n} test images (no per-example verdicts stored)"
               if self.subset else self.missing)
        log.info("%s: %s left out for %s: %s", figure, metric_text(self.metric, spec), ", ".join(names), why)


def robust_panels(result: dict[str, Any], done: Sequence[dict[str, Any]]) -> list[RobustPanel]:
    """The clean/robust panels of a study's figures: the first full-test-set attack against clean on
    the full test set, then each subset metric (AutoAttack) against clean on the same first N images;
    never a subset metric against a full-test-set one."""
    have = [m for m in result["metrics"] if m != "clean" and any(m in c["accuracy"] for c in done)]
    full = [RobustPanel(m, False) for m in have if m not in SUBSET_METRICS][:1]
    return full + [RobustPanel(m, True, result["spec"].get("aa_n")) for m in have if m in SUBSET_METRICS]


def c_name(cell: dict[str, Any]) -> str:
    """A cell's name as its folder spells it: ``<row label>-s<seed>``."""
    return StudyDir.cell_name(cell["label"], cell["seed"])


def cell_point(cell: dict[str, Any], panel: RobustPanel) -> Optional[tuple[float, float]]:
    """The (clean, robust) accuracies in % a panel plots for one cell, both on the panel's images;
    None when the cell lacks either (a subset panel's clean comes from ``on_aa_images`` only)."""
    x = (cell.get("on_aa_images") or {}).get("clean") if panel.subset else cell["accuracy"].get("clean")
    y = cell["accuracy"].get(panel.metric)
    return None if x is None or y is None else (100 * x, 100 * y)


def row_pair(row: dict[str, Any], panel: RobustPanel) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """The summaries (mean, interval, n) of clean and robust accuracy a panel plots for one row, both
    on the panel's images and, where the row keeps its values by seed, over the seeds that have both;
    None when either is missing."""
    source = row.get("on_aa_images") if panel.subset else row.get("metrics")
    x, y = ((source or {}).get(m) for m in ("clean", panel.metric))
    if x is None or y is None:
        return None
    if "per_seed" in x and "per_seed" in y:
        seeds = [s for s in x["per_seed"] if s in y["per_seed"]]
        x, y = (asdict(summarize([v["per_seed"][s] for s in seeds])) for v in (x, y))
    return (x, y) if x["mean"] is not None and y["mean"] is not None else None


def frontier_lines(result: dict[str, Any]) -> list[tuple[str, Optional[str], list[tuple[Any, dict[str, Any]]]]]:
    """The rows of each method as ``(method, varied hyper-parameter, [(its value, row), ...])``, sorted
    by that value; a method whose rows differ in no or in several hyper-parameters has ``None`` there
    and its rows in study order (their values: the row labels).

    A row's values are those its runs ran (``ran_method_args``: a data set's or a preset's own
    values included). A method with a row whose runs ran different values (seeds disagree:
    ``ran_method_args`` is None), or whose values do not sort, gets no line. A row whose runs
    recorded nothing (none finished yet; a results file collected before arow 0.9.1) counts with
    its study row's values over the method's defaults.
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        by_method.setdefault(r["method"], []).append(r)
    out = []
    for method, rows in by_method.items():
        defaults = METHODS.get(method).defaults() if method in METHODS.names() else {}
        asked = [{**defaults, **(r.get("method_args") or {})} for r in rows]
        args = [r.get("ran_method_args") or a for r, a in zip(rows, asked)]
        differ = any("ran_method_args" in r and r["ran_method_args"] is None for r in rows)
        varied = sorted(k for k in set().union(*args) if len({repr(a.get(k)) for a in args}) > 1)
        points = None
        if len(varied) == 1 and not differ and not any(r.get("overrides") for r in rows):
            try:
                points = sorted(((a.get(varied[0]), r) for a, r in zip(args, rows)), key=lambda t: t[0])
            except TypeError:  # values that do not order (None beside numbers): no line
                points = None
        if points is not None:
            out.append((method, varied[0], points))
        else:
            out.append((method, None, [(r["label"], r) for r in rows]))
    return out


def _frontier(result: dict[str, Any], colour: dict[str, Any], out_dir: Path) -> Optional[Path]:
    """Means over seeds with their 95% Student-t intervals on both axes, one line per method through
    its rows in the order of the hyper-parameter they vary, one panel per :func:`robust_panels` entry
    that some row can fill; only when some method has several rows."""
    if not [ln for ln in frontier_lines(result) if ln[1] is not None]:
        return None
    spec, kept = result["spec"], []
    for panel in robust_panels(result, [c for c in result["cells"] if c["status"] == "done"]):
        missing = [name for r in result["rows"] for name in _left_out(r, panel)]
        if missing:
            panel.note("frontier.png", missing, spec)
        if any(row_pair(r, panel) is not None for r in result["rows"]):
            kept.append((panel, missing))
    if not kept:
        return None
    fig = common.figure(7 * len(kept), 5.2)
    for ax, (panel, missing) in zip(np.atleast_1d(fig.subplots(1, len(kept))), kept):
        _frontier_panel(ax, result, panel, colour)
        panel.finish(ax, missing)
    fig.suptitle("clean / robust frontier\nmeans over seeds, 95% intervals (a long one runs off the edge), "
                 "lines in hyper-parameter order", fontsize=10)
    return common.save(fig, out_dir / "frontier.png")


def _left_out(row: dict[str, Any], panel: RobustPanel) -> list[str]:
    """The runs of a row that have the panel's robust metric but no clean accuracy on the same images
    (their cell names; the row's label where it keeps no values by seed and is left out whole)."""
    source = row.get("on_aa_images") if panel.subset else row.get("metrics")
    x, y = ((source or {}).get(m) or {} for m in ("clean", panel.metric))
    if "per_seed" in y:
        return [StudyDir.cell_name(row["label"], s) for s in y["per_seed"] if s not in x.get("per_seed", {})]
    return [row["label"]] if y.get("mean") is not None and row_pair(row, panel) is None else []


def frontier_limits(points: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """Axis limits (in %) for one axis of ``frontier.png`` from ``(mean, lo, hi)`` per row: the means
    with a margin, widened to each interval no longer than ``max(1 point, the spread of the means)``.
    A longer interval (two seeds give a Student-t factor of 12.7) runs off the panel's edge instead
    of squeezing every mean into a corner.

    >>> frontier_limits([(84.0, 83.8, 84.2), (86.0, 80.0, 92.0)])
    (83.58, 86.22)
    """
    means = [m for m, _, _ in points]
    span = max(means) - min(means)
    lo, hi = min(means), max(means)
    for m, a, b in points:
        if max(m - a, b - m) <= max(1.0, span):
            lo, hi = min(lo, a), max(hi, b)
    pad = max(0.1 * (hi - lo), 0.2)
    return round(lo - pad, 6), round(hi + pad, 6)


def _frontier_panel(ax: Any, result: dict[str, Any], panel: RobustPanel, colour: dict[str, Any]) -> None:
    """One panel of ``frontier.png``: each row that has both accuracies, a line per method when its
    rows vary one hyper-parameter; axis limits from :func:`frontier_limits`."""
    extent: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = []
    for method, key, points in frontier_lines(result):
        first = next(r["label"] for r in result["rows"] if r["method"] == method)
        drawn = []
        for value, row in points:
            pair = row_pair(row, panel)
            if pair is None:
                continue
            x, y = pair
            err = [[100 * (s["mean"] - s["lo"]) if s["lo"] is not None else 0.0] for s in (x, y)]
            err_hi = [[100 * (s["hi"] - s["mean"]) if s["hi"] is not None else 0.0] for s in (x, y)]
            ax.errorbar([100 * x["mean"]], [100 * y["mean"]], xerr=[err[0], err_hi[0]], yerr=[err[1], err_hi[1]],
                        fmt="o", color=colour[first], ms=6, capsize=3, lw=1)
            extent.append(tuple((100 * s["mean"], 100 * s["mean"] - e[0], 100 * s["mean"] + h[0])  # type: ignore[misc]
                                for s, e, h in zip((x, y), err, err_hi)))
            name = f"{key} {value:g}" if key is not None and isinstance(value, (int, float)) else str(value)
            ax.annotate(f"{name} (n={min(x['n'], y['n'])})", (100 * x["mean"], 100 * y["mean"]),
                        textcoords="offset points", xytext=(6, 5), fontsize=7)
            drawn.append((100 * x["mean"], 100 * y["mean"], row["label"]))
        if key is not None and len(drawn) > 1:
            ax.plot([d[0] for d in drawn], [d[1] for d in drawn], "-", color=colour[first], alpha=0.7,
                    label=f"{method} (by {key})")
        elif drawn:
            ax.plot([], [], "o", color=colour[first], label=method)
    if extent:
        ax.set_xlim(*frontier_limits([e[0] for e in extent]))
        ax.set_ylim(*frontier_limits([e[1] for e in extent]))


def bar_panels(result: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The panels of ``bars.png``: (title, metrics) for the full-test-set metrics, then one for
    AutoAttack on the first N test images; metrics no row has a mean for are left out."""
    spec = result["spec"]
    metrics = [m for m in result["metrics"] if any(r["metrics"][m]["mean"] is not None for r in result["rows"])]
    panels = [("full test set", [m for m in metrics if m not in SUBSET_METRICS])]
    panels += [(f"first {spec.get('aa_n')} test images only", [m]) for m in metrics if m in SUBSET_METRICS]
    return [(title, ms) for title, ms in panels if ms]


def _bars(result: dict[str, Any], colour: dict[str, Any], out_dir: Path) -> Optional[Path]:
    """Mean ± sample std per metric and row; full-test-set metrics and subset metrics in separate panels."""
    panels = bar_panels(result)
    rows = [r for r in result["rows"] if any(r["metrics"][m]["mean"] is not None for _, ms in panels for m in ms)]
    if not panels or not rows:
        return None
    widths = [max(1, len(ms)) for _, ms in panels]
    fig = common.figure(max(6.0, 1.6 * sum(widths) * max(1, len(rows)) / 2), 4.8)
    axes = np.atleast_1d(fig.subplots(1, len(panels), width_ratios=widths, sharey=True))
    for ax, (title, metrics) in zip(axes, panels):
        _bar_panel(ax, rows, metrics, result["spec"], colour)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("accuracy (%)")
    handles = [_legend_patch(colour[r["label"]], r["label"]) for r in rows]
    fig.legend(handles=handles, fontsize=8, ncol=min(4, len(rows)), loc="outside lower center")
    fig.suptitle("mean ± sample std over seeds (no bar: n=1, a single seed)", fontsize=10)
    return common.save(fig, out_dir / "bars.png")


def _bar_panel(ax: Any, rows: Sequence[dict[str, Any]], metrics: Sequence[str], spec: dict[str, Any],
               colour: dict[str, Any]) -> None:
    """One panel of ``bars.png``: a group of bars per metric, one bar per row; error bars only for n >= 2."""
    width = 0.8 / max(1, len(rows))
    top = 0.0
    for i, r in enumerate(rows):
        for j, m in enumerate(metrics):
            s = r["metrics"][m]
            if s["mean"] is None:
                continue
            x, y = j + (i - (len(rows) - 1) / 2) * width, 100 * s["mean"]
            ax.bar([x], [y], width, color=colour[r["label"]])
            err = 100 * s["std"] if s.get("std") is not None and s.get("n", 0) >= 2 else None
            if err is not None:
                ax.errorbar([x], [y], yerr=[err], fmt="none", ecolor="black", capsize=3, lw=1)
            label = f"n={s.get('n')}" if s.get("n") is not None else ""
            ax.annotate(label, (x, y + (err or 0.0)), textcoords="offset points", xytext=(0, 2), ha="center",
                        fontsize=6, color=C_OTHER)
            top = max(top, y + (err or 0.0))
    ax.set_xticks(range(len(metrics)), [metric_text(m, spec) for m in metrics])
    ax.set_ylim(0, min(105.0, top + 8) if top > 0 else 100)  # from 0: bar heights compare as ratios
    ax.grid(alpha=0.3, axis="y")


def _legend_patch(color: Any, label: str) -> Any:
    """A legend entry of a filled square of ``color``."""
    from matplotlib.patches import Patch

    return Patch(facecolor=color, label=label)


def _per_class(result: dict[str, Any], done: Sequence[dict[str, Any]], colour: dict[str, Any],
               out_dir: Path) -> Optional[Path]:
    """Accuracy per class of the first full-test-set attack, mean over seeds, one bar group per class."""
    attack = next((m for m in result["metrics"] if m not in ("clean", *SUBSET_METRICS)), "clean")
    per_class = {lab: [c["per_class"][attack] for c in done if c["label"] == lab and attack in c.get("per_class", {})]
                 for lab in colour}
    per_class = {lab: v for lab, v in per_class.items() if v}
    if not per_class:
        return None
    k = len(next(iter(per_class.values()))[0])
    fig = common.figure(max(7.0, 0.9 * k), 4.5)
    ax = fig.subplots()
    width = 0.8 / len(per_class)
    for i, (lab, vals) in enumerate(per_class.items()):
        mean = np.mean(np.array(vals), axis=0) * 100
        ax.bar(np.arange(k) + (i - (len(per_class) - 1) / 2) * width, mean, width, color=colour[lab],
               label=f"{lab} (n={len(vals)})")
    ds = next((c.get("dataset") for c in done if c.get("dataset")), None)
    names = common.class_names(ds)
    ax.set_xticks(range(k), names if len(names) == k else [str(i) for i in range(k)], rotation=30, fontsize=8)
    ax.set(ylabel=f"{attack_label(attack)} accuracy (%)", ylim=(0, 118),  # headroom: the legend sits above 100
           title="accuracy per class (full test set, mean over seeds)")
    ax.set_yticks(range(0, 101, 20))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=min(4, len(per_class)), loc="upper left")
    return common.save(fig, out_dir / "per_class.png")


def _eps_curve(result: dict[str, Any], done: Sequence[dict[str, Any]], colour: dict[str, Any],
               out_dir: Path) -> Optional[Path]:
    """PGD-20 accuracy against eps on the first ``eps_curve_n`` test images, mean over seeds."""
    spec = result["spec"]
    curves = {lab: [c["eps_curve"] for c in done if c["label"] == lab and c.get("eps_curve")] for lab in colour}
    curves = {lab: v for lab, v in curves.items() if v}
    if not curves:
        return None
    fig = common.figure(6.5, 4.8)
    ax = fig.subplots()
    for lab, cvs in curves.items():
        eps = [p[0] for p in cvs[0]]
        acc = np.mean(np.array([[p[1] for p in cv] for cv in cvs]), axis=0) * 100
        ax.plot(eps, acc, marker="o", markersize=3, color=colour[lab], label=f"{lab} (n={len(cvs)})")
    train_eps = next((c["eps"] for c in done if c.get("eps") is not None), None)
    if train_eps is not None:
        ax.axvline(train_eps, color=C_OTHER, lw=1, ls="-.", label="training eps")
    ax.set(xlabel="L-inf eps", ylabel=f"{attack_label('pgd20')} accuracy (%)", ylim=(0, 100),
           title=f"robust accuracy against eps (first {spec.get('eps_curve_n')} test images, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return common.save(fig, out_dir / "eps_curve.png")
