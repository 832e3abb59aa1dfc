"""Profile the embedded training recipe by operator: where one ARoW training step spends its time.

Builds the training the way ``arow train`` does (:func:`arow.config.plan.resolve_config`, then
:func:`arow.pipelines.train_run` and its :class:`arow.training.trainer.Trainer`), with the default config
(ARoW, small-cnn, Fashion-MNIST, batch 128, ``--amp auto``: bf16 autocast on CPUs with native
bf16) unless flags or ``--preset`` say otherwise. To run exactly ``--warmup`` + ``--steps``
steps it trains one epoch on the first ``(warmup + steps) x batch`` training images
(``limit_train``) with no validation split and no run folder; the learning-rate schedule is
therefore that of a 1-epoch run, which changes no timing. The Trainer's own loop runs unchanged;
a callback starts ``torch.profiler`` (CPU activity, and CUDA activity on a GPU; no shapes) after the
warm-up steps and stops it after the last one, then prints ``key_averages()`` sorted by self CPU
time (self CUDA time on a GPU). On a GPU every time mark (the warm-up steps, the start and the end
of the profile) waits for the device first (``torch.cuda.synchronize()``), so the seconds are the
GPU's, not the time the host took to queue the work, and the parts of the step below are the CUDA
kernel time inside each region.

For the summary the script (not the library) wraps, on the Trainer it was given, the method's
``attack`` and ``objective``, ``Trainer._forward_backward``, the optimiser's ``step`` and the
loader's iteration in ``torch.profiler.record_function`` regions (``arow::attack``,
``arow::train_forward``, ``arow::forward_backward``, ``arow::optimizer``, ``arow::data``); the
training backward is ``forward_backward - attack - train_forward``.

    python benchmarks/profile_epoch.py                                   # 5 warm-up + 40 profiled steps
    python benchmarks/profile_epoch.py --threads 1 --amp off --out profile-fp32.txt
    python benchmarks/profile_epoch.py --warmup 1 --steps 3 --threads 1  # smoke
    python benchmarks/profile_epoch.py --preset cifar10-resnet18 --device cuda --warmup 5 --steps 20
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_timing, also when imported from elsewhere

from bench_timing import now  # noqa: E402

from arow.distributed import resolve_device  # noqa: E402
from arow.training.callbacks import Callbacks  # noqa: E402
from arow.runs.checkpoint import atomic_write_text  # noqa: E402
from arow.config import resolve_config  # noqa: E402
from arow.pipelines import train_run  # noqa: E402

REGIONS = {"attack": "arow::attack", "train_forward": "arow::train_forward",
           "forward_backward": "arow::forward_backward", "optimizer": "arow::optimizer", "data": "arow::data"}


def labelled(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` inside a ``record_function(name)`` region."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


class LabelledLoader:
    """The Trainer's loader with each batch's production (shuffle, indexing, augmentation) in a region."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:  # set_epoch, epoch_counts, ...
        return getattr(self.inner, name)

    def __iter__(self):
        with record_function(REGIONS["data"]):
            it = iter(self.inner)
        while True:
            with record_function(REGIONS["data"]):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch


class ProfileSteps(Callbacks):
    """Labels the Trainer's parts, starts the profiler after ``warmup`` steps, stops it after ``steps`` more."""

    def __init__(self, prof: profile, warmup: int, steps: int, device: torch.device = torch.device("cpu")) -> None:
        self.prof, self.warmup, self.steps = prof, warmup, steps
        self.cuda = device.type == "cuda"
        self.device = device
        self.trainer: Any = None
        self.marks: list[float] = []  # perf_counter at the start of the epoch and after every warm-up step
        self.t0 = self.t1 = None

    def _now(self) -> float:
        """perf_counter once the device has finished what was queued (CUDA), else at once."""
        return now(self.device)

    def on_fit_start(self, trainer: Any) -> None:
        self.trainer = trainer
        m = trainer.method
        m.attack = labelled(m.attack, REGIONS["attack"])
        m.objective = labelled(m.objective, REGIONS["train_forward"])
        trainer._forward_backward = labelled(trainer._forward_backward, REGIONS["forward_backward"])
        trainer.opt.step = labelled(trainer.opt.step, REGIONS["optimizer"])
        trainer.loader = LabelledLoader(trainer.loader)

    def _start(self) -> None:
        self._now()
        self.prof.start()
        self.t0 = time.perf_counter()

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.marks.append(self._now())
        if self.warmup == 0:
            self._start()

    def on_step(self, step: int) -> None:
        # the warm-up marks wait for the device; inside the profiled steps only the last one does
        warm = step + 1 <= self.warmup
        self.marks.append(self._now() if warm else time.perf_counter())
        if step + 1 == self.warmup + self.steps and self.t1 is None:
            self.t1 = self._now()
            self.prof.stop()
        elif step + 1 == self.warmup:
            self._start()

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    def warmup_step_seconds(self) -> float | None:
        """Median unprofiled step time over the warm-up steps after the first (None with < 2)."""
        gaps = [b - a for a, b in zip(self.marks[1 : self.warmup], self.marks[2 : self.warmup + 1])]
        return statistics.median(gaps) if gaps else None


def profiler_settings(device: torch.device) -> tuple[list[ProfilerActivity], str]:
    """What the profile records on ``device`` and the operator table's default sort key: CPU
    activity by self CPU time, and on CUDA also CUDA activity, by self device (kernel) time.

    >>> activities, sort_by = profiler_settings(torch.device("cuda"))
    >>> ProfilerActivity.CUDA in activities, sort_by
    (True, 'self_device_time_total')
    """
    if device.type == "cuda":
        return [ProfilerActivity.CPU, ProfilerActivity.CUDA], "self_device_time_total"
    return [ProfilerActivity.CPU], "self_cpu_time_total"


