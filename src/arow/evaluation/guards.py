"""Checks against overstated robustness, run before ``arow eval`` reports a number.

Each guard looks for one way an evaluation can flatter a model (Athalye et al. 2018; Carlini
et al. 2019, "On evaluating adversarial robustness"; AutoAttack's own flags):

- ``finite``: the logits are finite on the inputs and at random points of the eps-ball (a model
  that outputs NaN/inf has no accuracy to report, and would otherwise look like noise or masking);
- ``eval-mode``: the forward pass is deterministic, independent of the other examples in the
  batch, leaves buffers alone and never runs a module in train mode (dropout or BatchNorm
  forced on inside ``forward`` make attacks chase noise);
- ``input-range``: inputs are in [0, 1] and the model is not far better on normalised inputs
  (a model expecting ``(x - mean) / std`` is evaluated with the wrong eps geometry);
- ``gradients``: input gradients are finite and non-zero for most examples;
- ``gradient-direction``: a step of eps/4 along the sign of the cross-entropy gradient (L2: along
  the normalised gradient), from the input and from PGD's random start, raises the loss of nearly
  every correctly classified example (a gradient can be finite and non-zero and still point the
  wrong way);
- ``large-eps``: PGD at a huge radius (>= 0.5 on [0, 1] data; L2: >= 0.5 sqrt(d), a ball that
  holds the grey image) drives accuracy to about chance;
- ``more-steps``: a stronger PGD (more steps and restarts) never leaves more examples standing;
- ``transfer``: checking the gradient's direction with forward passes (and a caller's surrogate
  model) does not break examples that attacks trusting the gradient could not;
- ``black-box``: Square (no gradients) does not break examples white-box PGD could not;
- ``consistency`` and ``held-out`` (after the evaluation, :mod:`arow.evaluation.crosscheck`): the
  evaluation's verdicts on the guard subset are the verdicts the guard run computed before it, and
  images the guards held back show no masking either.

The subset (:mod:`arow.evaluation.verdicts`). The guards run on ``n`` examples drawn at random
from the evaluated set, half of them from its end, not on its first ``n``: a model that is honest
near a fixed subset and masks its gradients elsewhere passes every check on that subset. The
default seed is derived from a hash of the model's weights and the data, so the verdicts are
reproducible; the draw is recorded (``GuardResults.subset``: seed, indices and their digest) so
that a guard run can be repeated and audited.

The direction check. A backward pass can lie while the forward pass stays honest: a custom
autograd function that reverses the input gradient of some examples leaves the predictions, and
so the accuracy, untouched, and every gradient attack on the model inherits the lie whatever its
loss. Forward passes cannot lie without changing the predictions being scored, so ``transfer``
runs the model's own first-order approximation with its direction checked by forward passes:
PGD on the Carlini-Wagner margin in which each step goes along +sign(grad) or -sign(grad),
whichever raises the margin more on the model itself, beside the same attack trusting the
gradient, from the same random starts. On an honest model the two break the same examples (a
margin loss may break more than PGD's cross-entropy: reported, not a failure); on a model whose
gradient is reversed for some examples only the checked one breaks them. It runs only on the
examples white-box PGD left robust. A caller's ``surrogate`` model (the same architecture
trained separately, or the model without its defence) adds classic transfer: PGD on the
surrogate, replayed on the model. Black-box Square stays as the check that needs no gradient at
all (a scrambled rather than reversed gradient).

All but Square run in a few dozen forward/backward passes over the subset; each returns a
:class:`GuardResult`. Guards never change the model (mode, flags and buffers restored).

The threat model. Every guard runs in the norm of the evaluation (``norm="linf"`` or ``"l2"``):
its attacks search that ball (PGD, the sign-checked surrogate and Square all take the norm), and
the radii that are not the evaluation's eps are given in that norm's terms (``large-eps``).

>>> results = run_guards(model, x, y, eps=0.1)          # doctest: +SKIP
>>> [r.name for r in results if not r.passed]           # doctest: +SKIP
[]
>>> results.subset["seed_from"], len(results.subset["indices"])  # doctest: +SKIP
('weights and data', 200)
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..attacks import Attack, ce_loss, frozen_eval, get_attack, pgd, predict, unwrap
from ..attacks.autoattack import PYAUTOATTACK_NORMS
from ..rng import private_rng
from ..threat import ThreatModel, check_norm, norm_label
from .cascade import default_eval_batch, float32_kernels
from .crosscheck import reference_attack, reference_verdicts
from .verdicts import (GuardResult, GuardResults, correct as _correct, draw_held_out, draw_subset, guard_seed,
                       late_count, margin_attacks, subset_digest)

log = logging.getLogger(__name__)
Tensor = torch.Tensor

#: the guards that run before the evaluation (``consistency`` and ``held-out`` run after it:
#: :func:`arow.evaluation.crosscheck.check_after_evaluation`)
GUARD_NAMES = ("finite", "eval-mode", "input-range", "gradients", "gradient-direction", "large-eps",
               "more-steps", "transfer", "black-box")
#: relative change of the logits between two passes / batch compositions that counts as a difference
DETERMINISM_TOL = 1e-3


class GuardContext:
    """The guard subset and what several guards share (clean predictions, PGD verdicts)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, num_classes: int,
                 batch_size: int, square_queries: int, seed: int,
                 surrogate: Optional[nn.Module] = None, norm: str = "linf", reported: Sequence[str] = ()) -> None:
        self.net, self.x, self.y, self.eps, self.norm = model, x, y, eps, norm
        self.reported = list(reported)  # the evaluation's margin attacks (CW, AutoAttack)
        self.num_classes, self.batch_size = num_classes, batch_size
        self.square_queries, self.seed, self.surrogate = square_queries, seed, surrogate
        self._clean: Optional[Tensor] = None
        self.whitebox_robust: Optional[Tensor] = None  # survived both PGD runs of "more-steps"

    @property
    def n(self) -> int:
        return len(self.x)

    def threat(self, **kw: Any) -> ThreatModel:
        """The evaluation's ball (its eps and norm), with ``kw`` changed: ``s.threat(steps=10)``."""
        return ThreatModel(**{"eps": self.eps, "norm": self.norm, **kw})

    def logits(self, x: Tensor) -> Tensor:
        # the net is already unwrapped and frozen: run it as it is (eval-mode watches what forward does)
        return predict(self.net, x, self.batch_size, logits=True, frozen=False)

    @property
    def clean_ok(self) -> Tensor:
        if self._clean is None:
            self._clean = _correct(self.logits(self.x), self.y)
        return self._clean

    def pgd_robust(self, threat: ThreatModel, restarts: int = 1) -> Tensor:
        """Per example: correct and not fooled by PGD on cross-entropy (first fooling iterate kept)."""
        robust = self.clean_ok.clone()
        idx = robust.nonzero().squeeze(1)
        for i in range(0, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            x_adv = pgd(self.net, self.x[j], self.y[j], threat, ce_loss, restarts=restarts, keep_best=True)
            robust[j] = _correct(self.logits(x_adv), self.y[j])
        return robust

    def pgd_left_robust(self) -> Tensor:
        """What white-box PGD left robust: shared by the guards that try other attacks on it."""
        if self.whitebox_robust is None:
            self.whitebox_robust = self.pgd_robust(self.threat(steps=10), restarts=2)
        return self.whitebox_robust


def run_guards(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    num_classes: Optional[int] = None,
    n: int = 200,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    square_queries: int = 250,
    only: Optional[Sequence[str]] = None,
    surrogate: Optional[nn.Module] = None,
    attacks: Sequence[Union[str, Attack]] = (),
    eval_seed: int = 0,
) -> GuardResults:
    """Run the guards on ``n`` examples of ``(x, y)`` (inputs in [0, 1]) drawn with ``seed``.

    ``eps`` and ``norm`` (``"linf"`` or ``"l2"``) are the evaluation's threat model; every guard runs in it.
    ``seed=None`` derives the seed from a hash of the model's weights and of ``(x, y)``
    (:func:`~arow.evaluation.verdicts.guard_seed`): the same model and data get the same subset and
    verdicts. The result is a list of :class:`GuardResult` whose ``subset`` records the draw (store
    it next to the verdicts). ``surrogate``: an optional model on the same device whose PGD examples
    the ``transfer`` guard replays on ``model``.

    ``attacks`` are the evaluation's (names or built), ``eval_seed`` its seed. With them the guard run
    also computes the verdicts of the attack the evaluation is cross-checked on
    (``results.reference``, see :mod:`arow.evaluation.crosscheck`), and ``transfer`` knows whether
    the evaluation reports a margin attack (CW, AutoAttack) itself.
    ``batch_size`` defaults to :func:`~arow.evaluation.cascade.default_eval_batch` of ``x``'s device.
    Deterministic for a given seed; the caller's RNG state and the model are left as they
    were. Under torchrun rank 0 computes and every rank receives the same results, or raises the
    same error when rank 0 failed.

    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> rs = run_guards(m, torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,)), eps=0.1, only=["gradients"])
    >>> rs[0].name, rs[0].passed, rs.subset["n"], rs.subset["total"]
    ('gradients', True, 8, 8)
    """
    names = list(only) if only is not None else list(GUARD_NAMES)
    unknown = [g for g in names if g not in GUARD_NAMES]
    if unknown:
        raise ValueError(f"unknown guard(s) {unknown}; choose from {', '.join(GUARD_NAMES)}")
    if n < 1:
        raise ValueError(f"the guards need n >= 1 examples, got {n}")
    if not eps > 0:
        raise ValueError(f"the guards need eps > 0, got {eps}")
    check_norm(norm)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"the guards need as many labels as inputs (at least one), got {len(x)} and {len(y)}")
    built = [get_attack(a, eps, norm=norm) if isinstance(a, str) else a for a in attacks]
    batch_size = default_eval_batch(x.device) if batch_size is None else batch_size
    given = seed is not None
    seed = int(seed) if given else guard_seed(model, x, y)
    # rank 0 alone runs them; an error there is raised on every rank, none is left waiting for it
    return distributed.on_main(_run, model, x, y, eps, num_classes, n, batch_size, (seed, given), square_queries,
                               names, surrogate, norm, built, eval_seed)


