"""Studies and big runs on a Slurm cluster, through submitit (optional: ``pip install -e '.[slurm]'``).

``arow study STUDY.yaml --out DIR --launcher slurm`` (:func:`submit_study`) checks and prepares the
study as ``arow study`` does (every cell's config resolved by ``arow train``'s resolver into its
``cell.json``), then submits every unfinished cell as one Slurm job array, one array task per cell,
and returns without waiting: each cell's job id and log files go to ``DIR/jobs.json``, submitit's
scripts, pickles and logs to ``DIR/slurm/``. A task runs :class:`CellJob`, which runs the cell with
:func:`arow.study.cells.run_cell` in the task's process, as ``python -m arow.study.cell`` does for
the local pool. ``arow study --status DIR`` (:mod:`arow.study.status`) shows where each cell is;
``arow study --collect DIR`` builds the comparison once they have finished.

Preemption and time limits: Slurm signals a job (``USR2``, 90 s before it ends it) and submitit
calls the job's ``checkpoint``, which returns the job itself: it is requeued and the cell continues
from what its run folder holds (training from ``last.pt``; a finished step is never redone), at
most ``max_requeues`` times; after that the cell records why it stopped, and submitting the study
again continues it. A cell that fails by itself (bad input, a tripped guard, a diverged run:
:class:`~arow.study.cells.CellFailed`) is not requeued: its job ends failed with the one-line error
the cell recorded in its ``study_failed.json``.

``arow train ... --launcher slurm --nodes M --gpus-per-node N`` (:func:`submit_train`) submits one
run as one job of M x N tasks, one per GPU. Each task exports the rendezvous that torchrun would set
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) from the Slurm
environment (``submitit.helpers.TorchDistributedEnvironment``), then runs
:func:`arow.pipelines.train_and_evaluate`, which is what ``torchrun -m arow train`` runs in each of
its processes (the process group is initialised from that environment, :mod:`arow.distributed`).

submitit is imported in this module only; without it, ``--launcher slurm`` stops with one line.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import time as clock
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

from ..config import TrainConfig, ensure_resolved
from ..pipelines import train_and_evaluate
from ..runs.rundir import RunDir
from ..runs.studydir import CellDir, submitit_folder
from .cells import CRASHED, CellFailed, CellPlan, resolve_cells, run_cell
from .runner import Study
from .spec import StudySpec

try:  # optional: only a submission needs it, and says so with one line (require_submitit)
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - without submitit nothing here is ever submitted
    Checkpointable = object  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
Cluster = Literal["slurm", "local"]
#: ``--launcher`` values: this machine's pool (or process), a Slurm cluster, and submitit's local
#: executor standing in for Slurm (the same jobs, run on this machine: for tests)
LAUNCHERS = {"local": None, "slurm": "slurm", "slurm-local": "local"}
MISSING = "--launcher slurm needs submitit: pip install -e '.[slurm]'"
#: the cluster's job states (sacct) that mean "waiting to run" and "running"
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD"})
RUNNING = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING"})


class SlurmError(ValueError):
    """A launcher setting is wrong, or the cluster refused a submission; one line says which."""


class JobFailed(RuntimeError):
    """A cell or run failed by itself inside its job, which ends failed (never requeued); the message
    is its one-line error."""


def require_submitit() -> Any:
    """The submitit module, or SlurmError with the one line that says how to install it."""
    try:
        import submitit
    except ImportError:
        raise SlurmError(MISSING) from None
    logging.getLogger("submitit").propagate = False  # it has its own handlers: through ours too, each line twice
    return submitit


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------- what a job asks for
def parse_time(value: Optional[str]) -> int:
    """A job's time limit in whole minutes, from minutes (``240``) or ``[D-]H:MM:SS`` (``4:00:00``).

    >>> parse_time("240"), parse_time("4:00:00"), parse_time("1-00:00:30")
    (240, 240, 1441)
    """
    if value is None or not str(value).strip():
        raise SlurmError("--launcher slurm needs --time: the time limit of each job, in minutes (240) or H:MM:SS "
                         "(4:00:00); a job that reaches it is requeued and continues from its last checkpoint")
    s = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]?\d):([0-5]?\d)", s)
    if s.isdigit():
        minutes = int(s)
    elif m:
        days, hours, mins, secs = (int(g) if g else 0 for g in m.groups())
        minutes = -(-(((days * 24 + hours) * 60 + mins) * 60 + secs) // 60)
    else:
        raise SlurmError(f"--time: expected minutes (240) or H:MM:SS (4:00:00), got {value!r}")
    if minutes < 1:
        raise SlurmError(f"--time must be at least one minute, got {value!r}")
    return minutes


def parse_sbatch_args(args: Optional[Sequence[str]]) -> dict[str, Any]:
    """``--sbatch-arg KEY=VALUE`` (or a bare ``KEY``, a switch) as submitit's ``additional_parameters``.

    >>> parse_sbatch_args(["qos=high", "--mail-type=END,FAIL", "exclusive"])
    {'qos': 'high', 'mail-type': 'END,FAIL', 'exclusive': True}
    """
    out: dict[str, Any] = {}
    for arg in args or ():
        key, sep, value = str(arg).partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key) or (sep and not value.strip()):
            raise SlurmError(f"--sbatch-arg: expected KEY=VALUE (an sbatch option without its dashes, e.g. "
                             f"qos=high) or KEY, got {arg!r}")
        out[key] = value.strip() if sep else True
    return out


def _at_least(name: str, value: Optional[int], low: int) -> Optional[int]:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        raise SlurmError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    return value


def _mem(value: Optional[str]) -> Optional[str]:
    if value is not None and not re.fullmatch(r"\d+[KMGTkmgt]?", str(value).strip()):
        raise SlurmError(f"--mem: expected a size such as 32G or 16000M, got {value!r}")
    return None if value is None else str(value).strip().upper()


@dataclass(frozen=True)
class Resources:
    """What each job asks the cluster for (the flags of :func:`submit_study` and :func:`submit_train`)."""

    minutes: int
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    mem: Optional[str] = None
    constraint: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
    array_parallelism: Optional[int] = None
    max_requeues: int = 3


def make_executor(folder: PathLike, res: Resources, *, name: str, cluster: Cluster = "slurm") -> Any:
    """submitit's executor for ``res``: the Slurm one (sbatch, srun), or with ``cluster="local"`` its
    local stand-in, which runs the same jobs on this machine (with requeueing) for tests."""
    submitit = require_submitit()
    if cluster not in ("slurm", "local"):
        raise SlurmError(f"unknown cluster {cluster!r}: slurm or local")
    try:
        ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=res.max_requeues,
                                   local_max_num_timeout=res.max_requeues)
    except RuntimeError as e:  # e.g. no srun here
        raise SlurmError(f"--launcher slurm: {_one_line(e)} (submit from a machine of the cluster, where sbatch "
                         "and srun are on PATH)") from None
    params = {"name": name, "timeout_min": res.minutes, "nodes": res.nodes, "tasks_per_node": res.tasks_per_node,
              "gpus_per_node": res.gpus_per_node or None, "cpus_per_task": res.cpus_per_task,
              "slurm_partition": res.partition, "slurm_account": res.account, "slurm_mem": res.mem,
              "slurm_constraint": res.constraint, "slurm_array_parallelism": res.array_parallelism,
              "slurm_additional_parameters": dict(res.extra) or None}
    try:
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    except (ValueError, NameError, AssertionError) as e:
        raise SlurmError(f"--launcher slurm: {_one_line(e)}") from None
    return ex


@dataclass
class Submitted:
    """One submitted job: a study's cell (``name``) or a run (its folder), its id and its log files."""

    name: str
    job_id: str
    cluster: str
    stdout: str
    stderr: str
    job: Any = field(default=None, repr=False, compare=False)  # submitit's Job (wait on it, e.g. in tests)

    def record(self) -> dict[str, Any]:
        """What ``jobs.json`` keeps of it."""
        return {"job_id": self.job_id, "cluster": self.cluster, "stdout": self.stdout, "stderr": self.stderr,
                "submitted": clock.strftime("%Y-%m-%d %H:%M:%S")}


