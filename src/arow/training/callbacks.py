"""What happens around the training loop: the loop calls these hooks, they do the side effects.

The :class:`~arow.training.trainer.Trainer` computes; everything that writes somewhere is a callback:
:class:`RunWriter` (the run folder: config, metrics, checkpoints), :class:`TensorBoardWriter`,
:class:`TrackerWriter` (W&B, MLflow), :class:`PlotWriter`, and the CLI's progress bars. Pass your
own in ``Trainer(..., callbacks=[...])``: any object with some of the hooks of :class:`Callbacks`
(no subclassing needed; a hook it lacks is not called).

>>> class PrintLoss:
...     def on_epoch_end(self, record):
...         print(record["epoch"], round(record["train_loss"], 2))
"""
from __future__ import annotations

import copy
import functools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Optional, Sequence

import torch

from .. import distributed
from ..config.plan import saved_config
from ..config.schema import ConfigError, TrainConfig
from ..methods import METHODS
from ..reporting.plots import plot_run
from ..runs.rundir import RunDir, RunFolderError
from ..runs.selection import reported_prefix
from .errors import TrainingDiverged
from .trackers import Tracker, open_trackers

# The hooks receive the Trainer and its TrainResult (arow.training.trainer); the annotations name
# them as strings, so this module does not import the loop that imports it.

log = logging.getLogger(__name__)


class Callbacks:
    """Hooks of :meth:`Trainer.fit`, all optional; subclassing is optional too: ``callbacks`` may be
    any objects, and the Trainer calls a hook only on those that have it (see :data:`HOOKS`).

    ``on_fit_start(trainer)``
        once, before the first epoch (of a resumed run too); here ``self.trainer`` is set.
    ``on_epoch_start(epoch, epochs, steps)``
        before each epoch: ``epoch`` 0-based, ``epochs`` the run's total, ``steps`` its batches.
    ``on_step_record(record)``
        on the optimiser steps that ``--log-every N`` logs (``log_every``), before that step's
        ``on_step``: ``record`` holds ``step``, ``epoch_float``, ``lr``, ``grad_norm`` and the
        means of the loss and its parts since the previous record.
    ``on_step(step)``
        after each optimiser step, ``step`` 0-based within the epoch.
    ``on_validation_start()``
        before each validation on the held-out split (once per model validated: the trained
        one, then the SWA or EMA average if one runs).
    ``on_epoch_end(record)``
        after each epoch's validation and model selection; ``record`` is the epoch's line of
        ``metrics.jsonl`` (``epoch`` 1-based, ``lr``, ``train_loss`` and the method's parts,
        ``val_clean_acc``, ``val_pgd_acc``, ``seconds``, ...). The run folder's epoch files are
        written before the user's hooks see it (on CUDA: being written, see :class:`EpochSaves`).
    ``on_fit_end(result)``
        once, with the :class:`~arow.training.trainer.TrainResult`, after the last epoch.
    ``close(error)``
        last, also when the fit ends with an exception (passed as ``error``; None otherwise).
    """

    trainer: Optional["Trainer"] = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def on_step(self, step: int) -> None: ...
    def on_step_record(self, record: dict[str, Any]) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...
    def on_fit_end(self, result: "TrainResult") -> None: ...
    def close(self, error: Optional[BaseException] = None) -> None: ...


