"""Pictures of a run, written as PNGs into its folder.

``curves.png`` (losses, validation accuracy, learning rate), ``per_class.png`` (test accuracy per
class from ``eval.json``), ``weights.png`` (how the per-example regularisation weight of ARoW or
MART is distributed over training) and ``eps_curve.png`` (robust accuracy against the attack
radius, from :func:`eps_curve`). :func:`compare_runs` draws several runs side by side into a folder
of its own (``compare_*.png``). Figures are drawn with matplotlib's object API on an Agg canvas:
no display, and the caller's pyplot state and backend are left alone.

>>> paths = plot_run("runs/fmnist-arow-s0")  # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..runs.checkpoint import Which
from ..data import DATASETS
from ..evaluation.cascade import EVAL_BATCH_SIZE
from .tables import ATTACK_LABELS, Run, format_eps, load_run
from ..runs.rundir import RunDir
from ..runs.checkpoint import atomic_write_bytes
from ..runs.records import load_model
from ..data import load_dataset
from ..distributed import resolve_device
from ..evaluation.cascade import evaluate
from .tables import markdown_table

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]



def class_names(dataset: Optional[str]) -> list[str]:
    """The data set's class names (none for an unknown one)."""
    return list(DATASETS.get(dataset).class_names) if dataset in DATASETS else []

EPS_FACTORS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
DPI = 130
# Colours: one meaning each across all figures (clean = blue, robust = orange/red, SWA = dashed).
C_CLEAN, C_ROBUST, C_OTHER = "#1f77b4", "#d62728", "#7f7f7f"


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _save(fig, path: Path) -> Path:
    import io


    buf = io.BytesIO()  # rendered in memory, then written atomically (never through a planted link)
    fig.savefig(buf, dpi=DPI, format="png")
    atomic_write_bytes(buf.getvalue(), path)
    log.debug("wrote %s", path)
    return path


def _protocol(run: Run, eps_word: Optional[str] = None) -> str:
    eps_word = eps_word or ("L2 eps" if run.norm == "l2" else "L-inf eps")
    c = run.config
    args = run.resolved.get("method_args") or {}
    hp = ", ".join(f"{k}={v}" for k, v in args.items() if not isinstance(v, bool) and k != "weight")
    return (f"{c.get('method')}{f' ({hp})' if hp else ''} / {c.get('model')} on {c.get('dataset')}, "
            f"{eps_word}={format_eps(run.eps)}, seed {c.get('seed')}")


def _weight_label(run: Run) -> str:
    method = run.config.get("method")
    if method == "mart":
        return "MART weight 1 - p_y(x) (clean)"
    if method == "gair-at":
        return "GAIR-AT weight (normalised to mean 1)"
    if (run.resolved.get("method_args") or {}).get("weight") == "cow":
        return "CoW weight p_y(x) (clean)"
    return "ARoW weight 1 - p_y(x_adv)"


# --------------------------------------------------------------------------- training curves
#: how the loss parts of metrics.jsonl (``train_<part>``) are named in legends
PART_LABELS = {"natural": "natural (CE on clean inputs)", "adv_bce": "adversarial BCE (MART)",
               "robust": "robust term", "helper": "helper term (HAT)",
               "attack_steps": "attack steps (FAT, mean; not a loss)", "kappa": "kappa (GAIR-AT, mean; not a loss)"}
#: the validation curve model selection reads, in the Trainer's order of precedence
SELECTION_KEYS = ("swa_val_pgd_acc", "ema_val_pgd_acc", "val_pgd_acc")


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
    return epoch, score, next(k for k in SELECTION_KEYS if k in record)


def plot_curves(run_dir: PathLike) -> Optional[Path]:
    """``curves.png``: loss and its parts, validation accuracy (clean, robust, SWA), learning rate.

    With step records (``--log-every``) the loss, learning rate, weight and gradient norm are drawn
    per logged step, so a one-epoch run has real curves and the schedule shows its shape.

    >>> plot_curves("runs/fmnist-arow-s0")  # doctest: +SKIP
    PosixPath('runs/fmnist-arow-s0/curves.png')
    """
    run = load_run(run_dir)
    fig = curves_figure(run, RunDir(run.path).read_steps())
    if fig is None:
        log.info("%s: no metrics.jsonl yet; no curves.png", run.path)
        return None
    return _save(fig, RunDir(run.path).file(RunDir.CURVES))