def _submitted(name: str, job: Any, cluster: str) -> Submitted:
    return Submitted(name, str(job.job_id), cluster, str(job.paths.stdout), str(job.paths.stderr), job)


def _submit(executor: Any, fns: list[Any]) -> list[Any]:
    """Submit ``fns`` as one job array (a single job when there is one); one line if sbatch refuses."""
    try:
        with executor.batch():
            jobs = [executor.submit(fn) for fn in fns]
    except OSError as e:  # no sbatch on PATH
        raise SlurmError(f"--launcher slurm: could not run sbatch ({_one_line(e)})") from None
    except RuntimeError as e:  # sbatch refused: its stderr
        raise SlurmError(f"--launcher slurm: the cluster refused the job: {_one_line(e)}") from None
    return jobs


def _log_to_stdout(main: bool) -> None:
    """A job's log goes to its stdout (submitit's log file), as ``python -m arow.study.cell`` prints."""
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s", stream=sys.stdout)
    logging.getLogger("submitit").propagate = False  # it has its own handlers: through ours too, each line twice


def _progress_lines() -> Any:
    """The progress lines ``python -m arow.study.cell`` prints (epochs, attacks), for a job's log.

    Imported when a job runs, not with this module: arow.cli imports this module, and a job's process
    loads this module first (from its pickle), where importing arow.cli at the top would be circular."""
    from ..cli.progress import Progress

    return Progress(tty=False)


