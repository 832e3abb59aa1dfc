"""Natural (standard) training: no attack."""
from __future__ import annotations

import torch.nn.functional as F

from .base import Method, MethodOutput, Passes
from .registry import METHODS


@METHODS.register("natural")
class Natural(Method):
    """Standard training: CE on clean inputs (no attack). Used as HAT's helper model."""

    default_steps = 0
    paper = None  # no paper: the non-robust baseline
    url = None
    passes = Passes(target=0, attack=0, train=1)
    test_settings = {}

    def objective(self, model, x, y, adv) -> MethodOutput:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        return MethodOutput(loss, logits_clean=logits, parts={"natural": loss.detach()})