def curves_figure(run: Run, steps: Sequence[dict[str, Any]] = ()) -> Any:
    """The figure of :func:`plot_curves` (None without epoch records), not yet saved."""
    m = run.metrics
    if not m:
        return None
    ep = [r["epoch"] for r in m]
    mk = dict(marker="o", markersize=3) if len(m) <= 30 else {}
    fig = _figure(13, 7.5)
    (ax_loss, ax_acc), (ax_lr, ax_4) = fig.subplots(2, 2)
    steps = [s for s in steps if "epoch_float" in s]
    sx = [s["epoch_float"] for s in steps]
    every = run.config.get("log_every")
    per = f"mean over {every} steps" if every else "mean since the previous record"

    def series(key: str, records: Sequence[dict[str, Any]] = m) -> list[float]:
        return [r.get(key, math.nan) for r in records]

    parts = sorted({k for r in [*m, *steps] for k in r if k.startswith("train_") and isinstance(r[k], (int, float))}
                   - {"train_loss", "train_clean_acc", "train_adv_acc", "train_weight_mean", "train_effective_weight",
                      "train_real", "train_extra"})
    if steps:  # per logged step as lines, the epoch means as dots of the same colour
        for k, label, kw in [("train_loss", "total", dict(color="black", lw=1.6))] + \
                [(k, part_label(k), {}) for k in parts]:
            (line,) = ax_loss.plot(sx, series(k, steps), label=label, **kw)
            ax_loss.plot(ep, series(k), ls="none", marker="o", markersize=4, color=line.get_color())
        ax_loss.plot([], [], ls="none", marker="o", markersize=4, color=C_OTHER, label="epoch means")
        ax_loss.set(title="training loss and its parts", xlabel="epoch", ylabel=f"loss (step records: {per})")
    else:
        ax_loss.plot(ep, series("train_loss"), color="black", lw=2, label="total", **mk)
        for k in parts:
            ax_loss.plot(ep, series(k), label=part_label(k), **mk)
        ax_loss.set(title="training loss and its parts", xlabel="epoch", ylabel="loss (mean over the epoch)")
    ax_loss.legend(fontsize=8)

    val = ATTACK_LABELS.get(run.val_attack, run.val_attack)
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
            ax_acc.plot(xs, ys, color=color, ls=ls, lw=lw, label=label, **style)
    best = best_point(run)
    if best is not None:  # on the curve it was selected on: the SWA/EMA model's when it was validated
        best_epoch, best_score, key = best
        which = {"swa_val_pgd_acc": "SWA val", "ema_val_pgd_acc": "EMA val"}.get(key, "val")
        ax_acc.axvline(best_epoch, color=C_OTHER, lw=0.8, ls="-.", zorder=1)
        ax_acc.plot([best_epoch], [100 * best_score], ls="none", marker="*", markersize=13, markerfacecolor="gold",
                    markeredgecolor="black", zorder=5,
                    label=f"best.pt: epoch {best_epoch}, selected on {which} {val} ({100 * best_score:.1f}%)")
    ax_acc.set(title="accuracy (val = held-out split of the training set)", xlabel="epoch", ylabel="accuracy (%)",
               ylim=(0, 100))
    # outside the axes: accuracy curves fill any corner of the panel at some point of training
    ax_acc.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax_acc.grid(alpha=0.3)

    stepwise = bool(steps) and any("lr" in s for s in steps)
    if stepwise:
        lr = series("lr", steps)
        ax_lr.plot(sx, lr, color="black", lw=1.4)
        lr_title = f"learning rate at each step record (every {every} steps)" if every else \
            "learning rate at each step record"
    else:
        lr = series("lr")
        ax_lr.step(ep, lr, where="mid", color="black", **mk)  # "mid": each epoch's value centred on its tick
        lr_title = "learning rate per epoch (as in metrics.jsonl)"
    finite = [v for v in lr if math.isfinite(v)]
    step_schedule = run.config.get("schedule") == "step"
    if finite and min(finite) > 0 and max(finite) / min(finite) > 5 and (step_schedule or not stepwise):
        ax_lr.set_yscale("log")  # step schedules drop by 10x: a log axis shows every drop
        levels = sorted(set(finite))
        if len(levels) <= 6:  # label each level of a step schedule instead of bare powers of ten
            ax_lr.set_yticks(levels, [f"{v:g}" for v in levels])
            ax_lr.minorticks_off()
    ax_lr.set(title=lr_title, xlabel="epoch", ylabel="learning rate")
    ax_lr.grid(alpha=0.3)

    if any("train_weight_mean" in r for r in [*m, *steps]):
        if any("train_weight_mean" in s for s in steps):
            ax_4.plot(sx, series("train_weight_mean", steps), color="purple", lw=1.2, label=f"step records ({per})")
            ax_4.plot(ep, series("train_weight_mean"), ls="none", marker="o", markersize=4, color="purple",
                      label="epoch means")
            ax_4.legend(fontsize=8)
        else:
            ax_4.plot(ep, series("train_weight_mean"), color="purple", **mk)
        ax_4.set(title=f"mean {_weight_label(run)}", xlabel="epoch", ylabel="mean weight",
                 ylim=(0, max([1.0, *(v for v in series("train_weight_mean") if math.isfinite(v))])))
    elif any("grad_norm" in s for s in steps):
        ax_4.plot(sx, series("grad_norm", steps), color=C_OTHER, lw=1.2)
        ax_4.set(title="gradient norm (L2 over all parameters) at each step record", xlabel="epoch",
                 ylabel="gradient norm")
        ax_4.set_ylim(bottom=0)
    else:
        ax_4.plot(ep, series("seconds"), color=C_OTHER, **mk)
        ax_4.set(title="time per epoch (training + validation)", xlabel="epoch", ylabel="seconds")
        ax_4.set_ylim(bottom=0)
    ax_4.grid(alpha=0.3)
    for ax in (ax_loss, ax_acc, ax_lr, ax_4):
        if not steps or ax is ax_acc:  # step records fall between the epochs
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"Training curves: {_protocol(run)}", fontsize=11)
    return fig