class RunWriter(Callbacks):
    """Keeps the run folder: takes its lock, writes config, metrics and checkpoints (rank 0 only),
    records a divergence in ``diverged.json``; before a fit it refuses a folder that already holds
    a run (:meth:`check_new`) or finds the state a resumed run continues from (:meth:`resume_state`).
    ``background``: write the epoch checkpoints while the next epoch trains (:class:`EpochSaves`);
    None: on CUDA only."""

    def __init__(self, run: RunDir, *, background: Optional[bool] = None) -> None:
        self.run = run
        self.background = background
        self.saves = EpochSaves(run, background=False)

    def check_new(self) -> None:
        """Refuse to start a new run in a folder that already holds one (nothing is deleted)."""
        if self.run.has_checkpoint():
            raise ConfigError(f"{self.run.path} already holds a run; pass --resume to continue it "
                              f"or choose another --out (nothing is deleted)")

    def resume_state(self, cfg: TrainConfig) -> dict[str, Any]:
        """The saved state to continue from (``last.pt``, else ``last.prev.pt``), if ``cfg`` continues
        the same experiment: only :meth:`TrainConfig.resumable_keys` may change, and ``lr`` (smaller)
        after a divergence; ``epochs`` may not undercut what was trained."""
        run = self.run
        diverged = run.diverged()
        if not run.has_checkpoint():
            hint = (" (the run diverged in its first epoch: start it again without --resume, e.g. with a "
                    "smaller --lr)") if diverged else ""
            raise ConfigError(f"--resume: {run.file(RunDir.LAST)} does not exist (nothing to resume){hint}")
        ckpt = run.load_resume_state()
        saved = saved_config(ckpt.get("config", {}))
        allowed = set(TrainConfig.resumable_keys())
        if diverged is not None:  # the documented exception: continue a diverged run with a smaller lr
            allowed.add("lr")
            if cfg.lr >= saved.get("lr", float("inf")):
                raise ConfigError(f"{run.path} stopped because training diverged ({diverged.get('reason')}); "
                                  f"resume it with a smaller --lr than {saved.get('lr')}")
        new = cfg.to_dict()
        if cfg.method in METHODS and new.get("method") == saved.get("method"):  # a default written out is no change
            defaults = METHODS.get(cfg.method).defaults()
            if {**defaults, **(saved.get("method_args") or {})} == {**defaults, **cfg.method_args}:
                new["method_args"] = saved.get("method_args")
        changed = sorted(k for k, v in new.items() if k not in allowed and k in saved and saved[k] != v)
        if changed:
            diffs = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise ConfigError(f"--resume would change the run in {run.path}: {diffs}; resume with its settings "
                              f"(only {', '.join(sorted(allowed))} may change) or start a new --out")
        if cfg.epochs < int(ckpt["epoch"]):
            raise ConfigError(f"--resume --epochs {cfg.epochs}: {ckpt['path']} has already trained "
                              f"{ckpt['epoch']} epochs; --epochs must be at least {ckpt['epoch']}")
        return ckpt

    def on_fit_start(self, trainer: "Trainer") -> None:
        super().on_fit_start(trainer)
        run = self.run
        cuda = trainer.device.type == "cuda"
        self.saves = EpochSaves(run, background=cuda if self.background is None else self.background)
        self.saves.saved = trainer.start_epoch or None  # a resumed run continues from that epoch's checkpoint
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"--out {run.path} is a file, not a run folder")
        try:
            run.lock()
        except OSError as e:
            raise ConfigError(f"--out {run.path}: cannot write the run folder ({e.strerror or e})") from None
        resumed = trainer.start_epoch > 0
        if not resumed:  # checked again under the lock: another process may have started a run meanwhile
            try:
                self.check_new()
            except ConfigError:
                run.unlock()
                raise
        # a fresh run starts empty; a resumed one drops the lines of unsaved epochs
        run.write_metrics(trainer.history, _saved_steps(run, trainer.start_epoch) if resumed else ())
        run.clear_diverged()
        run.write_config(trainer.resolved_config())

    def on_step_record(self, record: dict[str, Any]) -> None:
        self.run.append_metrics(record)

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        trainer = self.trainer
        self.run.append_metrics(record)
        ckpt = trainer.state_dict()
        best = trainer.best_state_dict(ckpt) if trainer.best.get("epoch") == record["epoch"] else None
        self.saves.save(ckpt, best)

    def on_fit_end(self, result: "TrainResult") -> None:
        self.saves.wait()
        self.run.save_final(self.trainer.final_state_dict(result.model))

    def close(self, error: Optional[BaseException] = None) -> None:
        try:
            try:
                self.saves.close()  # a write still running in the background ends (or fails) first
            except Exception:  # noqa: BLE001 - logged when it failed (EpochSaves); the fit's own error goes on
                if error is None:
                    raise
        finally:  # also when an interrupt arrives while waiting for that write
            try:
                if isinstance(error, TrainingDiverged):
                    self._mark_diverged(error)
            finally:
                self.run.unlock()

    def _mark_diverged(self, error: TrainingDiverged) -> None:
        """``diverged.json``, and the hint naming the checkpoint to continue from: the newest one
        written whole (a background write that failed left the one before it)."""
        self.run.mark_diverged(error.info)
        saved = self.saves.saved
        if saved and self.run.has_checkpoint():
            name = RunDir.LAST if self.run.file(RunDir.LAST).is_file() else RunDir.PREV
            error.hint = (f"; the last good checkpoint is {self.run.file(name)} (epoch {saved}): "
                          f"continue it with --resume --out {self.run.path} and a smaller --lr")
        elif int(error.info["epoch"]) > 1:
            error.hint = "; no checkpoint could be written, so there is nothing to resume"
        else:
            error.hint = "; no epoch had finished, so nothing was saved"


