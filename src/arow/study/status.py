"""``arow study --status DIR``: where each cell of a study is, in one table.

A cell is ``done`` when its folder holds every step's output (:func:`~arow.study.cells.pending_steps`
is empty), whoever ran it. Otherwise the cluster's word on the job recorded for it in ``jobs.json``
(``arow study --launcher slurm``, asked through submitit: one ``sacct`` call) says ``queued`` or
``running``; then the folder: ``failed`` with the error line its ``study_failed.json`` holds (or the
state its job ended in), ``running`` while a live process holds its run folder's lock (a local
``arow study``), ``interrupted`` when it has started but nothing runs it (submitting or running the
study again continues it from its last checkpoint), else ``not started``. Without submitit, or for a
study run by the local pool, the folders alone decide.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Union

from ..runs.rundir import RunDir
from ..runs.studydir import CellDir, StudyDir
from .cells import CellPlan, pending_steps
from .runner import Study
from .slurm import QUEUED, RUNNING, job_states, lock_holder

PathLike = Union[str, os.PathLike]
STATES = ("done", "running", "queued", "failed", "interrupted", "not started")


@dataclass(frozen=True)
class CellStatus:
    """One row of the table: the cell, where it is (:data:`STATES`), its job id, and what to know."""

    name: str
    state: str
    job: str = ""
    detail: str = ""


def study_status(path: PathLike) -> list[CellStatus]:
    """Where each cell of the study in ``path`` is, in the study's order (reads; changes nothing).

    Args:
        path: study folder
    """
    study = Study(path)
    jobs = study.dir.read_jobs()
    states = job_states(jobs)
    return [cell_status(study.dir, cell.name, jobs.get(cell.name) or {}, states.get(cell.name))
            for cell in study.spec.cells()]


def cell_status(folder: StudyDir, name: str, job: dict[str, Any], state: Optional[str]) -> CellStatus:
    """The row of cell ``name``: ``job`` is its ``jobs.json`` record, ``state`` the cluster's state of it."""
    run = folder.cell(name)
    jid = str(job.get("job_id", ""))
    try:
        data = run.read_cell()
        if data is None:
            return CellStatus(name, "not started", jid, "not prepared yet")
        steps = pending_steps(CellPlan.from_json(data, run.file(CellDir.CELL)), run)
        failure = run.read_failure()
    except ValueError as e:  # a damaged file (RunFolderError, StudyError): one line naming it
        return CellStatus(name, "failed", jid, _one_line(e))
    if not steps:
        return CellStatus(name, "done", jid)
    left = "to do: " + ", ".join(steps)
    log = f"; log {job['stdout']}" if job.get("stdout") else ""
    if state in QUEUED:
        return CellStatus(name, "queued", jid, left)
    if state in RUNNING:
        return CellStatus(name, "running", jid, left + log)
    if failure is not None:
        return CellStatus(name, "failed", jid, f"{failure.get('step')}: {failure.get('error')}")
    holder = lock_holder(run) if state is None else None
    if holder:
        return CellStatus(name, "running", jid, f"{left} ({holder})")
    if state is not None:
        return CellStatus(name, "failed", jid, f"its job ended ({state}) before the cell finished{log}; submit "
                                                f"the study again to continue it")
    started = run.file(RunDir.CONFIG).is_file() or run.has_checkpoint()
    return CellStatus(name, "interrupted" if started else "not started", jid, left)


def status_text(rows: list[CellStatus]) -> str:
    """The table, then one line counting the cells in each state."""
    head = ("cell", "status", "job", "details")
    table = [head] + [(r.name, r.state, r.job or "-", r.detail) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in table]
    counts = Counter(r.state for r in rows)
    lines.append(f"{len(rows)} cells: " + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s]))
    return "\n".join(line.rstrip() for line in lines)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
