"""arow: adversarial training that puts more regularisation on less robust samples (ARoW, ICML 2023).

>>> import arow
>>> model = arow.load_model("runs/fmnist-arow")          # doctest: +SKIP
>>> report = arow.evaluate(model, x, y, ["clean", "pgd20"], eps=0.1)  # guards first  # doctest: +SKIP

The names below are imported on first use, so ``import arow`` (and the CLI's ``--help``) stays cheap.
"""
from __future__ import annotations

__version__ = "0.9.1"

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that owns it
_PUBLIC = {
    "load_model": "runs.records", "model_from_checkpoint": "runs.records", "load_checkpoint": "runs.records",
    "train": "pipelines", "train_run": "pipelines", "evaluate_run": "pipelines", "evaluate": "pipelines:evaluate_model",
    "Trainer": "training", "TrainConfig": "config", "ThreatModel": "threat", "build_model": "models",
    "build_method": "methods", "load_dataset": "data", "from_tensors": "data",
}
_MODULES = ("losses", "attacks", "methods", "models", "data")
__all__ = ["__version__", *_PUBLIC, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module, _, attr = _PUBLIC[name].partition(":")
        return getattr(importlib.import_module(f".{module}", __name__), attr or name)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'arow' has no attribute {name!r}")


if TYPE_CHECKING:
    from . import attacks, data, losses, methods, models
    from .config import TrainConfig
    from .data import from_tensors, load_dataset
    from .methods import build_method
    from .models import build_model
    from .pipelines import evaluate_model as evaluate
    from .pipelines import evaluate_run, train, train_run
    from .runs.records import load_checkpoint, load_model, model_from_checkpoint
    from .threat import ThreatModel
    from .training import Trainer
