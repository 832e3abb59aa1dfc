"""Training: the loop, its state and model selection (:class:`Trainer`), weight averaging (SWA, EMA),
how a model runs (device, precision, compile, DDP) and the side effects of a run as callbacks (run
folder, TensorBoard, plots). A Trainer resolves a config it is given once (:mod:`arow.config.plan`);
which run folder it writes is decided outside it (:func:`arow.pipelines.build_trainer`)."""
from .callbacks import Callbacks, PlotWriter, RunWriter, TensorBoardWriter, run_writers
from .errors import TrainingDiverged
from .trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "Callbacks", "RunWriter", "TensorBoardWriter", "PlotWriter",
           "run_writers"]
