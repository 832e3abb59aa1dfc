"""What the training loop raises for a run that cannot go on."""
from __future__ import annotations

from typing import Any


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite, or the loss exploded; the run stopped before saving
    anything from it.

    ``info`` (epoch, step, reason, lr) is what the run folder records in ``diverged.json``; ``hint``
    (appended to the message) says what was kept: the loop knows only whether an epoch had finished,
    the run folder's writer replaces it with the checkpoint to continue from.
    """

    def __init__(self, message: str, info: dict[str, Any], hint: str = "") -> None:
        super().__init__(message)
        self.info = info
        self.hint = hint

    def __str__(self) -> str:
        return super().__str__() + self.hint


class ModelOutputError(ValueError):
    """The model's forward does not return what training needs: one tensor of logits (N, classes)."""
