"""The study folder and the study's files in each cell: the one place that knows their names.

A study folder (``arow study --out DIR``) holds:

=======================  ====================================================================
``study.json``           the resolved study (what ``arow study --collect`` and a grown study read)
``.lock``                held (``flock``) by the ``arow study`` that runs the folder: pid and host
``cells/<name>/``        one ordinary run folder per cell (:class:`CellDir`)
``results.md``           the comparison (also ``.csv`` and ``.json``; against another baseline row
                         ``results_vs_<row>.*``) and the figures ``*.png``
``collected.jsonl``      one line per comparison built from finished runs: when, and which rows,
                         seeds and finished cells it saw (so rows or seeds added after results
                         were seen are marked as such on the page)
``jobs.json``            written by ``arow study --launcher slurm``: each submitted cell's job id,
                         cluster and log files (what ``arow study --status`` asks the cluster about)
``slurm/``               submitit's folder: the sbatch scripts, the jobs' pickles and their logs
                         (``<job id>_<task>_log.out`` / ``.err``); ``arow train --launcher slurm``
                         keeps one in its run folder too (:func:`submitit_folder`)
=======================  ====================================================================

and each cell folder, besides what :class:`~arow.runs.rundir.RunDir` names, holds:

=======================  ====================================================================
``cell.json``            the cell's resolved training config and its evaluation steps: what
                         ``python -m arow.study.cell`` runs
``study.log``            everything the cell's process printed, appended (never through a symlink)
``study_failed.json``    written by the cell's process when a step failed: the step and one line
=======================  ====================================================================

>>> StudyDir("studies/x").cell_dir("arow-s0")   # doctest: +SKIP
PosixPath('studies/x/cells/arow-s0')
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from .checkpoint import append_line, atomic_write_text, dump_json
from .rundir import RunDir, RunFolderError

PathLike = Union[str, os.PathLike]


def _read_json_object(path: Path, what: str) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``; None if there is no such file; RunFolderError (one line) if it is damaged."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path}: unreadable {what} ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: not a {what} (expected a JSON object)")
    return data


class CellDir(RunDir):
    """A study cell: an ordinary run folder plus the study's own files in it."""

    CELL, LOG, FAILED = "cell.json", "study.log", "study_failed.json"

    def write_cell(self, plan: dict[str, Any]) -> Path:
        return self.write_json(self.CELL, plan)

    def read_cell(self) -> Optional[dict[str, Any]]:
        """``cell.json``, None if the cell was not prepared."""
        return _read_json_object(self.file(self.CELL), "cell file")

    def append_log(self, line: str) -> None:
        """One line onto ``study.log`` (refusing a symlink planted in its place)."""
        self.path.mkdir(parents=True, exist_ok=True)
        append_line(self.file(self.LOG), line)

    def write_failure(self, step: str, error: str, exit_status: int) -> None:
        """Record that ``step`` failed with the one-line ``error`` (the cell's exit status with it)."""
        self.write_json(self.FAILED, {"step": step, "error": error, "exit_status": exit_status})

    def read_failure(self) -> Optional[dict[str, Any]]:
        """The failure the cell's process recorded, None if it recorded none."""
        return _read_json_object(self.file(self.FAILED), "failure record")

    def clear_failure(self) -> None:
        self.file(self.FAILED).unlink(missing_ok=True)

    def read_eps_curve(self) -> Optional[dict[str, Any]]:
        """``eps_curve.json`` (robust accuracy against eps), None if the folder has none."""
        return _read_json_object(self.file(self.EPS_CURVE), "eps curve")

    def first_n_eval_path(self, n: int) -> Path:
        """Where an evaluation of the final model on the first ``n`` test images goes: ``eval_n<N>.json``
        (:meth:`RunDir.eval_path`), even when ``n`` reaches the whole test set, so that it never
        replaces the cell's ``eval.json``."""
        return self.eval_path("final", n, full=n + 1)