# --------------------------------------------------------------------------- per-class accuracy
def plot_per_class(run_dir: PathLike) -> Optional[Path]:
    """``per_class.png``: per-class test accuracy, clean next to each attack in ``eval.json``.

    >>> plot_per_class("runs/fmnist-arow-s0")  # doctest: +SKIP
    PosixPath('runs/fmnist-arow-s0/per_class.png')
    """
    run = load_run(run_dir)
    ev = run.eval
    if ev is None or not ev.get("per_class"):
        log.debug("%s: no eval.json with per-class numbers; no per_class.png (run `arow eval` first)", run.path)
        return None
    pc = ev["per_class"]
    names = [k for k in ("clean", "pgd20", "cw", "autoattack") if k in pc] + \
        sorted(k for k in pc if k not in ("clean", "pgd20", "cw", "autoattack", "worst_case"))
    n_cls = len(next(iter(pc.values())))
    labels = class_names(str(ev.get("dataset") or run.config.get("dataset")))
    labels = labels if len(labels) == n_cls else [str(i) for i in range(n_cls)]
    fig = _figure(min(max(8.0, 0.75 * n_cls + 2), 40), 4.8)
    ax = fig.subplots()
    x = np.arange(n_cls)
    width = 0.8 / len(names)
    cmap = _colormap("Reds")
    for i, k in enumerate(names):
        color = C_CLEAN if k == "clean" else cmap(0.45 + 0.5 * (i / max(len(names) - 1, 1)))
        vals = [100 * (v if v is not None else math.nan) for v in pc[k]]
        acc = ev.get("accuracy", {}).get(k)
        name = ATTACK_LABELS.get(k, k)
        label = f"{name} ({100 * acc:.1f}% overall)" if acc is not None else name
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, color=color, label=label)
    ax.set_xticks(x, labels, rotation=30 if n_cls <= 20 else 90, ha="right" if n_cls <= 20 else "center")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 118), xlabel="class")  # headroom: the legend sits above 100
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=len(names), loc="upper left")
    n = f"{ev.get('n')} of {ev.get('test_set_size')} test images" + (" (SUBSET)" if ev.get("subset") else "")
    ax.set_title(f"Per-class accuracy: {_protocol(run)}\n{n}", fontsize=10)
    return _save(fig, RunDir(run.path).file(RunDir.PER_CLASS))


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
    label = _weight_label(run)

    fig = _figure(12, 4.8)
    ax_map, ax_share = fig.subplots(1, 2, width_ratios=[1.4, 1])
    extent = (ep[0] - 0.5, ep[-1] + 0.5, 0.0, 1.0)  # one column per epoch, bins over [0, 1]
    from matplotlib.colors import PowerNorm

    # empty bins white, so "a few examples" stays distinguishable from "none"; a square-root
    # colour scale keeps the thin tails (few examples, but heavily weighted) visible
    cmap = _colormap("magma_r").with_extremes(bad="white")
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
    fig.suptitle(f"Per-example weight over training: {_protocol(run)}", fontsize=11)
    return _save(fig, RunDir(run.path).file(RunDir.WEIGHTS))


