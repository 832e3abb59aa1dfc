"""A study cell: an ordinary run, resolved once from the study into ``cell.json`` and run from it.

:func:`resolve_cells` puts each cell's training config together with
:func:`arow.config.resolve_config`, the resolver of ``arow train``, and checks it with the same
rules (the config's ranges, each hyper-parameter's, each attack's), before anything is written.
The result, a :class:`CellPlan`, is written as the cell folder's ``cell.json``; :func:`run_cell`
runs it in the current process (``python -m arow.study.cell CELL``, or a scheduler calling it):

1. ``train``: :func:`arow.pipelines.train_and_evaluate` on the cell's config: training, then
   the study's attacks on the test set (the full one, or the first ``eval_n`` images of an
   exploratory study) after the robustness guards; ``resume`` continues a killed training run from
   its ``last.pt``, ``eval`` evaluates a trained model whose evaluation is missing;
2. ``autoattack``: standard AutoAttack on the first ``autoattack_n`` test images, the same images
   for every cell (``eval_n<N>.json``; a killed evaluation continues from its saved state);
3. ``eps-curve``: PGD-20 accuracy against eps on the first ``eps_curve_n`` images (``eps_curve.json``).

Each step is skipped when its output exists, so a killed cell continues where it stopped. A step
that fails records its one-line error in the cell's ``study_failed.json`` and raises
:class:`CellFailed` with the exit status ``arow`` uses for it (2 bad input, 3 a tripped guard, 4 a
diverged run).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from ..attacks import get_attack
from ..config import TrainConfig, resolve, resolve_config, saved_config
from ..evaluation.cascade import Progress, quiet_attack_lines
from ..methods import METHODS
from ..pipelines import EvalReport, evaluate_run, train_and_evaluate
from ..reporting.plots import plot_runs
from ..reporting.records import EvalFile, RunRecord, read_run
from ..runs.rundir import RunDir
from ..runs.studydir import CellDir
from ..training.callbacks import Callbacks
from ..training.errors import TrainingDiverged
from .spec import Cell, StudyError, StudySpec, Variant, attack_names

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
STEPS = ("train", "resume", "eval", "autoattack", "eps-curve")
#: exit status of a failed cell by cause, as ``arow`` exits: bad input, a tripped guard, a diverged run
BAD_INPUT, GUARD_TRIPPED, DIVERGED, CRASHED = 2, 3, 4, 1


class CellFailed(Exception):
    """A step of a cell failed; ``step``, the one-line ``error`` and the ``exit_status`` were recorded."""

    def __init__(self, step: str, error: str, exit_status: int) -> None:
        super().__init__(error)
        self.step, self.error, self.exit_status = step, error, exit_status


@dataclass(frozen=True)
class Evaluation:
    """What a cell evaluates after training, and so which files say that it finished: the study's
    ``attacks`` (after the guards when ``guards``) on the full test set or its first ``eval_n``
    images, AutoAttack on the first ``autoattack_n`` and the eps curve on the first ``eps_curve_n``
    (0: no such step)."""

    attacks: tuple[str, ...]
    guards: bool
    eval_n: Optional[int]
    autoattack_n: int
    eps_curve_n: int

    @staticmethod
    def of(spec: StudySpec, variant: Variant) -> "Evaluation":
        return Evaluation(tuple(attack_names(spec.attacks)), spec.guards, spec.eval_n,
                          spec.aa_n if variant.aa else 0, spec.eps_curve_n)


@dataclass(frozen=True)
class CellPlan:
    """A cell, resolved: its training config (``arow train``'s, without ``out``: the cell's folder)
    and its evaluation steps after training (0: the step is skipped)."""

    name: str
    label: str
    method: str
    seed: int
    config: dict[str, Any]
    autoattack_n: int
    eps_curve_n: int

    @property
    def evaluation(self) -> "Evaluation":
        return Evaluation(tuple(attack_names(self.config["eval_attacks"])), bool(self.config["guards"]),
                          self.config.get("eval_n"), self.autoattack_n, self.eps_curve_n)

    def train_config(self, folder: PathLike) -> TrainConfig:
        # read as a saved config: a cell prepared before a data set had its own hyper-parameter
        # values runs with the method's, as it was planned
        return TrainConfig.from_dict({**saved_config(self.config), "out": str(folder)})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: Any, where: PathLike) -> "CellPlan":
        """The plan a ``cell.json`` holds (StudyError names a damaged one)."""
        names = [f.name for f in dataclasses.fields(CellPlan)]
        if not isinstance(d, dict) or set(d) != set(names) or not isinstance(d.get("config"), dict):
            raise StudyError(f"{where}: not a study cell file (expected the keys {', '.join(names)})")
        try:
            TrainConfig.from_dict({**d["config"], "out": None}).validate()
        except ValueError as e:
            raise StudyError(f"{where}: {e}") from None
        return CellPlan(**d)


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """Hold back the config resolver's notes (said once per row, not once per seed)."""
    logger = logging.getLogger(resolve_config.__module__)
    level = logger.level
    if on:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_cell(spec: StudySpec, cell: Cell, quiet: bool = False) -> CellPlan:
    """The cell's config through ``arow train``'s resolver and rules; StudyError (one line, naming
    the row) if any value is refused."""
    v = cell.variant
    overrides = {**spec.overrides, **v.overrides, "method": v.method, "seed": cell.seed,
                 "eval_attacks": spec.attacks, "guards": spec.guards,
                 **({"allow_guard_failures": True} if spec.allow_guard_failures else {})}
    try:
        with _quiet(quiet):
            cfg = resolve_config(overrides, dict(v.method_args), preset=spec.preset)
        hparams = METHODS.get(cfg.method).hparams
        margs = {k: hparams[k].check(k, value) for k, value in cfg.method_args.items()}
        cfg = resolve(dataclasses.replace(cfg, out=None, eval_n=spec.eval_n, method_args=margs))
        for name in cfg.eval_attacks.split(","):
            get_attack(name.strip(), cfg.eps, norm=cfg.norm)
    except (ValueError, KeyError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudyError(f"{v.label}: {text}") from None
    config = cfg.to_dict()
    config.pop("out")
    return CellPlan(cell.name, v.label, v.method, cell.seed, config, spec.aa_n if v.aa else 0, spec.eps_curve_n)


def resolve_cells(spec: StudySpec) -> list[CellPlan]:
    """Every cell of the study, resolved and checked (the first refused value ends it)."""
    seen: set[str] = set()
    plans = []
    for cell in spec.cells():
        plans.append(resolve_cell(spec, cell, quiet=cell.variant.label in seen))
        seen.add(cell.variant.label)
    return plans


# --------------------------------------------------------------------------- what a cell folder holds
def read_record(run: CellDir) -> Optional[RunRecord]:
    """The cell's run folder as :func:`~arow.reporting.records.read_run` reads it; None before training
    wrote its config."""
    return read_run(run.path) if run.file(RunDir.CONFIG).is_file() else None


def main_eval(ev: Evaluation, run: CellDir, rec: Optional[RunRecord]) -> Optional[EvalFile]:
    """The cell's test-set evaluation: ``eval.json``, or ``eval_n<N>.json`` in an exploratory study
    (``eval.json`` when the test set is no larger than ``eval_n``)."""
    if rec is None:
        return None
    full = rec.eval("final", full=True)
    if ev.eval_n is None:
        return full
    sub = rec.evals.get(run.first_n_eval_path(ev.eval_n).name)
    if sub is not None:
        return sub
    # a test set no larger than eval_n: the evaluation covered all of it, so it went to eval.json
    return full if full is not None and full.n is not None and full.n <= ev.eval_n else None


def has_main_eval(ev: Evaluation, e: Optional[EvalFile]) -> bool:
    """The evaluation has the study's attacks, after the guards when the study runs them (one made
    without them, e.g. a run folder copied in from elsewhere, is redone)."""
    return (e is not None and e.error is None and set(ev.attacks) <= set(e.accuracy)
            and (not ev.guards or e.data.get("guards_ran") is True))


def autoattack_eval(ev: Evaluation, run: CellDir, rec: Optional[RunRecord]) -> Optional[EvalFile]:
    """The cell's AutoAttack evaluation on the first ``autoattack_n`` test images, if it finished."""
    if rec is None or not ev.autoattack_n:
        return None
    e = rec.evals.get(run.first_n_eval_path(ev.autoattack_n).name)
    return e if e is not None and e.error is None and "autoattack" in e.accuracy else None


def eps_curve_of(ev: Evaluation, run: CellDir) -> Optional[dict[str, Any]]:
    """The cell's ``eps_curve.json`` if it was made on the study's ``eps_curve_n`` images."""
    curve = run.read_eps_curve() if ev.eps_curve_n else None
    if curve is None or not isinstance(curve.get("n"), int):
        return None
    fits = curve["n"] == ev.eps_curve_n or (not curve.get("subset") and curve["n"] < ev.eps_curve_n)
    return curve if fits else None


def pending_steps(plan: CellPlan, run: CellDir) -> list[str]:
    """The steps still needed to finish the cell (:data:`STEPS`), from what its folder holds."""
    rec, ev = read_record(run), plan.evaluation
    steps: list[str] = []
    if not has_main_eval(ev, main_eval(ev, run, rec)):
        if run.file(RunDir.FINAL).is_file():
            steps.append("eval")
        else:
            steps.append("resume" if run.file(RunDir.LAST).is_file() or run.file(RunDir.PREV).is_file() else "train")
    if ev.autoattack_n and autoattack_eval(ev, run, rec) is None:
        steps.append("autoattack")
    if ev.eps_curve_n and eps_curve_of(ev, run) is None:
        steps.append("eps-curve")
    return steps


# --------------------------------------------------------------------------- running a cell
def _check(step: str, rep: Optional[EvalReport]) -> None:
    if rep is not None and rep.error:
        raise CellFailed(step, rep.error, GUARD_TRIPPED)
    if rep is not None:
        log.info("%s", ", ".join(f"{k} {100 * v:.2f}%" for k, v in rep.accuracy.items()))


def _step(step: str, plan: CellPlan, run: CellDir, callbacks: Sequence[Callbacks], progress: Optional[Progress]) -> None:
    device, ev = plan.config.get("device", "auto"), plan.evaluation
    if step in ("train", "resume"):
        rep = train_and_evaluate(plan.train_config(run.path), callbacks=list(callbacks), resume=step == "resume",
                                 progress=progress)
        _check(step, rep.evaluation)
    elif step == "eval":
        _check(step, evaluate_run(run.path, ev.attacks, n=ev.eval_n, guards=ev.guards, device=device,
                                  allow_guard_failures=bool(plan.config.get("allow_guard_failures")),
                                  progress=progress))
    elif step == "autoattack":
        n = plan.autoattack_n
        _check(step, evaluate_run(run.path, ["clean", "autoattack"], n=n, guards=False, device=device,
                                  json_out=run.first_n_eval_path(n), progress=progress))
    elif step == "eps-curve":
        plot_runs([run.path], eps_curve_args={"n": plan.eps_curve_n, "device": device}, echo=log.info)
    else:
        raise ValueError(f"unknown cell step {step!r}; the steps are {', '.join(STEPS)}")


def _failure(step: str, e: BaseException) -> CellFailed:
    """What a step's exception is recorded as: its first line and the exit status ``arow`` gives it."""
    if isinstance(e, CellFailed):
        return e
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, TrainingDiverged):
        return CellFailed(step, text, DIVERGED)
    if isinstance(e, (ValueError, OSError, KeyError)):
        return CellFailed(step, text or type(e).__name__, BAD_INPUT)
    log.error("%s failed", step, exc_info=e)  # unexpected: the traceback goes to the cell's log
    return CellFailed(step, f"{type(e).__name__}: {text}" if text else type(e).__name__, CRASHED)


