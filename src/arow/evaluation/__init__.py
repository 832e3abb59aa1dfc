"""Evaluation: robust accuracy on a test set (the attack cascade with per-example verdicts), the
robustness guards against overstated numbers, and the sources a model to evaluate comes from
(your own factory, TorchScript, exported programs)."""
from .cascade import EVAL_BATCH_SIZE, EvalResult, evaluate
from .guards import GuardResult, run_guards

__all__ = ["evaluate", "EvalResult", "EVAL_BATCH_SIZE", "run_guards", "GuardResult"]