class EpochSaves:
    """Writes each epoch's checkpoints (:meth:`RunDir.save_epoch <arow.runs.rundir.RunDir.save_epoch>`),
    in the foreground or, with ``background``, while the next epoch trains.

    In the background the checkpoints are first copied whole to host memory (:func:`host_copy`): from
    a GPU, the optimiser's state is copied to the host there; the weights of the model and its
    averages, which their ``state_dict`` already copied to the host, are copied once more in host
    memory (a fraction of a second for WRN-34-10's 0.55 GB). Then one worker thread writes them. A
    failed write is logged at once; the next save still writes its own epoch, then raises the earlier
    error; the final save and :meth:`close` wait for a pending write and raise its error. The write is
    the same as in the foreground: ``best.pt``, then ``last.pt`` moved to ``last.prev.pt``, then the
    new ``last.pt`` written to a temporary file and renamed, so a crash at any moment leaves the
    previous checkpoint whole; a crash while a write is pending loses at most that epoch (the run
    resumes from the one before). Under torchrun only rank 0 writes, and the other ranks no longer
    wait for it. :attr:`saved` is the epoch of the newest checkpoint written whole (None: none yet).
    """

    def __init__(self, run: RunDir, *, background: bool) -> None:
        self.run, self.background = run, background
        self.saved: Optional[int] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None

    def save(self, ckpt: dict[str, Any], best: Optional[dict[str, Any]]) -> None:
        failed = self._finish()
        if failed is not None:  # the previous epoch's write failed: this epoch is still saved, then it stops
            try:
                self._write(ckpt, best)
            except Exception as e:  # noqa: BLE001 - the earlier error is the one raised
                log.error("could not write the checkpoints of epoch %s either (%s: %s)", ckpt.get("epoch"),
                          type(e).__name__, e)
            raise failed
        if not self.background:
            self._write(ckpt, best)
            return
        ckpt, best = host_copy((ckpt, best))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arow-checkpoint")
        self._pending = self._pool.submit(self._write, ckpt, best)
        self._pending.add_done_callback(functools.partial(_report_failure, ckpt.get("epoch")))

    def _write(self, ckpt: dict[str, Any], best: Optional[dict[str, Any]]) -> None:
        self.run.save_epoch(ckpt, best)
        self.saved = ckpt.get("epoch", self.saved)

    def _finish(self) -> Optional[BaseException]:
        """Wait for the pending write and return its error (None if it succeeded). An interrupt while
        waiting leaves it pending, so that a later wait still sees how it ended."""
        pending = self._pending
        if pending is None:
            return None
        error = pending.exception()
        self._pending = None
        return error

    def wait(self) -> None:
        """Return when no write is pending; the pending write's error is raised here."""
        failed = self._finish()
        if failed is not None:
            raise failed

    def close(self) -> None:
        try:
            self.wait()
        finally:  # the worker thread ends (after its write) even when an interrupt cut the wait short
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _report_failure(epoch: Any, write: Future) -> None:
    """Log a failed background write of ``epoch``'s checkpoints when it fails (not an epoch later)."""
    error = write.exception()
    if error is not None:
        log.error("could not write the checkpoints of epoch %s (%s: %s); the run folder keeps the previous "
                  "checkpoint, and the run stops with this error at its next save", epoch, type(error).__name__,
                  error)


