"""The interface every training method implements.

A method is called as ``method(model, x, y, rng=...)`` and returns the loss plus what is worth
logging. It is split in two halves so that wrappers (AWP) can reuse one attack for several
objective evaluations: :meth:`Method.attack` finds ``x_adv`` (eval mode, frozen weights) and
:meth:`Method.objective` runs the training forward passes (train mode) and the pure loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn

from ..rng import BatchRNG
from ..threat import ThreatModel

Tensor = torch.Tensor


@dataclass
class Hparam:
    """A method hyper-parameter: becomes ``--<name>`` on the CLI and a keyword of the class.

    Numbers must be finite and within ``[min, max]`` (either bound optional); ``choices`` lists the
    values a string may take.

    >>> Hparam(6.0, "weight", min=0).check("beta", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: --beta must be a finite number, got nan
    """

    default: Any
    help: str
    type: type = float
    min: Optional[float] = None
    max: Optional[float] = None
    choices: Optional[tuple[str, ...]] = None
    #: further types the Python API may pass (e.g. a module instead of a path)
    accepts: tuple[type, ...] = ()

    def check(self, name: str, value: Any) -> Any:
        """``value`` converted to this hyper-parameter's type, or a one-line ValueError."""
        name = "--" + name.replace("_", "-")
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{name} must not be empty")
        if self.accepts and isinstance(value, self.accepts):
            return value
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                allowed = f"one of {', '.join(self.choices)}" if self.choices else "a string"
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                self.type is int and not float(value).is_integer()):
            raise ValueError(f"{name} must be {'an integer' if self.type is int else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.min is not None and value < self.min:
            raise ValueError(f"{name} must be >= {self.min:g}, got {value!r}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{name} must be <= {self.max:g}, got {value!r}")
        return self.type(value)


@dataclass
class MethodOutput:
    """The loss and what the trainer logs. ``parts`` holds scalars; ``weight`` per-example weights."""

    loss: Tensor
    logits_clean: Optional[Tensor] = None
    logits_adv: Optional[Tensor] = None
    parts: dict[str, Tensor] = field(default_factory=dict)
    weight: Optional[Tensor] = None


class Method:
    """Base class: subclasses set ``name``, ``hparams``, and implement ``attack``/``objective``."""

    name: ClassVar[str] = ""
    hparams: ClassVar[dict[str, Hparam]] = {}
    #: training attack steps by default (the paper's recipe: 10 steps of eps/4)
    default_steps: ClassVar[int] = 10

    def __init__(self, threat: ThreatModel, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.hparams)
        if unknown:
            raise ValueError(f"method {self.name!r} has no hyper-parameter(s) {sorted(unknown)}; "
                             f"it takes {sorted(self.hparams) or 'none'}")
        self.threat = threat
        self.config = {k: h.check(k, kwargs.get(k, h.default)) for k, h in self.hparams.items()}
        for k, v in self.config.items():
            setattr(self, k, v)
        self.epoch = 0
        self.total_epochs = 1

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called by the trainer at the start of every epoch (0-based)."""
        self.epoch, self.total_epochs = epoch, total_epochs

    def attack(self, model: nn.Module, x: Tensor, y: Tensor, rng: Optional[BatchRNG] = None) -> Any:
        """The training attack. Returns what :meth:`objective` needs (usually ``x_adv``)."""
        return None

    def objective(self, model: nn.Module, x: Tensor, y: Tensor, adv: Any) -> MethodOutput:
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after the optimiser step (AWP restores the weights here)."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, rng: Optional[BatchRNG] = None) -> MethodOutput:
        return self.objective(model, x, y, self.attack(model, x, y, rng))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{type(self).__name__}({self.threat}, {args})"