def _stamp() -> str:
    return clock.strftime("%Y-%m-%d %H:%M:%S")


# --------------------------------------------------------------------------- a study's cells as a job array
class CellJob(Checkpointable):
    """One study cell as a Slurm job: :func:`~arow.study.cells.run_cell` on its ``cell.json``.

    ``checkpoint`` (called by submitit on preemption or at the time limit) returns the same cell to
    run again, ``requeues`` counted up to ``max_requeues``; the cell then continues from its folder."""

    def __init__(self, cell: str, max_requeues: int = 3, requeues: int = 0) -> None:
        self.cell, self.max_requeues, self.requeues = str(cell), max_requeues, requeues

    @property
    def folder(self) -> CellDir:
        return CellDir(Path(self.cell).parent)

    def __call__(self) -> dict[str, Any]:
        _log_to_stdout(True)
        bars = _progress_lines()
        try:
            done = run_cell(self.cell, callbacks=[bars], progress=bars.eval_progress)
        except CellFailed as e:  # recorded in study_failed.json; a failure of the cell itself is never requeued
            raise JobFailed(f"{self.folder.path.name}: {e.step} failed: {e.error}") from None
        finally:
            bars.close()
        return {"cell": self.folder.path.name, "steps": done, "requeues": self.requeues}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        submitit = require_submitit()
        if self.requeues >= self.max_requeues:  # raised into the cell: it records why it stopped
            raise CellFailed("requeue", f"preempted or out of time again after {self.requeues} requeue(s) (at most "
                                        f"{self.max_requeues}): submit the study again to continue from its last "
                                        f"checkpoint", CRASHED)
        self.folder.append_log(f"{_stamp()} preempted or out of time: requeued ({self.requeues + 1} of at most "
                               f"{self.max_requeues}); it continues from its last checkpoint")
        return submitit.helpers.DelayedSubmission(CellJob(self.cell, self.max_requeues, self.requeues + 1))


