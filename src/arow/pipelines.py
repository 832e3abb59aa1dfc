"""The two pipelines behind ``arow train`` and ``arow eval``, as library functions.

:func:`train_run` trains from a config alone (data, split, model, method, run folder);
:func:`evaluate_run` evaluates a run folder, checkpoint, safetensors export or an in-memory model
on a test set the way ``arow eval`` does: guards first, then the attacks, results written next to
the run. :func:`train_and_evaluate` is all of ``arow train`` (training, then that evaluation),
:func:`evaluate_source` all of ``arow eval`` (a run, or your own model through
:func:`evaluate_user_model`). The command line only parses flags, calls these, and prints.

>>> result = train_run(TrainConfig(epochs=1, limit_train=256, out="runs/quick"))   # doctest: +SKIP
>>> report = evaluate_run("runs/quick", ["clean", "pgd20"], n=500)                 # doctest: +SKIP
>>> report.accuracy["pgd20"]                                                         # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import __version__
from .training.callbacks import Callbacks
from .runs.checkpoint import Which, atomic_write_text, dump_json
from .runs.records import load_checkpoint, resolve_checkpoint
from .config.schema import TrainConfig
from .data import DATASETS, TensorData, load_dataset, train_val_split
from .data.extra import kept_indices, load_extra
from .evaluation.cascade import EVAL_BATCH_SIZE, EvalResult, Progress, evaluate
from .runs.rundir import RunDir, check_writable
from .training.trainer import Trainer, TrainResult
from .attacks import ATTACKS
from .config.schema import preset_names, preset_summary
from .methods import METHODS
from .models import MODELS
from .registry import Registry
from .models import build_model
from . import distributed
from .attacks import get_attack
from .training.callbacks import plot_run_safely
from .reporting.tables import markdown_table
from .reporting.tables import format_eps, markdown_table
from .threat import norm_label
from .threat import check_norm
from .data import default_eps
from .runs.records import model_from_checkpoint
from .reporting.robustbench import model_info, write_model_info
from .evaluation.guards import run_guards
from .data import as_data
from .evaluation.sources import is_user_model_file
from .evaluation.sources import load_user_model, load_weights, user_model_name

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


# --------------------------------------------------------------------------- training
def train_run(cfg: TrainConfig, *, callbacks: Union[Callbacks, Sequence[Callbacks], None] = None,
              resume: bool = False, plots: bool = True) -> TrainResult:
    """Train from a config alone: load the dataset, split off validation, build model and method.

    The held-out validation split (``cfg.val_size`` training images, seeded) is what model
    selection uses; the test set is never touched. ``plots`` draws the run's PNGs at the end.
    ``cfg.labels_kept`` first keeps the labelled real examples (the split is cut from them);
    ``cfg.extra_data`` is read here and mixed into every batch (docs/extra-data.md).

    >>> result = train_run(TrainConfig(method="arow", epochs=1, limit_train=256))  # doctest: +SKIP
    """

    cfg = cfg.resolve()
    info = DATASETS.get(cfg.dataset)
    data = load_dataset(cfg.dataset, root=cfg.data_dir, split="train")
    if cfg.limit_train is not None:
        data = data.subset(cfg.limit_train)
    if cfg.labels_kept is not None:  # the real examples whose labels are dropped are not used at all
        data = data.index(kept_indices(cfg.labels_kept, data.y, info.num_classes, cfg.seed))
    extra = load_extra(cfg.extra_data, info.num_classes, (info.image_size, info.image_size, info.in_channels),
                       take=cfg.extra_take) if cfg.extra_data else None
    val_size = min(cfg.val_size, len(data) // 5)
    train_data, val_data = train_val_split(data, val_size, seed=cfg.seed) if val_size > 0 else (data, None)
    spec = {"name": cfg.model, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size, "mean": None, "std": None, "dataset": cfg.dataset,
            "activation": cfg.activation}
    if cfg.normalize:
        spec["mean"] = train_data.x.mean(dim=(0, 2, 3)).tolist()
        spec["std"] = train_data.x.std(dim=(0, 2, 3)).tolist()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                        image_size=spec["image_size"], mean=spec["mean"], std=spec["std"],
                        activation=spec["activation"])
    return Trainer(cfg, model, train_data, val_data, model_spec=spec, callbacks=callbacks, resume=resume,
                   plots=plots, extra=extra).fit()


def train_and_evaluate(cfg: TrainConfig, *, callbacks: Union[Callbacks, Sequence[Callbacks], None] = None,
                       resume: bool = False, progress: Optional[Progress] = None,
                       on_guards: Optional[Callable[[EvalReport], None]] = None) -> TrainReport:
    """``arow train``: :func:`train_run`, then the evaluation of ``arow eval`` (guards included, see
    :func:`evaluate_run`) of the model in memory with ``cfg.eval_attacks`` on ``cfg.eval_n`` test images.

    The attack names and the test set are checked before training, so a typo or a missing test file
    fails now, not after training. The run's PNGs are drawn after ``eval.json`` exists (the per-class
    plot needs it), by rank 0 only; under torchrun the process group is left at the end.
    ``progress`` and ``on_guards`` go to the evaluation. ``cfg.eval_attacks=""`` skips it.

    >>> run = train_and_evaluate(TrainConfig(epochs=1, limit_train=256, out="runs/quick"))  # doctest: +SKIP
    >>> run.evaluation.accuracy                                                             # doctest: +SKIP
    """

    cfg = cfg.resolve()
    attacks = [s.strip() for s in cfg.eval_attacks.split(",") if s.strip()]
    if attacks and cfg.out is None:
        raise ValueError("the final evaluation is written to the run folder: set out (or eval_attacks='')")
    for name in attacks:  # a typo must fail now, not after training
        get_attack(name, cfg.eps, norm=cfg.norm)
    # missing or damaged test files must fail now, not after training
    test = load_dataset(cfg.dataset, root=cfg.data_dir, split="test") if attacks else None
    t0 = time.perf_counter()
    log.info("training %s / %s on %s -> %s", cfg.method, cfg.model, cfg.dataset, cfg.out)
    result = train_run(cfg, callbacks=callbacks, resume=resume, plots=not attacks)
    seconds = time.perf_counter() - t0
    is_main = distributed.info().is_main
    report = None
    if attacks:  # the same evaluation as `arow eval`, guards included, on the model in memory
        report = evaluate_run(cfg.out, attacks, model=result.model, data=test, n=cfg.eval_n, device=cfg.device,
                              guards=cfg.guards, extra={"train_seconds": seconds}, progress=progress,
                              on_guards=on_guards)
        if is_main:
            plot_run_safely(Path(cfg.out))  # after eval.json exists: per_class.png needs it
    distributed.teardown()
    return TrainReport(result, report, seconds, is_main)


# --------------------------------------------------------------------------- evaluation
@dataclass
class EvalReport:
    """What ``arow eval`` reports: the accuracies, what was evaluated, the guards and where it went."""

    result: Optional[EvalResult]
    info: dict[str, Any]
    guards: list[Any] = field(default_factory=list)  # GuardResult per guard that ran
    guards_ran: bool = False
    path: Optional[Path] = None  # the JSON written
    robustbench: Optional[Path] = None
    error: Optional[str] = None  # set when a guard tripped and the attacks did not run

    @property
    def accuracy(self) -> dict[str, float]:
        return self.result.accuracy if self.result is not None else {}

    @property
    def tripped(self) -> list[Any]:
        return [g for g in self.guards if not g.passed]

    def guards_text(self) -> str:
        """The guards' verdicts as a table, with the subset they ran on."""

        s = getattr(self.guards, "subset", None) or {}
        rows = [[g.name, "pass" if g.passed else "FAIL", f"{g.value:.4g}", f"{g.threshold:.4g}", g.message]
                for g in self.guards]
        where = f"{s.get('n')} of {s.get('total')} test images drawn at random (seed {s.get('seed')})" if s else ""
        return f"robustness guards on {where}\n" + markdown_table(rows, ["guard", "result", "value", "limit", "what"])

    def text(self) -> str:
        """The accuracies as a table, with what was evaluated and every warning that applies."""

        res, info = self.result, self.info
        rows = [[k, f"{100 * v:.2f}%", res.descriptions.get(k, "worst case over all attacks above")]
                for k, v in res.accuracy.items()]
        lines = [f"{info['dataset']} test set, {res.n} of {info['test_set_size']} images"
                 f"{' (SUBSET)' if info['subset'] else ''}, {norm_label(res.norm)} eps={format_eps(res.eps)}",
                 markdown_table(rows, ["attack", "accuracy", "what"])]
        if info["subset"]:
            lines.append(f"WARNING: {info['warning']}.")
        if self.tripped:
            lines.append("WARNING: robustness guards tripped (see above); these numbers are likely overstated.")
        if not self.guards_ran:
            lines.append("NOTE: the robustness guards did not run (--no-guards).")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = self.result.to_json() if self.result is not None else {}
        out.update(self.info)
        out["guards"] = [g.to_json() for g in self.guards]
        out["guards_ran"] = self.guards_ran
        out["arow_version"] = __version__  # which code evaluated (its attacks' random starts, for one)
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class TrainReport:
    """What ``arow train`` reports (:func:`train_and_evaluate`)."""

    train: TrainResult
    evaluation: Optional[EvalReport]  # None when ``cfg.eval_attacks`` is empty
    seconds: float  # the training's, without the evaluation
    is_main: bool = True  # rank 0 of a torchrun group, or a single process: the one that reports


