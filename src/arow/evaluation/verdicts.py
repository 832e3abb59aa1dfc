"""What the robustness guards share: a guard's verdict, the subset the guards run on and its seed,
and the margin attack with and without its direction checked by forward passes
(:func:`margin_attacks`), which ``transfer`` and ``held-out`` compare.

The subset. ``n`` examples of the evaluated set, drawn with a seed: half of them at random from
the whole set, the other half from its end (the last tenth, or more when ``n`` needs it), the
images an evaluation attacks last, when a model that changes as it sees images has seen the most.
The draw is recorded (``GuardResults.subset``: seed, indices, their SHA-256) so that a guard run
can be repeated and audited.

The seed. By default it is derived from a hash of the model's weights (its ``state_dict``) and of
the evaluated images and labels: the same model on the same data draws the same subset and gets
the same verdicts, every time and on every machine, while another model (one weight changed)
draws another subset. An explicit seed wins (``arow eval --guards-seed``).

>>> draw_subset(10, 4, seed=0).tolist() == draw_subset(10, 4, seed=0).tolist()
True
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..attacks import cw_loss, pgd
from ..attacks.autoattack import digest
from ..attacks.base import AttackLoss
from ..attacks.pgd import device_noise
from ..modules import unwrap
from ..rng import ExampleRNG, NoiseSource
from ..threat import ThreatModel

Tensor = torch.Tensor

#: share of the guard subset drawn from the end of the evaluated set
LATE_SHARE = 0.5
#: the end of the evaluated set: its last tenth (at least twice the examples drawn from it)
LATE_SPAN = 0.1


@dataclass
class GuardResult:
    """One guard's verdict: ``value`` compared with ``threshold``; ``message`` says what it means.

    ``details``: what the guard measured besides ``value`` (plain numbers and strings, for JSON)."""

    name: str
    passed: bool
    value: float
    threshold: float
    message: str
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class GuardResults(list):
    """The guards' verdicts (a list of :class:`GuardResult`), the subset they ran on and the
    reference verdicts the evaluation is cross-checked against.

    ``subset``: ``seed``, ``seed_from`` (``"given"`` or ``"weights and data"``), ``n``, ``total``
    (size of the evaluated set), ``late`` (how many indices lie in its end), ``indices`` (sorted,
    into the evaluated set), ``sha256`` (hex digest of the indices written as ``"3,17,42"``),
    ``held_out`` (the images kept back for the ``held-out`` guard, :func:`draw_held_out`) and, when
    computed, ``reference`` (a summary of the verdicts the evaluation is cross-checked against).
    ``reference``: see :class:`arow.evaluation.crosscheck.Reference` (None when not computed).
    """

    def __init__(self, results: Sequence[GuardResult] = (), subset: Optional[dict[str, Any]] = None,
                 reference: Any = None) -> None:
        super().__init__(results)
        self.subset: dict[str, Any] = subset or {}
        self.reference = reference


def draw_subset(total: int, n: int, seed: int) -> Tensor:
    """``min(n, total)`` distinct indices in ``range(total)``, drawn with ``seed`` and sorted.

    ``round(LATE_SHARE * n)`` of them come from the end of the set (its last ``LATE_SPAN``, at
    least twice as many positions as drawn there), the rest from all the positions not drawn yet.
    Drawn on the CPU: the same indices on every device.

    >>> draw_subset(10, 3, seed=0).tolist() == draw_subset(10, 3, seed=0).tolist()
    True
    >>> draw_subset(5, 9, seed=1).tolist()
    [0, 1, 2, 3, 4]
    >>> int((draw_subset(10_000, 200, seed=0) >= 9_000).sum()) >= 100
    True
    """
    n = min(n, total)
    if n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    late = int(round(LATE_SHARE * n))
    span = min(total, max(2 * late, int(LATE_SPAN * total)))
    tail = (total - span) + torch.randperm(span, generator=g)[:late]
    taken = torch.zeros(total, dtype=torch.bool)
    taken[tail] = True
    rest = (~taken).nonzero().squeeze(1)
    head = rest[torch.randperm(len(rest), generator=g)[: n - late]]
    return torch.cat([tail, head]).sort().values


def draw_held_out(total: int, subset: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` positions (fewer if the set has no more) that are not in ``subset``, drawn with ``seed``
    from the end of the set first (its last ``LATE_SPAN``), sorted: images the guard run never
    showed the model, checked after the evaluation (:func:`arow.evaluation.crosscheck.held_out_check`).

    >>> sorted(set(draw_held_out(100, [97, 98, 99], 5, seed=0)) & {97, 98, 99})
    []
    """
    free = torch.ones(total, dtype=torch.bool)
    free[torch.as_tensor(list(subset), dtype=torch.long)] = False
    g = torch.Generator().manual_seed(seed + 1)
    span = max(int(LATE_SPAN * total), 2 * n)
    late = free.clone()
    late[: max(total - span, 0)] = False
    pick = late.nonzero().squeeze(1)
    pick = pick[torch.randperm(len(pick), generator=g)[:n]]
    if len(pick) < n:  # a small set: the rest from anywhere
        free[pick] = False
        rest = free.nonzero().squeeze(1)
        pick = torch.cat([pick, rest[torch.randperm(len(rest), generator=g)[: n - len(pick)]]])
    return sorted(int(i) for i in pick)


