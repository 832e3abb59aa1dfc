"""What the training loop raises for a run that cannot go on."""
from __future__ import annotations

from typing import Any

class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; the run stopped before saving anything from it.

    ``info`` (epoch, step, reason, lr) is what the run folder records in ``diverged.json``.
    """

    def __init__(self, message: str, info: dict[str, Any]) -> None:
        super().__init__(message)
        self.info = info
