"""Checks against overstated robustness, run before ``arow eval`` reports a number.

Each guard looks for one way an evaluation can flatter a model (Athalye et al. 2018; Carlini
et al. 2019, "On evaluating adversarial robustness"; AutoAttack's own flags):

- ``eval-mode``: the forward pass is deterministic, independent of the other examples in the
  batch, leaves buffers alone and never runs a module in train mode (dropout or BatchNorm
  forced on inside ``forward`` make attacks chase noise);
- ``input-range``: inputs are in [0, 1] and the model is not far better on normalised inputs
  (a model expecting ``(x - mean) / std`` is evaluated with the wrong eps geometry);
- ``gradients``: input gradients are finite and non-zero for most examples;
- ``large-eps``: PGD at a huge radius (>= 0.5 on [0, 1] data) drives accuracy to about chance;
- ``more-steps``: a stronger PGD (more steps and restarts) never leaves more examples standing;
- ``black-box``: Square (no gradients) does not break many examples white-box PGD could not.

All run on a small subset (the first ``n`` examples) in a few forward/backward passes; each
returns a :class:`GuardResult`. Guards never change the model (mode, flags and buffers restored).

>>> results = run_guards(model, x, y, eps=0.1)          # doctest: +SKIP
>>> [r.name for r in results if not r.passed]           # doctest: +SKIP
[]
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .attacks import ce_loss, frozen_eval, pgd, unwrap
from .threat import ThreatModel

log = logging.getLogger(__name__)
Tensor = torch.Tensor

GUARD_NAMES = ("eval-mode", "input-range", "gradients", "large-eps", "more-steps", "black-box")
#: relative change of the logits between two passes / batch compositions that counts as a difference
DETERMINISM_TOL = 1e-3


@dataclass
class GuardResult:
    """One guard's verdict: ``value`` compared with ``threshold``; ``message`` says what it means."""

    name: str
    passed: bool
    value: float
    threshold: float
    message: str
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class GuardContext:
    """The guard subset and what several guards share (clean predictions, PGD verdicts)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, eps: float, num_classes: int,
                 batch_size: int, square_queries: int, seed: int) -> None:
        self.net, self.x, self.y, self.eps = model, x, y, eps
        self.num_classes, self.batch_size = num_classes, batch_size
        self.square_queries, self.seed = square_queries, seed
        self._clean: Optional[Tensor] = None
        self.whitebox_robust: Optional[Tensor] = None  # survived both PGD runs of "more-steps"

    @property
    def n(self) -> int:
        return len(self.x)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return torch.cat([self.net(x[i : i + self.batch_size]).float() for i in range(0, len(x), self.batch_size)])

    @property
    def clean_ok(self) -> Tensor:
        if self._clean is None:
            self._clean = self.logits(self.x).argmax(1) == self.y
        return self._clean

    def pgd_robust(self, threat: ThreatModel, restarts: int = 1) -> Tensor:
        """Per example: correct and not fooled by PGD on cross-entropy (first fooling iterate kept)."""
        robust = self.clean_ok.clone()
        idx = robust.nonzero().squeeze(1)
        for i in range(0, len(idx), self.batch_size):
            j = idx[i : i + self.batch_size]
            x_adv = pgd(self.net, self.x[j], self.y[j], threat, ce_loss, restarts=restarts, keep_best=True)
            robust[j] = self.logits(x_adv).argmax(1) == self.y[j]
        return robust


def run_guards(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    num_classes: Optional[int] = None,
    n: int = 200,
    batch_size: int = 500,
    seed: int = 0,
    square_queries: int = 100,
    only: Optional[Sequence[str]] = None,
) -> list[GuardResult]:
    """Run the guards on the first ``n`` examples of ``(x, y)`` (inputs in [0, 1]).

    Deterministic for a given ``seed``; the caller's RNG state and the model are left as they
    were. Under torchrun rank 0 computes and every rank receives the same results.

    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> rs = run_guards(m, torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,)), eps=0.1, only=["gradients"])
    >>> rs[0].name, rs[0].passed
    ('gradients', True)
    """
    names = list(only) if only is not None else list(GUARD_NAMES)
    unknown = [g for g in names if g not in GUARD_NAMES]
    if unknown:
        raise ValueError(f"unknown guard(s) {unknown}; choose from {', '.join(GUARD_NAMES)}")
    if n < 1:
        raise ValueError(f"the guards need n >= 1 examples, got {n}")
    if not eps > 0:
        raise ValueError(f"the guards need eps > 0, got {eps}")
    if distributed.info().enabled:
        out = _run(model, x, y, eps, num_classes, n, batch_size, seed, square_queries, names) \
            if distributed.info().is_main else None
        return distributed.broadcast_object(out)
    return _run(model, x, y, eps, num_classes, n, batch_size, seed, square_queries, names)


def _run(model: nn.Module, x: Tensor, y: Tensor, eps: float, num_classes: Optional[int], n: int,
         batch_size: int, seed: int, square_queries: int, names: list[str]) -> list[GuardResult]:
    net = unwrap(model)
    x, y = x[:n].detach(), y[:n].detach()
    num_classes = num_classes or int(y.max()) + 1
    devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
        if x.device.type == "cuda" else []
    results = []
    with frozen_eval(net), torch.random.fork_rng(devices=devices), _exact_float32():
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[devices[0]].manual_seed(seed)
        sub = GuardContext(net, x, y, eps, num_classes, batch_size, square_queries, seed)
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


@contextlib.contextmanager
def _exact_float32() -> Iterator[None]:
    # TF32 convolutions pick batch-size-dependent kernels: differences that are not the model's
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# --------------------------------------------------------------------------- the guards
def guard_eval_mode(s: GuardContext) -> GuardResult:
    """Deterministic, batch-independent forward in eval mode that changes no buffer."""
    net = s.net
    before = {k: v.clone() for k, v in net.named_buffers()}
    in_train: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _, name=name: in_train.append(name or "model")
                                         if mod.training else None) for name, m in net.named_modules()]
    try:
        a, b = s.logits(s.x), s.logits(s.x)
        k = max(1, s.n // 4)
        with torch.no_grad():
            c = net(s.x[:k]).float()  # the same examples in a smaller batch
    finally:
        for h in hooks:
            h.remove()
        changed = [name for name, v in net.named_buffers() if not torch.equal(v, before[name])]
        with torch.no_grad():  # undo what a misbehaving forward did to its buffers
            for name, v in net.named_buffers():
                v.copy_(before[name])
    scale = float(a.abs().max()) + 1e-12
    diff = max(float((a - b).abs().max()), float((a[:k] - c).abs().max())) / scale
    if not math.isfinite(diff):
        diff = math.inf
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
    normed = float((s.logits((s.x - mean) / std).argmax(1) == s.y).float().mean())
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
            (g,) = torch.autograd.grad(F.cross_entropy(s.net(xb).float(), s.y[i : i + s.batch_size],
                                                       reduction="sum"), xb, allow_unused=True)
        if g is None:  # the output does not depend on the input through autograd at all
            bad_zero += len(xb)
            continue
        g = g.flatten(1)
        finite = torch.isfinite(g).all(1)
        bad_nan += int((~finite).sum())
        bad_zero += int((finite & (g.abs().amax(1) == 0)).sum())
    frac_zero, frac_nan = bad_zero / s.n, bad_nan / s.n
    if frac_nan > 0:
        return GuardResult("gradients", False, frac_nan, 0.0,
                           f"input gradients are NaN/inf for {100 * frac_nan:.1f}% of examples")
    if frac_zero > max_zero:
        return GuardResult("gradients", False, frac_zero, max_zero,
                           f"input gradients are exactly zero for {100 * frac_zero:.1f}% of examples "
                           f"(gradient masking: quantisation, detach or saturation)")
    return GuardResult("gradients", True, frac_zero, max_zero,
                       f"finite input gradients; zero for {100 * frac_zero:.1f}% of examples")


def guard_large_eps(s: GuardContext, steps: int = 10, margin: float = 0.1) -> GuardResult:
    """PGD at eps >= 0.5 (images can be pushed to grey) must bring accuracy near chance."""
    big = min(1.0, max(0.5, 4 * s.eps))
    acc = float(s.pgd_robust(ThreatModel(eps=big, steps=steps)).float().mean())
    limit = 1 / s.num_classes + margin
    if acc > limit:
        return GuardResult("large-eps", False, acc, limit,
                           f"PGD-{steps} at eps={big:g} still leaves {100 * acc:.1f}% accuracy (chance "
                           f"{100 / s.num_classes:.0f}%): the attack is blocked, not the perturbation "
                           f"(gradient masking)")
    return GuardResult("large-eps", True, acc, limit, f"PGD-{steps} at eps={big:g}: {100 * acc:.1f}% accuracy")


def guard_more_steps(s: GuardContext, weak: int = 5, strong: int = 10, restarts: int = 2) -> GuardResult:
    """PGD with more steps and restarts must not leave more examples robust than a short PGD."""
    tm = ThreatModel(eps=s.eps, steps=weak)
    r_weak = s.pgd_robust(tm)
    r_strong = s.pgd_robust(tm.with_(steps=strong), restarts=restarts)
    s.whitebox_robust = r_weak & r_strong
    a_weak, a_strong = float(r_weak.float().mean()), float(r_strong.float().mean())
    tol = 0.03 + 2 / s.n  # different random starts: a few examples either way is noise
    value = a_strong - a_weak
    label = f"PGD-{strong}x{restarts} restarts {100 * a_strong:.1f}% vs PGD-{weak} {100 * a_weak:.1f}%"
    if value > tol:
        return GuardResult("more-steps", False, value, tol,
                           f"{label}: a stronger attack found fewer adversarial examples (randomness, "
                           f"state or masking inside the model)")
    return GuardResult("more-steps", True, value, tol, label)


def guard_black_box(s: GuardContext, min_gap: float = 0.05) -> GuardResult:
    """Square (score-based, no gradients) must not break many examples that PGD could not."""
    from pyautoattack.square import SquareAttack

    if s.whitebox_robust is None:
        s.whitebox_robust = s.pgd_robust(ThreatModel(eps=s.eps, steps=10), restarts=2)
    robust = s.whitebox_robust
    idx = robust.nonzero().squeeze(1)
    broken = 0
    square = SquareAttack(s.net, norm="Linf", n_queries=s.square_queries, eps=s.eps, p_init=0.8, n_restarts=1,
                          seed=s.seed, verbose=False, loss="margin", resc_schedule=True, device=s.x.device)
    for i in range(0, len(idx), s.batch_size):
        j = idx[i : i + s.batch_size]
        with torch.no_grad():
            x_adv = square.perturb(s.x[j], s.y[j])
        broken += int((s.logits(x_adv).argmax(1) != s.y[j]).sum())
    value, limit = broken / s.n, max(min_gap, 3 / s.n)
    label = (f"Square ({s.square_queries} queries) broke {100 * value:.1f}% of examples "
             f"(of {100 * float(robust.float().mean()):.1f}% that PGD left robust)")
    if value > limit:
        return GuardResult("black-box", False, value, limit,
                           f"{label}: a black-box attack beats white-box PGD, so the gradients mislead "
                           f"(gradient masking)")
    return GuardResult("black-box", True, value, limit, label)


GUARDS: dict[str, Callable[[GuardContext], GuardResult]] = {
    "eval-mode": guard_eval_mode,
    "input-range": guard_input_range,
    "gradients": guard_gradients,
    "large-eps": guard_large_eps,
    "more-steps": guard_more_steps,
    "black-box": guard_black_box,
}
