"""Running a study: its folder, its cells' processes, and the commands for a scheduler.

:func:`run_study` checks the whole study first (every cell's config resolved and checked, see
:func:`arow.study.cells.resolve_cells`), takes the study folder's lock (a second ``arow study`` on
the same folder refuses with one line), writes ``study.json`` and each cell's ``cell.json``, then
runs every unfinished cell as ``python -m arow.study.cell`` (:mod:`arow.study.cell`), ``jobs`` at
a time. Each cell process runs in its own process group and is bound to the study's process, so a
study killed even by SIGKILL leaves no cell training behind; Ctrl-C or SIGTERM stops every cell,
which keeps its last checkpoint. A cell's output streams, line by line, to the console and to its
``study.log``; a failed cell records its one-line error in its folder (``study_failed.json``) and
the others go on. Then :func:`arow.study.collect.collect` builds the comparison.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..runs.rundir import RunFolderError
from ..runs.studydir import CellDir, StudyDir
from .cells import CellPlan, pending_steps, resolve_cells
from .collect import collect
from .spec import Cell, StudyError, StudySpec

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
#: study keys that say what a study measured: a study folder may grow (rows, seeds), these may not change
MEASURED = ("preset", "overrides", "attacks", "aa_n", "eps_curve_n", "eval_n", "guards", "plan")


def check_compatible(old: StudySpec, new: StudySpec, path: PathLike) -> None:
    """A study may grow (more seeds, more rows); what it measured may not change under it."""
    for key in MEASURED:
        if getattr(old, key) != getattr(new, key):
            raise StudyError(f"{path} was run with {key}={getattr(old, key)!r}, not {getattr(new, key)!r}: "
                             f"use a new --out for a different study")
    old_v = {v.label: v for v in old.variants}
    for v in new.variants:
        if v.label in old_v and old_v[v.label] != v:
            raise StudyError(f"{path}: method label {v.label!r} was defined differently before; give it a new label")


class Study:
    """A study folder: its spec (``study.json``), its cells' run folders and its comparison files.

    With ``spec``, the folder may be new, or hold a study ``spec`` grows (:func:`check_compatible`);
    without, the folder's ``study.json`` is read. Nothing is written until :meth:`prepare`."""

    def __init__(self, path: PathLike, spec: Optional[StudySpec] = None) -> None:
        self.dir = StudyDir(path)
        self.path = self.dir.path
        stored = self.dir.read_spec()
        if spec is None:
            if stored is None:
                raise StudyError(f"{self.path} is not a study folder (no {StudyDir.SPEC})")
            spec = StudySpec.from_dict(stored)
        elif stored is not None:
            check_compatible(StudySpec.from_dict(stored), spec, self.path)
        self.spec = spec

    def cell_dir(self, cell: Cell) -> Path:
        return self.dir.cell_dir(cell.name)

    def check_cells(self, plans: list[CellPlan]) -> None:
        """Refuse a cell whose ``cell.json`` holds another config than the one resolved now (a preset
        or a default changed since the cell was prepared)."""
        for plan in plans:
            run = self.dir.cell(plan.name)
            old = run.read_cell()
            if old is not None and old != plan.to_json():
                cfg = old.get("config") if isinstance(old.get("config"), dict) else {}
                diff = sorted(k for k in set(cfg) | set(plan.config) if cfg.get(k) != plan.config.get(k))
                diff += [k for k in old if k != "config" and old[k] != plan.to_json().get(k)]
                raise StudyError(f"{run.file(CellDir.CELL)} holds another resolution of cell {plan.name} "
                                 f"({', '.join(diff) or 'its keys'} differ: a preset or a default changed since); "
                                 f"use a new --out")

    def prepare(self, plans: list[CellPlan]) -> None:
        """Write ``study.json`` and each cell's ``cell.json`` (after checking every existing one)."""
        self.check_cells(plans)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dir.write_spec(self.spec.to_dict())
        for plan in plans:
            run = self.dir.cell(plan.name)
            if run.read_cell() is None:
                run.write_cell(plan.to_json())

    def run(self, plans: list[CellPlan], *, jobs: int = 1, echo: Callable[[str], None] = print) -> dict[str, str]:
        """Run every unfinished prepared cell, ``jobs`` at a time; returns {cell: 'done' | 'failed (...)'}.

        ``echo`` gets each line a cell prints, prefixed with the cell's name and the local time."""
        if jobs < 1:
            raise StudyError(f"--jobs must be >= 1, got {jobs}")
        pool = _CellPool(self.dir, jobs, echo)
        todo = self.unfinished(plans)
        pool.status.update({plan.name: "done" for plan in plans if plan not in todo})
        return pool.run(todo)

    def unfinished(self, plans: list[CellPlan]) -> list[CellPlan]:
        """The cells with a step still to run (:func:`~arow.study.cells.pending_steps`), in order; a cell
        with a damaged file counts as unfinished (its own process reports the damage)."""
        todo = []
        for plan in plans:
            try:
                finished = not pending_steps(plan, self.dir.cell(plan.name))
            except RunFolderError:
                finished = False
            if not finished:
                todo.append(plan)
        return todo