def job_states(jobs: dict[str, Any]) -> dict[str, str]:
    """{cell: its recorded job's state as the cluster says it (``PENDING``, ``RUNNING``, ``COMPLETED``,
    ``TIMEOUT``, ``CANCELLED`` ...; ``ENDED`` for a local job that is gone)}, from one ``sacct`` call.
    Cells whose job the cluster does not know are left out, and all of them without submitit."""
    try:
        submitit = require_submitit()
    except SlurmError:
        return {}
    out: dict[str, str] = {}
    slurm: dict[str, str] = {}
    for name, rec in jobs.items():
        jid = str(rec.get("job_id", "")) if isinstance(rec, dict) else ""
        if not jid:
            continue
        if rec.get("cluster") == "local":  # submitit's local job: its controller process
            out[name] = "RUNNING" if jid.isdigit() and _alive(int(jid)) else "ENDED"
        elif rec.get("cluster") == "slurm":
            slurm[name] = jid
    if slurm and shutil.which("sacct") is None:
        log.warning("sacct is not on PATH here: the Slurm jobs' states are unknown, the cells' folders alone tell")
    elif slurm:
        watcher = submitit.slurm.slurm.SlurmInfoWatcher()  # our own: no states cached from earlier calls
        for jid in slurm.values():
            watcher.register_job(jid)
        watcher.update()  # one sacct call for every job
        for name, jid in slurm.items():
            state = (watcher.get_state(jid, mode="cache") or "").split()
            if state and state[0].upper() != "UNKNOWN":
                out[name] = state[0].upper()  # "CANCELLED by 123" -> CANCELLED
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended


def lock_holder(run: RunDir) -> Optional[str]:
    """Who holds the run folder's lock ("pid N on HOST since ..."), None if nobody does. A holder on
    this machine is checked to be alive; one on another machine is taken at its word."""
    try:
        text = run.file(RunDir.LOCK).read_text(errors="replace").strip()
    except OSError:
        return None
    m = re.match(r"pid (\d+) on (\S+)", text)
    if not m:
        return None
    if m.group(2) == socket.gethostname() and not _alive(int(m.group(1))):
        return None
    return text


def submit_study(path: PathLike, spec: StudySpec, *, time: Optional[str] = None, partition: Optional[str] = None,
                 account: Optional[str] = None, gpus_per_cell: int = 1, cpus_per_cell: Optional[int] = None,
                 mem: Optional[str] = None, constraint: Optional[str] = None,
                 sbatch_arg: Optional[Sequence[str]] = None, array_parallelism: Optional[int] = None,
                 max_requeues: int = 3, cluster: Cluster = "slurm",
                 echo: Callable[[str], None] = print) -> list[Submitted]:
    """Submit every unfinished cell of the study in ``path`` as one Slurm job array and return (no
    waiting); writes ``PATH/jobs.json`` and one line per cell to ``echo``. The study is checked and
    prepared first, as :func:`~arow.study.runner.run_study` does; a cell whose recorded job is still
    queued or running is not submitted again.

    Args:
        path: study folder (run folders go into PATH/cells)
        spec: what the study trains and how it scores it
        time: time limit of each cell's job: minutes (240) or H:MM:SS (4:00:00); a job that reaches it is
            requeued and continues from its last checkpoint
        partition: Slurm partition (the cluster's default when not given)
        account: Slurm account the jobs are charged to
        gpus_per_cell: GPUs of each cell's job (0: CPUs only)
        cpus_per_cell: CPU cores of each cell's job (the cluster's default when not given)
        mem: memory of each cell's job, e.g. 32G (the cluster's default when not given)
        constraint: node features the jobs need, e.g. a100|h100
        sbatch_arg: any other sbatch option as KEY=VALUE or KEY (e.g. qos=high), repeatable
        array_parallelism: cells of the array that run at once (all when not given)
        max_requeues: requeues of a job after preemption or its time limit, at most
        cluster: slurm, or local: the same jobs through submitit's local executor on this machine (tests)
        echo: where the lines go
    """
    require_submitit()
    res = Resources(parse_time(time), gpus_per_node=_at_least("gpus_per_cell", gpus_per_cell, 0),
                    cpus_per_task=_at_least("cpus_per_cell", cpus_per_cell, 1), partition=partition,
                    account=account, mem=_mem(mem), constraint=constraint, extra=parse_sbatch_args(sbatch_arg),
                    array_parallelism=_at_least("array_parallelism", array_parallelism, 1),
                    max_requeues=_at_least("max_requeues", max_requeues, 0))
    plans = resolve_cells(spec)
    study = Study(path, spec)
    study.dir.lock()
    try:
        study.prepare(plans)
        submitted = _submit_cells(study, plans, res, cluster, echo)
    finally:
        study.dir.unlock()
    for s in submitted:
        echo(f"{s.name}: job {s.job_id}, log {s.stdout}")
    if submitted:
        echo(f"submitted {len(submitted)} cell(s) of {study.path}; see where they are with `arow study --status "
             f"{study.path}`, and build the comparison with `arow study --collect {study.path}` when they are done")
    return submitted


