"""The two pipelines behind ``arow train`` and ``arow eval``, as library functions.

:func:`train_run` trains from a config alone (data, split, model, method, run folder);
:func:`evaluate_run` evaluates a run folder, checkpoint, safetensors export or an in-memory model
on a test set the way ``arow eval`` does: guards first, then the attacks, results written next to
the run. :func:`train_and_evaluate` is all of ``arow train`` (training, then that evaluation),
:func:`evaluate_source` all of ``arow eval`` (a run, or your own model: see
:mod:`arow.evaluation.sources`), :func:`evaluate_model` is ``arow.evaluate``; all evaluate through
:func:`arow.evaluation.protocol.evaluate`. The command line only parses flags, calls these, and prints.

>>> result = train_run(TrainConfig(epochs=1, limit_train=256, out="runs/quick"))   # doctest: +SKIP
>>> report = evaluate_run("runs/quick", ["clean", "pgd20"], n=500)                 # doctest: +SKIP
>>> report.accuracy["pgd20"]                                                         # doctest: +SKIP
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .training.callbacks import Callbacks, RunWriter, callback_list, run_writers
from .runs.checkpoint import atomic_write_text, dump_json
from .config.plan import ensure_resolved
from .config.schema import ConfigError, TrainConfig
from .data import DATASETS, TensorData, load_dataset, train_val_split
from .data.extra import ExtraData, kept_indices, load_extra
from .runs.rundir import RunDir, check_writable
from .training.trainer import Trainer, TrainResult, plan_training
from .attacks import ATTACKS
from .config.presets import preset_names, preset_summary
from .methods import METHODS, Method
from .models import MODELS
from .registry import Registry
from .models.spec import ModelSpec
from . import distributed
from .attacks import get_attack
from .training.callbacks import plot_run_safely
from .reporting.robustbench import model_info, write_model_info
from .evaluation.cascade import Progress
from .evaluation.protocol import build_attacks, evaluate
from .evaluation.report import EvalReport, RobustnessGuardError
from .evaluation.settings import EvalSettings, GuardSettings, eval_settings, resolve_threat
from .evaluation.sources import AROW_KINDS, ModelFormat, ModelSource, open_source
from .data import as_data

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


# --------------------------------------------------------------------------- training
def train_run(cfg: TrainConfig, *, callbacks: Union[Callbacks, Sequence[Callbacks], None] = None,
              resume: bool = False, plots: bool = True) -> TrainResult:
    """Train from a config alone: load the dataset, split off validation, build model and method.

    The held-out validation split (``cfg.val_size`` training images, seeded) is what model
    selection uses; the test set is never touched. ``plots`` draws the run's PNGs at the end.
    ``cfg.labels_kept`` first keeps the labelled real examples (the split is cut from them);
    ``cfg.extra_data`` is read here and mixed into every batch (docs/extra-data.md). The run folder
    ``cfg.out`` (if set) is kept as :func:`build_trainer` keeps it; ``resume`` continues it.

    >>> result = train_run(TrainConfig(method="arow", epochs=1, limit_train=256))  # doctest: +SKIP
    """

    cfg = ensure_resolved(cfg)
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
    spec = ModelSpec(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                     image_size=info.image_size, dataset=cfg.dataset, activation=cfg.activation)
    if cfg.normalize:
        spec = spec.replace(mean=train_data.x.mean(dim=(0, 2, 3)), std=train_data.x.std(dim=(0, 2, 3)))
    torch.manual_seed(cfg.seed)
    return build_trainer(cfg, spec.build(), train_data, val_data, model_spec=spec, callbacks=callbacks,
                         resume=resume, plots=plots, extra=extra).fit()


def build_trainer(cfg: TrainConfig, model: nn.Module, train_data: TensorData, val_data: Optional[TensorData] = None,
                  *, method: Optional[Method] = None, model_spec: Union[ModelSpec, dict[str, Any], None] = None,
                  callbacks: Union[Callbacks, Sequence[Callbacks], None] = None, resume: bool = False,
                  plots: bool = True, extra: Optional[ExtraData] = None) -> Trainer:
    """A :class:`~arow.training.trainer.Trainer` that keeps the run folder ``cfg.out``: its writers
    (:func:`~arow.training.callbacks.run_writers`) come before ``callbacks``; a folder that already
    holds a run is refused unless ``resume``, which continues it from its saved state (the same
    experiment: see :meth:`~arow.training.callbacks.RunWriter.resume_state`). The config is resolved
    once, here, for this model and data. Your own model and tensors into a run folder:

    >>> cfg = TrainConfig(epochs=10, eps=8 / 255, out="runs/mine")                       # doctest: +SKIP
    >>> result = build_trainer(cfg, my_model, from_tensors(x, y), callbacks=[MyLogger()]).fit()  # doctest: +SKIP

    ``method`` (a method object built by you), ``model_spec``, ``extra`` and ``plots`` are as for the
    Trainer and :func:`train_run`.
    """
    cfg = plan_training(cfg, model, train_data, model_spec=model_spec, method=method)
    distributed.setup(cfg.device)
    run = RunDir(cfg.out) if cfg.out else None
    if resume and run is None:
        raise ConfigError("--resume needs --out pointing at the run folder to continue")
    writers = run_writers(run, cfg, resume=resume, plots=plots)
    trainer = Trainer(cfg, model, train_data, val_data, method=method, model_spec=model_spec,
                      callbacks=writers + callback_list(callbacks), extra=extra)
    if resume:
        trainer.load_state_dict(RunWriter(run).resume_state(trainer.cfg))
    return trainer


def train_and_evaluate(cfg: TrainConfig, *, callbacks: Union[Callbacks, Sequence[Callbacks], None] = None,
                       resume: bool = False, progress: Optional[Progress] = None,
                       on_guards: Optional[Callable[[EvalReport], None]] = None) -> TrainReport:
    """``arow train``: :func:`train_run`, then the evaluation of ``arow eval`` (guards included, see
    :func:`evaluate_loaded`) of the model in memory with ``cfg.eval_attacks`` on ``cfg.eval_n`` test
    images, at the data set, norm and eps the config says (:func:`trained_source`: nothing is read back).

    The attack names and the test set are checked before training, so a typo or a missing test file
    fails now, not after training. The run's PNGs are drawn after ``eval.json`` exists (the per-class
    plot needs it), by rank 0 only; under torchrun the process group is left at the end.
    ``progress`` and ``on_guards`` go to the evaluation. ``cfg.eval_attacks=""`` skips it.

    >>> run = train_and_evaluate(TrainConfig(epochs=1, limit_train=256, out="runs/quick"))  # doctest: +SKIP
    >>> run.evaluation.accuracy                                                             # doctest: +SKIP
    """

    cfg = ensure_resolved(cfg)
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
        settings, guards = eval_settings(attacks=attacks, n=cfg.eval_n, device=cfg.device, guards=cfg.guards,
                                         allow_guard_failures=cfg.allow_guard_failures)
        report = evaluate_loaded(trained_source(cfg), settings, guards, model=result.model, data=test,
                                 extra={"train_seconds": seconds}, progress=progress, on_guards=on_guards)
        if is_main:
            plot_run_safely(Path(cfg.out))  # after eval.json exists: per_class.png needs it
    distributed.teardown()
    return TrainReport(result, report, seconds, is_main)


def trained_source(cfg: TrainConfig) -> ModelSource:
    """What the evaluation knows of the model :func:`train_run` trained from ``cfg`` (resolved), taken
    from the plan, not read back from ``final.pt``: its data set, the norm and eps it was trained at,
    the run folder its results go to, and what they record about it."""
    out = Path(str(cfg.out))
    info = {"checkpoint": str(RunDir(out).file(RunDir.FINAL)), "which": "final", "method": cfg.method,
            "model": cfg.model, "seed": cfg.seed}
    return ModelSource("run", cfg.model, path=out, dataset=cfg.dataset, trained_norm=cfg.norm, trained_eps=cfg.eps,
                       run_dir=out, data_dir=cfg.data_dir, info=info)


# --------------------------------------------------------------------------- evaluation
@dataclass
class TrainReport:
    """What ``arow train`` reports (:func:`train_and_evaluate`)."""

    train: TrainResult
    evaluation: Optional[EvalReport]  # None when ``cfg.eval_attacks`` is empty
    seconds: float  # the training's, without the evaluation
    is_main: bool = True  # rank 0 of a torchrun group, or a single process: the one that reports


def evaluate_source(
    source: Optional[PathLike] = None,
    attacks: Optional[Sequence[str]] = None,
    *,
    settings: Optional[EvalSettings] = None,
    guards: Union[GuardSettings, bool, None] = None,
    model_factory: Optional[str] = None,
    weights: Optional[PathLike] = None,
    trust_code: bool = False,
    model_format: Optional[ModelFormat] = None,
    progress: Optional[Progress] = None,
    on_guards: Optional[Callable[[EvalReport], None]] = None,
    **options: Any,
) -> EvalReport:
    """``arow eval``: evaluate the model of ``source`` (see :mod:`arow.evaluation.sources`) as
    ``settings`` and ``guards`` say: :func:`~arow.evaluation.sources.open_source` (every flag
    checked, nothing loaded), then :func:`evaluate_loaded`. ``attacks`` and ``options`` (named like
    the flags: ``n=1000``, ``which="best"``, ``guards_n=50``) override the settings objects.

    >>> rep = evaluate_source("runs/fmnist-arow", ["clean", "pgd20"], n=1000, which="best")  # doctest: +SKIP
    >>> rep = evaluate_source(None, ["clean", "pgd20"], model_factory="mynets:wrn", weights="wrn.safetensors",
    ...                       dataset="cifar10", eps=8/255)                                  # doctest: +SKIP

    Args:
        source: run folder, checkpoint, .safetensors export, or your own model as a TorchScript file or
            exported program (.pt2; both need ``trust_code``, --dataset and --eps)
        attacks: the attacks, in order (see --attacks)
        settings: what to evaluate and how (EvalSettings; the flags below --attacks)
        guards: the robustness guards (GuardSettings, or False to skip them)
        model_factory: your own model: a function ``pkg.module:function`` returning the nn.Module
            (inputs in [0, 1], logits out), with ``weights`` (or a run folder of your own model class as
            the source, whose checkpoint holds the weights), --dataset and --eps
        weights: state dict for ``model_factory`` (.safetensors, or a torch.save file read with
            weights_only=True)
        trust_code: load a TorchScript file or exported program: both are code that runs with your
            permissions (it can read and write files); give it only for files whose source you trust
        model_format: what the model file is when its name does not say so (a .pt2 file is an exported
            program, a TorchScript archive says it is one; a .pt file is otherwise an arow checkpoint)
        progress: progress callback of the attacks (see :mod:`arow.cli.progress`)
        on_guards: called with the report as soon as the guards have run
        options: settings by flag name, overriding ``settings`` and ``guards``
    """
    settings, guard_settings = eval_settings(settings, guards, attacks=attacks, **options)
    src = open_source(source, dataset=settings.dataset, model_factory=model_factory, weights=weights,
                      trust_code=trust_code, model_format=model_format, which=settings.which)
    return evaluate_loaded(src, settings, guard_settings, progress=progress, on_guards=on_guards)


def evaluate_run(
    source: PathLike,
    attacks: Optional[Sequence[str]] = None,
    *,
    settings: Optional[EvalSettings] = None,
    guards: Union[GuardSettings, bool, None] = None,
    model: Optional[nn.Module] = None,
    data: Optional[TensorData] = None,
    extra: Optional[dict[str, Any]] = None,
    progress: Optional[Progress] = None,
    on_guards: Optional[Callable[[EvalReport], None]] = None,
    **options: Any,
) -> EvalReport:
    """Evaluate the model of ``source`` (run folder, checkpoint, ``.safetensors`` export) on its
    test set as ``arow eval`` does (:func:`evaluate_loaded`); ``model`` evaluates an in-memory
    model with the metadata of ``source``, ``data`` is a test set already loaded, ``extra`` more
    entries for the results. ``attacks`` and ``options`` (named like the flags) override the settings.

    >>> rep = evaluate_run("runs/fmnist-arow", ["clean", "pgd20"])  # doctest: +SKIP
    >>> rep.accuracy                                               # doctest: +SKIP
    {'clean': 0.8195, 'pgd20': 0.6833, 'worst_case': 0.6833}
    """
    settings, guard_settings = eval_settings(settings, guards, attacks=attacks, **options)
    src = open_source(source, dataset=settings.dataset, which=settings.which, model=model)
    return evaluate_loaded(src, settings, guard_settings, data=data, extra=extra, progress=progress,
                           on_guards=on_guards)


def evaluate_loaded(src: ModelSource, settings: EvalSettings, guards: GuardSettings, *,
                    model: Optional[nn.Module] = None, data: Optional[TensorData] = None,
                    extra: Optional[dict[str, Any]] = None, progress: Optional[Progress] = None,
                    on_guards: Optional[Callable[[EvalReport], None]] = None) -> EvalReport:
    """The evaluation pipeline of a model whose source is known (:class:`ModelSource`): its
    threat model decided (:func:`~arow.evaluation.settings.resolve_threat`), the attacks built (a
    typo fails here), the test set loaded (unless ``data``), the output path checked, and only then
    the model loaded (unless ``model``: e.g. the model ``arow train`` holds) and evaluated by
    :func:`~arow.evaluation.protocol.evaluate`, guards first. The results go to ``settings.json_out``
    or :meth:`ModelSource.results_path` (rank 0), RobustBench's model info beside a run's results
    whenever clean and AutoAttack ran; an interrupted evaluation of a run continues from its
    ``eval_state/`` (``settings.resume``)."""
    settings, guards = settings.check(), guards.check()
    eps, norm = resolve_threat(settings.eps, settings.norm, dataset=src.dataset, trained_eps=src.trained_eps,
                               trained_norm=src.trained_norm)
    settings = settings.resolved(eps, norm)
    build_attacks(settings.attacks, eps, norm)  # a typo fails before anything is loaded
    d = distributed.setup(settings.device)
    dev = distributed.resolve_device(settings.device, d.local_rank)
    if data is None:
        data = load_dataset(str(src.dataset), root=settings.data_dir or src.data_dir, split="test")
    full = len(data)
    n = min(settings.n or full, full)
    path = _output_path(settings.json_out, src.results_path(n, full, norm), src)
    robustbench = settings.robustbench or src.robustbench_path(n, full, norm)
    if settings.robustbench:
        check_writable(settings.robustbench, "--robustbench")
    if model is None:
        model = src.load(dev).model
    if src.kind in AROW_KINDS:
        model = model.to(dev).eval().to(memory_format=torch.channels_last)  # same numbers, 1.3-1.45x on CPU
    info = {"dataset": src.dataset, **(src.info or {"model": src.name}), **(extra or {})}
    if src.user_model or src.kind == "factory":
        info["source"] = "user model" if src.factory is None else f"user model ({src.factory})"
    state = RunDir(src.run_dir).file(RunDir.EVAL_STATE) if settings.resume and src.run_dir is not None else None
    report = evaluate(model, data, settings, guards, progress=progress, on_guards=on_guards, state_dir=state,
                      info=info)
    report.path = path
    if d.is_main:
        if path is not None:
            atomic_write_text(dump_json(report.to_json()) + "\n", path)
        if robustbench and not report.error and {"clean", "autoattack"} <= set(report.accuracy):
            report.robustbench = write_model_info(model_info(report.to_json()), robustbench)
    return report


def _output_path(given: Optional[str], default: Optional[Path], src: ModelSource) -> Optional[Path]:
    """Where the results go, checked writable now (before hours of work)."""
    if given is None and default is None and src.kind == "factory":
        raise ValueError(f"--json is required for --model-factory {src.factory} without --weights: the results "
                         f"are written beside the weights or model file, and there is none")
    where = given if given is not None else default
    return check_writable(where, "--json") if where is not None else None


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
    batch_size: Optional[int] = None,
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
    ``report.guards_ran`` says whether they ran. The same evaluation as ``arow eval``
    (:func:`arow.evaluation.protocol.evaluate`), on ``device`` (default: the model's).

    >>> report = arow.evaluate(my_model, test_loader, attacks=["clean", "pgd20", "autoattack"], eps=8/255)  # doctest: +SKIP
    >>> report.accuracy, report.guards_ran                                                               # doctest: +SKIP
    ({'clean': 0.83, 'pgd20': 0.51, 'autoattack': 0.47, 'worst_case': 0.47}, True)
    """
    td = as_data(data, y, num_classes=num_classes, name=name)
    eps, norm = resolve_threat(eps, norm, dims=td.x[0].numel(), trained_norm=norm)
    device = device or str(next((p.device for p in model.parameters()), torch.device("cpu")))
    settings, guard_settings = eval_settings(attacks=attacks, eps=eps, norm=norm, batch_size=batch_size,
                                             device=device, guards=guards, guards_n=guards_n,
                                             guards_seed=guards_seed, allow_guard_failures=allow_guard_failures)
    report = evaluate(model, td, settings, guard_settings, progress=progress, info={"model": type(model).__name__})
    if report.error:
        raise RobustnessGuardError(report.error.replace("--allow-guard-failures", "allow_guard_failures=True"), report)
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

