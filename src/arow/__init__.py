"""arow: adversarial training that puts more regularisation on less robust samples (ARoW, ICML 2023).

>>> import arow
>>> model = arow.load_model("runs/fmnist-arow")          # doctest: +SKIP
>>> report = arow.evaluate(model, x, y, ["clean", "pgd20"], eps=0.1)  # guards first  # doctest: +SKIP
"""
from __future__ import annotations

__version__ = "0.4.2"

from typing import TYPE_CHECKING, Any

__all__ = ["__version__", "load_model", "model_from_checkpoint", "train", "train_run", "evaluate_run", "evaluate",
           "Trainer", "TrainConfig", "ThreatModel", "build_model", "build_method", "load_dataset", "from_tensors",
           "losses"]


def load_model(path: Any, *, device: Any = "cpu", which: str = "final") -> "torch.nn.Module":
    """The trained model of a run folder, checkpoint or ``.safetensors`` export, in eval mode.

    It takes inputs in [0, 1] (any normalisation is its first layer) and returns logits.
    ``which`` picks ``final`` (SWA model if SWA ran, else the last epoch), ``best`` (selected on
    the held-out validation split) or ``last`` when ``path`` is a run folder. Files are read
    without running code from them (see :mod:`arow.runs.checkpoint`).

    >>> model = load_model("runs/fmnist-arow")  # doctest: +SKIP
    >>> model = load_model("model.safetensors")  # from `arow export`  # doctest: +SKIP
    """
    from .runs.checkpoint import load_checkpoint

    return model_from_checkpoint(load_checkpoint(path, which=which), device=device)


def model_from_checkpoint(ckpt: dict[str, Any], *, device: Any = "cpu") -> "torch.nn.Module":
    """Build the model a loaded checkpoint describes and load its weights (eval mode)."""
    from .runs.checkpoint import CheckpointError
    from .models import build_model

    spec, path = ckpt["model_spec"], ckpt.get("path")
    if spec.get("custom"):
        raise CheckpointError(f"{path}: holds a user-defined model ({spec.get('name')}); build it yourself and "
                              f"load_state_dict(arow.runs.checkpoint.load_checkpoint(path)['model'])")
    try:
        model = build_model(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                            image_size=spec["image_size"], mean=spec.get("mean"), std=spec.get("std"),
                            activation=spec.get("activation", "relu"))  # older checkpoints: relu
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: incomplete model spec ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model spec {spec.get('name')} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval()


def __getattr__(name: str) -> Any:  # lazy: `import arow` stays cheap for the CLI's --help
    import importlib

    lazy = {"train": ("training", "train"), "Trainer": ("training", "Trainer"), "TrainConfig": ("config", "TrainConfig"),
            "train_run": ("pipelines", "train_run"), "evaluate_run": ("pipelines", "evaluate_run"),
            "evaluate": ("pipelines", "evaluate_model"), "ThreatModel": ("threat", "ThreatModel"),
            "build_model": ("models", "build_model"), "build_method": ("methods", "build_method"),
            "load_dataset": ("data", "load_dataset"), "from_tensors": ("data", "from_tensors")}
    if name in lazy:
        mod, attr = lazy[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name in ("losses", "attacks", "methods", "models", "data"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'arow' has no attribute {name!r}")


if TYPE_CHECKING:
    import torch

    from . import losses
    from .config.schema import TrainConfig
    from .data import from_tensors, load_dataset
    from .pipelines import evaluate_model as evaluate
    from .methods import build_method
    from .models import build_model
    from .pipelines import evaluate_run, train_run
    from .threat import ThreatModel
    from .training.trainer import Trainer, train