def _submit_cells(study: Study, plans: list[CellPlan], res: Resources, cluster: Cluster,
                  echo: Callable[[str], None]) -> list[Submitted]:
    """Submit the unfinished cells whose recorded job is not queued or running; record them (study locked)."""
    jobs = study.dir.read_jobs()
    states = job_states(jobs)
    todo = []
    for plan in study.unfinished(plans):
        state = states.get(plan.name)
        if state in QUEUED or state in RUNNING:
            echo(f"{plan.name}: its job {jobs[plan.name]['job_id']} is {state.lower()}; not submitted again")
        else:
            todo.append(plan)
    if not todo:
        echo(f"nothing to submit: every cell of {study.path} is finished, queued or running")
        return []
    executor = make_executor(submitit_folder(study.path), res, name=f"arow-{study.path.resolve().name}",
                             cluster=cluster)
    cells = [study.dir.cell(plan.name) for plan in todo]
    fns = [CellJob(str(run.file(CellDir.CELL).resolve()), res.max_requeues) for run in cells]
    submitted = [_submitted(plan.name, job, cluster) for plan, job in zip(todo, _submit(executor, fns))]
    jobs.update({s.name: s.record() for s in submitted})
    study.dir.write_jobs(jobs)
    for run, s in zip(cells, submitted):
        run.append_log(f"{_stamp()} submitted as {cluster} job {s.job_id}; its output goes to {s.stdout}")
    return submitted


# --------------------------------------------------------------------------- one run on several nodes
class TrainJob(Checkpointable):
    """One ``arow train`` run as a Slurm job of one task per GPU: each task exports the torchrun
    environment from Slurm's (``TorchDistributedEnvironment``) and runs
    :func:`~arow.pipelines.train_and_evaluate` on ``config`` (a resolved config's ``to_dict()``).
    ``checkpoint`` requeues it with ``resume`` once the run folder holds a checkpoint."""

    def __init__(self, config: dict[str, Any], resume: bool = False, max_requeues: int = 3,
                 requeues: int = 0) -> None:
        self.config, self.resume, self.max_requeues, self.requeues = dict(config), resume, max_requeues, requeues

    def __call__(self) -> dict[str, Any]:
        env = require_submitit().helpers.TorchDistributedEnvironment()
        # every task sees the node's GPUs; arow.distributed picks cuda:LOCAL_RANK, as under torchrun
        env.export(set_cuda_visible_devices=False, overwrite=True)
        _log_to_stdout(env.rank == 0)
        bars = _progress_lines()
        try:
            rep = train_and_evaluate(TrainConfig.from_dict(self.config), callbacks=[bars], resume=self.resume,
                                     progress=bars.eval_progress)
        finally:
            bars.close()
        ev = rep.evaluation
        if ev is not None and ev.error:
            raise JobFailed(ev.error)
        if rep.is_main and ev is not None:
            print("\n" + ev.text(), flush=True)
        return {"out": self.config.get("out"), "rank": env.rank, "world_size": env.world_size,
                "seconds": rep.seconds, "accuracy": dict(ev.accuracy) if ev is not None else {}}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        out = self.config.get("out")
        if self.requeues >= self.max_requeues:
            raise JobFailed(f"preempted or out of time again after {self.requeues} requeue(s) (at most "
                            f"{self.max_requeues}): continue with `arow train --resume --out {out} --launcher slurm`")
        resume = self.resume or RunDir(out).has_checkpoint()
        return require_submitit().helpers.DelayedSubmission(
            TrainJob(self.config, resume, self.max_requeues, self.requeues + 1))


