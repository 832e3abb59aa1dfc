"""Studies (``arow study``): a grid of methods x seeds trained and evaluated alike, each cell an
ordinary run folder, then compared with paired statistics over seeds."""
from .core import Study, StudyError, StudySpec, collect, run_study

__all__ = ["StudySpec", "Study", "StudyError", "run_study", "collect"]