def trained_norm(ckpt: dict[str, Any]) -> str:
    """The norm a checkpoint was trained in (``"linf"`` for checkpoints that predate L2)."""
    return str((ckpt.get("threat") or {}).get("norm") or (ckpt.get("config") or {}).get("norm") or "linf")


def eval_norm(ckpt: dict[str, Any], norm: Optional[str] = None) -> str:
    """The norm to evaluate in: ``norm`` if given, else the one the model was trained in."""

    return check_norm(norm) if norm is not None else trained_norm(ckpt)


def eval_eps(ckpt: dict[str, Any], dataset: str, eps: Optional[float] = None, norm: Optional[str] = None) -> float:
    """The radius to evaluate at: ``eps`` if given, else the model's training eps when ``norm`` is the
    norm it was trained in, else the data set's default in ``norm`` (L-inf 0.1 or 8/255; L2 1.5 or 0.5)."""

    norm = eval_norm(ckpt, norm)
    if eps is not None:
        info = DATASETS.get(dataset)
        hi = 1.0 if norm == "linf" else math.sqrt(info.in_channels * info.image_size ** 2)
        if not eps >= 0 or eps > hi:
            raise ValueError(f"--eps must be in [0, {hi:.4g}] for --norm {norm}, got {eps}")
        return float(eps)
    trained = (ckpt.get("threat") or {}).get("eps")
    if trained is not None and norm == trained_norm(ckpt):
        return float(trained)
    found = default_eps(dataset, norm)
    if found is None:
        raise ValueError(f"no default {norm} eps for data set {dataset!r}: pass --eps")
    return float(found)