# --------------------------------------------------------------------------- robustness vs eps
def eps_curve(
    run_dir: PathLike,
    *,
    n: Optional[int] = 1000,
    factors: Sequence[float] = EPS_FACTORS,
    attack: str = "pgd20",
    which: Which = "final",
    device: str = "auto",
    data_dir: Optional[str] = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> dict[str, Any]:
    """Robust accuracy at ``factors`` times the training eps on the first ``n`` test images (None: all).

    Writes ``eps_curve.json`` into the run folder and returns its content.

    >>> curve = eps_curve("runs/fmnist-arow-s0", n=500)  # doctest: +SKIP
    >>> [p["eps"] for p in curve["points"]][:3]  # doctest: +SKIP
    [0.0, 0.025, 0.05]

    Args:
        run_dir: the run folder
        n: first N test examples
        factors: multiples of the training eps
        attack: the attack at each eps
        which: the run's checkpoint: final, best (by validation) or last
        device: auto, cpu, cuda, cuda:1, ...
        data_dir: folder with the dataset files (default: the run's)
        batch_size: examples per attack batch; the verdicts of PGD do not depend on it
    """

    run = load_run(run_dir)
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if not factors or any(f < 0 for f in factors):
        raise ValueError(f"eps factors must be a non-empty list of numbers >= 0, got {list(factors)}")
    if run.eps is None:
        raise ValueError(f"{run.path}: config.json has no resolved eps")
    dev = resolve_device(device)
    model = load_model(run.path, which=which, device=dev)
    dataset = run.config.get("dataset")
    data = load_dataset(dataset, root=data_dir or run.config.get("data_dir"), split="test")
    full = len(data)
    data = (data.subset(n) if n is not None and n < full else data).to(dev)
    points = []
    for f in sorted(set(float(f) for f in factors)):
        e = f * run.eps
        attacks = ["clean"] if e == 0 else ["clean", attack]  # at eps 0 the attack cannot move: clean accuracy
        res = evaluate(model, data.x, data.y, attacks, eps=e, norm=run.norm, num_classes=data.num_classes,
                       batch_size=batch_size)
        acc = res.accuracy[attacks[-1]]
        points.append({"factor": f, "eps": e, "accuracy": acc})
        log.info("eps %.4g (%.2g x train eps): %s %.2f%%", e, f, attack, 100 * acc)
    out = {"run": str(run.path), "dataset": dataset, "method": run.config.get("method"), "norm": run.norm,
           "train_eps": run.eps,
           "attack": attack, "checkpoint": which, "n": len(data), "test_set_size": full, "subset": len(data) < full,
           "points": points}
    RunDir(run.path).write_json(RunDir.EPS_CURVE, out)
    return out


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
    path = RunDir(run.path).file(RunDir.EPS_CURVE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; compute it with `arow plot {run.path} --eps-curve`")
    d = json.loads(path.read_text())
    pts = d["points"]
    xs, ys = [p["eps"] for p in pts], [100 * p["accuracy"] for p in pts]
    attack = ATTACK_LABELS.get(d["attack"], d["attack"])
    fig = _figure(8.5, 5.2)
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
    ax.set_title(f"Robust accuracy vs eps: {_protocol(run, 'trained at eps')}\n"
                 f"{attack} (CE, step eps/4, random start) on {n}, {d['checkpoint']} checkpoint", fontsize=9)
    return _save(fig, RunDir(run.path).file(RunDir.EPS_CURVE_PNG))


def plot_run(run_dir: PathLike) -> list[Path]:
    """Every picture the run folder has data for: curves, per-class accuracy, weights, eps curve.

    >>> plot_run("runs/fmnist-arow-s0")  # doctest: +SKIP
    [PosixPath('runs/fmnist-arow-s0/curves.png'), ...]
    """
    run = load_run(run_dir)
    out = [plot_curves(run.path), plot_per_class(run.path), plot_weights(run.path)]
    if (RunDir(run.path).file(RunDir.EPS_CURVE)).is_file():
        out.append(plot_eps_curve(run.path))
    return [p for p in out if p is not None]


# --------------------------------------------------------------------------- a study's comparison
def study_plots(result: dict[str, Any], out_dir: PathLike) -> list[Path]:
    """The comparison figures of a study (:func:`arow.study.core.collect`'s result), into ``out_dir``:
    ``tradeoff.png`` (clean against robust accuracy, one point per run, one colour per method),
    ``bars.png`` (mean ± sample std per metric), ``per_class.png`` (PGD-20 accuracy per class,
    mean over seeds) and ``eps_curve.png`` (PGD-20 accuracy against eps, mean over seeds)."""
    out_dir = Path(out_dir)
    rows, cells, spec = result["rows"], result["cells"], result["spec"]
    labels = [r["label"] for r in rows]
    cmap = _colormap("tab10")
    colour = {lab: cmap(i % 10) for i, lab in enumerate(labels)}
    written: list[Path] = []
    done = [c for c in cells if c["status"] != "failed" and "clean" in c["accuracy"]]
    if not done:
        return written
    dataset = spec.get("preset") or "default preset"

    robust = next((m for m in result["metrics"] if m != "clean" and any(m in c["accuracy"] for c in done)), None)
    fig = _figure(6.5, 5) if robust else None
    if fig is None:
        return written
    ax = fig.subplots()
    for lab in labels:
        pts = [(100 * c["accuracy"]["clean"], 100 * c["accuracy"][robust]) for c in done
               if c["label"] == lab and robust in c["accuracy"]]
        if pts:
            ax.scatter(*zip(*pts), color=colour[lab], label=lab, s=36, alpha=0.85)
            mx, my = (sum(p[i] for p in pts) / len(pts) for i in (0, 1))
            ax.scatter([mx], [my], color=colour[lab], marker="X", s=110, edgecolor="black", linewidth=0.6)
    rlab = (f"AutoAttack, first {spec['aa_n']} test images" if robust == "autoattack" else
            f"{ATTACK_LABELS.get(robust, robust)}, full test set")
    ax.set(xlabel="clean accuracy, full test set (%)", ylabel=f"robust accuracy: {rlab} (%)",
           title=f"clean vs robust accuracy per run ({dataset})\nX = mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "tradeoff.png"))

    metrics = [m for m in result["metrics"] if any(r["metrics"][m]["n"] for r in rows)]
    fig = _figure(max(6.0, 1.6 * len(metrics) * max(1, len(labels)) / 2), 4.8)
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    for i, r in enumerate(rows):
        xs, ys, es = [], [], []
        for j, m in enumerate(metrics):
            s = r["metrics"][m]
            if s["mean"] is not None:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(100 * s["mean"])
                es.append(100 * (s["std"] or 0.0))
        ax.bar(xs, ys, width, yerr=es, capsize=3, color=colour[r["label"]], label=r["label"])
    names = {"autoattack": f"AutoAttack\n(first {spec.get('aa_n')})", "pgd20": "PGD-20", "cw": "CW-30",
             "clean": "clean"}
    ax.set_xticks(range(len(metrics)), [names.get(m, m) for m in metrics])
    lows = [100 * r["metrics"][m]["mean"] for r in rows for m in metrics if r["metrics"][m]["mean"] is not None]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 8), min(100.0, max(lows) + 4))
    ax.set(ylabel="accuracy (%)", title="mean ± sample std over seeds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=min(4, len(labels)))
    written.append(_save(fig, out_dir / "bars.png"))

    attack = next((m for m in result["metrics"] if m not in ("clean", "autoattack")), "clean")
    per_class = {lab: [c["per_class"][attack] for c in done if c["label"] == lab and attack in c.get("per_class", {})]
                 for lab in labels}
    if any(per_class.values()):
        k = len(next(v for v in per_class.values() if v)[0])
        fig = _figure(max(7.0, 0.9 * k), 4.5)
        ax = fig.subplots()
        width = 0.8 / max(1, len(labels))
        for i, lab in enumerate(labels):
            if per_class[lab]:
                mean = np.mean(np.array(per_class[lab]), axis=0) * 100
                ax.bar(np.arange(k) + (i - (len(labels) - 1) / 2) * width, mean, width, color=colour[lab], label=lab)
        ds = next((c.get("dataset") for c in done if c.get("dataset")), None)
        names = class_names(ds)
        ax.set_xticks(range(k), names if len(names) == k else [str(i) for i in range(k)], rotation=30, fontsize=8)
        ax.set(ylabel=f"{ATTACK_LABELS.get(attack, attack)} accuracy (%)",
               title="accuracy per class (full test set, mean over seeds)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, ncol=min(4, len(labels)))
        written.append(_save(fig, out_dir / "per_class.png"))

    curves = {lab: [c["eps_curve"] for c in done if c["label"] == lab and c.get("eps_curve")] for lab in labels}
    if any(curves.values()):
        fig = _figure(6.5, 4.8)
        ax = fig.subplots()
        for lab in labels:
            if curves[lab]:
                eps = [p[0] for p in curves[lab][0]]
                acc = np.mean(np.array([[p[1] for p in cv] for cv in curves[lab]]), axis=0) * 100
                ax.plot(eps, acc, marker="o", markersize=3, color=colour[lab], label=lab)
        ax.axvline(next(c["eps"] for c in done if c.get("eps") is not None), color=C_OTHER, lw=1, ls="-.",
                   label="training eps")
        ax.set(xlabel="L-inf eps", ylabel="PGD-20 accuracy (%)", ylim=(0, 100),
               title=f"robust accuracy against eps (first {spec.get('eps_curve_n')} test images, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "eps_curve.png"))
    return written


# --------------------------------------------------------------------------- runs side by side
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
    cmap = _colormap("tab10" if len(runs) <= 10 else "tab20")
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


def _left_out(what: str, labels: Sequence[str]) -> str:
    return f"\nleft out ({what}): {', '.join(labels)}" if labels else ""


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
    val = ATTACK_LABELS.get(next(iter(attacks)), next(iter(attacks))) if len(attacks) == 1 else "robust"
    fig = _figure(11, 5.5)
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
                 + _left_out("no validation records", missing))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    return _save(fig, out / COMPARE_CURVES)


def _compare_per_class(runs: Sequence[Run], labels: Sequence[str], colours: Sequence[Any],
                       out: Path) -> Optional[Path]:
    have, missing = [], []
    for r, lab, c in zip(runs, labels, colours):
        pc = (r.eval or {}).get("per_class") or {}
        if pc:
            have.append((r, lab, c, pc))
        else:
            missing.append(lab)
            log.info("%s: no eval.json with per-class numbers (run `arow eval` first); left out of %s",
                     r.path, COMPARE_PER_CLASS)
    if not have:
        log.info("no run has per-class numbers; no %s", COMPARE_PER_CLASS)
        return None
    n_cls = len(next(iter(have[0][3].values())))
    other = [lab for _, lab, _, pc in have if len(next(iter(pc.values()))) != n_cls]
    have = [h for h in have if h[1] not in other]
    attack = _robust_key([pc for *_, pc in have])
    fig = _figure(min(max(8.0, 0.35 * n_cls * len(have) + 3), 40), 5.0)
    ax = fig.subplots()
    x = np.arange(n_cls)
    width = 0.8 / len(have)
    for i, (r, lab, c, pc) in enumerate(have):
        key = attack or next((k for k in ROBUST_ORDER if k in pc),
                             min((k for k in pc if k != "clean"), default="clean"))
        vals = [100 * (v if v is not None else math.nan) for v in pc[key]]
        acc = (r.eval or {}).get("accuracy", {}).get(key)
        name = ATTACK_LABELS.get(key, key)
        label = lab + (f": {name}" if attack is None else "") + (f" ({100 * acc:.1f}% overall)" if acc is not None
                                                                 else "")
        ax.bar(x + (i - (len(have) - 1) / 2) * width, vals, width, color=c, label=label)
    datasets = {str((r.eval or {}).get("dataset") or r.config.get("dataset")) for r, *_ in have}
    names = class_names(next(iter(datasets))) if len(datasets) == 1 else []
    ax.set_xticks(x, names if len(names) == n_cls else [str(i) for i in range(n_cls)],
                  rotation=30 if n_cls <= 20 else 90, ha="right" if n_cls <= 20 else "center")
    what = ATTACK_LABELS.get(attack, attack) if attack else "each run's robust"
    ax.set(xlabel="class", ylabel=f"{what} test accuracy (%)", ylim=(0, 118))
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(have), 4), loc="upper left")
    ax.set_title(f"per-class {what} accuracy of each run's final model (eval.json)"
                 + _left_out("no eval.json per-class numbers", missing)
                 + _left_out(f"not {n_cls} classes", other), fontsize=10)
    return _save(fig, out / COMPARE_PER_CLASS)


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
    fig = _figure(10, 5.0)
    ax = fig.subplots()
    for r, lab, c, last in have:
        hist = np.asarray(last["weight_hist"], dtype=float)
        share = 100 * hist / max(hist.sum(), 1.0)
        centres = (np.arange(len(hist)) + 0.5) / len(hist)
        mean = last.get("train_weight_mean")
        ax.plot(centres, share, color=c, marker="o", markersize=3, lw=1.6,
                label=f"{lab}: {_weight_label(r)}, epoch {last['epoch']}"
                      + (f", mean {mean:.2f}" if isinstance(mean, (int, float)) else ""))
    ax.axvline(0.5, color=C_OTHER, lw=0.8, ls="--")
    bins = len(have[0][3]["weight_hist"])
    ax.set(xlabel=f"per-example weight (centres of {bins} bins over [0, 1])", ylabel="% of training examples",
           xlim=(0, 1), title="distribution of the per-example weight at each run's last epoch"
                             + _left_out("no per-example weight", missing))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / COMPARE_WEIGHTS)


