"""The GPU check's rows for the training loop: the extra-data loader, validation and BatchNorm
recalibration per epoch, and the epoch's checkpoint write (``benchmarks/gpu_check.py`` runs them,
with its helpers, under its budget and time limits):

- ``loader``: ``MixedLoader`` (70% of each batch from 100k memory-mapped extra images) with the extra
  images kept on the GPU (``device``: what a set this small gets) and, with
  :data:`arow.data.loader.EXTRA_ON_DEVICE_SHARE` set to 0, gathered on the host into pinned memory
  and copied with ``non_blocking=True`` (``pinned``: what a set too large for the GPU gets): images/s
  and host synchronisations per batch, against the fastest eager train row's images/s.
- ``epoch-overhead``: ``Trainer.validate`` (PGD-20 on 1,000 held-out images at the CUDA evaluation
  batch) and one BatchNorm recalibration of the EMA model over a 50k-image epoch (synthetic), as
  shares of the ARoW training epoch the train rows measured (bf16).
- ``checkpoint``: a WRN-34-10 run's epoch checkpoint (model, SGD momentum, EMA model) written by
  ``EpochSaves`` in the foreground and in the background: how long the loop is blocked, and the
  training step's images/s while the background write runs. The files go to the system's
  temporary folder (``TMPDIR`` moves them: put it on the disk the runs are written to).
"""
from __future__ import annotations

import itertools
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import torch

import arow.data.loader as data_loader
from arow.data.extra import MixedLoader, load_extra
from arow.evaluation.cascade import default_eval_batch
from arow.runs.rundir import RunDir
from arow.training.callbacks import EpochSaves
from arow.training.trainer import Trainer

from bench_timing import Stopwatch
from gpu_base import (CLASSES, EPOCH_IMAGES, EXTRA_FRACTION, TRAIN_RATE, Budget, Row, Scale, arow_trainer, count_syncs,
                      label, rate, run_steps, synthetic)

KEEP_UP = 2.0  # a loader keeps up with the training step at >= 2x its images/s (the host also launches the step)
OVERHEAD_SHARE = 0.10  # validation + recalibration above 10% of a training epoch: make them cheaper
WRITE_SPEED = 0.90  # steps while the background write runs must keep 90% of their images/s
EMA_DECAY = 0.999


# --------------------------------------------------------------------------- the extra-data loader
def loader_row(mode: str, sc: Scale, device: torch.device, budget: Budget) -> Row:
    """The extra-data ``MixedLoader`` with its extra images in ``mode`` (``"device"`` or ``"pinned"``,
    see :class:`arow.data.loader.ExtraFeed`): images/s and host synchronisations per batch. Off CUDA
    both modes are the host path (pinned memory needs an accelerator)."""
    cuda = device.type == "cuda"
    row = Row("extra-data loader" + (", pinned" if mode == "pinned" else ""), "-", "-", "-")
    real = synthetic(sc.loader_real, sc).to(device)
    rng = np.random.default_rng(0)
    share = 0.0 if mode == "pinned" else data_loader.EXTRA_ON_DEVICE_SHARE
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(data_loader, "EXTRA_ON_DEVICE_SHARE", share):
        path = Path(tmp) / "extra.npz"
        np.savez(path, image=rng.integers(0, 256, (sc.loader_extra, sc.size, sc.size, 3), dtype=np.uint8),
                 label=rng.integers(0, CLASSES, sc.loader_extra))
        extra = load_extra([path], CLASSES, (sc.size, sc.size, 3))
        loader = MixedLoader(real, extra, sc.batch, fraction=EXTRA_FRACTION, augment="crop+flip", seed=0,
                             epoch_batches=2 + sc.loader_batches)
        loader.memory_format = torch.channels_last if cuda else None  # as the Trainer sets it
        for _ in loader:  # the first pass is fed from pinned memory; the placement is decided at the second
            pass
        batches = iter(loader)
        for _ in range(2):  # the epoch's draws (and in device mode the extra images) are copied at the first batch
            next(batches)
        syncs, seconds = count_syncs(lambda: [next(batches) for _ in range(sc.loader_batches)], device)
        mapped, used = extra.memory_mapped, loader.feed.mode
    row.images_s = sc.batch * sc.loader_batches / seconds
    row.implied = f"{EPOCH_IMAGES / row.images_s:.2f} s / 50k images"
    row.sync = f"{syncs / sc.loader_batches:g} per batch"
    row.failed = cuda and used != mode
    placed = f"{'pass' if used == mode else 'FAIL'}: {used} mode" if cuda else f"n/a (CPU: {used} mode)"
    row.check = f"{placed}; {keeps_up(row.images_s, sc)}"
    row.notes = (f"batch {sc.batch}, {100 * EXTRA_FRACTION:.0f}% of it from {sc.loader_extra} extra images "
                 f"({'memory-mapped' if mapped else 'in memory'}), crop+flip; {sc.loader_batches} batches")
    if mode == "pinned":
        row.decides = (f"whether extra data too large for the GPU (pinned host memory, non-blocking copies) feeds "
                       f"the training step: it keeps up at >= {KEEP_UP:g}x the fastest train row's images/s; "
                       f"below that, gathering the next batch needs a thread of its own")
    return row