def evaluate_run(
    source: PathLike,
    attacks: Sequence[str] = ("clean", "pgd20", "cw"),
    *,
    n: Optional[int] = None,
    eps: Optional[float] = None,
    norm: Optional[str] = None,
    which: str = "final",
    model: Optional[nn.Module] = None,
    dataset: Optional[str] = None,
    data: Optional[TensorData] = None,
    data_dir: Optional[str] = None,
    device: str = "auto",
    batch_size: int = EVAL_BATCH_SIZE,
    guards: bool = True,
    guards_n: int = 200,
    guards_seed: Optional[int] = None,
    allow_guard_failures: bool = False,
    resume: bool = True,
    json_out: Optional[PathLike] = None,
    robustbench: Optional[PathLike] = None,
    extra: Optional[dict[str, Any]] = None,
    progress: Optional[Progress] = None,
    on_guards: Optional[Callable[["EvalReport"], None]] = None,
) -> EvalReport:
    """Evaluate the model of ``source`` (run folder, checkpoint, ``.safetensors``) on its test set.

    The model runs in eval mode on the FULL test set unless ``n`` is given; the robustness guards
    run first on ``guards_n`` test images drawn at random (``guards_seed``, recorded; None draws a
    seed, so no model can be tuned to a known subset), ``guards=False`` skips them and the report
    says so; a tripped guard stops the
    evaluation unless ``allow_guard_failures``. ``model`` evaluates an in-memory model with the
    metadata of ``source``; ``data`` is a test set already loaded. Results go to ``eval.json`` of
    the run folder (full test set, final model), ``eval_<which>.json`` / ``eval_n<N>.json``
    otherwise, or ``json_out``; an interrupted evaluation continues from ``eval_state/``.
    ``on_guards(report)`` is called as soon as the guards have run. ``norm`` (``"linf"`` or ``"l2"``)
    defaults to the norm the model was trained in, ``eps`` to its training eps in that norm (else
    the data set's default in ``norm``).

    >>> rep = evaluate_run("runs/fmnist-arow", ["clean", "pgd20"])  # doctest: +SKIP
    >>> rep.accuracy                                               # doctest: +SKIP
    {'clean': 0.8195, 'pgd20': 0.6833, 'worst_case': 0.6833}
    """

    d = distributed.setup(device)
    dev = distributed.resolve_device(device, d.local_rank)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if guards and guards_n < 1:
        raise ValueError(f"--guards-n must be >= 1, got {guards_n}")
    attacks = [a.strip() for a in attacks if a.strip()]
    if not attacks:
        raise ValueError("--attacks is empty")
    if robustbench and not {"clean", "autoattack"} <= set(attacks):
        raise ValueError("--robustbench needs both clean and autoattack in --attacks")
    src = Path(source)
    ckpt_path = resolve_checkpoint(src, which)
    ckpt = load_checkpoint(ckpt_path)  # read once, without running code from the file
    cfg, spec = ckpt.get("config", {}), ckpt["model_spec"]
    dataset = dataset or spec.get("dataset") or cfg.get("dataset")
    if dataset not in DATASETS:
        raise ValueError(f"{ckpt_path}: does not say which data set it was trained on; pass --dataset")
    dinfo = DATASETS.get(dataset)
    shape = (spec.get("in_channels"), spec.get("image_size"), spec.get("num_classes"))
    if None not in shape and shape != (dinfo.in_channels, dinfo.image_size, dinfo.num_classes):
        raise ValueError(f"--dataset {dataset} ({dinfo.in_channels}x{dinfo.image_size}x{dinfo.image_size}, "
                         f"{dinfo.num_classes} classes) does not fit the model in {ckpt_path} "
                         f"({shape[0]}x{shape[1]}x{shape[1]}, {shape[2]} classes)")
    norm = eval_norm(ckpt, norm)
    other_norm = norm if norm != trained_norm(ckpt) else None  # its own file: eval.json stays the trained norm's
    eps = eval_eps(ckpt, dataset, eps, norm)
    built = [get_attack(name, eps, norm=norm) for name in attacks]  # a typo fails now, not after the guards
    if data is None:
        data = load_dataset(dataset, root=data_dir or cfg.get("data_dir"), split="test")
    full = len(data)
    if n is not None:
        data = data.subset(n)
    run = RunDir(src if src.is_dir() else src.parent)
    tag = which if src.is_dir() else src.stem  # eval.json: the final model on the FULL test set only
    path = check_writable(json_out if json_out else run.eval_path(tag, len(data), full, other_norm), "--json")
    if model is None:
        model = model_from_checkpoint(ckpt, device=dev)
    model = model.to(dev).eval().to(memory_format=torch.channels_last)  # same numbers, 1.3-1.45x on CPU
    subset = len(data) < full
    info: dict[str, Any] = {"dataset": dataset, "test_set_size": full, "subset": subset, "checkpoint": ckpt["path"],
                            "which": tag, "method": cfg.get("method"), "model": spec.get("name"),
                            "seed": cfg.get("seed"), **(extra or {})}
    if subset:
        info["warning"] = f"evaluated on a subset ({len(data)} of {full} test images); not a full-test-set number"
    data = data.to(dev)
    report = EvalReport(None, info, path=path)
    _guarded_evaluate(report, model, data, built, eps=eps, norm=norm, batch_size=batch_size, guards=guards,
                      guards_n=guards_n, guards_seed=guards_seed, allow_guard_failures=allow_guard_failures,
                      progress=progress, on_guards=on_guards, state_dir=run.file(RunDir.EVAL_STATE) if resume else None)
    if report.error:
        if d.is_main:
            atomic_write_text(dump_json(report.to_json()) + "\n", path)
        return report
    if d.is_main:
        atomic_write_text(dump_json(report.to_json()) + "\n", path)
        if {"clean", "autoattack"} <= set(report.accuracy):

            report.robustbench = write_model_info(model_info(report.to_json()),
                                                  robustbench or run.file(RunDir.ROBUSTBENCH))
    return report