def load_plan(cell: PathLike) -> tuple[CellPlan, CellDir]:
    """The plan in a cell folder's ``cell.json`` (``cell``: the folder or the file) and the folder."""
    path = Path(cell)
    run = CellDir(path if path.is_dir() else path.parent)
    if not path.is_dir() and path.name != CellDir.CELL:
        raise StudyError(f"{path}: a study cell is its folder or the folder's {CellDir.CELL}")
    data = run.read_cell()
    if data is None:
        raise StudyError(f"{run.file(CellDir.CELL)} does not exist: prepare the study first "
                         f"(`arow study ... --prepare`)")
    return CellPlan.from_json(data, run.file(CellDir.CELL)), run


def run_cell(cell: PathLike, *, callbacks: Sequence[Callbacks] = (), progress: Optional[Progress] = None,
             on_step: Optional[Callable[[str], None]] = None) -> list[str]:
    """Run the steps of a prepared cell that have no output yet (in this process); returns them.

    ``cell`` is the cell's folder or its ``cell.json``. ``callbacks`` go to the training,
    ``progress`` to the evaluations, ``on_step(step)`` is called as each step starts. A failed
    step is recorded in the folder's ``study_failed.json`` and raised as :class:`CellFailed`; an
    interrupt (KeyboardInterrupt) records nothing: the cell continues when run again.
    """
    plan, run = load_plan(cell)
    run.clear_failure()
    step, done = "prepare", []
    try:
        for step in pending_steps(plan, run):
            if on_step is not None:
                on_step(step)
            log.info("step %s of %s ...", step, plan.name)
            t0 = time.perf_counter()
            with quiet_attack_lines():  # progress while it runs; its numbers once, in the step's own line
                _step(step, plan, run, callbacks, progress)
            log.info("step %s done in %.0fs", step, time.perf_counter() - t0)
            done.append(step)
    except Exception as e:  # noqa: BLE001 - every failure is recorded with its step, then raised
        failed = _failure(step, e)
        run.write_failure(failed.step, failed.error, failed.exit_status)
        if failed is e:
            raise
        raise failed from e
    return done