def keeps_up(images_s: float, sc: Scale) -> str:
    """The loader's images/s against the fastest eager train row's (what it has to feed)."""
    if not TRAIN_RATE:
        return "no train row ran to compare with"
    (name, precision), step = max(TRAIN_RATE.items(), key=lambda kv: kv[1])
    ratio = images_s / step
    verdict = "n/a (dry run)" if sc.dry else "keeps up" if ratio >= KEEP_UP else "TOO SLOW"
    return (f"{verdict}: {ratio:.1f}x the fastest train step ({name} {precision}, {rate(step)} images/s; "
            f">= {KEEP_UP:g}x)")


# --------------------------------------------------------------------------- validation and recalibration
def epoch_overhead_row(name: str, sc: Scale, device: torch.device, budget: Budget) -> Row:
    """``Trainer.validate`` (PGD-20 on ``sc.val_n`` held-out images at the device's evaluation batch)
    and one BatchNorm recalibration of the EMA model over ``sc.epoch_images`` training images (what
    every epoch of a run with an average costs besides training), as shares of the ARoW training
    epoch measured by the train row of ``name`` in bf16 (or here, if that row did not run)."""
    row = Row("epoch overhead (validation + BN recalibration)", name, "train bf16, validate float32", "off")
    steps = math.ceil(sc.epoch_images / sc.batch)
    trainer = arow_trainer(name, sc, device, "bf16", steps=steps, val_data=synthetic(sc.val_n, sc, seed=1),
                           ema=EMA_DECAY)
    batch = default_eval_batch(device)
    held_out = trainer.val_data
    trainer.val_data = held_out.subset(batch)
    trainer.validate()  # kernels loaded, the evaluation batch's shapes run once
    trainer.val_data = held_out
    with Stopwatch(device) as t:
        trainer.validate()
    validate_s = t.seconds
    ema = trainer.ema
    ema.update(trainer.model)
    ema.recalibrate(itertools.islice(trainer.loader, 2), amp=trainer.amp)  # the averaged model's shapes, once
    with Stopwatch(device) as t:
        ema.recalibrate(trainer.loader, amp=trainer.amp)  # as Trainer._validate_epoch does
    recal_s = t.seconds
    train_rate, source = train_rate_of(name, trainer, sc)
    epoch_s = EPOCH_IMAGES / train_rate
    val, recal = validate_s / epoch_s, recal_s / epoch_s
    total = 2 * val + recal  # the trained and the averaged model validated, the average recalibrated
    row.images_s = len(trainer.train_data) / recal_s
    row.implied = (f"validate {validate_s:.2f} s ({100 * val:.1f}%), recalibrate {recal_s:.2f} s "
                   f"({100 * recal:.1f}%) of a {epoch_s:.1f} s epoch")
    verdict = "n/a (dry run)" if sc.dry else "cheap enough" if total <= OVERHEAD_SHARE else "MAKE CHEAPER"
    row.check = (f"{verdict}: {100 * total:.1f}% of an epoch with an average (2 validations + 1 recalibration; "
                 f"<= {100 * OVERHEAD_SHARE:.0f}%)")
    row.notes = (f"PGD-20 on {sc.val_n} images at eval batch {batch}; EMA recalibration over {steps} batches of "
                 f"{sc.batch} (images/s: the recalibration's); epoch: 50k images at {rate(train_rate)} images/s "
                 f"({source})")
    row.decides = (f"whether validation and BatchNorm recalibration need to get cheaper on a GPU: above "
                   f"{100 * OVERHEAD_SHARE:.0f}% of a training epoch, validate less often or at a larger evaluation "
                   f"batch (the recalibration stays a full pass: the saved best and final models keep its statistics)")
    return row


