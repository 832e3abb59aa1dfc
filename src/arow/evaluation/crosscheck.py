"""After the evaluation: its verdicts on the guard subset must be the guard run's, and images the
guards never showed the model must show no masking either.

``consistency`` (:func:`cross_check`). PGD and CW draw each example's random start from
``(seed, attack, example index)``, so the verdict of such an attack on an example depends neither
on the batch it falls in nor on the order of the examples. The guard run
(:func:`arow.evaluation.guards.run_guards`, before the evaluation) computes that attack's verdicts
on the guard subset as the evaluation will: the same attack, eps, steps and seed
(:func:`reference_verdicts`). After the evaluation, the evaluation's verdicts on the same images
are compared with them. A model with state (one that answers differently once it has seen enough
images) or randomness inside gives other verdicts the second time, and the guard fails.

Floating point. The same example in another batch is computed with other kernel shapes, whose
rounding can, rarely, flip a borderline verdict. Where verdicts differ, the guard run's own
batches are attacked again after the evaluation, with deterministic kernels as the first time: an
honest model gives the first answers again, so any change there is state or randomness and fails.
Differences the rerun does not reproduce as changes are batch effects, allowed up to
:data:`BATCH_TOLERANCE` of the subset (at least one example); more fail too.

``held-out`` (:func:`held_out_check`). A model could remember the images it is shown first (the
guard subset: the guard run comes first) and be honest on exactly those, so that both runs agree
there. So the guards keep back ``n/2`` images, drawn from the end of the set: after the
evaluation, what the evaluation left robust among them meets the margin attack with its direction
checked by forward passes, beside the same attack trusting the gradient; what only the checked one
breaks is masking the guards were not shown.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from .. import distributed
from ..attacks import Attack, frozen_eval, predict, unwrap
from ..rng import ExampleRNG, private_rng
from ..threat import ThreatModel
from .cascade import EvalResult, example_seed
from .verdicts import GuardResult, GuardResults, margin_attacks

Tensor = torch.Tensor
CONSISTENCY, HELD_OUT = "consistency", "held-out"
#: share of the subset whose verdicts may differ through batch composition alone (rounding)
BATCH_TOLERANCE = 0.01


@dataclass
class Reference:
    """The guard run's verdicts of ``attack`` on the guard subset (``indices`` into the evaluated set).

    ``robust``: per index, correct and not fooled (the evaluation's verdict); ``clean``: correct on
    the clean input. ``eval_seed`` and ``batch_size`` are the evaluation's."""

    attack: str
    indices: list[int]
    robust: Tensor
    clean: Tensor
    eval_seed: int
    batch_size: int
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """What the report records: the attack, the seed and how many of the subset it left robust."""
        return {"attack": self.attack, "eval_seed": self.eval_seed, "n": len(self.indices),
                "robust": int(self.robust.sum()), "seconds": self.seconds}


def reference_attack(attacks: Sequence[Attack]) -> Optional[Attack]:
    """The attack the cross-check compares: the evaluation's first attack with per-example random
    starts (PGD, CW), else ``clean`` if it is evaluated; None when neither is."""
    for atk in attacks:
        if atk.per_example_rng and not atk.cascade:
            return atk
    return next((a for a in attacks if a.name == "clean"), None)


@contextlib.contextmanager
def _as_evaluated(device: torch.device) -> Iterator[None]:
    """float32 as the evaluation runs (no autocast), with deterministic cuDNN kernels: a rerun of
    the same batch gives the same numbers on an honest model."""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


def _fooled(model: nn.Module, x: Tensor, y: Tensor, index: Tensor, atk: Attack, seed: int,
            batch_size: int) -> Tensor:
    """Whether ``atk`` fools ``model`` on the examples ``x`` (one batch; ``index``: their positions
    in the evaluated set, which seed their random starts), computed as the evaluation does."""
    x_adv = atk(model, x, y, rng=ExampleRNG(example_seed(seed, atk.name), index.cpu()))
    return predict(model, x_adv, batch_size) != y


def _batches(todo: Tensor, batch_size: int) -> list[Tensor]:
    return [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]


def _robust(model: nn.Module, x: Tensor, y: Tensor, index: Tensor, atk: Attack, seed: int, batch_size: int,
            clean: Tensor, only: Optional[set[int]] = None, known: Optional[Tensor] = None) -> Tensor:
    """Per example: ``clean`` and not fooled by ``atk``, attacking the clean-correct examples in
    batches of ``batch_size`` in order. With ``only`` (positions), just the batches holding one of
    them are attacked; the others keep their ``known`` verdicts."""
    robust = (clean if known is None else known.to(clean.device)).clone()
    if atk.name == "clean":
        return robust
    todo = clean.nonzero().squeeze(1)
    for j in _batches(todo, batch_size):
        if only is None or any(int(k) in only for k in j):
            robust[j] = ~_fooled(model, x[j], y[j], index[j], atk, seed, batch_size)
    return robust


def reference_verdicts(model: nn.Module, x: Tensor, y: Tensor, indices: Sequence[int], atk: Attack, *,
                       eval_seed: int, batch_size: int) -> Reference:
    """``atk``'s verdicts on the subset ``(x, y)`` (the evaluated set's examples ``indices``), as the
    evaluation seeded ``eval_seed`` computes them: clean predictions, then the attack on the
    correct ones in batches of ``batch_size``, each example's random start its own."""
    t0 = time.perf_counter()
    index = torch.as_tensor(list(indices), dtype=torch.long, device=x.device)
    with _as_evaluated(x.device), private_rng(x.device, eval_seed):
        clean = predict(model, x, batch_size) == y
        robust = _robust(model, x, y, index, atk, eval_seed, batch_size, clean)
    return Reference(atk.name, [int(i) for i in indices], robust.cpu(), clean.cpu(), int(eval_seed), int(batch_size),
                     time.perf_counter() - t0)


def cross_check(model: nn.Module, x: Tensor, y: Tensor, guards: GuardResults, result: EvalResult,
                attacks: Sequence[Attack]) -> GuardResult:
    """The ``consistency`` guard: the evaluation's verdicts (``result``) on the guard subset against the
    guard run's (``guards.reference``), on the evaluated set ``(x, y)``.

    Passes when they are equal; when not, reruns the guard run's batches that hold the differences
    (see the module docstring) and fails on any change there (state or randomness inside the model)
    or on more differences than batch composition explains. Under torchrun rank 0 computes and
    every rank receives the verdict (or raises rank 0's error).
    """
    return distributed.on_main(_check, model, x, y, guards, result, attacks)


def _check(model: nn.Module, x: Tensor, y: Tensor, guards: GuardResults, result: EvalResult,
           attacks: Sequence[Attack]) -> GuardResult:
    t0 = time.perf_counter()
    ref: Optional[Reference] = guards.reference
    if ref is None or ref.attack not in result.correct:
        return GuardResult(CONSISTENCY, True, 0.0, 0.0,
                           "not checked: no evaluated attack draws its random start per example (PGD, CW) and "
                           "clean is not evaluated, so no verdict of the guard run can be compared")
    atk = next(a for a in attacks if a.name == ref.attack)
    index = torch.as_tensor(ref.indices, dtype=torch.long, device=x.device)
    evaluated = result.correct[ref.attack].to(index.device)[index].cpu()
    differ = (evaluated != ref.robust).nonzero().squeeze(1)
    n, d = len(index), len(differ)
    tol = max(1, math.floor(BATCH_TOLERANCE * n))
    details: dict[str, Any] = {"attack": ref.attack, "n": n, "differ": d, "changed": 0, "allowed": tol,
                               "guard_run_robust": int(ref.robust.sum()), "evaluation_robust": int(evaluated.sum())}
    what = f"{ref.attack} verdicts on the {n} guard images"
    if d == 0:
        return GuardResult(CONSISTENCY, True, 0.0, tol, f"the evaluation's {what} equal the guard run's "
                           f"({int(ref.robust.sum())} robust)", time.perf_counter() - t0, details)
    changed = _rerun_changes(model, x[index], y[index], index, atk, ref, {int(k) for k in differ})
    details["changed"] = changed
    msg = (f"the evaluation's {what} differ from the guard run's for {d} of them ({int(evaluated.sum())} robust in "
           f"the evaluation, {int(ref.robust.sum())} in the guard run)")
    if changed:
        problem = (f"{msg}; the guard run's own batches, attacked again after the evaluation, gave {changed} other "
                   f"verdict(s) than before it: the model changes as it is used (state) or is random, so its "
                   f"numbers are not its own")
        return GuardResult(CONSISTENCY, False, float(d), tol, problem, time.perf_counter() - t0, details)
    if d > tol:
        problem = (f"{msg}, more than batch composition explains (at most {tol}): the model's answers depend on "
                   f"which examples share a batch")
        return GuardResult(CONSISTENCY, False, float(d), tol, problem, time.perf_counter() - t0, details)
    return GuardResult(CONSISTENCY, True, float(d), tol, f"{msg}; the guard run's batches give the same verdicts "
                       f"again: rounding in other batch shapes, within {tol}", time.perf_counter() - t0, details)


def _rerun_changes(model: nn.Module, x: Tensor, y: Tensor, index: Tensor, atk: Attack, ref: Reference,
                   differ: set[int]) -> int:
    """How many verdicts of the guard run's batches that hold ``differ`` (subset positions) change
    when they are computed again now, exactly as the guard run computed them."""
    with _as_evaluated(x.device), private_rng(x.device, ref.eval_seed):
        clean_then = ref.clean.to(x.device)
        clean_now = predict(model, x, ref.batch_size) == y
        robust_now = _robust(model, x, y, index, atk, ref.eval_seed, ref.batch_size, clean_then, differ, ref.robust)
    changed = (clean_now.cpu() != ref.clean) | (robust_now.cpu() != ref.robust)
    return int(changed.sum())


def held_out_check(model: nn.Module, x: Tensor, y: Tensor, guards: GuardResults, result: EvalResult, *,
                   batch_size: int, steps: int = 10, tol: float = 0.03) -> GuardResult:
    """The ``held-out`` guard, after the evaluation: on the test images the guard run never showed
    the model (``guards.subset["held_out"]``), what the evaluation left robust (its worst case) must
    not fall to the margin attack with its direction checked by forward passes where the same attack
    trusting the gradient fails (:func:`~arow.evaluation.verdicts.margin_attacks`): that is what
    only a misleading gradient explains. It catches a model that is honest on the images it was
    shown first (the guard subset) and masks its gradients on all others. Under torchrun rank 0
    computes and every rank receives the verdict (or raises rank 0's error)."""
    return distributed.on_main(_held_out, model, x, y, guards, result, batch_size, steps, tol)


def _held_out(model: nn.Module, x: Tensor, y: Tensor, guards: GuardResults, result: EvalResult, batch_size: int,
              steps: int, tol: float) -> GuardResult:
    t0 = time.perf_counter()
    held = guards.subset.get("held_out") or []
    if not held:
        return GuardResult(HELD_OUT, True, 0.0, 0.0, "not checked: the guard subset held every evaluated image")
    index = torch.as_tensor(held, dtype=torch.long, device=x.device)
    robust = result.correct["worst_case"].to(x.device)[index]
    todo = index[robust]
    tm = ThreatModel(eps=result.eps, norm=result.norm, steps=steps)
    masked = margin = 0
    seed = int(guards.subset.get("seed", 0))
    with frozen_eval(unwrap(model)) as net, private_rng(x.device, seed), torch.autocast(x.device.type, enabled=False):
        for j in _batches(todo, batch_size):
            trusted, checked = margin_attacks(net, x[j], y[j], tm, seed, j, lambda z: predict(net, z, batch_size,
                                                                                             logits=True, frozen=False))
            masked += int((checked & ~trusted).sum())
            margin += int(trusted.sum())
    n = len(index)
    value, limit = masked / n, tol + 2 / n
    label = (f"on {n} test images the guards had not shown the model, CW-{steps} broke {100 * margin / n:.1f}% that "
             f"the evaluation left robust ({100 * len(todo) / n:.1f}%); checking the gradient's direction broke "
             f"{100 * value:.1f}% more")
    details = {"n": n, "evaluation_robust": len(todo) / n, "margin": margin / n, "masked": value}
    if value > limit:
        return GuardResult(HELD_OUT, False, value, limit, f"{label}: the model's gradients mislead attacks on images it "
                           f"had not been checked on, so the evaluation's numbers are overstated (gradient masking)",
                           time.perf_counter() - t0, details)
    return GuardResult(HELD_OUT, True, value, limit, label, time.perf_counter() - t0, details)


def check_after_evaluation(report: Any, model: nn.Module, x: Tensor, y: Tensor, attacks: Sequence[Attack],
                           allow_failures: bool, batch_size: int) -> None:
    """The last step of a guarded evaluation: :func:`cross_check` and :func:`held_out_check` on the
    finished ``report`` (an :class:`~arow.evaluation.report.EvalReport` whose guards ran) of the
    evaluated ``(x, y)``.

    Their verdicts join ``report.guards``; when one failed, ``report.error`` says so (exit status 3
    for ``arow eval``) unless ``allow_failures``, as for a guard that trips before the attacks.
    Nothing happens when the guards did not run or the attacks did not finish."""
    if not report.guards_ran or report.result is None:
        return
    verdicts = [cross_check(model, x, y, report.guards, report.result, attacks),
                held_out_check(model, x, y, report.guards, report.result, batch_size=batch_size)]
    report.guards.extend(verdicts)
    bad = [v for v in verdicts if not v.passed]
    if bad and not allow_failures:
        report.error = (f"robustness guard {', '.join(repr(v.name) for v in bad)} tripped: {bad[0].message} "
                        f"(--allow-guard-failures reports the numbers anyway)")
