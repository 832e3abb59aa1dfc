"""Studies (``arow study``): a grid of methods x seeds trained and evaluated alike, each cell an
ordinary run folder launched from its resolved config, then compared with paired statistics over
seeds.

:mod:`~arow.study.spec` (what a study is, checked), :mod:`~arow.study.cells` (a cell resolved into
``cell.json`` and run from it; ``python -m arow.study.cell`` runs one), :mod:`~arow.study.runner`
(the folder, its lock, the cells' processes), :mod:`~arow.study.collect` (the comparison pages).
"""
from .cells import CellPlan, resolve_cells, run_cell
from .collect import collect
from .runner import Study, prepare_study, run_study, study_commands
from .spec import StudyError, StudySpec

__all__ = ["StudySpec", "Study", "StudyError", "CellPlan", "resolve_cells", "run_cell", "run_study",
           "prepare_study", "study_commands", "collect"]
