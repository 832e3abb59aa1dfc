"""Clock reads that wait for the device: the one timing helper of the benchmark scripts.

CUDA runs asynchronously: the host queues kernels and goes on, so a plain ``time.perf_counter()``
around GPU work measures how long the host took to queue it. Every clock read here first waits
until the device has finished what was queued (``torch.cuda.synchronize``); on the CPU it reads
the clock at once.

>>> with Stopwatch(torch.device("cpu")) as t:
...     _ = sum(range(1000))
>>> t.seconds >= 0
True
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch


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
