"""Pictures of runs and studies, written as PNGs.

Into a run's folder (:mod:`.run`, :mod:`.curves`, :mod:`.eps`): ``curves.png`` (losses, validation
accuracy, learning rate), ``per_class.png`` (test accuracy per class from the run's evaluation),
``weights.png`` (how the per-example weight of ARoW or MART is distributed over training) and
``eps_curve.png`` (robust accuracy against the attack radius, from ``eps_curve.json``).
:func:`compare_runs` draws several runs side by side into a folder of its own (``compare_*.png``,
:mod:`.compare`); :func:`study_plots` draws a study's figures (:mod:`.study`). Figures are drawn
with matplotlib's object API on an Agg canvas (:mod:`.common`): no display, and the caller's pyplot
state and backend are left alone.

>>> paths = plot_run("runs/fmnist-arow-s0")  # doctest: +SKIP
"""
from .common import C_CLEAN, C_OTHER, C_ROBUST, DPI, class_names
from .compare import (COMPARE_CURVES, COMPARE_PER_CLASS, COMPARE_TRADEOFF, COMPARE_WEIGHTS, ROBUST_ORDER,
                      check_compare_out, compare_runs, plot_runs, run_labels)
from .curves import PART_LABELS, SELECTION_KEYS, best_point, curves_figure, part_label, plot_curves
from .eps import EPS_FACTORS, eps_curve, eps_curve_table, plot_eps_curve
from .run import plot_per_class, plot_run, plot_weights
from .study import bar_panels, study_colours, study_plots

__all__ = ["C_CLEAN", "C_OTHER", "C_ROBUST", "DPI", "class_names", "COMPARE_CURVES", "COMPARE_PER_CLASS",
           "COMPARE_TRADEOFF", "COMPARE_WEIGHTS", "ROBUST_ORDER", "check_compare_out", "compare_runs", "plot_runs",
           "run_labels", "PART_LABELS", "SELECTION_KEYS", "best_point", "curves_figure", "part_label", "plot_curves",
           "EPS_FACTORS", "eps_curve", "eps_curve_table", "plot_eps_curve", "plot_per_class", "plot_run",
           "plot_weights", "bar_panels", "study_colours", "study_plots"]