def _compare_tradeoff(runs: Sequence[Run], labels: Sequence[str], colours: Sequence[Any],
                      out: Path) -> Optional[Path]:
    have = [(r, lab, c) for r, lab, c in zip(runs, labels, colours)
            if r.eval is not None and "clean" in r.eval.get("accuracy", {}) and len(r.eval["accuracy"]) > 1]
    missing = [lab for r, lab in zip(runs, labels) if all(r is not s for s, _, _ in have)]
    for r, lab in zip(runs, labels):
        if lab in missing:
            log.info("%s: no eval.json with clean and robust accuracy (run `arow eval` first); left out of %s",
                     r.path, COMPARE_TRADEOFF)
    if not have:
        log.info("no run has an eval.json; no %s", COMPARE_TRADEOFF)
        return None
    attack = _robust_key([r.eval["accuracy"] for r, _, _ in have])
    fig = _figure(7.5, 5.5)
    ax = fig.subplots()
    sizes = {(r.eval.get("n"), r.eval.get("test_set_size")) for r, _, _ in have}
    for r, lab, c in have:
        acc = r.eval["accuracy"]
        key = attack or next((k for k in ROBUST_ORDER if k in acc), min(k for k in acc if k != "clean"))
        x, y = 100 * acc["clean"], 100 * acc[key]
        extra = "" if attack else f", {ATTACK_LABELS.get(key, key)}"
        extra += f", n={r.eval.get('n')}" if len(sizes) > 1 else ""
        ax.scatter([x], [y], color=c, s=48, edgecolor="black", linewidth=0.5, zorder=3,
                   label=lab + (f" ({extra[2:]})" if extra else ""))
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    what = ATTACK_LABELS.get(attack, attack) if attack else "robust (each run's first attack)"
    if len(sizes) == 1:
        n, full = next(iter(sizes))
        on = f"{n} of {full} test images" + (" (SUBSET)" if n is not None and full is not None and n < full else "")
    else:
        on = "test sets of different sizes (n per run)"
    ax.set(xlabel="clean test accuracy (%)", ylabel=f"{what} test accuracy (%)")
    ax.set_title(f"clean vs {what} accuracy of each run's final model (eval.json)\n{on}"
                 + _left_out("no eval.json", missing), fontsize=10)
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out / COMPARE_TRADEOFF)
