"""The evaluation protocol: one function, :func:`evaluate`, runs the robustness guards on a model
and then, unless one tripped, the attacks on the test set. ``arow eval``, ``arow train``'s final
evaluation, :func:`arow.evaluate` and the eps curve all evaluate through it.

>>> report = evaluate(model, test, EvalSettings(attacks=["clean", "pgd20"], eps=0.1))  # doctest: +SKIP
>>> report.accuracy, report.guards_ran                                                  # doctest: +SKIP
({'clean': 0.82, 'pgd20': 0.68, 'worst_case': 0.68}, True)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch.nn as nn

from .. import distributed
from ..attacks import Attack, get_attack
from ..data import TensorData
from .cascade import Progress, default_eval_batch, float32_kernels, precision_record
from .cascade import evaluate as run_attacks
from .crosscheck import check_after_evaluation
from .guards import run_guards
from .report import EvalReport
from .settings import EvalSettings, GuardSettings

log = logging.getLogger(__name__)


def evaluate(model: nn.Module, data: TensorData, settings: EvalSettings, guards: Optional[GuardSettings] = None, *,
             progress: Optional[Progress] = None, on_guards: Optional[Callable[[EvalReport], None]] = None,
             state_dir: Optional[Path] = None, info: Optional[dict[str, Any]] = None) -> EvalReport:
    """Evaluate ``model`` (inputs in [0, 1], logits out; run in eval mode on ``settings.device``) on
    the first ``settings.n`` examples of ``data`` (all by default): the guards first (unless
    ``guards.enabled`` is False; the report then says so), then ``settings.attacks`` in order at
    ``settings.eps`` in ``settings.norm`` (decided beforehand, see
    :func:`~arow.evaluation.settings.resolve_threat`). A tripped guard sets ``report.error`` and
    the attacks do not run, unless ``guards.allow_failures``. Everything runs with TF32 set to
    ``settings.tf32`` (default off: strict float32) and cuDNN's autotuner off, the process's own
    flags restored afterwards; the report records both (``float32_matmul``, ``device``) and the
    batch size (``settings.batch_size``, default :func:`~arow.evaluation.cascade.default_eval_batch`).

    ``on_guards(report)`` is called as soon as the guards have run; ``state_dir`` keeps the
    attacks' finished batches so that an interrupted evaluation continues; ``info`` (what is known
    about the model: checkpoint, method, ...) goes into the report after the test set's description.
    Nothing is written: the caller decides where the report goes.
    """
    settings, guards = settings.check(), (guards or GuardSettings()).check()
    if settings.eps is None:
        raise ValueError("evaluate() needs the radius: settings.eps (see arow.evaluation.settings.resolve_threat)")
    norm = settings.norm or "linf"
    attacks = build_attacks(settings.attacks, settings.eps, norm)
    dev = distributed.resolve_device(settings.device, distributed.info().local_rank)
    batch = settings.batch_size if settings.batch_size is not None else default_eval_batch(dev)
    full = len(data)
    if settings.n is not None:
        data = data.subset(settings.n)
    subset = len(data) < full
    described: dict[str, Any] = {"dataset": data.name, "test_set_size": full, "subset": subset, **(info or {}),
                                 **precision_record(dev, settings.tf32), "batch_size": batch}
    if subset:
        described["warning"] = (f"evaluated on a subset ({len(data)} of {full} test images); not a full-test-set "
                                f"number")
    model, data = model.to(dev).eval(), data.to(dev)
    report = EvalReport(None, described)
    # one float32 precision for the guards, the attacks and the cross-check, and no cuDNN autotuning
    # (training leaves it on; it would re-tune every new batch shape): the process's flags come back after
    with float32_kernels(settings.tf32, benchmark=False):
        if guards.enabled and not _run_guards(report, model, data, settings.eps, norm, batch, guards, on_guards,
                                              attacks):
            return report
        t0 = time.perf_counter()
        report.result = run_attacks(model, data.x, data.y, attacks, eps=settings.eps, norm=norm,
                                    num_classes=data.num_classes, batch_size=batch, progress=progress,
                                    state_dir=state_dir)
        log.debug("evaluation took %.0fs", time.perf_counter() - t0)
        check_after_evaluation(report, model, data.x, data.y, attacks, guards.allow_failures, batch)
    return report


def _run_guards(report: EvalReport, model: nn.Module, data: TensorData, eps: float, norm: str, batch_size: int,
                guards: GuardSettings, on_guards: Optional[Callable[[EvalReport], None]],
                attacks: Sequence[Attack] = ()) -> bool:
    """The one place the guards run, before the attacks (cheap, so an untrustworthy model fails
    fast): their verdicts into ``report``; False when one tripped and the attacks must not run.
    ``attacks`` (the evaluation's) let the guard run compute what the evaluation is cross-checked on."""
    report.guards = run_guards(model, data.x, data.y, eps=eps, norm=norm, num_classes=data.num_classes,
                               n=min(guards.n, len(data)), batch_size=batch_size, seed=guards.seed,
                               attacks=attacks)
    report.guards_ran = True
    report.info["guards_subset"] = getattr(report.guards, "subset", None)
    if on_guards is not None:  # e.g. print the verdicts now, before hours of attacks
        on_guards(report)
    if report.tripped and not guards.allow_failures:
        bad = report.tripped
        report.error = (f"robustness guard {', '.join(repr(g.name) for g in bad)} tripped: {bad[0].message} "
                        f"(--allow-guard-failures reports the numbers anyway)")
        return False
    return True


def build_attacks(attacks: Sequence[Any], eps: float, norm: str) -> list[Attack]:
    """The attacks named (or given) in ``attacks`` at radius ``eps`` in ``norm``: a typo fails here,
    before any model is loaded or attacked."""
    return [a if isinstance(a, Attack) else get_attack(a, eps, norm=norm) for a in attacks]