def train_rate_of(name: str, trainer: Trainer, sc: Scale) -> tuple[float, str]:
    """images/s of ``name``'s bf16 ARoW steps: the train row's, else measured on ``trainer`` now."""
    if (name, "bf16") in TRAIN_RATE:
        return TRAIN_RATE[(name, "bf16")], "its bf16 train row"
    run_steps(trainer, sc.warmup)
    n = min(sc.timed, 10)
    return sc.batch * n / run_steps(trainer, n), f"measured in this row, {n} steps: no bf16 train row ran"


# --------------------------------------------------------------------------- the checkpoint write
class WriteClock:
    """Wraps ``run.save_epoch`` (whichever thread calls it): when the write started and ended."""

    def __init__(self, run: RunDir) -> None:
        self.start = self.end = math.nan
        self.done = threading.Event()
        save = run.save_epoch

        def timed(*args: Any, **kwargs: Any) -> None:
            self.start = time.monotonic()
            try:
                save(*args, **kwargs)
            finally:
                self.end = time.monotonic()
                self.done.set()

        run.save_epoch = timed  # the instance's attribute: EpochSaves calls run.save_epoch

    @property
    def seconds(self) -> float:
        return self.end - self.start


def steps_rate(trainer: Trainer, chunk: int, more: Callable[[int], bool], seconds: float) -> tuple[float, int]:
    """images/s of training steps run ``chunk`` at a time (no host wait inside a chunk) while
    ``more(steps so far)`` holds and ``seconds`` last: at least one chunk. Returns (images/s, steps)."""
    n, spent = 0, 0.0
    while n == 0 or (more(n) and spent < seconds):
        spent += run_steps(trainer, chunk, epoch=3 + n)
        n += chunk
    return trainer.cfg.batch_size * n / spent, n


def checkpoint_row(sc: Scale, device: torch.device, budget: Budget) -> Row:
    """A WRN-34-10 run's epoch checkpoint (model, SGD momentum, EMA model) saved by ``EpochSaves`` in
    the foreground and in the background: the loop's wait (``state_dict`` included) for each, and the
    training step's images/s while the background write runs against without a write."""
    row = Row("checkpoint write, foreground vs background", "wrn-34-10", label("bf16", device), "off")
    trainer = arow_trainer("wrn-34-10", sc, device, "bf16", ema=EMA_DECAY)
    run_steps(trainer, sc.warmup)  # cuDNN autotuned; momentum buffers and the EMA model exist
    chunk = max(1, min(5, sc.timed))
    alone, _ = steps_rate(trainer, chunk, lambda n: n < sc.timed, 0.2 * budget.row_left())
    blocked, written = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for background in (False, True):
            run = RunDir(Path(tmp) / ("background" if background else "foreground"))
            run.path.mkdir()
            clock, saves = WriteClock(run), EpochSaves(run, background=background)
            try:
                with Stopwatch(device) as t:  # what on_epoch_end blocks the loop for
                    saves.save(trainer.state_dict(), None)
                blocked[background] = t.seconds
                if background:
                    during, steps = steps_rate(trainer, chunk, lambda n: not clock.done.is_set(),
                                               0.3 * budget.row_left())
                    outlasted = not clock.done.is_set()  # the row's time ran out first
            finally:
                saves.close()
            written[background] = clock.seconds
        size = run.file(RunDir.LAST).stat().st_size
    ratio = during / alone
    ok = blocked[True] < blocked[False] and ratio >= WRITE_SPEED
    row.images_s = during
    row.implied = f"{ratio:.2f}x the {rate(alone)} images/s without a write"
    verdict = "n/a (dry run)" if sc.dry else "keep on" if ok else "REVISIT"
    row.check = (f"{verdict}: loop blocked {blocked[False]:.2f} s foreground, {blocked[True]:.2f} s background; "
                 f"steps at {100 * ratio:.0f}% speed while writing (>= {100 * WRITE_SPEED:.0f}%)")
    row.notes = (f"{size / 1e6:.0f} MB checkpoint (model, momentum, EMA) to {tempfile.gettempdir()}; write "
                 f"{written[False]:.2f} s foreground, {written[True]:.2f} s background; {steps} steps timed while it "
                 f"ran, {chunk} at a time ({'it outlasted them' if outlasted else 'the last group may end after it'})")
    row.decides = (f"whether the background checkpoint write stays on by default on CUDA: it does if it blocks the "
                   f"loop for less time than the foreground write and the steps keep >= {100 * WRITE_SPEED:.0f}% of "
                   f"their images/s while it runs")
    return row