def submitit_folder(path: PathLike) -> Path:
    """submitit's folder (sbatch scripts, pickles, logs) of a study folder or of a run folder."""
    return Path(path) / StudyDir.SUBMITIT


class StudyDir:
    """A study folder and every file in it."""

    SPEC, LOCK, CELLS, RESULTS, COLLECTED = "study.json", ".lock", "cells", "results", "collected.jsonl"
    JOBS, SUBMITIT = "jobs.json", "slurm"

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._lock = RunDir(self.path)  # the same flock: released by the kernel when the holder dies

    def __repr__(self) -> str:
        return f"StudyDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @staticmethod
    def cell_name(label: str, seed: int) -> str:
        """The folder name of a study's (row, seed) cell under ``cells/``: ``<row label>-s<seed>``."""
        return f"{label}-s{seed}"

    def cell(self, name: str) -> CellDir:
        return CellDir(self.path / self.CELLS / name)

    def cell_dir(self, name: str) -> Path:
        return self.path / self.CELLS / name

    def results(self, stem: str, ext: str) -> Path:
        """``results.md`` and friends (``stem``: ``results`` or ``results_vs_<row>``)."""
        return self.file(f"{stem}.{ext}")

    def read_spec(self) -> Optional[dict[str, Any]]:
        """``study.json``, None if the folder holds no study."""
        return _read_json_object(self.file(self.SPEC), "study file")

    def write_spec(self, spec: dict[str, Any]) -> None:
        atomic_write_text(dump_json(spec) + "\n", self.file(self.SPEC))

    def record_collect(self, entry: dict[str, Any]) -> None:
        """Append one line to ``collected.jsonl``."""
        self.path.mkdir(parents=True, exist_ok=True)
        append_line(self.file(self.COLLECTED), json.dumps(entry, sort_keys=True))

    def read_collects(self) -> list[dict[str, Any]]:
        """The lines of ``collected.jsonl``, oldest first ([] when there are none)."""
        path = self.file(self.COLLECTED)
        if not path.is_file():
            return []
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunFolderError(f"{path}, line {i}: not JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise RunFolderError(f"{path}, line {i}: expected a JSON object")
            out.append(entry)
        return out

    def published_files(self) -> list[Path]:
        """The small files that let the comparison be rebuilt and re-tested image by image, relative to
        the folder: ``study.json``, ``collected.jsonl`` and, per cell, ``cell.json``, ``config.json``,
        ``metrics.jsonl``, every evaluation file (with its per-example verdicts), the eps curve and the
        failure records. Never a checkpoint, a log or an evaluation's saved state."""
        keep = [self.SPEC, self.COLLECTED]
        per_cell = (CellDir.CELL, CellDir.CONFIG, CellDir.METRICS, CellDir.EPS_CURVE, CellDir.DIVERGED,
                    CellDir.FAILED)
        cells = self.path / self.CELLS
        for d in sorted(cells.iterdir()) if cells.is_dir() else []:
            if not d.is_dir() or d.is_symlink():
                continue
            run = CellDir(d)
            names = [n for n in per_cell if run.file(n).is_file()] + list(run.eval_files())
            keep += [f"{self.CELLS}/{d.name}/{n}" for n in dict.fromkeys(names)]
        return [Path(k) for k in keep if (self.path / k).is_file() and not (self.path / k).is_symlink()]

    def read_jobs(self) -> dict[str, Any]:
        """``jobs.json``: {cell: {"job_id", "cluster", "stdout", "stderr", "submitted"}}; {} before any submission."""
        return _read_json_object(self.file(self.JOBS), "job record") or {}

    def write_jobs(self, jobs: dict[str, Any]) -> None:
        atomic_write_text(dump_json(jobs) + "\n", self.file(self.JOBS))

    def lock(self) -> None:
        """Take the folder for this process, or fail with one line naming the ``arow study`` holding it."""
        self._lock.lock()

    def unlock(self) -> None:
        self._lock.unlock()
