"""Progress for people: tqdm bars on a terminal, a plain line every ``interval`` seconds elsewhere.

Without a terminal (CI, ``nohup``, Slurm logs) a bar would print nothing until it ends, so a long
epoch or AutoAttack would look hung: there a line like ``epoch 2/10: 150/469 batches (32%), 41s``
is logged at most every ``interval`` seconds. On a terminal, log lines are written through the bar
so they never overwrite it. Used by the CLI as a training callback and an evaluation progress hook.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, ContextManager, Optional

from ..training.callbacks import Callbacks

log = logging.getLogger("arow")


class Progress(Callbacks):
    """Training callback and evaluation hook that reports progress (rank 0 only)."""

    def __init__(self, interval: float = 30.0, tty: Optional[bool] = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.quiet = os.environ.get("RANK", "0") != "0"
        self.interval, self.bar, self.validating = interval, None, False
        self.desc, self.unit, self.total, self.done, self.t0, self.last = "", "", 0, 0, 0.0, 0.0

    def _open(self, total: int, desc: str, unit: str) -> None:
        self.close()
        self.desc, self.unit, self.total, self.done = desc, unit, total, 0
        self.t0 = self.last = time.monotonic()
        if self.tty and not self.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def _advance(self, done: int) -> None:
        self.done = done
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if not self.tty and not self.quiet and now - self.last >= self.interval and self.total:
            self.last = now
            log.info("%s: %d/%d %s (%.0f%%), %.0fs", self.desc, done, self.total, self.unit,
                     100 * done / self.total, now - self.t0)

    def close(self, error: Optional[BaseException] = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # training
    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._open(steps, f"epoch {epoch + 1}/{epochs}", "batches")
        self.validating = False

    def on_step(self, step: int) -> None:
        self._advance(step + 1)

    def on_validation_start(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("validating")
        elif not self.tty and not self.quiet and not self.validating:  # once, also when EMA or SWA is validated too
            log.info("%s: validating on the held-out training split", self.desc)
        self.validating = True

    def on_epoch_end(self, r: dict[str, Any]) -> None:
        """One line per epoch: loss, lr, ARoW's mean weight, time. Each validation has its own line
        already (the Trainer's, naming the model and split), so its numbers are not repeated here."""
        self.close()
        parts = [f"epoch {r['epoch']}", f"loss {r.get('train_loss', float('nan')):.4f}", f"lr {r['lr']:.4g}"]
        if "train_weight_mean" in r:
            parts.append(f"weight {r['train_weight_mean']:.3f}")
        log.info(" | ".join(parts + [f"{r['seconds']:.0f}s"]))

    # evaluation: arow.evaluation.cascade's progress hook
    def eval_progress(self, name: str, done: int, total: int) -> None:
        if self.desc != f"eval {name}" or (self.bar is None and self.tty and not self.quiet):
            self._open(total, f"eval {name}", "images")
        self._advance(done)


def log_through_bars() -> ContextManager[Any]:
    """On a terminal, the context in which log lines are written through the progress bars (so that
    they never overwrite one); elsewhere it changes nothing."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm([log, logging.getLogger()])
