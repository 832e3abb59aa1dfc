"""Robust accuracy on a test set: eval mode, full set by default, per-example verdicts kept.

Cheap white-box attacks (FGSM, PGD, CW) each run on every example the model classifies
correctly, so their numbers are the ones papers report; a ``cascade`` attack (AutoAttack)
runs only on the examples still robust after all attacks before it. The worst case per
example over all attacks is always reported too. Under torchrun the examples are sharded
across ranks and the verdicts gathered.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import distributed
from .attacks import Attack, frozen_eval, get_attack, unwrap

log = logging.getLogger(__name__)
Tensor = torch.Tensor
Progress = Callable[[str, int, int], None]  # (attack name, examples done, examples total)


@dataclass
class EvalResult:
    """Accuracies as fractions in [0, 1]; ``correct[name]`` is the per-example verdict."""

    n: int
    eps: float
    accuracy: dict[str, float]
    per_class: dict[str, list[float]]
    correct: dict[str, Tensor] = field(repr=False)
    seconds: dict[str, float]
    descriptions: dict[str, str]
    num_classes: int

    def to_json(self) -> dict:
        return {"n": self.n, "eps": self.eps, "accuracy": self.accuracy, "per_class": self.per_class,
                "seconds": self.seconds, "attacks": self.descriptions}


def per_class_accuracy(correct: Tensor, y: Tensor, num_classes: int) -> list[float]:
    total = torch.bincount(y, minlength=num_classes).float()
    hit = torch.bincount(y[correct], minlength=num_classes).float()
    return [float(h / t) if t > 0 else float("nan") for h, t in zip(hit, total)]


def _shard(n: int) -> tuple[int, int, int]:
    """This rank's contiguous slice [lo, hi) of n examples, padded so all ranks get ``size``."""
    d = distributed.info()
    size = -(-n // d.world_size)
    lo = min(d.rank * size, n)
    return lo, min(lo + size, n), size


def _gather(local: Tensor, size: int, n: int) -> Tensor:
    pad = torch.zeros(size, dtype=local.dtype, device=local.device)
    pad[: len(local)] = local
    return distributed.all_gather_cat(pad)[:n] if distributed.info().enabled else local


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 500) -> Tensor:
    """Predicted labels, batched, in eval mode."""
    net = unwrap(model)
    with frozen_eval(net):
        out = [net(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[Union[str, Attack]] = ("clean", "pgd20"),
    *,
    eps: float,
    num_classes: Optional[int] = None,
    batch_size: int = 500,
    progress: Optional[Progress] = None,
) -> EvalResult:
    """Evaluate ``model`` on ``(x, y)`` (inputs in [0, 1]) under each attack, in order.

    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> r = evaluate(m, torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,)), ["clean", "pgd5"], eps=0.1)
    >>> sorted(r.accuracy) == ["clean", "pgd5", "worst_case"]
    True
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    built = [a if isinstance(a, Attack) else get_attack(a, eps) for a in attacks]
    names = [a.name for a in built]
    if len(set(names)) != len(names):
        raise ValueError(f"attack listed twice: {names}")
    n = len(x)
    num_classes = num_classes or int(y.max()) + 1
    lo, hi, size = _shard(n)
    xs, ys = x[lo:hi], y[lo:hi]
    clean_ok = predict(model, xs, batch_size) == ys
    robust = clean_ok.clone()  # worst case so far
    correct, seconds = {}, {}
    for atk in built:
        t0 = time.perf_counter()
        if atk.name == "clean":
            verdict = clean_ok.clone()
        else:
            verdict = clean_ok.clone()
            todo = (robust if getattr(atk, "cascade", False) else clean_ok).nonzero().squeeze(1)
            if getattr(atk, "cascade", False):
                verdict = robust.clone()
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                x_adv = atk(model, xs[idx], ys[idx])
                _check_ball(x_adv, xs[idx], eps, atk.name)
                verdict[idx] = predict(model, x_adv, batch_size) == ys[idx]
                if progress is not None:
                    progress(atk.name, min(start + batch_size, len(todo)), len(todo))
        robust &= verdict
        correct[atk.name] = _gather(verdict, size, n)
        seconds[atk.name] = time.perf_counter() - t0
        log.info("%s: %.2f%% (%.1fs)", atk.name, 100 * correct[atk.name].float().mean(), seconds[atk.name])
    correct["worst_case"] = _gather(robust, size, n)
    y_all = y.to(correct["worst_case"].device)
    accuracy = {k: float(v.float().mean()) for k, v in correct.items()}
    per_class = {k: per_class_accuracy(v, y_all, num_classes) for k, v in correct.items()}
    descriptions = {a.name: a.description for a in built}
    return EvalResult(n, eps, accuracy, per_class, correct, seconds, descriptions, num_classes)


def _check_ball(x_adv: Tensor, x: Tensor, eps: float, name: str) -> None:
    """An attack that leaves the threat model would report a meaningless number: refuse it."""
    if len(x) == 0:
        return
    dev, lo, hi = float((x_adv - x).abs().amax()), float(x_adv.min()), float(x_adv.max())
    if dev > eps + 1e-5 or lo < 0.0 or hi > 1.0:
        raise RuntimeError(f"attack {name} left the threat model: max |delta| {dev:.4g} (eps {eps}), "
                           f"range [{lo:.4g}, {hi:.4g}]")