def late_count(indices: Sequence[int], total: int, n: int) -> int:
    """How many of ``indices`` lie in the end of the set that :func:`draw_subset` draws from."""
    late = int(round(LATE_SHARE * min(n, total)))
    span = min(total, max(2 * late, int(LATE_SPAN * total)))
    return sum(1 for i in indices if int(i) >= total - span)


def subset_digest(indices: Sequence[int]) -> str:
    """SHA-256 of the indices written as ``"3,17,42"``: reproducible without PyTorch."""
    return hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()


def guard_seed(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """The default seed of the guard subset: 31 bits of a SHA-256 over the model's ``state_dict``,
    the images and the labels (:func:`arow.attacks.autoattack.digest`).

    >>> m = nn.Linear(2, 2)
    >>> guard_seed(m, torch.zeros(3, 2), torch.zeros(3)) == guard_seed(m, torch.zeros(3, 2), torch.zeros(3))
    True
    """
    return int(digest("arow guard subset", unwrap(model), x, y)[:8], 16) & 0x7FFF_FFFF


def correct(logits: Tensor, y: Tensor) -> Tensor:
    """Per example: the logits are finite and their argmax is the label (a NaN/inf row is never
    "correct": argmax would pick the NaN and could hit the label)."""
    return torch.isfinite(logits).all(1) & (logits.argmax(1) == y)


def checked_pgd(net: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, loss: AttackLoss,
                 rng: Optional[NoiseSource] = None) -> Tensor:
    """PGD that trusts the model's gradient only up to its sign, keeping the first fooling iterate.

    Each step tries ``x + a d(g)`` and ``x - a d(g)`` (``d``: the threat model's step direction,
    the sign for L-inf, the normalised gradient for L2) and keeps whichever has the higher
    ``loss`` on the model's forward pass (a backward pass that lies about the direction is ignored).
    ``rng``: where the random start comes from (default: torch's global generator).
    """
    x_adv, best = threat.init(x, device_noise(rng, x.device)), x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(threat.steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            logits = net(x_adv).float()
            (g,) = torch.autograd.grad(loss(logits, y).sum(), x_adv, allow_unused=True)
        x_adv = x_adv.detach()
        new = ~correct(logits.detach(), y) & ~fooled
        best[new], fooled = x_adv[new], fooled | new
        g = torch.zeros_like(x) if g is None else torch.nan_to_num(g, nan=0.0)
        up, down = threat.ascend(x_adv, g, x), threat.ascend(x_adv, -g, x)
        with torch.no_grad():
            l_up, l_down = loss(net(up).float(), y), loss(net(down).float(), y)
        x_adv = torch.where((l_up >= l_down).view(shape), up, down)
    with torch.no_grad():
        new = ~correct(net(x_adv).float(), y) & ~fooled
    best[new], fooled = x_adv[new], fooled | new
    best[~fooled] = x_adv[~fooled]
    return best


def margin_attacks(net: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, rng_seed: int, index: Tensor,
                   logits: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Which examples PGD on the Carlini-Wagner margin fools when it trusts the model's gradient,
    and which the same search fools with each step's direction checked by forward passes
    (:func:`checked_pgd`), both from the same random starts (drawn per example from ``rng_seed``
    and ``index``). What only the checked search fools is what only a misleading gradient explains.
    ``logits`` computes the model's logits of a batch."""
    trusted = pgd(net, x, y, threat, cw_loss, keep_best=True, rng=ExampleRNG(rng_seed, index))
    checked = checked_pgd(net, x, y, threat, cw_loss, rng=ExampleRNG(rng_seed, index))
    return ~correct(logits(trusted), y), ~correct(logits(checked), y)
