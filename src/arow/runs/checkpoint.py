"""Checkpoints: written atomically, read back without ever running code from the file.

Every checkpoint ``arow`` writes holds plain values only (tensors, numbers, strings, lists,
dicts), so it loads with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which
refuses any other Python object instead of constructing it. A file with a pickled payload (a
shared checkpoint from a stranger, a model zoo download) is refused with one line. Models meant for
sharing are exported as safetensors (:func:`export_model`): raw tensors plus a small JSON header,
no pickle at all.

Checkpoints written by arow 0.1.0 stored numpy's RNG state as a numpy array; they still load, with
numpy's array-reconstruction functions added to the allow-list and nothing else. Anything else that
needs more is refused with the one command that converts a file its owner trusts
(``arow convert --trust-pickle FILE``).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..modules import unwrap

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
#: the tag in a safetensors header that marks an arow model export
EXPORT_FORMAT = "arow-model/1"


#: a run folder's checkpoints: the final model, the best by validation, the last saved epoch
Which = Literal["final", "best", "last"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or not an arow checkpoint."""


# --------------------------------------------------------------------------- atomic writes
def _umask_mode() -> int:
    """0o666 less the umask: the permissions open() would give, which mkstemp (0o600) does not."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(file)`` into a fresh temporary file beside ``path``, fsync, rename.

    A crash at any point leaves either the old file or the new one, never half a file. The
    temporary file is created exclusively (a planted symlink is never followed) and the rename
    replaces a symlink at ``path`` rather than writing through it. On any failure the temporary
    file is removed; a SIGKILL can still leave one, which :func:`remove_stale_tmp` cleans.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _umask_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: PathLike) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: f.write(data))


def append_line(path: PathLike, line: str) -> None:
    """Append one line to ``path``, refusing to follow a symlink planted at ``path``."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if Path(path).is_symlink():
            raise OSError(f"{path} is a symbolic link; arow does not write through links in a run folder") from None
        raise e
    with os.fdopen(fd, "a") as f:
        f.write(line.rstrip("\n") + "\n")


def save_keyed(state: dict[str, Any], key: str, path: PathLike) -> None:
    """Save the progress ``state`` of a resumable computation under ``key`` (what its results
    depend on) atomically; :func:`load_keyed` gives it back only for the same key."""
    atomic_save({"key": key, **state}, path)


def load_keyed(path: PathLike, key: str, what: str) -> Optional[dict[str, Any]]:
    """The state :func:`save_keyed` wrote at ``path`` under ``key``, or None when there is none to trust.

    A missing file is None; an unreadable one (torn, foreign) or one saved under another key
    (another model, data or setting) is None with a warning naming ``what`` it would have been:
    the caller recomputes rather than trusts it. Plain values only (``weights_only=True``).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: start over rather than trust it
        log.warning("ignoring unreadable %s %s (%s)", what, path, type(e).__name__)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log.warning("ignoring %s %s: it belongs to another model, data or setting", what, path)
        return None
    return state


def remove_stale_tmp(folder: PathLike) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files an interrupted atomic write left in ``folder``.

    Call it only while holding the folder (its run lock): another writer's file would look the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished temporary file(s) in %s", len(stale), folder)
    return stale


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, so ``json.dumps`` writes valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dump_json(obj: Any, indent: Optional[int] = 2) -> str:
    """Valid JSON (RFC 8259: no NaN or Infinity) of ``obj``; non-finite numbers become null."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


# --------------------------------------------------------------------------- state
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state of the unwrapped module: no ``module.`` (DDP) or ``_orig_mod.`` (compile) prefixes."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model, compiled=True).state_dict().items()}


def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, as plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- reading
def _legacy_numpy_globals() -> list[Any]:
    """What arow 0.1.0's numpy RNG state needs: numpy array reconstruction, nothing that runs code."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _torch_load(path: Path, map_location: Optional[str]) -> Any:
    """``torch.load`` with PyTorch's restricted unpickler: plain values only, never arbitrary objects."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as first:  # noqa: BLE001 - every failure below becomes one line
        if "numpy" in str(first):  # arow 0.1.0 kept numpy's RNG state as a numpy array
            try:
                with torch.serialization.safe_globals(_legacy_numpy_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception:  # noqa: BLE001
                pass
        if "global" in str(first).lower():  # the unpickler met a class or function it does not allow
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects that could run code when loaded "
                f"(only tensors and plain values are read). If you trust its source, convert it once "
                f"with `arow convert --trust-pickle {path}`") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(first).__name__}; "
                              f"truncated or damaged?)") from None


def _load_safetensors(path: Path, map_location: Optional[str]) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=map_location or "cpu") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path}: a safetensors file without arow's model header (format "
                              f"{EXPORT_FORMAT!r}); load its weights into your own model instead")
    try:
        info = json.loads(meta["arow"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: damaged arow header in the safetensors metadata") from None
    return {"model": weights, "model_spec": info.get("model_spec", {}), "config": info.get("config", {}),
            "threat": info.get("threat", {}), "version": info.get("version"), "exported": True}


def read_checkpoint(path: PathLike, map_location: Optional[str] = "cpu") -> dict[str, Any]:
    """Read one checkpoint file (``.pt``) or model export (``.safetensors``) without running code from it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        ckpt = _load_safetensors(path, map_location)
    else:
        ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or "model_spec" not in ckpt:
        raise CheckpointError(f"{path}: not an arow checkpoint (no model / model_spec entries)")
    ckpt["path"] = str(path)
    return ckpt
