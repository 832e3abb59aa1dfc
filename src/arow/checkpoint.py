"""Checkpoints: written atomically, holding everything a run needs to resume or be evaluated."""
from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not an arow checkpoint."""


def _umask_mode() -> int:
    """0o666 less the umask: the permissions open() would give, which mkstemp (0o600) does not."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _umask_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, _umask_mode())
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of the unwrapped module: no ``module.`` (DDP) or ``_orig_mod.`` (compile) prefixes."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            break
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_checkpoint(path: PathLike, which: str = "final") -> Path:
    """The checkpoint file a run folder's ``which`` names (``final`` falls back to ``last.pt`` while
    a run is unfinished); a file path is returned as it is.

    >>> resolve_checkpoint("runs/x/best.pt")
    PosixPath('runs/x/best.pt')
    """
    p = Path(path)
    if not p.is_dir():
        return p
    if which not in ("final", "best", "last"):
        raise ValueError(f"which must be final, best or last, got {which!r}")
    if (p / f"{which}.pt").is_file():
        return p / f"{which}.pt"
    if which == "final" and (p / "last.pt").is_file():
        return p / "last.pt"
    raise CheckpointError(f"{p}: no {which}.pt in this run folder")


def load_checkpoint(path: PathLike, map_location: Optional[str] = "cpu") -> dict[str, Any]:
    """Read an arow checkpoint (a file, or a run folder: its ``final.pt``, else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("final.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: no final.pt or last.pt in this run folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file to the user
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise CheckpointError(f"{path}: not an arow checkpoint (no model / model_spec entries)")
    ckpt["path"] = str(path)
    return ckpt
