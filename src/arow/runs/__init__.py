"""Runs on disk: the run folder (:class:`RunDir`: every file name in it, the lock, the order of
writes), checkpoint files (atomic writes, loading without running code, keyed progress of resumable
work) and checkpoints as records (which file a run names, the model it describes, export)."""
from .checkpoint import CheckpointError, Which
from .records import export_model, load_checkpoint, load_model, model_from_checkpoint, resolve_checkpoint
from .rundir import RunDir, RunFolderError, RunLockedError

__all__ = ["RunDir", "RunFolderError", "RunLockedError", "CheckpointError", "Which", "load_checkpoint",
           "load_model", "model_from_checkpoint", "resolve_checkpoint", "export_model"]
