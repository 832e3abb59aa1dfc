"""``curves.png``: a run's training curves (loss and its parts, validation accuracy with the best.pt
marker, learning rate, and the per-example weight, gradient norm or time per epoch)."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ...runs.rundir import RunDir
from ...runs.selection import selection_key
from ..labels import attack_label
from ..tables import Run, load_run
from . import common
from .common import C_CLEAN, C_OTHER, C_ROBUST

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

#: how the loss parts of metrics.jsonl (``train_<part>``) are named in legends
PART_LABELS = {"natural": "natural (CE on clean inputs)", "adv_bce": "adversarial BCE (MART)",
               "robust": "robust term", "helper": "helper term (HAT)",
               "attack_steps": "attack steps (FAT, mean; not a loss)", "kappa": "kappa (GAIR-AT, mean; not a loss)"}
#: the validation curve model selection reads, in the Trainer's order of precedence
SELECTION_KEYS = ("swa_val_pgd_acc", "ema_val_pgd_acc", "val_pgd_acc")
#: ``train_*`` keys that are not parts of the loss
_NOT_PARTS = {"train_loss", "train_clean_acc", "train_adv_acc", "train_weight_mean", "train_effective_weight",
              "train_real", "train_extra"}


def part_label(key: str) -> str:
    """The legend name of a ``train_<part>`` key (``train_adv_bce`` -> ``adversarial BCE (MART)``)."""
    part = key[len("train_"):] if key.startswith("train_") else key
    return PART_LABELS.get(part, part)


def best_point(run: Run) -> Optional[tuple[int, float, str]]:
    """Where ``best.pt`` sits on the curves: (epoch, score, the metrics key it was selected on).

    The key is ``swa_val_pgd_acc`` or ``ema_val_pgd_acc`` when the averaged model was validated
    that epoch (the Trainer then selects on it), else ``val_pgd_acc``.
    """
    epoch, score = run.best_epoch()
    if epoch is None or score is None:
        return None
    record = next(r for r in run.metrics if int(r["epoch"]) == epoch)
    return epoch, score, selection_key(record)


def plot_curves(run_dir: PathLike) -> Optional[Path]:
    """``curves.png``: loss and its parts, validation accuracy (clean, robust, SWA), learning rate.

    With step records (``--log-every``) the loss, learning rate, weight and gradient norm are drawn
    per logged step, so a one-epoch run has real curves and the schedule shows its shape.

    >>> plot_curves("runs/fmnist-arow-s0")  # doctest: +SKIP
    PosixPath('runs/fmnist-arow-s0/curves.png')
    """
    run = load_run(run_dir)
    fig = curves_figure(run, run.record.steps if run.record is not None else ())
    if fig is None:
        log.info("%s: no metrics.jsonl yet; no curves.png", run.path)
        return None
    return common.save(fig, RunDir(run.path).file(RunDir.CURVES))


@dataclass
class _Series:
    """The epoch records ``m`` and step records ``steps`` of a run, as the panels draw them."""

    run: Run
    m: Sequence[dict[str, Any]]
    steps: Sequence[dict[str, Any]]

    @property
    def ep(self) -> list[Any]:
        return [r["epoch"] for r in self.m]

    @property
    def sx(self) -> list[float]:
        return [s["epoch_float"] for s in self.steps]

    @property
    def mk(self) -> dict[str, Any]:
        """Markers on short runs only."""
        return dict(marker="o", markersize=3) if len(self.m) <= 30 else {}

    @property
    def every(self) -> Any:
        return self.run.config.get("log_every")

    @property
    def per(self) -> str:
        return f"mean over {self.every} steps" if self.every else "mean since the previous record"

    def get(self, key: str, records: Optional[Sequence[dict[str, Any]]] = None) -> list[float]:
        return [r.get(key, math.nan) for r in (self.m if records is None else records)]


def curves_figure(run: Run, steps: Sequence[dict[str, Any]] = ()) -> Any:
    """The figure of :func:`plot_curves` (None without epoch records), not yet saved."""
    if not run.metrics:
        return None
    s = _Series(run, run.metrics, [r for r in steps if "epoch_float" in r])
    fig = common.figure(13, 7.5)
    (ax_loss, ax_acc), (ax_lr, ax_4) = fig.subplots(2, 2)
    _loss_panel(ax_loss, s)
    _accuracy_panel(ax_acc, s)
    _lr_panel(ax_lr, s)
    _fourth_panel(ax_4, s)
    for ax in (ax_loss, ax_acc, ax_lr, ax_4):
        if not s.steps or ax is ax_acc:  # step records fall between the epochs
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"Training curves: {common.protocol(run)}", fontsize=11)
    return fig


def _loss_panel(ax: Any, s: _Series) -> None:
    """The training loss and its parts; with step records per logged step, the epoch means as dots."""
    parts = sorted({k for r in [*s.m, *s.steps] for k in r if k.startswith("train_") and isinstance(r[k], (int, float))}
                   - _NOT_PARTS)
    if s.steps:  # per logged step as lines, the epoch means as dots of the same colour
        for k, label, kw in [("train_loss", "total", dict(color="black", lw=1.6))] + \
                [(k, part_label(k), {}) for k in parts]:
            (line,) = ax.plot(s.sx, s.get(k, s.steps), label=label, **kw)
            ax.plot(s.ep, s.get(k), ls="none", marker="o", markersize=4, color=line.get_color())
        ax.plot([], [], ls="none", marker="o", markersize=4, color=C_OTHER, label="epoch means")
        ax.set(title="training loss and its parts", xlabel="epoch", ylabel=f"loss (step records: {s.per})")
    else:
        ax.plot(s.ep, s.get("train_loss"), color="black", lw=2, label="total", **s.mk)
        for k in parts:
            ax.plot(s.ep, s.get(k), label=part_label(k), **s.mk)
        ax.set(title="training loss and its parts", xlabel="epoch", ylabel="loss (mean over the epoch)")
    ax.legend(fontsize=8)


def _accuracy_panel(ax: Any, s: _Series) -> None:
    """Validation (and training) accuracy per epoch, with a star where ``best.pt`` was selected."""
    run, m, mk = s.run, s.m, s.mk
    val = attack_label(run.val_attack)
    for key, label, color, ls in [("val_clean_acc", "val clean", C_CLEAN, "-"),
                                  ("val_pgd_acc", f"val {val}", C_ROBUST, "-"),
                                  ("swa_val_clean_acc", "SWA val clean", C_CLEAN, "--"),
                                  ("swa_val_pgd_acc", f"SWA val {val}", C_ROBUST, "--"),
                                  ("ema_val_clean_acc", "EMA val clean", C_CLEAN, "--"),
                                  ("ema_val_pgd_acc", f"EMA val {val}", C_ROBUST, "--"),
                                  ("train_clean_acc", "train clean", C_CLEAN, ":"),
                                  ("train_adv_acc", "train adversarial (training attack)", C_ROBUST, ":")]:
        if any(key in r for r in m):
            xs = [r["epoch"] for r in m if key in r]
            ys = [100 * r[key] for r in m if key in r]
            lw = 1.0 if key.startswith("train_") else 1.8
            style = dict(mk, marker="s", markerfacecolor="white") if key[:4] in ("swa_", "ema_") and mk else mk
            ax.plot(xs, ys, color=color, ls=ls, lw=lw, label=label, **style)
    best = best_point(run)
    if best is not None:  # on the curve it was selected on: the SWA/EMA model's when it was validated
        best_epoch, best_score, key = best
        which = {"swa_val_pgd_acc": "SWA val", "ema_val_pgd_acc": "EMA val"}.get(key, "val")
        ax.axvline(best_epoch, color=C_OTHER, lw=0.8, ls="-.", zorder=1)
        ax.plot([best_epoch], [100 * best_score], ls="none", marker="*", markersize=13, markerfacecolor="gold",
                markeredgecolor="black", zorder=5,
                label=f"best.pt: epoch {best_epoch}, selected on {which} {val} ({100 * best_score:.1f}%)")
    ax.set(title="accuracy (val = held-out split of the training set)", xlabel="epoch", ylabel="accuracy (%)",
           ylim=(0, 100))
    # outside the axes: accuracy curves fill any corner of the panel at some point of training
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)


def _lr_panel(ax: Any, s: _Series) -> None:
    """The learning rate per step record or per epoch; a log axis labelled at each level of a step schedule."""
    stepwise = bool(s.steps) and any("lr" in r for r in s.steps)
    if stepwise:
        lr = s.get("lr", s.steps)
        ax.plot(s.sx, lr, color="black", lw=1.4)
        title = f"learning rate at each step record (every {s.every} steps)" if s.every else \
            "learning rate at each step record"
    else:
        lr = s.get("lr")
        ax.step(s.ep, lr, where="mid", color="black", **s.mk)  # "mid": each epoch's value centred on its tick
        title = "learning rate per epoch (as in metrics.jsonl)"
    finite = [v for v in lr if math.isfinite(v)]
    step_schedule = s.run.config.get("schedule") == "step"
    if finite and min(finite) > 0 and max(finite) / min(finite) > 5 and (step_schedule or not stepwise):
        ax.set_yscale("log")  # step schedules drop by 10x: a log axis shows every drop
        levels = sorted(set(finite))
        if len(levels) <= 6:  # label each level of a step schedule instead of bare powers of ten
            ax.set_yticks(levels, [f"{v:g}" for v in levels])
            ax.minorticks_off()
    ax.set(title=title, xlabel="epoch", ylabel="learning rate")
    ax.grid(alpha=0.3)


def _fourth_panel(ax: Any, s: _Series) -> None:
    """The mean per-example weight (ARoW, MART, ...), else the gradient norm, else the time per epoch."""
    if any("train_weight_mean" in r for r in [*s.m, *s.steps]):
        if any("train_weight_mean" in r for r in s.steps):
            ax.plot(s.sx, s.get("train_weight_mean", s.steps), color="purple", lw=1.2,
                    label=f"step records ({s.per})")
            ax.plot(s.ep, s.get("train_weight_mean"), ls="none", marker="o", markersize=4, color="purple",
                    label="epoch means")
            ax.legend(fontsize=8)
        else:
            ax.plot(s.ep, s.get("train_weight_mean"), color="purple", **s.mk)
        ax.set(title=f"mean {common.weight_label(s.run)}", xlabel="epoch", ylabel="mean weight",
               ylim=(0, max([1.0, *(v for v in s.get("train_weight_mean") if math.isfinite(v))])))
    elif any("grad_norm" in r for r in s.steps):
        ax.plot(s.sx, s.get("grad_norm", s.steps), color=C_OTHER, lw=1.2)
        ax.set(title="gradient norm (L2 over all parameters) at each step record", xlabel="epoch",
               ylabel="gradient norm")
        ax.set_ylim(bottom=0)
    else:
        ax.plot(s.ep, s.get("seconds"), color=C_OTHER, **s.mk)
        ax.set(title="time per epoch (training + validation)", xlabel="epoch", ylabel="seconds")
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
