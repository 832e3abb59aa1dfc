"""What happens around the training loop: the loop calls these hooks, they do the side effects.

The :class:`~arow.training.Trainer` computes; everything that writes somewhere is a callback:
:class:`RunWriter` (the run folder: config, metrics, checkpoints), :class:`TensorBoardWriter`,
:class:`PlotWriter`, and the CLI's progress bars. Pass your own in ``Trainer(..., callbacks=[...])``.

>>> class PrintLoss(Callbacks):
...     def on_epoch_end(self, record):
...         print(record["epoch"], round(record["train_loss"], 2))
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .config import ConfigError
from .runs import RunDir

if TYPE_CHECKING:
    from .training import Trainer, TrainResult

log = logging.getLogger(__name__)


class Callbacks:
    """Hooks of :meth:`Trainer.fit`, all optional. ``self.trainer`` is set by ``on_fit_start``.

    Order per epoch: ``on_epoch_start``, ``on_step`` per batch, ``on_validation_start``,
    ``on_epoch_end`` (the run folder's epoch files are written before the user's hooks see it).
    ``close`` runs last, also when the fit ends with an exception (passed as ``error``).
    """

    trainer: Optional["Trainer"] = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def on_step(self, step: int) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...
    def on_fit_end(self, result: "TrainResult") -> None: ...
    def close(self, error: Optional[BaseException] = None) -> None: ...


class RunWriter(Callbacks):
    """Keeps the run folder: takes its lock, writes config, metrics and checkpoints (rank 0 only)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_fit_start(self, trainer: "Trainer") -> None:
        super().on_fit_start(trainer)
        run = self.run
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"--out {run.path} is a file, not a run folder")
        try:
            run.lock()
        except OSError as e:
            raise ConfigError(f"--out {run.path}: cannot write the run folder ({e.strerror or e})") from None
        resumed = trainer.start_epoch > 0
        if run.has_checkpoint() and not resumed:
            run.unlock()
            raise ConfigError(f"{run.path} already holds a run; pass --resume to continue it "
                              f"or choose another --out (nothing is deleted)")
        run.write_metrics(trainer.history)  # a fresh run starts empty; a resumed one drops unsaved epochs
        run.clear_diverged()
        run.write_config(trainer.resolved_config())

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        trainer = self.trainer
        self.run.append_metrics(record)
        ckpt = trainer.state_dict()
        best = trainer.best_state_dict(ckpt) if trainer.best.get("epoch") == record["epoch"] else None
        self.run.save_epoch(ckpt, best)

    def on_fit_end(self, result: "TrainResult") -> None:
        self.run.save_final(self.trainer.final_state_dict(result.model))

    def close(self, error: Optional[BaseException] = None) -> None:
        from .training import TrainingDiverged

        if isinstance(error, TrainingDiverged):
            self.run.mark_diverged(error.info)
        self.run.unlock()


class TensorBoardWriter(Callbacks):
    """The scalars of metrics.jsonl, under the same names, to ``DIR/tensorboard``."""

    def __init__(self, folder: Path) -> None:
        require_tensorboard()  # fail when the run is set up, not after the first epoch
        self.folder, self.writer = Path(folder), None

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder))
        for k, v in record.items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, record["epoch"])
        self.writer.flush()  # a killed run keeps its curves

    def close(self, error: Optional[BaseException] = None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class PlotWriter(Callbacks):
    """The run's PNGs when the fit ends; a plotting problem never costs the trained model."""

    def __init__(self, run: RunDir) -> None:
        self.run = run

    def on_fit_end(self, result: "TrainResult") -> None:
        plot_run_safely(self.run.path)


def require_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError as e:
        raise ValueError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                         "in the arow checkout (or pip install tensorboard)") from e


def plot_run_safely(out: Path) -> None:
    """The PNGs of run folder ``out``; a failure only warns (the run itself is saved)."""
    try:
        from .plots import plot_run

        paths = plot_run(out)
        log.info("plots in %s: %s", out, ", ".join(p.name for p in paths) or "none")
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw the plots of %s (%s: %s); the run itself is saved. Retry with `arow plot %s`",
                    out, type(e).__name__, e, out)