def _guarded_evaluate(report: EvalReport, model: nn.Module, data: TensorData, attacks: Sequence[Any], *, eps: float,
                      norm: str = "linf", batch_size: int, guards: bool, guards_n: int, guards_seed: Optional[int],
                      allow_guard_failures: bool, progress: Optional[Progress] = None,
                      on_guards: Optional[Callable[["EvalReport"], None]] = None,
                      state_dir: Optional[Path] = None) -> EvalReport:
    """The guards (unless ``guards=False``), then the attacks unless a guard tripped: fills ``report``."""
    if guards:  # cheap, so before the evaluation: an untrustworthy model fails fast

        report.guards = run_guards(model, data.x, data.y, eps=eps, norm=norm, num_classes=data.num_classes,
                                   n=min(guards_n, len(data)), batch_size=batch_size, seed=guards_seed)
        report.guards_ran = True
        report.info["guards_subset"] = getattr(report.guards, "subset", None)
        if on_guards is not None:  # e.g. print the verdicts now, before hours of attacks
            on_guards(report)
        if report.tripped and not allow_guard_failures:
            bad = report.tripped
            report.error = (f"robustness guard {', '.join(repr(g.name) for g in bad)} tripped: {bad[0].message} "
                            f"(--allow-guard-failures reports the numbers anyway)")
            return report
    t0 = time.perf_counter()
    report.result = evaluate(model, data.x, data.y, attacks, eps=eps, norm=norm, num_classes=data.num_classes,
                             batch_size=batch_size, progress=progress, state_dir=state_dir)
    log.debug("evaluation took %.0fs", time.perf_counter() - t0)
    return report