def host_copy(obj: Any, memo: Optional[dict[int, Any]] = None) -> Any:
    """``obj`` with every tensor copied to host memory and every dict, list, tuple and namedtuple rebuilt
    (a dict as its own kind, e.g. an ``OrderedDict`` with its attributes; an object met twice is copied
    once): a snapshot that later training, on any device, cannot change.

    >>> w = torch.zeros(2); snap = host_copy({"w": w, "history": [1]}); _ = w.add_(1)
    >>> snap["w"].tolist()
    [0.0, 0.0]
    """
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out: Any = obj.detach().to("cpu", copy=True)
    elif isinstance(obj, dict):
        out = obj.copy() if type(obj) is dict else copy.copy(obj)  # copy.copy keeps the kind and attributes
        for k, v in obj.items():
            out[k] = host_copy(v, memo)
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        out = type(obj)(*(host_copy(v, memo) for v in obj))
    elif type(obj) in (list, tuple):
        out = type(obj)(host_copy(v, memo) for v in obj)
    else:
        return obj
    memo[id(obj)] = out
    return out


class TensorBoardWriter(Callbacks):
    """The records of metrics.jsonl to ``DIR/tensorboard``, against the global optimiser step.

    Epoch records (at the epoch's last step): ``train/<part>`` (means over the epoch), ``val/...``
    (``val/swa_...``, ``val/ema_...`` for the averaged models), ``lr``, ``time/epoch_seconds``,
    ``progress/epoch`` and the histogram ``train/weight`` of the per-example weight (ARoW, MART).
    Step records (``--log-every``): ``train_step/<part>`` (means since the previous record),
    ``train_step/grad_norm`` and ``lr`` at every logged step. When the fit ends, the resolved
    config's scalar settings and the final validation numbers go to the HParams tab.
    """

    def __init__(self, folder: Path) -> None:
        require_tensorboard()  # fail when the run is set up, not after the first epoch
        self.folder, self.writer = Path(folder), None

    def _open(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder))
        return self.writer

    def _step(self, record: dict[str, Any]) -> int:
        return int(self.trainer.global_step) if self.trainer is not None else int(record["epoch"])

    def on_step_record(self, record: dict[str, Any]) -> None:
        w = self._open()
        for k, v in _scalars(record):
            if k not in ("step", "epoch_float"):
                w.add_scalar("lr" if k == "lr" else f"train_step/{k.removeprefix('train_')}", v, record["step"])

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        w, step = self._open(), self._step(record)
        step_lr = self.trainer is not None and getattr(self.trainer.cfg, "log_every", 0) > 0
        for k, v in _scalars(record):
            if not (k == "lr" and step_lr):  # with step records, ``lr`` is the per-step schedule
                w.add_scalar(tensorboard_tag(k), v, step)
        hist = record.get("weight_hist")
        if hist and sum(hist) > 0:
            _add_binned_histogram(w, "train/weight", hist, step)
        w.flush()  # a killed run keeps its curves

    def on_fit_end(self, result: "TrainResult") -> None:
        if self.trainer is None or not result.history:
            return
        from torch.utils.tensorboard.summary import hparams

        w = self._open()
        metrics = {f"hparam/{k}": v for k, v in final_metrics(self.trainer, result.history).items()}
        exp, ssi, sei = hparams(hparam_values(self.trainer.resolved_config()), metrics)
        file_writer = w._get_file_writer()  # the run's own event file (add_hparams would open a sub-run)
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary, self.trainer.global_step)
        for k, v in metrics.items():
            w.add_scalar(k, v, self.trainer.global_step)
        w.flush()

    def close(self, error: Optional[BaseException] = None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class TrackerWriter(Callbacks):
    """The records of metrics.jsonl to an experiment tracker (:mod:`arow.training.trackers`: W&B,
    MLflow), against the global optimiser step and under TensorBoard's names (``train/loss``,
    ``val/pgd_acc``, ``lr``; step records ``train_step/<part>``). When the fit starts, the resolved
    config's settings (:func:`hparam_values`) become the tracker run's parameters; when it ends, the
    final and best validation numbers (:func:`final_metrics`) its summary; the tracker's run is closed
    also when training fails."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_fit_start(self, trainer: "Trainer") -> None:
        super().on_fit_start(trainer)
        out = trainer.cfg.out
        self.tracker.start(Path(out).name if out else None, hparam_values(trainer.resolved_config()))

    def on_step_record(self, record: dict[str, Any]) -> None:
        self.tracker.log({k if k == "lr" else f"train_step/{k.removeprefix('train_')}": v for k, v in _scalars(record)
                          if k not in ("step", "epoch_float")}, int(record["step"]))

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        step_lr = self.trainer.cfg.log_every > 0  # with step records, ``lr`` is the per-step schedule
        self.tracker.log({tensorboard_tag(k): v for k, v in _scalars(record) if not (k == "lr" and step_lr)},
                         int(self.trainer.global_step))

    def on_fit_end(self, result: "TrainResult") -> None:
        self.tracker.summary(final_metrics(self.trainer, result.history), int(self.trainer.global_step))

    def close(self, error: Optional[BaseException] = None) -> None:
        self.tracker.finish(error)


def final_metrics(trainer: "Trainer", history: Sequence[dict[str, Any]]) -> dict[str, float]:
    """A finished fit's numbers: ``final_val_clean_acc`` and ``final_val_pgd_acc`` of the model the run
    reports (SWA, else EMA, else the last epoch's), ``best_val_pgd_acc`` and ``best_epoch``."""
    if not history:
        return {}
    last = history[-1]
    pre = reported_prefix(last)
    metrics = {f"final_{k}": float(last[f"{pre}{k}"]) for k in ("val_clean_acc", "val_pgd_acc")
               if isinstance(last.get(f"{pre}{k}"), (int, float))}
    if trainer.best.get("epoch") is not None:
        metrics["best_val_pgd_acc"] = float(trainer.best["val_pgd_acc"])
        metrics["best_epoch"] = float(trainer.best["epoch"])
    return metrics


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of an epoch record's key: ``train_loss`` -> ``train/loss``,
    ``swa_val_pgd_acc`` -> ``val/swa_pgd_acc``, ``lr`` -> ``lr``."""
    for prefix, group in (("train_", "train/"), ("val_", "val/"), ("swa_val_", "val/swa_"), ("ema_val_", "val/ema_")):
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return {"lr": "lr", "seconds": "time/epoch_seconds", "epoch": "progress/epoch"}.get(key, f"other/{key}")


def hparam_values(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config's settings as TensorBoard hyper-parameters: numbers, strings and booleans;
    the method's hyper-parameters and the derived values as ``method_args.*`` and ``resolved.*``."""
    out: dict[str, Any] = {}

    def put(key: str, v: Any) -> None:
        if isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(str(x) for x in v)

    for k, v in config.items():
        if k not in ("resolved", "method_args"):
            put(k, v)
    resolved = config.get("resolved") or {}
    for k, v in (resolved.get("method_args") or config.get("method_args") or {}).items():
        put(f"method_args.{k}", v)
    for k, v in resolved.items():
        if k != "method_args":
            put(f"resolved.{k}", v)
    return out


def _scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    return [(k, v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _add_binned_histogram(writer: Any, tag: str, counts: list[float], step: int) -> None:
    """A histogram of values in [0, 1] from the counts of equal bins (bin centres stand for the values)."""
    n = len(counts)
    centres = [(i + 0.5) / n for i in range(n)]
    used = [i for i, c in enumerate(counts) if c > 0]
    writer.add_histogram_raw(tag, min=used[0] / n, max=(used[-1] + 1) / n, num=sum(counts),
                             sum=sum(c * x for c, x in zip(counts, centres)),
                             sum_squares=sum(c * x * x for c, x in zip(counts, centres)),
                             bucket_limits=[(i + 1) / n for i in range(n)], bucket_counts=list(counts),
                             global_step=step)


class PlotWriter(Callbacks):
    """The run's PNGs when the fit ends; a plotting problem never costs the trained model."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_fit_end(self, result: "TrainResult") -> None:
        plot_run_safely(self.run.path)


#: the hooks a training callback may have, in the order a fit first calls them (see :class:`Callbacks`)
HOOKS = ("on_fit_start", "on_epoch_start", "on_step_record", "on_step", "on_validation_start", "on_epoch_end",
         "on_fit_end", "close")


def _has_hooks(obj: Any) -> bool:
    return isinstance(obj, Callbacks) or any(callable(getattr(obj, h, None)) for h in HOOKS)


def callback_list(callbacks: Any) -> list[Any]:
    """``callbacks`` as a list: one callback, several, or none. A callback is any object with one or
    more of the :data:`HOOKS` (a :class:`Callbacks` subclass or not); anything else is refused with
    one line (a ValueError), e.g. a class passed instead of an instance.

    >>> class Printer:
    ...     def on_epoch_end(self, record): print(record["epoch"])
    >>> [type(cb).__name__ for cb in callback_list(Printer())]
    ['Printer']
    """
    if callbacks is None:
        return []
    if _has_hooks(callbacks) or not isinstance(callbacks, Iterable) or isinstance(callbacks, (str, bytes)):
        callbacks = [callbacks]
    items = list(callbacks)
    for cb in items:
        if isinstance(cb, type):
            raise ValueError(f"callbacks: {cb.__name__} is a class; pass an instance, e.g. "
                             f"callbacks=[{cb.__name__}()]")
        if not _has_hooks(cb):
            raise ValueError(f"callbacks: a {type(cb).__name__} has none of the hooks a training callback "
                             f"may have ({', '.join(HOOKS)})")
    return items


def call_hook(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """Call ``hook`` with ``args`` on each of ``callbacks`` that has it, in order."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def run_writers(run: Optional[RunDir], cfg: TrainConfig, *, resume: bool = False,
                plots: bool = True) -> list[Callbacks]:
    """The callbacks that keep the run folder ``run`` (None: no folder) for this process, first in the
    fit's list: :class:`RunWriter`, :class:`PlotWriter` (``plots``), :class:`TensorBoardWriter`
    (``cfg.tensorboard``) and a :class:`TrackerWriter` per tracker (``cfg.wandb``, ``cfg.mlflow``: their
    packages checked now) on rank 0, none on the other ranks. A folder that already holds a run is
    refused unless ``resume``; under torchrun every rank raises rank 0's verdict together."""
    dist = distributed.info()
    writers: list[Callbacks] = []
    error = None
    if dist.is_main:  # only rank 0 writes; every rank learns its verdict on the folder
        try:
            if run is not None:
                writer = RunWriter(run)
                if not resume:
                    writer.check_new()
                writers += [writer, PlotWriter(run)] if plots else [writer]
            if cfg.tensorboard:
                if run is None:
                    raise ConfigError("--tensorboard needs a run folder (--out) to write DIR/tensorboard into")
                writers.append(TensorBoardWriter(run.file(RunDir.TENSORBOARD)))
            writers += [TrackerWriter(t) for t in open_trackers(cfg, run.path if run is not None else None)]
        except ValueError as e:
            if not dist.enabled:
                raise
            error = str(e)
    distributed.raise_together(error, ConfigError)
    return writers


def require_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError as e:
        raise ValueError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                         "in the arow checkout (or pip install tensorboard)") from e


def _saved_steps(run: RunDir, epochs: int) -> list[dict[str, Any]]:
    """The step records of the epochs a resumed run keeps (the first ``epochs``)."""
    try:
        return [s for s in run.read_steps() if float(s.get("epoch_float", 0.0)) <= epochs]
    except RunFolderError as e:
        log.warning("dropping the step records of %s (%s)", run.path, e)
        return []


def plot_run_safely(out: Path) -> None:
    """The PNGs of run folder ``out``; a failure only warns (the run itself is saved)."""
    try:

        paths = plot_run(out)
        log.info("plots in %s: %s", out, ", ".join(p.name for p in paths) or "none")
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw the plots of %s (%s: %s); the run itself is saved. Retry with `arow plot %s`",
                    out, type(e).__name__, e, out)
