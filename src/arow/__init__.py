"""arow: adversarial training that puts more regularisation on less robust samples (ARoW, ICML 2023).

>>> import arow
>>> model = arow.load_model("runs/fmnist-arow")          # doctest: +SKIP
>>> result = arow.evaluate(model, x, y, ["clean", "pgd20"], eps=0.1)  # doctest: +SKIP
"""
from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

__all__ = ["__version__", "load_model", "train", "evaluate", "Trainer", "TrainConfig", "ThreatModel",
           "build_model", "build_method", "load_dataset", "from_tensors", "losses"]


def load_model(path: Any, *, device: Any = "cpu", which: str = "final") -> "torch.nn.Module":
    """The trained model of a run folder or checkpoint file, in eval mode.

    It takes inputs in [0, 1] (any normalisation is its first layer) and returns logits.
    ``which`` picks ``final`` (SWA model if SWA ran, else the last epoch), ``best`` (selected on
    the held-out validation split) or ``last`` when ``path`` is a run folder.

    >>> model = load_model("runs/fmnist-arow")  # doctest: +SKIP
    """
    from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from .models import build_model

    p = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(p)
    spec = ckpt["model_spec"]
    if spec.get("custom"):
        raise CheckpointError(f"{p}: holds a user-defined model ({spec.get('name')}); build it yourself and "
                              f"load_state_dict(torch.load(path)['model'])")
    model = build_model(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                        image_size=spec["image_size"], mean=spec.get("mean"), std=spec.get("std"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def __getattr__(name: str) -> Any:  # lazy: `import arow` stays cheap for the CLI's --help
    import importlib

    lazy = {"train": ("training", "train"), "Trainer": ("training", "Trainer"), "TrainConfig": ("config", "TrainConfig"),
            "evaluate": ("evaluation", "evaluate"), "ThreatModel": ("threat", "ThreatModel"),
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
    from .config import TrainConfig
    from .data import from_tensors, load_dataset
    from .evaluation import evaluate
    from .methods import build_method
    from .models import build_model
    from .threat import ThreatModel
    from .training import Trainer, train