class RobustnessGuardError(ValueError):
    """A robustness guard tripped: the model's robust accuracy would likely be overstated.

    ``report`` holds the guards' verdicts (:meth:`EvalReport.guards_text`)."""

    def __init__(self, message: str, report: EvalReport) -> None:
        super().__init__(message)
        self.report = report


def evaluate_model(
    model: nn.Module,
    data: Any,
    y: Any = None,
    attacks: Sequence[str] = ("clean", "pgd20"),
    *,
    eps: float,
    norm: str = "linf",
    num_classes: Optional[int] = None,
    guards: bool = True,
    guards_n: int = 200,
    guards_seed: Optional[int] = None,
    allow_guard_failures: bool = False,
    batch_size: int = EVAL_BATCH_SIZE,
    device: Optional[str] = None,
    progress: Optional[Progress] = None,
    name: str = "custom",
) -> EvalReport:
    """Evaluate any model honestly: the robustness guards, then ``attacks`` in order (``arow.evaluate``).

    ``model`` takes inputs in [0, 1] and returns logits (put normalisation inside it); it runs in
    eval mode. ``data`` is images with labels ``y``, a :class:`~arow.data.TensorData`, a torch
    ``Dataset`` or a ``DataLoader`` (see :func:`arow.data.as_data`). The guards (checks against
    gradient masking and other ways robustness gets overstated) run first on ``guards_n`` examples
    drawn at random; if one trips, :class:`RobustnessGuardError` is raised unless
    ``allow_guard_failures`` (then ``report.tripped`` lists them). ``guards=False`` skips them;
    ``report.guards_ran`` says whether they ran.

    >>> report = arow.evaluate(my_model, test_loader, attacks=["clean", "pgd20", "autoattack"], eps=8/255)  # doctest: +SKIP
    >>> report.accuracy, report.guards_ran                                                               # doctest: +SKIP
    ({'clean': 0.83, 'pgd20': 0.51, 'autoattack': 0.47, 'worst_case': 0.47}, True)
    """

    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    if not attacks:
        raise ValueError("attacks is empty")
    if guards and guards_n < 1:
        raise ValueError(f"guards_n must be >= 1, got {guards_n}")
    built = [get_attack(a, eps, norm=norm) if isinstance(a, str) else a for a in attacks]
    td = as_data(data, y, num_classes=num_classes, name=name)
    dev = torch.device(device) if device else next((p.device for p in model.parameters()), torch.device("cpu"))
    model = model.to(dev).eval()
    td = td.to(dev)
    info: dict[str, Any] = {"dataset": td.name, "test_set_size": len(td), "subset": False,
                            "model": type(model).__name__}
    report = _guarded_evaluate(EvalReport(None, info), model, td, built, eps=eps, norm=norm, batch_size=batch_size,
                               guards=guards, guards_n=guards_n, guards_seed=guards_seed,
                               allow_guard_failures=allow_guard_failures, progress=progress)
    if report.error:
        raise RobustnessGuardError(report.error.replace("--allow-guard-failures", "allow_guard_failures=True"), report)
    return report


