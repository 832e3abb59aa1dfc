"""Models that ``arow`` did not build, for evaluation: a Python factory plus weights, a TorchScript
file, or an exported program (``torch.export``).

Each is returned as an ``nn.Module`` taking inputs in [0, 1] and returning logits, ready for
:func:`arow.evaluate` / ``arow eval``. A factory is your own code (``pkg.module:function``,
imported from the current directory or the Python path); weights are read without unpickling
code (``.safetensors``, or a ``torch.save`` state dict loaded with ``weights_only=True``).
TorchScript and exported programs are loaded by PyTorch and run their own compiled graph: load
only files you trust, as with any model you run.

>>> model = load_user_model("mypkg.nets:wrn", weights="wrn.safetensors")  # doctest: +SKIP
>>> model = load_user_model("model.pt2")                                  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]


class UserModelError(ValueError):
    """The model could not be built or loaded; the message says which and why."""


class ExportedModel(nn.Module):
    """An exported program's module, which cannot switch between train and eval mode itself.

    It computes what it was exported in (export in eval mode); ``train()``/``eval()`` only set the
    flag here, so attacks that put a model in eval mode work on it.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode  # the exported graph's mode is fixed; its children are not switched
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def is_factory(spec: str) -> bool:
    """``pkg.module:function`` (and not a file that exists)."""
    mod, sep, fn = str(spec).partition(":")
    return bool(sep and mod and fn.isidentifier() and not Path(spec).exists())


def user_model_name(spec: PathLike) -> str:
    """The name a user model's results go under: the function of ``pkg.module:function``, else the
    file's stem (``eval_<name>.json``).

    >>> user_model_name("mypkg.nets:wrn"), user_model_name("exports/model.pt2")
    ('wrn', 'model')
    """
    spec = str(spec)
    return (spec.partition(":")[2] if is_factory(spec) else Path(spec).stem) or "model"


def load_user_model(spec: PathLike, *, weights: Optional[PathLike] = None, device: Any = "cpu") -> nn.Module:
    """Build or load a model from ``spec``: ``pkg.module:function`` (called with no arguments; then
    ``weights`` is loaded into it), a TorchScript file or an exported program (``.pt2``)."""
    spec = str(spec)
    if is_factory(spec):
        model = _from_factory(spec)
        if weights is not None:
            load_weights(model, weights)
    else:
        if weights is not None:
            raise UserModelError("--weights goes with --model-factory pkg.module:function; a TorchScript or "
                                 "exported-program file holds its own weights")
        model = _from_file(Path(spec), device)
    return model.to(device).eval()


def _from_factory(spec: str) -> nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `pkg.module` of the directory the command runs in
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserModelError(f"--model-factory {spec}: cannot import {mod_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserModelError(f"--model-factory {spec}: {mod_name} has no function {fn_name}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise UserModelError(f"--model-factory {spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: PathLike) -> None:
    """Load a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``; a
    checkpoint dict with ``model`` or ``state_dict`` inside is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise UserModelError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or pickled-code file: one line, whatever PyTorch raised
        raise UserModelError(f"--weights {path}: cannot be read as weights ({str(e).splitlines()[0][:200]})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserModelError(f"--weights {path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserModelError(f"--weights {path}: do not fit the model ({str(e).splitlines()[0][:200]})") from None


def _from_file(path: Path, device: Any) -> nn.Module:
    if not path.is_file():
        raise UserModelError(f"{path}: no such file (or pass --model-factory pkg.module:function)")
    if not zipfile.is_zipfile(path):
        raise UserModelError(f"{path}: not a TorchScript file, exported program (.pt2) or arow checkpoint")
    names = zipfile.ZipFile(path).namelist()
    try:
        if any(n.endswith("/archive_format") for n in names):
            return ExportedModel(torch.export.load(str(path)).module())
        if any("/code/" in n for n in names):
            return torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise UserModelError(f"{path}: PyTorch could not load it ({str(e).splitlines()[0][:200]})") from None
    raise UserModelError(f"{path}: a torch.save file, not a model: use --model-factory pkg.module:function "
                         f"--weights {path}")


def is_user_model_file(path: PathLike) -> bool:
    """A TorchScript file or exported program (as opposed to an arow checkpoint)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    names = zipfile.ZipFile(p).namelist()
    return any(n.endswith("/archive_format") or "/code/" in n for n in names)
