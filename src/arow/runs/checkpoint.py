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
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..models.spec import ModelSpec
from ..modules import unwrap
from ..threat import NORMS, check_eps

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


def save_keyed(state: dict[str, Any], key: str, path: PathLike, *, parts: Optional[dict[str, str]] = None) -> None:
    """Save the progress ``state`` of a resumable computation under ``key`` (what its results
    depend on) atomically; :func:`load_keyed` gives it back only for the same key. ``parts``: the
    key part by part (``{how a difference reads: digest}``), kept so that a mismatch can say why."""
    atomic_save({"key": key, **state, **({"key_parts": dict(parts)} if parts else {})}, path)


def load_keyed(path: PathLike, key: str, what: str, *, parts: Optional[dict[str, str]] = None
               ) -> Optional[dict[str, Any]]:
    """The state :func:`save_keyed` wrote at ``path`` under ``key``, or None when there is none to trust.

    A missing file is None; an unreadable one (torn, foreign) or one saved under another key
    (another model, data or setting) is None with a warning naming ``what`` it would have been and,
    with ``parts`` (as saved), which of them differ: the caller recomputes rather than trusts it.
    Plain values only (``weights_only=True``).
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
        saved = state.get("key_parts") if isinstance(state, dict) else None
        changed = [k for k, v in (parts or {}).items() if isinstance(saved, dict) and saved.get(k) != v]
        log.warning("ignoring %s %s: %s", what, path, f"it was saved for {' and '.join(changed)}" if changed else
                    "it belongs to another model, data or setting")
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


#: how every file torch.save writes begins: a zip archive, or (before PyTorch 1.6) a protocol-2
#: pickle of torch's magic number
_TORCH_HEADS = (b"PK\x03\x04", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19")


def is_raw_pickle(path: PathLike) -> bool:
    """Whether ``path`` is a bare pickle (``pickle.dump``, protocol 2 or later), not a ``torch.save`` file."""
    with open(path, "rb") as f:
        head = f.read(16)
    return head[:1] == b"\x80" and not head.startswith(_TORCH_HEADS)


def _torch_load(path: Path, map_location: Optional[str]) -> Any:
    """``torch.load`` with PyTorch's restricted unpickler: plain values only, never arbitrary objects.

    A bare pickle (``pickle.dump``) is refused without reading it: only its own unpickler could
    read it, and that runs whatever the file says. torch's warnings about pickle protocols are
    not shown (the outcome is one line either way)."""
    if is_raw_pickle(path):
        raise CheckpointError(
            f"{path}: refused: a bare pickle (pickle.dump), not a torch.save checkpoint; unpickling it could run "
            f"code. If you trust its source, convert it once with `arow convert --trust-pickle {path}`")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol ...": not the user's concern
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
            if meta.get("format") != EXPORT_FORMAT:
                raise CheckpointError(f"{path}: a safetensors file without arow's model header (format "
                                      f"{EXPORT_FORMAT!r}); load its weights into your own model instead")
            for k in f.keys():  # before any tensor is read
                _check_export_dtype(path, k, f.get_slice(k).get_dtype())
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        info = json.loads(meta["arow"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: damaged arow header in the safetensors metadata") from None
    _check_export_header(path, info)
    return {"model": weights, "model_spec": info.get("model_spec", {}), "config": info.get("config") or {},
            "threat": info.get("threat") or {}, "version": info.get("version"), "exported": True}


#: what an export's tensors may be: weights in a floating type arow trains or evaluates in; integers
#: only as BatchNorm's batch counter
_EXPORT_DTYPES = {"F32", "BF16", "F16"}


def _check_export_dtype(path: Path, key: str, dtype: str) -> None:
    if dtype in _EXPORT_DTYPES or (dtype == "I64" and key.endswith("num_batches_tracked")):
        return
    raise CheckpointError(f"{path}: tensor {key!r} is {dtype}; an arow export holds float32, bfloat16 or float16 "
                          f"weights only")


def _check_export_header(path: Path, info: Any) -> None:
    """The ``arow`` header of a safetensors export is untrusted input: checked like flags (a JSON
    object; a model spec of the right types; a known norm and a finite eps in its range), one line
    naming the file otherwise."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: the arow header must be a JSON object, got {type(info).__name__}")
    try:
        spec = ModelSpec.from_dict(info.get("model_spec"))
    except ValueError as e:
        raise CheckpointError(f"{path}: header {e}") from None
    for key in ("config", "threat"):
        if info.get(key) is not None and not isinstance(info[key], dict):
            raise CheckpointError(f"{path}: header {key!r} must be a JSON object, got {info[key]!r}")
    threat = info.get("threat") or {}
    norm = threat["norm"] if threat.get("norm") is not None else "linf"  # exports before L2: L-inf
    if norm not in NORMS:
        raise CheckpointError(f"{path}: header norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if "eps" in threat:
        dims = (spec.in_channels or 0) * (spec.image_size or 0) ** 2
        if not dims:  # a spec without its sizes: the L2 bound is not known, every other rule holds
            dims = 1 if norm == "linf" else 1 << 62
        try:
            check_eps(threat["eps"], norm, dims, what="header eps", positive=True)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None


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