def submit_train(cfg: TrainConfig, *, resume: bool = False, nodes: int = 1, gpus_per_node: int = 1,
                 time: Optional[str] = None, partition: Optional[str] = None, account: Optional[str] = None,
                 cpus_per_task: Optional[int] = None, mem: Optional[str] = None, constraint: Optional[str] = None,
                 sbatch_arg: Optional[Sequence[str]] = None, max_requeues: int = 3,
                 cluster: Cluster = "slurm") -> Submitted:
    """Submit one training run (then its evaluation) as one Slurm job of ``nodes`` x ``gpus_per_node``
    tasks, one per GPU, and return (no waiting). submitit's files go to ``OUT/slurm/``.

    Args:
        cfg: the run's config, resolved as ``arow train`` resolves it (it is resolved here otherwise)
        resume: continue the run in ``cfg.out`` from its last checkpoint
        nodes: nodes of the job (DDP across them; the run folder must be on storage they share)
        gpus_per_node: GPUs per node, one training process (task) each (0: one CPU process per node)
        time: time limit of the job: minutes (240) or H:MM:SS (4:00:00); a job that reaches it is requeued and
            continues from its last checkpoint
        partition: Slurm partition (the cluster's default when not given)
        account: Slurm account the job is charged to
        cpus_per_task: CPU cores of each training process (the cluster's default when not given)
        mem: memory per node, e.g. 64G (the cluster's default when not given)
        constraint: node features the job needs, e.g. a100|h100
        sbatch_arg: any other sbatch option as KEY=VALUE or KEY (e.g. qos=high), repeatable
        max_requeues: requeues of the job after preemption or its time limit, at most
        cluster: slurm, or local: the same job through submitit's local executor on this machine (tests)
    """
    require_submitit()
    res = Resources(parse_time(time), nodes=_at_least("nodes", nodes, 1),
                    tasks_per_node=max(1, _at_least("gpus_per_node", gpus_per_node, 0) or 0),
                    gpus_per_node=gpus_per_node, cpus_per_task=_at_least("cpus_per_task", cpus_per_task, 1),
                    partition=partition, account=account, mem=_mem(mem), constraint=constraint,
                    extra=parse_sbatch_args(sbatch_arg), max_requeues=_at_least("max_requeues", max_requeues, 0))
    cfg = ensure_resolved(cfg)
    if cfg.out is None:
        raise SlurmError("--launcher slurm needs --out: the run folder, on storage the job's nodes share")
    world = res.nodes * res.tasks_per_node
    if cfg.batch_size % world:
        raise SlurmError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the {world} "
                         f"training processes (--nodes {res.nodes} x --gpus-per-node {gpus_per_node})")
    executor = make_executor(submitit_folder(cfg.out), res, name=f"arow-{Path(cfg.out).name}", cluster=cluster)
    [job] = _submit(executor, [TrainJob(cfg.to_dict(), resume, res.max_requeues)])
    return _submitted(str(cfg.out), job, cluster)