class _CellPool:
    """The cell processes of one ``Study.run``: started, streamed, stopped together."""

    def __init__(self, folder: StudyDir, jobs: int, echo: Callable[[str], None]) -> None:
        self.dir, self.jobs = folder, jobs
        self.echo = lambda line: echo(f"{time.strftime('%H:%M:%S')} {line}")
        self.status: dict[str, str] = {}
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.gpus = _visible_gpus()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        if not self.gpus and jobs > 1:  # N processes share the CPU threads
            self.env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))

    def run(self, todo: list[CellPlan]) -> dict[str, str]:
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            futures = [pool.submit(self.run_one, i, plan) for i, plan in enumerate(todo)]
            for f in futures:
                while not f.done():
                    time.sleep(0.2)
                f.result()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop every cell, each keeps its last checkpoint
            self.stopping.set()
            with self.lock:
                for p in self.procs:
                    _signal_group(p, signal.SIGTERM)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return self.status

    def run_one(self, i: int, plan: CellPlan) -> None:
        if self.stopping.is_set():
            return
        run = self.dir.cell(plan.name)
        env = dict(self.env)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[i % len(self.gpus)]
        cmd = [*cell_command(run), "--parent", str(os.getpid())]
        run.append_log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}")
        self.echo(f"[{plan.name}] started")
        t0 = time.perf_counter()
        with self.lock:
            if self.stopping.is_set():
                return
            # a new process group (Ctrl-C reaches it through _signal_group only); the cell binds itself to
            # this process with PR_SET_PDEATHSIG, which follows the thread that starts it: a pool thread,
            # alive until every cell has ended
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 text=True, encoding="utf-8", errors="replace", env=env, start_new_session=True)
            self.procs.add(p)
        try:
            assert p.stdout is not None
            for line in p.stdout:  # streamed as the cell prints it
                run.append_log(line)
                self.echo(f"[{plan.name}] {line.rstrip()}")
            p.wait()
        finally:
            with self.lock:
                self.procs.discard(p)
        if self.stopping.is_set():
            return
        self.status[plan.name] = self.outcome(plan, run, p.returncode)
        self.echo(f"[{plan.name}] {self.status[plan.name]} after {time.perf_counter() - t0:.0f}s")

    def outcome(self, plan: CellPlan, run: CellDir, code: int) -> str:
        """'done', or 'failed (STEP): ERROR' from the record the cell wrote (or its exit status)."""
        if code == 0:
            return "done"
        try:
            failure = run.read_failure()
        except RunFolderError as e:
            failure = {"step": "?", "error": str(e)}
        if failure is None:  # the process died before it could record anything
            why = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                   else f"exited with status {code}")
            failure = {"step": "?", "error": f"the cell's process {why} (see {run.file(CellDir.LOG)})"}
            run.write_failure(failure["step"], failure["error"], code)
        return f"failed ({failure.get('step')}): {failure.get('error')}"


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the cell and anything it started (its own process group)
    except (ProcessLookupError, PermissionError):
        pass


