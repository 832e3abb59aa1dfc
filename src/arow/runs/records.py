"""A run's checkpoints as records: which file a run folder names, reading one without running code
from it, the model it describes, and sharing it (safetensors export) or converting an old one.

>>> model = load_model("runs/fmnist-arow")          # doctest: +SKIP
>>> ckpt = load_checkpoint("runs/fmnist-arow", which="best")  # doctest: +SKIP
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..models.spec import ModelSpec
from .checkpoint import (EXPORT_FORMAT, CheckpointError, PathLike, Which, atomic_write_bytes, dump_json, is_raw_pickle,
                         read_checkpoint)
from .rundir import RunDir


def resolve_checkpoint(path: PathLike, which: Which = "final") -> Path:
    """The checkpoint file a run folder's ``which`` names (``final`` falls back to ``last.pt`` while
    a run is unfinished); a file path is returned as it is.

    >>> resolve_checkpoint("runs/x/best.pt")
    PosixPath('runs/x/best.pt')

    Args:
        path: run folder or checkpoint file
        which: the run's checkpoint: final, best (by validation) or last
    """
    p = Path(path)
    return RunDir(p).checkpoint(which) if p.is_dir() else p


def load_checkpoint(path: PathLike, map_location: Optional[str] = "cpu", *, which: Which = "final") -> dict[str, Any]:
    """Read an arow checkpoint or model export without running code from it.

    ``path`` is a ``.pt`` checkpoint, a ``.safetensors`` export, or a run folder (the checkpoint
    ``which`` names, see :func:`resolve_checkpoint`).

    >>> ckpt = load_checkpoint("runs/fmnist-arow")  # doctest: +SKIP
    >>> sorted(ckpt["model_spec"])[:3]              # doctest: +SKIP
    ['dataset', 'image_size', 'in_channels']
    """
    return read_checkpoint(resolve_checkpoint(path, which), map_location)


def export_model(source: Union[PathLike, dict[str, Any]], out: PathLike, which: Which = "final") -> Path:
    """Write a run's model as safetensors: its weights plus a JSON header (model spec, threat
    model, training config) that :func:`load_checkpoint` and ``arow.load_model`` read back. No
    optimiser or RNG state, no pickle.

    >>> export_model("runs/fmnist-arow", "model.safetensors", which="best")  # doctest: +SKIP

    Args:
        source: run folder or checkpoint file (in Python also a checkpoint that load_checkpoint returned)
        out: the .safetensors file to write
        which: the run's checkpoint: final, best (by validation) or last
    """
    from safetensors.torch import save as st_save  # optional at import time: only exports need it

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: an export is a .safetensors file")
    ckpt = source if isinstance(source, dict) else load_checkpoint(source, which=which)
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt["model"].items()}
    info = {"model_spec": ckpt["model_spec"], "threat": ckpt.get("threat", {}),
            "config": ckpt.get("config", {}), "version": ckpt.get("version"),
            "final_source": ckpt.get("final_source"), "epoch": ckpt.get("epoch")}
    atomic_write_bytes(st_save(weights, metadata={"format": EXPORT_FORMAT, "arow": dump_json(info, None)}), out)
    return out


def convert_checkpoint(src: PathLike, dst: Optional[PathLike] = None, *, trust_pickle: bool = False) -> Path:
    """Rewrite a checkpoint that needs the full (unsafe) unpickler as one that loads safely.

    ONLY for files whose source you trust: reading ``src`` runs whatever its pickle says, so
    ``trust_pickle=True`` must say you do. The result holds the same entries as plain values (numpy
    RNG state as tensors).
    """
    _check_trust(trust_pickle)
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    if is_raw_pickle(src):  # pickle.dump of a checkpoint dict: torch.load cannot read it at all
        with open(src, "rb") as f:
            ckpt = pickle.load(f)  # the user vouched for this file
    else:
        ckpt = torch.load(src, map_location="cpu", weights_only=False)  # the user vouched for this file
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{src}: not an arow checkpoint (no model entry)")
    rng = ckpt.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        name, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = {"name": str(name), "keys": torch.as_tensor(np.asarray(keys).astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    ckpt.pop("path", None)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    try:
        torch.load(buf, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{src}: holds objects other than plain values even after conversion "
                              f"({str(e).splitlines()[0][:120]})") from None
    atomic_write_bytes(buf.getvalue(), dst)
    return dst


def _check_trust(trust_pickle: bool) -> None:
    if not trust_pickle:
        raise CheckpointError("converting reads the file with Python's full unpickler, which runs any code it "
                              "holds; pass --trust-pickle (trust_pickle=True) to confirm you trust where it came from")


def convert_path(path: PathLike, *, trust_pickle: bool = False) -> list[Path]:
    """:func:`convert_checkpoint` on a file, or on every ``.pt`` file of a run folder (in place).

    Args:
        path: checkpoint file or run folder (every .pt in it), rewritten in place
        trust_pickle: required: reading the old file runs whatever its pickle holds; only for files you trust
    """
    _check_trust(trust_pickle)
    path = Path(path)
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise CheckpointError(f"{path}: no checkpoint file(s) to convert")
    return [convert_checkpoint(f, trust_pickle=True) for f in files]


def load_model(path: Any, *, device: Any = "cpu", which: str = "final") -> nn.Module:
    """The trained model of a run folder, checkpoint or ``.safetensors`` export, in eval mode.

    It takes inputs in [0, 1] (any normalisation is its first layer) and returns logits.
    ``which`` picks ``final`` (SWA model if SWA ran, else the last epoch), ``best`` (selected on
    the held-out validation split) or ``last`` when ``path`` is a run folder. Files are read
    without running code from them (see :mod:`arow.runs.checkpoint`).

    >>> model = load_model("runs/fmnist-arow")  # doctest: +SKIP
    >>> model = load_model("model.safetensors")  # from `arow export`  # doctest: +SKIP
    """
    return model_from_checkpoint(load_checkpoint(path, which=which), device=device)


def model_from_checkpoint(ckpt: dict[str, Any], *, device: Any = "cpu") -> nn.Module:
    """Build the model a loaded checkpoint describes and load its weights (eval mode)."""
    path = ckpt.get("path")
    try:
        spec = ModelSpec.from_dict(ckpt["model_spec"])  # older checkpoints: the defaults of today (relu)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete model spec ({type(e).__name__}: {e})") from None
    if spec.custom:
        raise CheckpointError(f"{path}: holds a user-defined model ({spec.name}); build it yourself and "
                              f"load_state_dict(arow.runs.checkpoint.load_checkpoint(path)['model'])")
    try:
        model = spec.build()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete model spec ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model spec {spec.name} "
                              f"({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval()
