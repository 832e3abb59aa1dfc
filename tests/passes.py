"""Counting the model passes of one training step: the helper behind tests/test_passes.py.

Test code, not part of the package (tests import it as ``from passes import ...``; pytest puts
tests/ on the path, as for ``conftest``). Each method class declares what one step costs in its
``passes`` attribute (:class:`arow.methods.Passes`); :data:`PASS_TABLE` gathers them,
:func:`count_passes` runs one step under forward hooks and counts what actually ran, and
docs/performance.md shows the same table. tests/test_passes.py holds all three to each other.

>>> documented_passes("arow", steps=10).cost     # forward-equivalents per image
27
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from arow.methods import METHODS, Passes

__all__ = ["PASS_TABLE", "PassCount", "Passes", "count_passes", "documented_passes", "reference_cost"]

Tensor = torch.Tensor


class _PassTable(Mapping[str, Passes]):
    """method -> its documented passes per training step (``attack`` per attack step), read live from
    the registry: each method class declares its own ``passes`` (:class:`arow.methods.base.Passes`).
    docs/performance.md shows the same table and tests/test_passes.py counts every registered method
    against both. AWP rows are for epochs where AWP is active (its proxy adds the inner method's
    train forwards). Methods without ``passes`` are absent."""

    def _passes(self) -> dict[str, Passes]:
        return {name: METHODS.get(name).passes for name in METHODS.names()
                if METHODS.get(name).passes is not None}

    def __getitem__(self, name: str) -> Passes:
        return self._passes()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._passes())

    def __len__(self) -> int:
        return len(self._passes())

    def __repr__(self) -> str:
        return f"PASS_TABLE({self._passes()!r})"


PASS_TABLE: Mapping[str, Passes] = _PassTable()


def documented_passes(method: str, steps: int) -> Passes:
    """The documented pass count of ``method`` with ``steps`` attack steps (K)."""
    if method not in PASS_TABLE:
        raise ValueError(f"no documented pass count for method {method!r}; give its class a `passes` "
                         f"(arow.methods.base.Passes) and add its row to docs/performance.md")
    return PASS_TABLE[method].for_steps(steps)


def reference_cost(method: str, steps: int) -> int:
    """Forward-equivalents per image of the reference-style step (benchmarks/train_step.py's
    ``reference_style_step``, costed there by ``reference_style_cost``): the research code's KL
    attacks (ARoW, TRADES) recompute the clean forward in every attack step."""
    p = PASS_TABLE[method]
    return Passes(target=steps if method in ("arow", "trades") else 0, attack=p.attack * steps, train=p.train).cost


@dataclass(frozen=True)
class PassCount(Passes):
    """What :func:`count_passes` observed: :class:`Passes` plus consistency checks."""

    backward: int = 0  # backward passes that reached the model's parameters (.grad accumulated)
    train_no_grad: int = 0  # train-mode forwards whose output got no gradient (should be 0)
    batch_sizes: tuple[int, ...] = ()


def count_passes(method: Any, model: nn.Module, x: Tensor, y: Tensor, *, helper: Optional[nn.Module] = None,
                 rng: Any = None) -> PassCount:
    """Run one training step of ``method`` as the Trainer does, counting the model's passes.

    Every outermost call of a module of ``type(model)`` counts (AWP's proxy is a copy of the
    model); calls of ``helper`` count as helper forwards. A forward is an attack pass if its
    output later receives a gradient in eval mode, a training pass if it does in train mode.

    >>> from arow.methods import build_method
    >>> from arow.threat import ThreatModel
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> c = count_passes(build_method("arow", ThreatModel(0.1, steps=3)), net, torch.rand(2, 1, 2, 2),
    ...                  torch.tensor([0, 1]))
    >>> c.target, c.attack, c.train, c.backward
    (1, 3, 2, 1)
    """
    cls, records, depth = type(model), [], [0]

    def pre(m: nn.Module, inp: Any) -> None:
        depth[0] += 1

    def post(m: nn.Module, inp: Any, out: Any) -> None:
        depth[0] -= 1
        if depth[0] != 0 or not isinstance(out, Tensor):
            return
        if m is helper:
            records.append({"kind": "helper", "training": m.training, "grad": False, "n": out.shape[0]})
        elif type(m) is cls:
            rec = {"kind": "model", "training": m.training, "grad": False, "n": out.shape[0]}
            records.append(rec)
            if out.requires_grad:
                out.register_hook(lambda g, rec=rec: rec.__setitem__("grad", True))

    params = [p for p in model.parameters() if p.requires_grad]
    backward = [0]
    handles = [nn.modules.module.register_module_forward_pre_hook(pre),
               nn.modules.module.register_module_forward_hook(post)]
    if params:
        handles.append(params[0].register_post_accumulate_grad_hook(lambda p: backward.__setitem__(0, backward[0] + 1)))
    try:
        model.train()
        out = method(model, x, y, rng=rng)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        method.after_step(model)
    finally:
        for h in handles:
            h.remove()
    mine = [r for r in records if r["kind"] == "model"]
    return PassCount(
        target=sum(not r["training"] and not r["grad"] for r in mine),
        attack=sum(not r["training"] and r["grad"] for r in mine),
        train=sum(r["training"] and r["grad"] for r in mine),
        helper=sum(r["kind"] == "helper" for r in records),
        backward=backward[0],
        train_no_grad=sum(r["training"] and not r["grad"] for r in mine),
        batch_sizes=tuple(sorted({r["n"] for r in records})),
    )