def evaluate_source(
    source: Optional[PathLike],
    attacks: Sequence[str] = ("clean", "pgd20", "cw"),
    *,
    model_factory: Optional[str] = None,
    weights: Optional[PathLike] = None,
    n: Optional[int] = None,
    eps: Optional[float] = None,
    norm: Optional[Literal["linf", "l2"]] = None,
    which: Which = "final",
    dataset: Optional[str] = None,
    data_dir: Optional[str] = None,
    device: str = "auto",
    batch_size: int = EVAL_BATCH_SIZE,
    guards: bool = True,
    guards_n: int = 200,
    guards_seed: Optional[int] = None,
    allow_guard_failures: bool = False,
    resume: bool = True,
    json_out: Optional[PathLike] = None,
    robustbench: Optional[PathLike] = None,
    progress: Optional[Progress] = None,
    on_guards: Optional[Callable[["EvalReport"], None]] = None,
) -> EvalReport:
    """``arow eval``: evaluate a run's model (:func:`evaluate_run`) or your own (:func:`evaluate_user_model`;
    ``which``, ``resume`` and ``robustbench`` do not apply to it).

    >>> rep = evaluate_source(None, ["clean", "pgd20"], model_factory="mynets:wrn", weights="wrn.safetensors",
    ...                       dataset="cifar10", eps=8/255)  # doctest: +SKIP

    Args:
        source: run folder, checkpoint, .safetensors export, or your own model as a TorchScript file or
            exported program (.pt2; then ``dataset`` and ``eps`` are required)
        attacks: the attacks, in order: clean, pgd20, cw, fgsm, autoattack (standard; runs on what the
            attacks before it left robust), apgd-monitor, ... (`arow list`)
        model_factory: your own model: a function ``pkg.module:function`` returning the nn.Module
            (inputs in [0, 1], logits out); with ``weights``, ``dataset`` and ``eps``
        weights: state dict for ``model_factory`` (.safetensors, or a torch.save file read with
            weights_only=True)
        n: first N test examples only (default: the full test set)
        eps: e.g. 0.1 or 8/255 (default: the eps the model was trained with; with another ``norm``,
            that norm's data-set default)
        norm: threat model (default: the norm the model was trained with; L-inf for your own model)
        which: the run's checkpoint: final, best (by validation) or last
        dataset: default: the dataset the model was trained on
        data_dir: folder with the dataset files
        device: auto, cpu, cuda, cuda:1, ...
        batch_size: examples per attack batch; the verdicts of PGD and CW do not depend on it, and 100
            was the fastest measured on a CPU
        guards: run the checks against overstated robustness first (when skipped, the results say so)
        guards_n: test images the guards use
        guards_seed: which random test images the guards use (default: drawn, and recorded)
        allow_guard_failures: report the numbers even when a guard trips (default: stop with an error)
        resume: continue an interrupted evaluation from DIR/eval_state instead of recomputing everything
        json_out: where to write the results (default DIR/eval.json; DIR/eval_n<N>.json with ``n``)
        robustbench: RobustBench model-info JSON (default DIR/robustbench.json whenever autoattack ran)
        progress: progress callback of the attacks (see :mod:`arow.cli.progress`)
        on_guards: called with the report as soon as the guards have run
    """

    kw: dict[str, Any] = dict(n=n, eps=eps, data_dir=data_dir, device=device, batch_size=batch_size, guards=guards,
                              guards_n=guards_n, guards_seed=guards_seed, allow_guard_failures=allow_guard_failures,
                              json_out=json_out, progress=progress, on_guards=on_guards)
    if model_factory or (source and is_user_model_file(source)):
        if model_factory and source:
            raise ValueError(f"give either a model file ({source}) or --model-factory, not both")
        return evaluate_user_model(model_factory or source, dataset, attacks, weights=weights, norm=norm or "linf",
                                   **kw)
    if source is None:
        raise ValueError("give a run folder, checkpoint, .safetensors export, TorchScript or .pt2 file, "
                         "or --model-factory pkg.module:function")
    if weights:
        raise ValueError("--weights goes with --model-factory pkg.module:function")
    return evaluate_run(source, attacks, norm=norm, which=which, dataset=dataset, resume=resume,
                        robustbench=robustbench, **kw)


