"""Evaluation: the one evaluation of a model (:func:`evaluate`: the robustness guards, then the
attacks), what it is asked to do (:class:`EvalSettings`, :class:`GuardSettings`), what it reports
(:class:`EvalReport`), where a model comes from (:func:`load_source`: run folders, checkpoints,
exports, your own factory, TorchScript and exported programs, the last two only when trusted), and
the eps curve. The attack cascade itself (per-example verdicts, resumable, no guards) is
:func:`arow.evaluation.cascade.evaluate`."""
from .cascade import EVAL_BATCH_SIZE, EvalResult, default_eval_batch
from .curve import eps_curve
from .guards import GuardResult, run_guards
from .protocol import evaluate
from .report import EvalReport, RobustnessGuardError
from .settings import EvalSettings, GuardSettings, resolve_threat
from .sources import LoadedModel, ModelSource, load_source, open_source

__all__ = ["evaluate", "EvalSettings", "GuardSettings", "EvalReport", "RobustnessGuardError", "resolve_threat",
           "load_source", "open_source", "LoadedModel", "ModelSource", "eps_curve", "EvalResult", "EVAL_BATCH_SIZE",
           "default_eval_batch", "run_guards", "GuardResult"]