def _reported_margin_attacks(attacks: Sequence[Attack]) -> list[str]:
    """The evaluation's attacks on a margin loss (CW, AutoAttack's DLR): they report what the
    ``transfer`` guard's margin attack finds."""
    return [a.name for a in attacks if a.name.startswith("cw") or a.name == "autoattack"]


def _run(model: nn.Module, x: Tensor, y: Tensor, eps: float, num_classes: Optional[int], n: int,
         batch_size: int, seed: tuple[int, bool], square_queries: int, names: list[str],
         surrogate: Optional[nn.Module], norm: str, attacks: Sequence[Attack], eval_seed: int) -> GuardResults:
    net = unwrap(model)
    seed, given = seed
    idx = draw_subset(len(x), n, seed)
    subset = {"seed": seed, "seed_from": "given" if given else "weights and data", "n": len(idx), "total": len(x),
              "late": late_count(idx.tolist(), len(x), n), "indices": idx.tolist(),
              "sha256": subset_digest(idx.tolist()),
              "held_out": draw_held_out(len(x), idx.tolist(), max(1, len(idx) // 2), seed)}
    num_classes = num_classes or int(y.max()) + 1
    x, y = x[idx.to(x.device)].detach(), y[idx.to(y.device)].detach()
    results = GuardResults(subset=subset)
    ref_atk = reference_attack(attacks)
    if ref_atk is not None:  # first: the model's answers before anything else has queried it
        results.reference = reference_verdicts(model, x, y, idx.tolist(), ref_atk, eval_seed=eval_seed,
                                               batch_size=batch_size)
        subset["reference"] = results.reference.summary()
    with frozen_eval(net), private_rng(x.device, seed), _exact_float32():
        sub = GuardContext(net, x, y, eps, num_classes, batch_size, square_queries, seed,
                           unwrap(surrogate) if surrogate is not None else None, norm,
                           _reported_margin_attacks(attacks))
        for name in names:
            t0 = time.perf_counter()
            r = GUARDS[name](sub)
            r.seconds = time.perf_counter() - t0
            log.debug("guard %s: %s (%.4g vs %.4g, %.1fs)", r.name, "pass" if r.passed else "FAIL",
                      r.value, r.threshold, r.seconds)
            results.append(r)
    return results


def tripped(results: Sequence[GuardResult]) -> list[GuardResult]:
    """The guards that failed."""
    return [r for r in results if not r.passed]


def _exact_float32() -> contextlib.AbstractContextManager[None]:
    # TF32 convolutions pick batch-size-dependent kernels: differences that are not the model's
    return float32_kernels(False, benchmark=None)


def _verdict(name: str, value: float, limit: float, label: str, problem: str) -> GuardResult:
    """Passed when ``value <= limit`` (message: ``label``); failed otherwise (``label: problem``)."""
    failed = value > limit
    return GuardResult(name, not failed, value, limit, f"{label}: {problem}" if failed else label)


def _max_diff(a: Tensor, b: Tensor) -> float:
    """Largest entry-wise difference; the same NaN/inf in both places counts as no difference."""
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    d = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return float(torch.nan_to_num(d, nan=math.inf).max()) if d.numel() else 0.0


def _ce_order(logits: Tensor, y: Tensor) -> Tensor:
    """``logsumexp_{k != y} z_k - z_y`` in float64: rises exactly when the cross-entropy does.

    The cross-entropy itself rounds to 0 for a confident example (margin > ~37 in float64),
    so its rise would be invisible; this stays exact down to margins of several hundred.
    """
    z = logits.double()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    return z.scatter(1, y[:, None], float("-inf")).logsumexp(1) - z_y


# --------------------------------------------------------------------------- the guards
def guard_finite(s: GuardContext) -> GuardResult:
    """Finite logits on the inputs and at a random point of each input's eps-ball."""
    x_rand = s.threat().init(s.x)  # where PGD starts
    bad = ~(torch.isfinite(s.logits(s.x)).all(1) & torch.isfinite(s.logits(x_rand)).all(1))
    value = float(bad.float().mean())
    if value > 0:
        return GuardResult("finite", False, value, 0.0,
                           f"the model outputs NaN/inf logits for {100 * value:.1f}% of examples (on the input or "
                           f"within eps of it): a non-finite model, its accuracy means nothing")
    return GuardResult("finite", True, value, 0.0, "finite logits on the inputs and within eps of them")


def guard_eval_mode(s: GuardContext) -> GuardResult:
    """Deterministic, batch-independent forward in eval mode that changes no buffer."""
    net = s.net
    before = {k: v.clone() for k, v in net.named_buffers()}
    in_train: list[str] = []
    # TorchScript modules take no hooks: their modes are read after the passes instead
    scripted = isinstance(net, torch.jit.ScriptModule)
    hooks = [] if scripted else [m.register_forward_pre_hook(lambda mod, _, name=name: in_train.append(
        name or "model") if mod.training else None) for name, m in net.named_modules()]
    try:
        a, b = s.logits(s.x), s.logits(s.x)
        k = max(1, s.n // 4)
        with torch.no_grad():
            c = net(s.x[:k]).float()  # the same examples in a smaller batch
    finally:
        for h in hooks:
            h.remove()
        in_train += [name or "model" for name, m in net.named_modules() if scripted and m.training]
        changed = [name for name, v in net.named_buffers() if not torch.equal(v, before[name])]
        with torch.no_grad():  # undo what a misbehaving forward did to its buffers
            for name, v in net.named_buffers():
                v.copy_(before[name])
    finite = a[torch.isfinite(a)]  # NaN/inf outputs are the "finite" guard's finding, not noise
    scale = (float(finite.abs().max()) if finite.numel() else 0.0) + 1e-12
    diff = max(_max_diff(a, b), _max_diff(a[:k], c)) / scale
    problems = []
    if in_train:
        problems.append(f"module {in_train[0]!r} ran in train mode although the model was put in eval mode "
                        f"(forward switches modes itself)")
    if changed:
        problems.append(f"the forward pass changed buffer {changed[0]!r} (e.g. BatchNorm statistics updated)")
    if diff > DETERMINISM_TOL:
        problems.append(f"logits differ by {diff:.2g} (relative) between two passes or batch compositions "
                        f"(dropout or batch statistics inside forward)")
    msg = "; ".join(problems) + ": attacks would chase noise" if problems else \
        "eval mode, deterministic and batch-independent forward, no buffer changed"
    return GuardResult("eval-mode", not problems, diff, DETERMINISM_TOL, msg)


def guard_input_range(s: GuardContext, gap: float = 0.1) -> GuardResult:
    """Inputs in [0, 1], and no large accuracy gain from normalising them outside the model."""
    lo, hi = float(s.x.min()), float(s.x.max())
    if lo < 0 or hi > 1:
        return GuardResult("input-range", False, max(-lo, hi - 1), 0.0,
                           f"inputs span [{lo:.3g}, {hi:.3g}], not [0, 1]: eps would be measured in the wrong units")
    dims = [d for d in range(s.x.dim()) if d != 1]
    mean, std = s.x.mean(dim=dims, keepdim=True), s.x.std(dim=dims, keepdim=True).clamp_min(1e-6)
    raw = float(s.clean_ok.float().mean())
    normed = float(_correct(s.logits((s.x - mean) / std), s.y).float().mean())
    value = normed - raw
    if value > gap:
        msg = (f"clean accuracy {100 * raw:.1f}% on [0, 1] inputs but {100 * normed:.1f}% on (x - mean) / std: "
               f"the model expects normalised inputs; normalisation must be inside the model")
        return GuardResult("input-range", False, value, gap, msg)
    return GuardResult("input-range", True, value, gap,
                       f"inputs in [0, 1]; accuracy {100 * raw:.1f}% raw vs {100 * normed:.1f}% normalised")


def guard_gradients(s: GuardContext, max_zero: float = 0.5) -> GuardResult:
    """Input gradients of the cross-entropy are finite, and non-zero for most examples."""
    bad_zero, bad_nan = 0, 0
    for i in range(0, s.n, s.batch_size):
        xb = s.x[i : i + s.batch_size].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = s.net(xb).float()
            (g,) = torch.autograd.grad(F.cross_entropy(logits, s.y[i : i + s.batch_size], reduction="sum"),
                                       xb, allow_unused=True)
        # examples with NaN/inf logits have no meaningful gradient: the "finite" guard reports them
        out_ok = torch.isfinite(logits.detach()).all(1)
        if g is None:  # the output does not depend on the input through autograd at all
            bad_zero += int(out_ok.sum())
            continue
        g = g.flatten(1)
        finite = torch.isfinite(g).all(1)
        bad_nan += int((out_ok & ~finite).sum())
        bad_zero += int((out_ok & finite & (g.abs().amax(1) == 0)).sum())
    frac_zero, frac_nan = bad_zero / s.n, bad_nan / s.n
    if frac_nan > 0:
        return GuardResult("gradients", False, frac_nan, 0.0,
                           f"input gradients are NaN/inf for {100 * frac_nan:.1f}% of examples with finite outputs")
    if frac_zero > max_zero:
        return GuardResult("gradients", False, frac_zero, max_zero,
                           f"input gradients are exactly zero for {100 * frac_zero:.1f}% of examples "
                           f"(gradient masking: quantisation, detach or saturation)")
    return GuardResult("gradients", True, frac_zero, max_zero,
                       f"finite input gradients; zero for {100 * frac_zero:.1f}% of examples")


def guard_gradient_direction(s: GuardContext, step: float = 0.25, max_wrong: float = 0.1) -> GuardResult:
    """A step of ``step * eps`` along sign(grad CE) raises the loss of nearly every correct example.

    In L2 the step goes along the normalised gradient (the step of L2 PGD), ``step * eps`` long.

    Checked from the input and from a random point of its eps-ball (where PGD starts); an example
    counts as wrong if either step fails to raise the loss. Steps that clamping to [0, 1] cancels
    entirely, and zero or NaN gradients (the "gradients" guard's finding) are not counted. eps/4
    is PGD's own step, the scale at which the gradient has to be right; honest models (linear,
    MLP, small CNNs random, trained or adversarially trained) fail on none of their examples, so
    10% leaves room for curvature in larger models while a reversal on 60% is far above it.
    """
    tm = s.threat(step=step * s.eps)
    idx = s.clean_ok.nonzero().squeeze(1)
    checked, wrong = 0, 0
    for i in range(0, len(idx), s.batch_size):
        j = idx[i : i + s.batch_size]
        xb, yb = s.x[j], s.y[j]
        seen = torch.zeros(len(j), dtype=torch.bool, device=xb.device)
        bad = torch.zeros_like(seen)
        for x0 in (xb, tm.init(xb)):
            x0 = x0.clone().requires_grad_(True)
            with torch.enable_grad():
                logits = s.net(x0).float()
                (g,) = torch.autograd.grad(ce_loss(logits, yb).sum(), x0, allow_unused=True)
            if g is None:
                continue
            x1 = (x0.detach() + tm.step_size * tm.direction(g)).clamp(0, 1)
            with torch.no_grad():
                l0, l1 = _ce_order(logits.detach(), yb), _ce_order(s.net(x1).float(), yb)
            usable = (torch.isfinite(g).flatten(1).all(1) & (g != 0).flatten(1).any(1)
                      & (x1 != x0.detach()).flatten(1).any(1) & torch.isfinite(l0) & torch.isfinite(l1))
            seen |= usable
            bad |= usable & ~(l1 > l0)
        checked += int(seen.sum())
        wrong += int(bad.sum())
    value = wrong / checked if checked else 0.0
    limit = max(max_wrong, 2.5 / checked) if checked else max_wrong  # a couple of examples is noise
    along = "the gradient's sign" if s.norm == "linf" else f"the {norm_label(s.norm)}-normalised gradient"
    label = (f"a step of {step:g} eps along {along} failed to raise the loss for {wrong} of "
             f"{checked} correctly classified examples ({100 * value:.1f}%)")
    return _verdict("gradient-direction", value, limit, label,
                    "the gradient points the wrong way, so PGD walks away from adversarial examples "
                    "(gradient masking)")


def guard_large_eps(s: GuardContext, steps: int = 10, margin: float = 0.1) -> GuardResult:
    """PGD at eps >= 0.5 (images can be pushed to grey) must bring accuracy near chance.

    In L2 the radius is at least ``0.5 sqrt(d)`` (d: input size), the smallest L2 ball around every
    input in [0, 1]^d that holds the L-inf ball of 0.5 and so the grey image; at most ``sqrt(d)``.
    """
    tm = s.threat()
    top = tm.max_radius(s.x)  # 1 (L-inf) or sqrt(d) (L2): a ball that holds all of [0, 1]^d
    big = min(top, max(0.5 * top, 4 * s.eps))
    acc = float(s.pgd_robust(tm.with_(eps=big, steps=steps)).float().mean())
    limit = 1 / s.num_classes + margin
    where = f"eps={big:g}" if s.norm == "linf" else f"{norm_label(s.norm)} eps={big:.4g}"
    if acc > limit:
        return GuardResult("large-eps", False, acc, limit,
                           f"PGD-{steps} at {where} still leaves {100 * acc:.1f}% accuracy (chance "
                           f"{100 / s.num_classes:.0f}%): the attack is blocked, not the perturbation "
                           f"(gradient masking)")
    return GuardResult("large-eps", True, acc, limit, f"PGD-{steps} at {where}: {100 * acc:.1f}% accuracy")


def guard_more_steps(s: GuardContext, weak: int = 5, strong: int = 10, restarts: int = 2) -> GuardResult:
    """PGD with more steps and restarts must not leave more examples robust than a short PGD."""
    tm = s.threat(steps=weak)
    r_weak = s.pgd_robust(tm)
    r_strong = s.pgd_robust(tm.with_(steps=strong), restarts=restarts)
    s.whitebox_robust = r_weak & r_strong
    a_weak, a_strong = float(r_weak.float().mean()), float(r_strong.float().mean())
    tol = 0.03 + 2 / s.n  # different random starts: a few examples either way is noise
    value = a_strong - a_weak
    label = f"PGD-{strong}x{restarts} restarts {100 * a_strong:.1f}% vs PGD-{weak} {100 * a_weak:.1f}%"
    return _verdict("more-steps", value, tol, label,
                    "a stronger attack found fewer adversarial examples (randomness, state or masking inside "
                    "the model)")


def guard_transfer(s: GuardContext, steps: int = 10, tol: float = 0.03) -> GuardResult:
    """Checking the gradient's direction must not break examples that trusting it could not.

    On the examples white-box PGD left robust, two attacks on the Carlini-Wagner margin from the
    same random starts: CW-``steps`` trusting the model's gradient, and the same search with the
    direction of each step checked by forward passes (:func:`~arow.evaluation.verdicts.checked_pgd`). What only the checked
    one breaks is what only a misleading gradient explains (masking): above ``tol`` the guard fails.
    What both break is a margin loss being stronger than cross-entropy on this model, not masking:
    it is reported (``details["margin"]``), and it passes; the message says whether the evaluation
    reports a margin attack itself (CW, AutoAttack), so that nothing is overstated, or by how much
    the PGD numbers may be on the guard subset. The caller's ``surrogate`` model, if given, adds
    classic transfer: its PGD examples that fool the model where neither margin attack did count
    as masking too.
    """
    robust = s.pgd_left_robust()
    idx = robust.nonzero().squeeze(1)
    tm = s.threat(steps=steps)
    masked, margin, by_surrogate = 0, 0, 0
    for i in range(0, len(idx), s.batch_size):
        j = idx[i : i + s.batch_size]
        xb, yb = s.x[j], s.y[j]
        trusted, checked = margin_attacks(s.net, xb, yb, tm, s.seed, j, s.logits)
        masked += int((checked & ~trusted).sum())
        margin += int((checked | trusted).sum())
        if s.surrogate is not None:
            fooled_s = ~_correct(s.logits(pgd(s.surrogate, xb, yb, tm, ce_loss)), yb)
            by_surrogate += int((fooled_s & ~checked & ~trusted).sum())
    value, limit = (masked + by_surrogate) / s.n, tol + 2 / s.n  # a few examples either way is noise
    gap = margin / s.n
    pgd_acc = float(robust.float().mean())
    label = (f"of {100 * pgd_acc:.1f}% that white-box PGD left robust, CW-{steps} broke {100 * gap:.1f}%; checking "
             f"the gradient's direction broke {100 * masked / s.n:.1f}% more"
             f"{f', PGD-{steps} on the surrogate model {100 * by_surrogate / s.n:.1f}% more' if s.surrogate else ''}")
    if s.reported:
        label += f" (the evaluation reports {', '.join(s.reported)}, a margin attack: nothing is overstated)"
    elif gap > limit:
        label += (f"; PGD alone may overstate robust accuracy by about {100 * gap:.1f} points (worst case on the "
                  f"guard subset {100 * (pgd_acc - gap):.1f}%): add cw or autoattack to the attacks")
    r = _verdict("transfer", value, limit, label, "the model's gradients mislead attacks that trust them, so the "
                 "white-box numbers are overstated (gradient masking)")
    r.details = {"pgd_robust": pgd_acc, "margin": gap, "masked": masked / s.n, "surrogate": by_surrogate / s.n,
                 "reported_by": list(s.reported)}
    return r


def guard_black_box(s: GuardContext, min_gap: float = 0.03) -> GuardResult:
    """Square (score-based, no gradients) must not break many examples that PGD could not.

    250 queries and 3%: on an honest adversarially trained small CNN Square breaks none of the
    PGD-robust examples up to 500 queries, while partial masking (gradients reversed for some
    examples) shows most of its gap by 250; 1000 queries would cost 4x for a little more.
    """
    from pyautoattack.square import SquareAttack

    robust = s.pgd_left_robust()
    idx = robust.nonzero().squeeze(1)
    broken = 0

    square = SquareAttack(s.net, norm=PYAUTOATTACK_NORMS[s.norm], n_queries=s.square_queries, eps=s.eps,
                          p_init=0.8, n_restarts=1,
                          seed=s.seed, verbose=False, loss="margin", resc_schedule=True, device=s.x.device)
    for i in range(0, len(idx), s.batch_size):
        j = idx[i : i + s.batch_size]
        with torch.no_grad():
            x_adv = square.perturb(s.x[j], s.y[j])
        broken += int((~_correct(s.logits(x_adv), s.y[j])).sum())
    value, limit = broken / s.n, max(min_gap, 3 / s.n)
    label = (f"Square ({s.square_queries} queries) broke {100 * value:.1f}% of examples "
             f"(of {100 * float(robust.float().mean()):.1f}% that PGD left robust)")
    return _verdict("black-box", value, limit, label,
                    "a black-box attack beats white-box PGD, so the gradients mislead (gradient masking)")


GUARDS: dict[str, Callable[[GuardContext], GuardResult]] = {
    "finite": guard_finite,
    "eval-mode": guard_eval_mode,
    "input-range": guard_input_range,
    "gradients": guard_gradients,
    "gradient-direction": guard_gradient_direction,
    "large-eps": guard_large_eps,
    "more-steps": guard_more_steps,
    "transfer": guard_transfer,
    "black-box": guard_black_box,
}