def region_seconds(prof: profile, device_time: bool = False) -> dict[str, float]:
    """Inclusive seconds of each labelled region over the profiled steps: CPU time, or with
    ``device_time`` the CUDA kernel time of the operators inside the region."""
    attr = "device_time_total" if device_time else "cpu_time_total"
    found = {e.key: getattr(e, attr) / 1e6 for e in prof.key_averages() if e.key in REGIONS.values()}
    return {k: found.get(v, 0.0) for k, v in REGIONS.items()}


def summary(cb: ProfileSteps, batch: int) -> str:
    tr, n = cb.trainer, cb.steps
    total = cb.seconds
    r = region_seconds(cb.prof, device_time=cb.cuda)
    backward = max(r["forward_backward"] - r["attack"] - r["train_forward"], 0.0)
    parts = [("attack (method.attack: target forward + K attack steps)", r["attack"], "attack"),
             ("training forward + loss (method.objective)", r["train_forward"], "forward"),
             ("training backward (+ zero_grad)", backward, "backward"),
             ("optimizer (SGD step)", r["optimizer"], None),
             ("data + augmentation (loader)", r["data"], None)]
    rest = total - sum(s for _, s, _ in parts)
    parts.append(("rest of the loop (lr, metrics, finite-loss checks, callbacks, profiler)" if not cb.cuda else
                  "rest: the GPU idle or outside the regions (loop, metrics, launch gaps)", rest, None))
    cost = getattr(tr.method, "passes", None)
    share = {}
    if cost is not None:
        c = cost.for_steps(tr.threat.steps)
        share = {"attack": (c.target + 2 * c.attack) / c.cost, "forward": c.train / c.cost,
                 "backward": 2 * c.train / c.cost}
    lines = [(f"{n} profiled steps after {cb.warmup} warm-up step(s): {tr.cfg.method} / {tr.cfg.model} / "
              f"{tr.cfg.dataset}, batch {batch}, {tr.threat.steps} attack steps, amp {'bf16' if tr.amp else 'off'}, "
              f"{torch.get_num_threads()} CPU thread(s), channels_last {tr.cfg.channels_last}"),
             f"seconds per step {total / n:.3f} (profiled), images/s {batch * n / total:.0f}"]
    warm = cb.warmup_step_seconds()
    if warm is not None:
        lines[-1] += f"; unprofiled warm-up steps 2..{cb.warmup}: {warm:.3f} s/step, {batch / warm:.0f} images/s"
    unit = "GPU kernel seconds" if cb.cuda else "seconds"
    lines += ["", f"| part | {unit} | % of step time | cost model share |", "|---|---|---|---|"]
    for name, s, kind in parts:
        model_share = f"{100 * share[kind]:.0f}%" if kind in share else ""
        lines.append(f"| {name} | {s:.3f} | {100 * s / total:.1f}% | {model_share} |")
    if share:
        lines.append(f"cost model: {tr.cfg.method}'s passes per image (Passes.for_steps({tr.threat.steps}): "
                     f"{c.cost} forward-equivalents: attack = target forwards + 2 per attack step (forward + "
                     f"input-gradient backward), training = 1 forward + 2 for its weight backward per train forward)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=5, help="unprofiled training steps first (default 5)")
    p.add_argument("--steps", type=int, default=40, help="profiled training steps (default 40)")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16"), help="as arow train --amp")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    p.add_argument("--batch-size", type=int, help="training batch (default: the config's, 128)")
    p.add_argument("--method", help="training method (default: the config's, arow)")
    p.add_argument("--model", help="architecture (default: the config's, small-cnn)")
    p.add_argument("--preset", help="an arow preset as the base config (as arow train --preset)")
    p.add_argument("--device", default="cpu", help="device: cpu (default), cuda, cuda:N or auto; on CUDA the "
                   "profile records CUDA activity too and the parts are GPU kernel time")
    p.add_argument("--rows", type=int, default=25, help="rows of the operator table (default 25)")
    p.add_argument("--sort-by", help="key_averages().table sort key (default self_cpu_time_total, on CUDA "
                   "self_device_time_total)")
    p.add_argument("--out", help="also write the table and the summary to this file")
    a = p.parse_args(argv)
    if a.warmup < 0 or a.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = {"amp": a.amp, "batch_size": a.batch_size, "method": a.method, "model": a.model, "device": a.device}
    cfg = resolve_config({k: v for k, v in overrides.items() if v is not None}, preset=a.preset)
    n = (a.warmup + a.steps) * cfg.batch_size  # one epoch of exactly warmup + steps batches
    cfg = dataclasses.replace(cfg, out=None, epochs=1, limit_train=n, val_size=0, log_every=0, tensorboard=False,
                              swa_start=None, ema=None)
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        p.error(str(e).splitlines()[0])
    activities, sort_by = profiler_settings(device)
    prof = profile(activities=activities, record_shapes=False)
    cb = ProfileSteps(prof, a.warmup, a.steps, device)
    train_run(cfg, callbacks=[cb], plots=False)
    if cb.t1 is None:
        raise SystemExit(f"profile_epoch: the epoch had fewer than {a.warmup + a.steps} steps "
                         f"(training set smaller than {n} images?)")
    table = prof.key_averages().table(sort_by=a.sort_by or sort_by, row_limit=a.rows)
    text = f"{table}\n{summary(cb, cfg.batch_size)}\n"
    print(text, end="")
    if a.out:
        atomic_write_text(text, a.out)
        print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