def evaluate_user_model(
    model: Union[nn.Module, PathLike],
    dataset: str,
    attacks: Sequence[str] = ("clean", "pgd20", "cw"),
    *,
    eps: float,
    name: Optional[str] = None,
    weights: Optional[PathLike] = None,
    norm: str = "linf",
    n: Optional[int] = None,
    data_dir: Optional[str] = None,
    device: str = "auto",
    batch_size: int = EVAL_BATCH_SIZE,
    guards: bool = True,
    guards_n: int = 200,
    guards_seed: Optional[int] = None,
    allow_guard_failures: bool = False,
    json_out: Optional[PathLike] = None,
    progress: Optional[Progress] = None,
    on_guards: Optional[Callable[["EvalReport"], None]] = None,
) -> EvalReport:
    """``arow eval`` for a model ``arow`` did not build (see :mod:`arow.evaluation.sources`): the same
    guards and attacks as :func:`evaluate_run` on a built-in test set, results in ``json_out``
    (default ``./eval_<name>.json``, or ``eval_<name>_n<N>.json`` on a subset).

    ``model`` is an ``nn.Module`` or what :func:`arow.evaluation.sources.load_user_model` loads
    (``pkg.module:function``, a TorchScript or ``.pt2`` file); ``weights`` are loaded into it.
    ``name`` defaults to the factory's function or the file's stem (the module's class name for a
    module)."""

    if not isinstance(model, nn.Module):
        name = name or user_model_name(model)
        model = load_user_model(model, weights=weights)
    elif weights is not None:
        load_weights(model, weights)
    name = name or type(model).__name__
    if dataset not in DATASETS:
        raise ValueError(f"--dataset is required for your own model (one of: {', '.join(DATASETS.names())})")
    if eps is None or not eps >= 0:
        raise ValueError("--eps is required for your own model (e.g. --eps 8/255): its training eps is not known")
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    built = [get_attack(a, eps, norm=norm) for a in attacks]
    d = distributed.setup(device)
    dev = distributed.resolve_device(device, d.local_rank)
    data = load_dataset(dataset, root=data_dir, split="test")
    full = len(data)
    if n is not None:
        data = data.subset(n)
    stem = f"eval_{name}" if len(data) == full else f"eval_{name}_n{len(data)}"
    path = check_writable(json_out or Path(f"{stem}.json"), "--json")
    model = model.to(dev).eval()
    info: dict[str, Any] = {"dataset": dataset, "test_set_size": full, "subset": len(data) < full, "model": name,
                            "source": "user model"}
    if info["subset"]:
        info["warning"] = f"evaluated on a subset ({len(data)} of {full} test images); not a full-test-set number"
    report = _guarded_evaluate(EvalReport(None, info, path=path), model, data.to(dev), built, eps=eps, norm=norm,
                               batch_size=batch_size, guards=guards, guards_n=guards_n, guards_seed=guards_seed,
                               allow_guard_failures=allow_guard_failures, progress=progress, on_guards=on_guards)
    if d.is_main:
        atomic_write_text(dump_json(report.to_json()) + "\n", path)
    return report


# --------------------------------------------------------------------------- what arow knows by name

def catalogue() -> dict[str, dict[str, str]]:
    """Everything ``arow`` knows by name, with a line on each: methods, models, datasets, attacks and
    presets (what ``arow list`` prints).

    >>> "arow" in catalogue()["methods"]
    True
    """
    regs: dict[str, Registry[Any]] = {"methods": METHODS, "models": MODELS, "datasets": DATASETS, "attacks": ATTACKS}
    return {**{title: {n: reg.help(n) for n in reg.names()} for title, reg in regs.items()},
            "presets": {n: preset_summary(n) for n in preset_names()}}


def train(cfg: TrainConfig, *, callbacks: Union[Callbacks, Sequence[Callbacks], None] = None,
          resume: bool = False) -> TrainResult:
    """Train from a config alone (:func:`train_run`)."""
    return train_run(cfg, callbacks=callbacks, resume=resume)