def _visible_gpus() -> list[str]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return []
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in vis.split(",")] if vis else [str(i) for i in range(n)]


def cell_command(run: CellDir) -> list[str]:
    """The command that runs a prepared cell (:mod:`arow.study.cell`)."""
    return [sys.executable, "-m", "arow.study.cell", str(run.file(CellDir.CELL))]


def _listing(study: Study, plans: list[CellPlan]) -> list[str]:
    lines = []
    for plan in plans:
        run = study.dir.cell(plan.name)
        try:
            steps = pending_steps(plan, run)
        except RunFolderError as e:
            lines.append(f"# {plan.name}: unreadable ({e})")
            continue
        lines.append(f"# {plan.name}: " + (", ".join(steps) if steps else "finished"))
        if steps:
            lines.append(shlex.join(cell_command(run)))
    return lines


def study_commands(path: PathLike, spec: StudySpec) -> str:
    """The command that finishes each cell, as a shell script; writes nothing. The commands run the
    cells' ``cell.json``, which ``arow study ... --prepare`` (:func:`prepare_study`) writes."""
    plans = resolve_cells(spec)
    study = Study(path, spec)
    study.check_cells(plans)
    head = [f"# {len(plans)} cells of study {study.path}. Nothing was written: the same `arow study` command with "
            "--prepare instead of --print-commands checks the study and writes study.json and each cell's "
            "cell.json, which these commands run"]
    return "\n".join(head + _listing(study, plans))


def prepare_study(path: PathLike, spec: StudySpec) -> str:
    """Check the study, write ``study.json`` and each cell's ``cell.json``; returns the commands that
    finish each cell (for a scheduler; ``arow study --collect`` builds the comparison after)."""
    plans = resolve_cells(spec)
    study = Study(path, spec)
    study.dir.lock()
    try:
        study.prepare(plans)
    finally:
        study.dir.unlock()
    return "\n".join([f"# {len(plans)} cells of study {study.path}, prepared"] + _listing(study, plans))


def run_study(path: PathLike, spec: StudySpec, *, jobs: int = 1, rows: Optional[str] = None,
              echo: Callable[[str], None] = print) -> tuple[list[str], str]:
    """Run every unfinished cell of the study in ``path`` (:meth:`Study.run`), then build the comparison
    (:func:`~arow.study.collect.collect`); returns the names of the cells that failed and the text of
    ``results.md``. Every cell's config is resolved and checked before anything is written.

    Args:
        path: study folder (run folders go into PATH/cells)
        spec: what the study trains and how it scores it
        jobs: runs at once (one per GPU when several are visible, else sharing the CPU threads)
        rows: run only these rows' cells now, comma-separated labels (e.g. the primary rows first); the
            study keeps all its rows: study.json, the plan and the comparison are the whole study's
        echo: where the progress lines go
    """
    if jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {jobs}")
    plans = resolve_cells(spec)
    labels = [v.label for v in spec.variants]
    only = [r.strip() for r in (rows or "").split(",") if r.strip()]
    unknown = [r for r in only if r not in labels]
    if unknown:
        raise StudyError(f"--rows {', '.join(unknown)}: not rows of the study ({', '.join(labels)})")
    study = Study(path, spec)
    study.dir.lock()
    try:
        study.prepare(plans)
        plans = [p for p in plans if not only or p.label in only]
        what = "an EXPLORATORY study on the first %d test images" % spec.eval_n if spec.exploratory else "a study"
        log.info("%s: %s, %d runs (%d methods), %d at a time", path, what, len(plans), len(spec.variants), jobs)
        status = study.run(plans, jobs=jobs, echo=echo)
        collect(path)
    finally:
        study.dir.unlock()
    return [k for k, v in status.items() if v != "done"], study.dir.results(StudyDir.RESULTS, "md").read_text()
