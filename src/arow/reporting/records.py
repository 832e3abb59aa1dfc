"""The reader of run folders: everything ``arow train`` and ``arow eval`` left in one, read once.

:func:`read_run` returns a :class:`RunRecord`: the config, the epoch and step records of
``metrics.jsonl``, every evaluation file (``eval.json``, ``eval_<which>.json``, the subsets
``eval_n<N>.json``, other norms ``eval_l2.json``; each an :class:`EvalFile` that says whether it
is a full-test-set number), whether the run finished (``final.pt`` exists) and why it stopped if
it diverged. File names are :class:`~arow.runs.rundir.RunDir`'s; a damaged file raises
:class:`~arow.runs.rundir.RunFolderError` with one line naming it.

>>> rec = read_run("runs/fmnist-arow-s0")        # doctest: +SKIP
>>> rec.finished, sorted(rec.evals)               # doctest: +SKIP
(True, ['eval.json', 'eval_n20.json'])
>>> rec.reported_eval().full                      # doctest: +SKIP
True
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..runs.rundir import RunDir, RunFolderError, parse_eval_name

PathLike = Union[str, os.PathLike]

__all__ = ["EvalFile", "RunRecord", "RunFolderError", "read_run", "read_eval_file", "read_eps_curve"]


@dataclass(frozen=True)
class EvalFile:
    """One evaluation file of a run folder (fractions in [0, 1]).

    ``which``: the checkpoint evaluated (``final``, ``best``, ``last`` or a checkpoint file's stem);
    ``other_norm``: the norm when the file holds an evaluation in another norm than the training's
    (``eval_l2.json``), else None; ``full``: True only for a full-test-set number; ``error``: why
    the evaluation stopped (a tripped guard), then ``accuracy`` is empty.
    """

    name: str
    path: Path
    which: str
    other_norm: Optional[str]
    n: Optional[int]
    test_set_size: Optional[int]
    full: bool
    data: dict[str, Any]
    error: Optional[str] = None

    @property
    def accuracy(self) -> dict[str, float]:
        return dict(self.data.get("accuracy") or {})

    @property
    def subset(self) -> bool:
        """Evaluated on part of the test set (the first ``n`` images): not a full-test-set number."""
        return not self.full and self.error is None

    @property
    def size_text(self) -> str:
        """``"20 of 10000 test images (SUBSET)"``, or ``"10000 of 10000 test images"``."""
        return f"{self.n} of {self.test_set_size} test images" + (" (SUBSET)" if self.subset else "")


@dataclass(frozen=True)
class RunRecord:
    """What a run folder holds. ``metrics``: the epoch records of ``metrics.jsonl``; ``steps``: its
    step records (``--log-every``); ``evals``: every evaluation file by file name, ``eval.json``
    first; ``finished``: ``final.pt`` exists; ``diverged``: the content of ``diverged.json``;
    ``eps_curve``: the content of ``eps_curve.json`` (robust accuracy against eps, ``arow plot --eps-curve``)."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    evals: Mapping[str, EvalFile]
    finished: bool
    diverged: Optional[dict[str, Any]] = None
    eps_curve: Optional[dict[str, Any]] = None

    @property
    def method(self) -> Optional[str]:
        return self.config.get("method")

    @property
    def dataset(self) -> Optional[str]:
        return self.config.get("dataset")

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def failed(self) -> bool:
        """Training stopped on a non-finite loss or weight (``diverged.json``)."""
        return self.diverged is not None

    @property
    def failure(self) -> Optional[str]:
        """One line on why training stopped, None for a run that did not diverge."""
        d = self.diverged
        if d is None:
            return None
        where = ", ".join(f"{k} {d[k]}" for k in ("epoch", "step") if d.get(k) is not None)
        return f"diverged{f' at {where}' if where else ''}: {d.get('reason') or 'non-finite loss or weight'}"

    def eval(self, which: str = "final", *, other_norm: Optional[str] = None,
             full: Optional[bool] = True) -> Optional[EvalFile]:
        """The evaluation of checkpoint ``which`` (in the training norm unless ``other_norm``): the
        full-test-set one (``full=True``), the largest subset (``full=False``) or the full one else
        the largest subset (``full=None``). None if the folder has none that fits."""
        fits = [e for e in self.evals.values() if e.error is None and e.which == which and e.other_norm == other_norm]
        whole = [e for e in fits if e.full]
        part = sorted((e for e in fits if e.subset), key=lambda e: -(e.n or 0))
        if full is True:
            return whole[0] if whole else None
        if full is False:
            return part[0] if part else None
        return (whole or part or [None])[0]

    def reported_eval(self) -> Optional[EvalFile]:
        """The evaluation a report shows for the run: ``eval.json`` (the final model on the full
        test set), else the final model's largest subset evaluation (marked by ``subset``)."""
        return self.eval("final", full=None)


def read_eval_file(run: RunDir, name: str) -> EvalFile:
    """The evaluation file ``name`` of ``run`` (a name :meth:`RunDir.eval_path` writes)."""
    parsed = parse_eval_name(name)
    if parsed is None:
        raise RunFolderError(f"{run.file(name)}: not an evaluation file name (eval[_<which>][_<norm>][_n<N>].json)")
    which, other_norm, n_name = parsed
    data = run.read_eval(name, failed_ok=True)
    if data is None:
        raise RunFolderError(f"{run.file(name)} does not exist")
    error = data.get("error") if "accuracy" not in data else None
    n, size = _int(data, "n", run.file(name)), _int(data, "test_set_size", run.file(name))
    n = n if n is not None else n_name
    full = (error is None and n_name is None and not data.get("subset", False)
            and (n is None or size is None or n >= size))
    return EvalFile(name, run.file(name), which, other_norm, n, size, full, data, error)


def read_run(path: PathLike) -> RunRecord:
    """Read the run folder ``path`` (see the module docstring); RunFolderError names a damaged file.

    >>> read_run("runs/fmnist-arow-s0").eval("final").accuracy["pgd20"]  # doctest: +SKIP
    0.6833
    """
    run = RunDir(path)
    config = run.read_config()
    metrics, steps = run.read_metrics(), run.read_steps()
    evals = {name: read_eval_file(run, name) for name in run.eval_files()}
    diverged = run.diverged()
    if diverged is not None and not isinstance(diverged, dict):
        raise RunFolderError(f"{run.file(RunDir.DIVERGED)}: not a JSON object")
    return RunRecord(run.path, config, metrics, steps, evals, run.file(RunDir.FINAL).is_file(), diverged,
                     read_eps_curve(run))


def read_eps_curve(run: RunDir) -> Optional[dict[str, Any]]:
    """``eps_curve.json`` of ``run`` (None if there is none), checked to hold its points."""
    path = run.file(RunDir.EPS_CURVE)
    if not path.is_file():
        return None
    try:
        curve = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path}: unreadable ({(str(e).splitlines() or [repr(e)])[0]})") from None
    points = curve.get("points") if isinstance(curve, dict) else None
    if not isinstance(points, list) or not all(isinstance(p, dict) and _number(p.get("eps"))
                                               and _number(p.get("accuracy")) for p in points):
        raise RunFolderError(f"{path}: no 'points' list of eps and accuracy: not written by `arow plot --eps-curve`")
    return curve


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(data: dict[str, Any], key: str, path: Path) -> Optional[int]:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise RunFolderError(f"{path}: {key!r} is {v!r}, not a count of test images")
    return v
