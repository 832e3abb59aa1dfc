"""What a checkpoint says about its model: :class:`ModelSpec`, the one reader and writer of the
``model_spec`` entry of checkpoints, exports and ``config.json``.

A checkpoint stores the spec as a plain dict (:meth:`ModelSpec.to_dict`); :meth:`ModelSpec.from_dict`
reads every version since 0.1.0 (a key it lacks takes the default of today: ``activation`` relu, no
normalisation, a built-in model) and :meth:`ModelSpec.build` makes the architecture again.

>>> spec = ModelSpec("small-cnn", num_classes=10, in_channels=1, image_size=28, dataset="fashion-mnist")
>>> ModelSpec.from_dict(spec.to_dict()) == spec
True
>>> spec.build()(torch.rand(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from . import build_model


@dataclass(frozen=True)
class ModelSpec:
    """An architecture by name with its sizes and normalisation, or a user-defined model (``custom``:
    only its class name is known; arow cannot build it)."""

    name: str
    num_classes: Optional[int] = None
    in_channels: Optional[int] = None
    image_size: Optional[int] = None
    mean: Optional[tuple[float, ...]] = None  # the normalisation layer's per-channel mean (None: no layer)
    std: Optional[tuple[float, ...]] = None
    dataset: Optional[str] = None  # the data set it was trained on, if a built-in one
    activation: str = "relu"
    custom: bool = False

    @classmethod
    def of_user_model(cls, model: nn.Module) -> "ModelSpec":
        """The spec of a model arow did not build: its class name, marked ``custom``."""
        return cls(type(model).__name__, custom=True)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a checkpoint stores: every key for a built-in model; for a user-defined one
        its name, ``custom: True`` and whatever else is known."""
        d: dict[str, Any] = {"name": self.name, "num_classes": self.num_classes, "in_channels": self.in_channels,
                             "image_size": self.image_size, "mean": _listed(self.mean), "std": _listed(self.std),
                             "dataset": self.dataset, "activation": self.activation}
        if not self.custom:
            return d
        known = {k: v for k, v in d.items() if v is not None and not (k == "activation" and v == "relu")}
        return {**known, "custom": True}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        """Read a stored spec; keys an older version did not write take today's defaults, keys a
        newer one added are ignored. A wrong type is a one-line ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"model spec: expected a mapping, got {type(d).__name__}")
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"model spec: 'name' must be a non-empty string, got {name!r}")
        values: dict[str, Any] = {"name": name}
        for key in ("num_classes", "in_channels", "image_size"):
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"model spec: {key!r} must be an integer, got {v!r}")
            values[key] = v
        for key in ("mean", "std"):
            values[key] = _numbers(key, d.get(key))
        for key, default in (("dataset", None), ("activation", "relu")):
            v = d.get(key, default)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"model spec: {key!r} must be a string, got {v!r}")
            values[key] = default if v is None else v
        if not isinstance(d.get("custom", False), bool):
            raise ValueError(f"model spec: 'custom' must be true or false, got {d.get('custom')!r}")
        values["custom"] = d.get("custom", False)
        return cls(**values)

    def build(self) -> nn.Module:
        """A new model of this spec (random weights, train mode), as :func:`arow.models.build_model`
        builds it; a ValueError for a user-defined model or a spec without its sizes."""
        if self.custom:
            raise ValueError(f"{self.name} is a user-defined model: build it yourself and load its weights")
        missing = [k for k in ("num_classes", "in_channels", "image_size") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"the model spec of {self.name} lacks {', '.join(missing)}")
        return build_model(self.name, num_classes=self.num_classes, in_channels=self.in_channels,
                           image_size=self.image_size, mean=_listed(self.mean), std=_listed(self.std),
                           activation=self.activation)

    def replace(self, **changes: Any) -> "ModelSpec":
        """A copy with ``changes`` (e.g. the normalisation measured on the training data)."""
        return dataclasses.replace(self, **{k: _numbers(k, v) if k in ("mean", "std") else v
                                            for k, v in changes.items()})


def _numbers(key: str, v: Any) -> Optional[tuple[float, ...]]:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise ValueError(f"model spec: {key!r} must be a list of numbers, got {v!r}")
    return tuple(float(x) for x in v)


def _listed(v: Optional[tuple[float, ...]]) -> Optional[list[float]]:
    return None if v is None else list(v)
