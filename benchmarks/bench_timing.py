"""Clock reads that wait for the device: the one timing helper of the benchmark scripts.

CUDA runs asynchronously: the host queues kernels and goes on, so a plain ``time.perf_counter()``
around GPU work measures how long the host took to queue it. Every clock read here first waits
until the device has finished what was queued (``torch.cuda.synchronize``); on the CPU it reads
the clock at once. The scripts that time the evaluation do it in the kernels ``arow eval`` runs
(:func:`arow_eval_kernels`), whatever flags an earlier training step left.

>>> with Stopwatch(torch.device("cpu")) as t:
...     _ = sum(range(1000))
>>> t.seconds >= 0
True
"""
from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from typing import Any

import torch

from arow.evaluation.cascade import float32_kernels


def sync(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued on it (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device`` has finished what was queued."""
    sync(device)
    return time.perf_counter()


class Stopwatch:
    """``with Stopwatch(device) as t: ...``, then ``t.seconds``: the device's time for the block,
    synchronised on entry and on exit (:func:`now`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = math.nan
        self._t0 = math.nan

    def __enter__(self) -> "Stopwatch":
        self._t0 = now(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = now(self.device) - self._t0


def arow_eval_kernels() -> AbstractContextManager[None]:
    """While inside, the kernel settings ``arow eval`` evaluates in (its guards, attacks and
    cross-check; ``--tf32`` left at its default): strict float32, TF32 off for matmuls and cuDNN
    convolutions, and cuDNN's autotuner off; the process's own flags come back on exit
    (:func:`arow.evaluation.cascade.float32_kernels`). A training run leaves TF32 and the autotuner
    on: timed without this, an evaluation runs other kernels than ``arow eval`` does.

    >>> with arow_eval_kernels():
    ...     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    (False, False, False)
    """
    return float32_kernels(False, benchmark=False)
