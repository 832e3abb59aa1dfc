"""Training: the loop and its state (:class:`Trainer`), weight averaging (SWA, EMA), how a model runs
(device, precision, compile, DDP) and the side effects of a run as callbacks (run folder, TensorBoard,
plots). Nothing here resolves a config or decides where a run lives."""
from .callbacks import Callbacks, PlotWriter, RunWriter, TensorBoardWriter
from .errors import TrainingDiverged
from .trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "Callbacks", "RunWriter", "TensorBoardWriter", "PlotWriter"]
