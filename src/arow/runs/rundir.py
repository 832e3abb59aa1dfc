"""The run folder: the one place that knows its file names and how each is read and written.

A run folder (``arow train --out DIR``) holds:

==================  =========================================================================
``config.json``     the resolved config (replays the run: ``arow train --config DIR/config.json``)
``metrics.jsonl``   one JSON object per epoch (and per N steps with ``--log-every N``)
``last.pt``         the full resumable state after the latest epoch (optimiser, RNG, SWA/EMA)
``last.prev.pt``    the state one epoch earlier: the fallback when ``last.pt`` is damaged
``best.pt``         the epoch selected on the held-out validation split
``final.pt``        the model the run reports (the last epoch, or the SWA average)
``eval.json``       the full-test-set evaluation of ``final.pt`` (subsets go to ``eval_n<N>.json``)
``eval_state/``     the progress of an interrupted evaluation
``diverged.json``   written when training stopped on a non-finite loss or weight
``.lock``           held (``flock``) by the process that trains into the folder: pid and host
``tensorboard/``    with ``--tensorboard``; ``mlruns/`` (MLflow's local store) and ``wandb/`` (W&B's
                    files) with ``--mlflow`` / ``--wandb`` when no other place is configured
==================  =========================================================================

Writes are atomic (temporary file, fsync, rename) and never follow a symlink planted in the folder.
The epoch's files are written best first, then last: a kill between the two leaves ``last.pt`` one
epoch behind, so a resumed run redoes that epoch and rewrites ``best.pt`` identically.

>>> run = RunDir("runs/fmnist-arow")           # doctest: +SKIP
>>> run.checkpoint("best")                     # doctest: +SKIP
PosixPath('runs/fmnist-arow/best.pt')
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..threat import NORMS
from .checkpoint import (CheckpointError, Which, append_line, atomic_save, atomic_write_text, dump_json,
                         read_checkpoint, remove_stale_tmp)

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


class RunLockedError(ValueError):
    """Another live process holds the run folder."""


class RunFolderError(ValueError):
    """A path is not an arow run folder, or one of its files is unreadable or malformed."""


class RunDir:
    """A run folder and every file in it."""

    CONFIG, METRICS, LAST, PREV, BEST, FINAL = ("config.json", "metrics.jsonl", "last.pt", "last.prev.pt",
                                                "best.pt", "final.pt")
    EVAL, EVAL_STATE, DIVERGED, LOCK, ROBUSTBENCH = ("eval.json", "eval_state", "diverged.json", ".lock",
                                                     "robustbench.json")
    CURVES, PER_CLASS, WEIGHTS, EPS_CURVE, EPS_CURVE_PNG, TENSORBOARD = (
        "curves.png", "per_class.png", "weights.png", "eps_curve.json", "eps_curve.png", "tensorboard")
    MLRUNS, WANDB = "mlruns", "wandb"

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: Optional[int] = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # ----------------------------------------------------------------- state of the folder
    def has_checkpoint(self) -> bool:
        return any(self.file(n).is_file() for n in (self.LAST, self.PREV, self.FINAL))

    def checkpoint(self, which: str = "final") -> Path:
        """The file of ``final`` (falls back to ``last`` while the run is unfinished), ``best`` or ``last``."""
        if which not in typing.get_args(Which):
            raise ValueError(f"which must be final, best or last, got {which!r}")
        p = self.file(f"{which}.pt")
        if p.is_file():
            return p
        if which == "final" and self.file(self.LAST).is_file():
            return self.file(self.LAST)
        raise CheckpointError(f"{self.path}: no {which}.pt in this run folder")

    # ----------------------------------------------------------------- lock
    def lock(self) -> None:
        """Take the folder for this process, or fail with one line naming the holder.

        The lock is an ``flock`` on ``.lock``: the kernel releases it when its process dies, so a
        killed run never leaves a folder locked; the file's pid and host only name the holder.
        """
        if self._lock_fd is not None:
            return
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.file(self.LOCK)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"{self.path} is in use by {holder}; wait for it to finish or choose "
                                     f"another --out") from None
            raise
        previous = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if previous:
            log.info("taking over the lock of %s left by a run that is no longer alive (%s)", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._lock_fd = fd
        remove_stale_tmp(self.path)  # ours now: temporary files in it are leftovers of a killed write

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._lock_fd, 0)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ----------------------------------------------------------------- config and metrics
    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(dump_json(config) + "\n", self.file(self.CONFIG))

    def read_config(self) -> dict[str, Any]:
        """``config.json``, checked to be an arow run config."""
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path} is not a run folder (no such directory)")
        path = self.file(self.CONFIG)
        if not path.is_file():
            raise RunFolderError(f"{self.path} is not an arow run folder (no config.json); pass the folder "
                                 f"`arow train --out` wrote")
        config = _read_json(path)
        if not isinstance(config, dict) or "method" not in config:
            raise RunFolderError(f"{path} is not an arow run config (no 'method' key)")
        return config

    def read_metrics(self) -> list[dict[str, Any]]:
        """The epoch records of ``metrics.jsonl`` (null, a non-finite number, reads as missing).

        Step records (``--log-every``) are left out; :meth:`read_steps` reads them."""
        return self._read_records()[0]

    def read_steps(self) -> list[dict[str, Any]]:
        """The step records of ``metrics.jsonl`` (``--log-every N``: ``step``, ``epoch_float``, ``lr``,
        the training loss and its parts over the last N steps, ``grad_norm``); empty without them."""
        return self._read_records()[1]

    def _read_records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        path, epochs, steps = self.file(self.METRICS), [], []
        if not path.is_file():
            return epochs, steps
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunFolderError(f"{path} line {i}: not JSON ({e})") from None
            if isinstance(rec, dict) and "epoch" not in rec and _is_int(rec.get("step")):
                steps.append({k: v for k, v in rec.items() if v is not None})
                continue
            if not _is_int(rec.get("epoch") if isinstance(rec, dict) else None):
                raise RunFolderError(f"{path} line {i}: not an epoch record (no integer 'epoch') "
                                     f"nor a step record (no integer 'step')")
            epochs.append({k: v for k, v in rec.items() if v is not None})
        return epochs, steps

    def read_eval(self, name: Optional[str] = None, *, failed_ok: bool = False) -> Optional[dict[str, Any]]:
        """An evaluation written by ``arow eval`` (default ``eval.json``), None if there is none.

        ``failed_ok``: also return the record of an evaluation that stopped on a tripped guard (its
        ``error`` says why; it has no accuracies)."""
        path = self.file(name or self.EVAL)
        if not path.is_file():
            return None
        ev = _read_json(path)
        if failed_ok and isinstance(ev, dict) and isinstance(ev.get("error"), str) and "accuracy" not in ev:
            return ev
        if not (isinstance(ev, dict) and isinstance(ev.get("accuracy"), dict)):
            raise RunFolderError(f"{path} has no 'accuracy' mapping: not written by `arow eval`")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ev["accuracy"].values()):
            raise RunFolderError(f"{path}: 'accuracy' holds values that are not numbers")
        return ev

    def write_json(self, name: str, obj: Any) -> Path:
        atomic_write_text(dump_json(obj) + "\n", self.file(name))
        return self.file(name)

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_line(self.file(self.METRICS), dump_json(record, None))

    def write_metrics(self, records: list[dict[str, Any]], steps: Sequence[dict[str, Any]] = ()) -> None:
        """Replace ``metrics.jsonl`` by the epoch ``records`` and the step records ``steps``, each
        step before the end of its epoch (a resumed run drops lines of unsaved epochs)."""
        merged = sorted([(float(r["epoch"]), 1, i, r) for i, r in enumerate(records)]
                        + [(float(s.get("epoch_float", 0.0)), 0, i, s) for i, s in enumerate(steps)],
                        key=lambda t: t[:3])
        atomic_write_text("".join(dump_json(t[3], None) + "\n" for t in merged), self.file(self.METRICS))

    # ----------------------------------------------------------------- checkpoints
    def save_epoch(self, ckpt: dict[str, Any], best: Optional[dict[str, Any]] = None) -> None:
        """The epoch's checkpoints: ``best.pt`` (if it improved) before ``last.pt``; the old
        ``last.pt`` is kept as ``last.prev.pt``."""
        if best is not None:
            atomic_save(model_only(best), self.file(self.BEST))
        last = self.file(self.LAST)
        if last.is_file() and not last.is_symlink():
            os.replace(last, self.file(self.PREV))
        atomic_save(ckpt, last)

    def save_final(self, ckpt: dict[str, Any]) -> None:
        atomic_save(model_only(ckpt), self.file(self.FINAL))

    def load_resume_state(self) -> dict[str, Any]:
        """The newest readable resumable state: ``last.pt``, else ``last.prev.pt`` (saying so)."""
        last, prev = self.file(self.LAST), self.file(self.PREV)
        problem = f"{last} does not exist"
        if last.is_file():
            try:
                return read_checkpoint(last)
            except CheckpointError as e:
                if "refused" in str(e):
                    raise
                problem = str(e)
        if prev.is_file():
            ckpt = read_checkpoint(prev)
            log.warning("%s; resuming from the previous checkpoint %s (epoch %s)", problem, prev.name,
                        ckpt.get("epoch"))
            return ckpt
        if last.is_file():
            raise CheckpointError(f"{problem}, and there is no earlier checkpoint to resume from")
        raise CheckpointError(f"--resume: {last} does not exist (nothing to resume)")

    # ----------------------------------------------------------------- divergence
    def mark_diverged(self, info: dict[str, Any]) -> None:
        atomic_write_text(dump_json(info) + "\n", self.file(self.DIVERGED))

    def diverged(self) -> Optional[dict[str, Any]]:
        p = self.file(self.DIVERGED)
        return _read_json(p) if p.is_file() else None

    def clear_diverged(self) -> None:
        self.file(self.DIVERGED).unlink(missing_ok=True)

    # ----------------------------------------------------------------- evaluation
    def eval_path(self, which: str = "final", n: Optional[int] = None, full: Optional[int] = None,
                  norm: Optional[str] = None) -> Path:
        """Where an evaluation of checkpoint ``which`` is written: ``eval.json`` holds the final model
        on the full test set only; a subset of ``n`` images goes to ``eval_n<N>.json``; ``norm`` (an
        evaluation in another norm than the model was trained in) adds ``_<norm>``: ``eval_l2.json``."""
        stem = "eval" if which == "final" else f"eval_{which}"
        if norm is not None:
            stem += f"_{norm}"
        if n is not None and full is not None and n < full:
            stem += f"_n{n}"
        return self.file(stem + ".json")

    def robustbench_path(self, which: str = "final", n: Optional[int] = None, full: Optional[int] = None,
                         norm: Optional[str] = None) -> Path:
        """Where the RobustBench model info of an evaluation is written: ``robustbench.json`` for the
        final model on the full test set in the norm it was trained in only; a subset of ``n`` images
        adds ``_n<N>``, another norm ``_<norm>`` (``robustbench_n20_l2.json``), so that a quick
        AutoAttack run on a few images never replaces the full one."""
        stem = "robustbench" if which == "final" else f"robustbench_{which}"
        if n is not None and full is not None and n < full:
            stem += f"_n{n}"
        if norm is not None:
            stem += f"_{norm}"
        return self.file(stem + ".json")

    def eval_files(self) -> dict[str, Path]:
        """Every evaluation file :meth:`eval_path` names that the folder holds, by file name
        (``eval.json`` first, then the others sorted)."""
        if not self.path.is_dir():
            return {}
        names = sorted(p.name for p in self.path.iterdir() if parse_eval_name(p.name) is not None and p.is_file())
        return {n: self.file(n) for n in sorted(names, key=lambda n: (n != self.EVAL, n))}


def parse_eval_name(name: str) -> Optional[tuple[str, Optional[str], Optional[int]]]:
    """``(which, norm, n)`` of a file name :meth:`RunDir.eval_path` writes, None for any other name.

    >>> parse_eval_name("eval.json"), parse_eval_name("eval_best_l2_n20.json"), parse_eval_name("x.json")
    (('final', None, None), ('best', 'l2', 20), None)
    """
    if name == RunDir.EVAL:
        return "final", None, None
    if not (name.startswith("eval_") and name.endswith(".json")):
        return None
    parts = name[len("eval_"):-len(".json")].split("_")
    n = int(parts.pop()[1:]) if re.fullmatch(r"n\d+", parts[-1]) else None
    norm = parts.pop() if parts and parts[-1] in NORMS else None
    if "" in parts:
        return None
    return "_".join(parts) or "final", norm, n


#: what best.pt and final.pt keep: what evaluation and export need. Only last.pt holds the optimiser,
#: SWA/EMA and RNG state that a resumed run needs (for a WRN-34-10 that is 2/3 of the file).
MODEL_KEYS = ("model", "model_spec", "config", "threat", "epoch", "history", "best", "version", "final_source",
              "model_source")


def model_only(ckpt: dict[str, Any]) -> dict[str, Any]:
    """``ckpt`` without the training state: weights, model spec, config, threat and history."""
    return {k: v for k, v in ckpt.items() if k in MODEL_KEYS}


def check_writable(path: PathLike, what: str = "output") -> Path:
    """Fail now, with one line, if a file cannot be written at ``path`` (before hours of work)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create its folder ({e.strerror or e})") from None
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{what} {path} is not writable")
    return path


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
