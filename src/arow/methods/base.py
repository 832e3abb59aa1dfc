"""The interface every training method implements, and the facts each method class carries.

A method is called as ``method(model, x, y, rng=...)`` and returns the loss plus what is worth
logging. It is split in two halves so that wrappers (AWP) can reuse one attack for several
objective evaluations: :meth:`Method.attack` finds ``x_adv`` (eval mode, frozen weights) and
:meth:`Method.objective` runs the training forward passes (train mode) and the pure loss.

A new method is one file under ``arow/methods/`` (imported by the package automatically) and one
test. Its class declares, besides ``attack``/``objective``:

- ``hparams``: its hyper-parameters as :class:`Hparam` (they become CLI flags and are range
  checked); the instance holds their values in ``self.hp``, a frozen dataclass generated from
  ``hparams`` (``cls.Params``), and their plain dict in ``self.config`` (the run folder records it);
- ``paper`` and ``url``: what it implements;
- ``passes``: its model passes per training step (:class:`Passes`; docs/performance.md shows them
  and tests/test_passes.py counts them);
- ``test_settings``: hyper-parameters the tests use to exercise it quickly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

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

    @property
    def annotation(self) -> Any:
        """The Python type of a checked value: ``type``, or a Union with ``accepts`` / None."""
        types = (self.type, *self.accepts) + ((type(None),) if self.default is None else ())
        return types[0] if len(types) == 1 else Union[types]  # type: ignore[valid-type]


def params_class(owner: str, hparams: dict[str, Hparam], module: Optional[str] = None) -> type:
    """The frozen dataclass of ``hparams``' values, one typed field per hyper-parameter.

    >>> P = params_class("Demo", {"beta": Hparam(6.0, "weight"), "start": Hparam(None, "epoch", int)})
    >>> P(), P.__dataclass_fields__["start"].type
    (Demo.Params(beta=6.0, start=None), typing.Optional[int])
    """
    cls = dataclasses.make_dataclass(
        "Params", [(k, h.annotation, field(default=h.default)) for k, h in hparams.items()], frozen=True)
    cls.__qualname__ = f"{owner}.Params"
    if module is not None:
        cls.__module__ = module
    return cls


@dataclass(frozen=True)
class Passes:
    """Model passes of one training step, per image of the batch.

    ``target``: eval-mode forwards with no gradient (the KL attack's clean target p(x));
    ``attack``: eval-mode forwards each followed by one input-gradient backward (the weights
    are frozen, so that backward costs about one forward); ``train``: train-mode forwards, each
    backpropagated to the weights (about two forwards); ``helper``: forwards of another model
    of the same size (HAT's helper), no gradient.

    On a method class (``Method.passes``) ``attack`` counts the passes PER ATTACK STEP;
    :meth:`for_steps` gives the passes of a step with K attack steps.

    >>> Passes(target=1, attack=1, train=2).for_steps(10).cost
    27
    """

    target: int
    attack: int
    train: int
    helper: int = 0

    @property
    def cost(self) -> int:
        """Forward-equivalents per image: target + 2 attack + 3 train + helper."""
        return self.target + 2 * self.attack + 3 * self.train + self.helper

    def for_steps(self, steps: int) -> "Passes":
        """These per-attack-step counts for an attack of ``steps`` steps (K)."""
        return Passes(self.target, self.attack * steps, self.train, self.helper)


@dataclass
class MethodOutput:
    """The loss and what the trainer logs. ``parts`` holds scalars; ``weight`` per-example weights."""

    loss: Tensor
    logits_clean: Optional[Tensor] = None
    logits_adv: Optional[Tensor] = None
    parts: dict[str, Tensor] = field(default_factory=dict)
    weight: Optional[Tensor] = None


class Method:
    """Base class: subclasses set ``hparams`` and the facts below, and implement ``attack``/``objective``.

    Hyper-parameter values live in ``self.hp`` (an instance of ``cls.Params``, generated from
    ``hparams``); ``method.<name>`` reads the same value (read-only).
    """

    name: ClassVar[str] = ""  # set by METHODS.register
    hparams: ClassVar[dict[str, Hparam]] = {}
    #: the frozen dataclass of the hyper-parameters' values (generated from ``hparams``)
    Params: ClassVar[type] = params_class("Method", {}, __name__)
    #: training attack steps by default (the paper's recipe: 10 steps of eps/4); a method on this
    #: default gets a data set's own L-inf attack where it has one (``DatasetInfo.train_attack``)
    default_steps: ClassVar[int] = 10
    #: short citation (authors, title, venue year) and a link to the paper; None for no paper
    paper: ClassVar[Optional[str]] = None
    url: ClassVar[Optional[str]] = None
    #: model passes per training step, ``attack`` per attack step (docs/performance.md)
    passes: ClassVar[Optional[Passes]] = None
    #: hyper-parameters that make the method's tests quick (e.g. an effect switched on from epoch 1)
    test_settings: ClassVar[dict[str, Any]] = {}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every hyper-parameter's default value, by name (what a run that sets none of them runs).

        >>> from arow.methods import METHODS
        >>> METHODS.get("arow").defaults()["lam"]
        3.5
        """
        return {k: h.default for k, h in cls.hparams.items()}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "hparams" in cls.__dict__ and "Params" not in cls.__dict__:
            cls.Params = params_class(cls.__qualname__, cls.hparams, cls.__module__)

    def __init__(self, threat: ThreatModel, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.hparams)
        if unknown:
            raise ValueError(f"method {self.name!r} has no hyper-parameter(s) {sorted(unknown)}; "
                             f"it takes {sorted(self.hparams) or 'none'}")
        self.threat = threat
        self.config = {k: h.check(k, kwargs.get(k, h.default)) for k, h in self.hparams.items()}
        self.hp = self.Params(**self.config)
        self.epoch = 0
        self.total_epochs = 1

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: ``method.lam`` reads ``method.hp.lam``
        hp = self.__dict__.get("hp")
        if hp is not None and name in hp.__dataclass_fields__:
            return getattr(hp, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        hp = self.__dict__.get("hp")
        if hp is not None and name in hp.__dataclass_fields__:
            raise AttributeError(f"hyper-parameter {name!r} is fixed when the method is built; "
                                 f"build a new one: build_method({self.name!r}, threat, {name}=...)")
        super().__setattr__(name, value)

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
