"""Training throughput: our training step against a reference-style baseline, side by side.

The library part of ``benchmarks/bench_train.py`` (the script holds the command line). Not part
of the ``arow`` package: it imports the package (the script puts ``src/`` on the path first, so
a checkout runs it without installation). For each (model, method) it times, in one run:

- OUR step: :meth:`arow.training.trainer.Trainer.train_epoch` itself (data on the device, batched
  augmentation, the attack's clean target computed once, no host synchronisation per step,
  bf16 autocast and fused SGD on CUDA, optional ``torch.compile``);
- the COMPARISON BASELINE, :func:`reference_style_step`: NOT arow's training, but a step written
  the way the ARoW/TRADES research code is: a per-sample ``Dataset`` (uint8 image -> crop/flip
  one image at a time -> float tensor) behind a ``DataLoader``, the clean softmax recomputed
  inside every attack step, ``model.eval()`` / ``model.train()`` toggles, three ``.item()``
  calls per step for logging, float32 eager.

Throughput is images per second; the achieved rate counts the USEFUL floating-point work of
the algorithm (each method class's ``passes``, :class:`arow.methods.Passes`: forward = 1x the
model's forward FLOPs, an attack step's input-gradient backward = 1x since the weights are
frozen, a training backward = 2x) for both columns, so their ratio is the speed-up; the
machine's peak is a large matrix multiply (float32 on the CPU, bf16 on CUDA), and each row's "% of
peak" divides by the matmul peak of its own precision: bf16, or on CUDA float32 with TF32 pinned
on or off for the whole run (``tf32=``; PyTorch's own default runs convolutions in TF32 but
matmuls not), measured with that same setting. PGD-20 time is measured on a fixed subset in the
evaluation's settings (strict float32, cuDNN autotuner off), after a warm-up on the timed batch
shapes. With ``compile=True`` dynamo's caches are reset before every timed configuration, and
each row reports its compilations; a row whose timed steps compiled again, or whose frames fell
back to eager, is marked FAILED (``Row.failed``): its number is not compiled code's.

>>> ours_cost("arow", steps=10), reference_style_cost("arow", steps=10)   # forward-equivalents per image
(27, 36)
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

from arow import distributed
from arow.attacks import get_attack
from arow.config.schema import TrainConfig
from arow.data import Loader, TensorData
from arow.evaluation.cascade import float32_kernels
from arow.methods import METHODS, Passes
from arow.models import MODELS, build_model, model_flops
from arow.training.runtime import use_amp
from arow.training.trainer import Trainer

from bench_timing import Stopwatch, now, sync

log = logging.getLogger(__name__)
Tensor = torch.Tensor


# --------------------------------------------------------------------------- pass accounting
def ours_cost(method: str, steps: int) -> int:
    """Forward-equivalents per image of our step: the ``passes`` the method class declares (the
    table in docs/performance.md; tests/test_passes.py counts them)."""
    passes = METHODS.get(method).passes
    if passes is None:
        raise ValueError(f"method {method!r} has no documented pass count: give its class a `passes` "
                         f"(arow.methods.Passes)")
    return passes.for_steps(steps).cost


def reference_style_cost(method: str, steps: int) -> int:
    """Forward-equivalents per image of :func:`reference_style_step`: its KL attacks (ARoW, TRADES)
    pay a clean forward in every attack step. (tests/passes.py's ``reference_cost`` is the same.)"""
    p = METHODS.get(method).passes
    return Passes(target=steps if method in ("arow", "trades") else 0, attack=p.attack * steps, train=p.train).cost


# --------------------------------------------------------------------------- settings that change the numbers
@contextlib.contextmanager
def pinned_tf32(on: bool) -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions pinned ``on`` or off, restored on exit (CUDA only;
    no effect on the CPU)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class FallbackLog(logging.Handler):
    """Counts dynamo's warnings that a frame hit the recompile limit (it then runs eagerly)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = str(record.msg)
        if "recompile_limit" in msg or "cache_size_limit" in msg or "hit config." in msg:
            self.count += 1


def dynamo_counts() -> dict[str, int]:
    """Since the last ``torch._dynamo.reset()``: frames (code objects) compiled, compilations (a
    recompile is a frame compiled again), graphs, graph breaks and frames that failed to compile."""
    from torch._dynamo import convert_frame
    from torch._dynamo.utils import counters

    per_frame = dict(getattr(convert_frame, "FRAME_COMPILE_COUNTER", {}))
    return {"frames": len(per_frame), "compiles": sum(per_frame.values()),
            "graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values()),
            "failed": counters["frames"]["total"] - counters["frames"]["ok"]}


def dynamo_report(before: dict[str, int], warm: dict[str, int], after: dict[str, int],
                  fallbacks: int) -> tuple[str, bool]:
    """The dynamo summary of a compiled run and whether it is suspect: a compilation after the
    warm-up (the timed steps ran something not compiled before), a frame that fell back to eager,
    or one that failed to compile. A frame that hits the recompile limit both logs the warning
    :class:`FallbackLog` counts and counts as a failed frame: one fallback, not two.

    >>> z = {"frames": 0, "compiles": 0, "graphs": 0, "breaks": 0, "failed": 0}
    >>> w = {"frames": 1, "compiles": 3, "graphs": 3, "breaks": 0, "failed": 0}
    >>> dynamo_report(z, w, w, 0)
    ('graphs 3, 3 compile(s) of 1 frame(s), 0 after warm-up, graph breaks 0, eager fallbacks 0', False)
    """
    later = after["compiles"] - warm["compiles"]
    eager = max(fallbacks, after["failed"] - before["failed"])
    text = (f"graphs {after['graphs'] - before['graphs']}, {after['compiles']} compile(s) of {after['frames']} "
            f"frame(s), {later} after warm-up, graph breaks {after['breaks'] - before['breaks']}, "
            f"eager fallbacks {eager}")
    return text, later > 0 or eager > 0


# --------------------------------------------------------------------------- the comparison baseline
class PerSampleData(torch.utils.data.Dataset):
    """Images stored as uint8 HWC arrays and augmented one at a time, as torchvision datasets are.

    Lighter than the reference's PIL round trip, so the reference column is, if anything, flattered.
    """

    def __init__(self, x_uint8: np.ndarray, y: np.ndarray, augment: str, pad: int = 4) -> None:
        self.x, self.y, self.augment, self.pad = x_uint8, y, augment, pad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.x[i]
        if "crop" in self.augment:
            h, w, p = img.shape[0], img.shape[1], self.pad
            padded = np.pad(img, ((p, p), (p, p), (0, 0)))
            top, left = np.random.randint(0, 2 * p + 1, size=2)
            img = padded[top : top + h, left : left + w]
        if "flip" in self.augment and np.random.rand() < 0.5:
            img = img[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0), int(self.y[i])


def _ls_ce(logits: Tensor, y: Tensor, smoothing: float) -> Tensor:
    logp = F.log_softmax(logits, dim=-1)
    return ((1 - smoothing) * -logp.gather(1, y[:, None]).squeeze(1) - smoothing * logp.mean(-1)).mean()


def _kl_rows(logits_adv: Tensor, logits_clean: Tensor) -> Tensor:
    adv, nat = F.softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1)
    return F.kl_div((adv + 1e-12).log(), nat, reduction="none").sum(dim=1)


def reference_style_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, method: str,
                         eps: float, steps: int) -> float:
    """The comparison baseline, not arow's training: one step the way the research code writes it
    (ARoW reference: PGD_Linf + ARoW_loss/TRADES_loss).

    Returns the logged loss (its ``.item()`` calls synchronise with the device every step).
    """
    step = eps / 4
    model.eval()
    x_adv = (x.detach() + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    kl_attack = method in ("arow", "trades")
    for _ in range(steps):
        x_adv.requires_grad_()
        out = model(x_adv)
        if kl_attack:  # the clean softmax is recomputed inside every step
            loss = F.kl_div(F.log_softmax(out, dim=1), F.softmax(model(x), dim=1), reduction="sum")
        else:
            loss = F.cross_entropy(out, y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    model.train()
    if method == "pgd-at":
        sup, reg = F.cross_entropy(model(x_adv), y), torch.zeros((), device=x.device)
    else:
        logits, logits_adv = model(x), model(x_adv)
        if method == "arow":
            p_y = F.softmax(logits_adv, dim=1).gather(1, y[:, None]).squeeze(1)
            sup, reg = _ls_ce(logits, y, 0.2), 7.0 * (_kl_rows(logits_adv, logits) * (1 - p_y)).mean()
        elif method == "trades":
            sup, reg = F.cross_entropy(logits, y), 6.0 * _kl_rows(logits_adv, logits).mean()
        elif method == "mart":
            p_adv = F.softmax(logits_adv, dim=1)
            others = p_adv.scatter(1, y[:, None], float("-inf")).max(1).values
            p_y = F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
            sup = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - others + 1e-12).mean()
            reg = 6.0 * (_kl_rows(logits_adv, logits) * (1 - p_y)).mean()
        else:
            raise ValueError(f"no reference-style step for method {method!r} (arow, trades, mart, pgd-at)")
    loss = sup + reg
    logged = (sup.item(), reg.item(), loss.item())  # the per-step logging of the reference code
    opt.zero_grad()
    loss.backward()
    opt.step()
    return logged[2]


#: the methods :func:`reference_style_step` implements
REFERENCE_METHODS = ("arow", "trades", "mart", "pgd-at")


# --------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class Shape:
    channels: int
    size: int
    eps: float
    augment: str
    train_images: int  # one epoch of the dataset this shape stands for


def shape_for(model: str) -> Shape:
    """small-cnn: Fashion-MNIST 1x28x28 (eps 0.1, flip); everything else CIFAR 3x32x32 (8/255, crop+flip)."""
    if model == "small-cnn":
        return Shape(1, 28, 0.1, "flip", 60_000)
    return Shape(3, 32, 8 / 255, "crop+flip", 50_000)


#: (batch, timed iterations, warm-up iterations, PGD-20 images) when the flags leave them unset
DEFAULTS = {
    "cpu": {"small-cnn": (128, 4, 1, 500), "resnet18": (4, 2, 1, 4), "wrn-34-10": (1, 1, 0, 0)},
    "cuda": {"small-cnn": (512, 50, 10, 10_000), "resnet18": (128, 30, 5, 2000), "wrn-34-10": (128, 10, 3, 500)},
}


def device_name(device: torch.device) -> str:
    """``NVIDIA H100 80GB HBM3`` or the CPU's model name, with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def matmul_peak(device: torch.device, n: Optional[int] = None, reps: int = 10,
                dtype: Optional[torch.dtype] = None) -> tuple[float, str]:
    """Best measured GFLOP/s of an n x n matrix multiply in ``dtype`` (default: float32 on the
    CPU, bf16 on CUDA).

    The best of ``reps``: on a machine shared with other jobs, the least disturbed one.
    """
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(reps):
        with Stopwatch(device) as t:
            a @ b
        best = min(best, t.seconds)
    what = f"{n}x{n} {str(dtype).replace('torch.', '')} matmul"
    if device.type == "cuda" and dtype == torch.float32:
        what += f" (TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
    return 2 * n**3 / best / 1e9, what


def synthetic_uint8(shape: Shape, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (N, H, W, C) and labels: timing does not depend on the pixels."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, shape.size, shape.size, shape.channels), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64))


def _build(model: str, shape: Shape, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model, num_classes=10, in_channels=shape.channels, image_size=shape.size)


def time_ours(model: str, method: str, batch: int, iters: int, warmup: int, steps: int, device: torch.device,
              *, compile: bool = False, amp: str = "auto", seed: int = 0) -> tuple[float, str, bool]:
    """Seconds for ``iters`` training steps of the Trainer (after ``warmup`` untimed ones), and with
    ``compile`` dynamo's summary (:func:`dynamo_report`; its caches are reset first, so every
    configuration compiles afresh instead of filling one cache until later rows run eagerly) and
    whether the timing failed: the timed steps compiled again or a frame fell back to eager
    (logged as an error at once)."""
    shape = shape_for(model)
    x, y = synthetic_uint8(shape, batch * max(iters, warmup), seed)
    data = TensorData(torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0), torch.from_numpy(y), 10)
    cfg = TrainConfig(method=method, epochs=2, batch_size=batch, eps=shape.eps, attack_steps=steps,
                      augment=shape.augment, device=str(device), amp=amp, compile=compile, seed=seed,
                      val_size=0, schedule="constant", lr=0.01)
    fallbacks = FallbackLog()
    if compile:
        torch._dynamo.reset()
        logging.getLogger("torch._dynamo").addHandler(fallbacks)
    try:
        before = dynamo_counts()
        trainer = Trainer(cfg, _build(model, shape, seed), data)
        if warmup:
            trainer.loader = Loader(trainer.train_data.subset(batch * warmup), batch, shuffle=True,
                                    augment=shape.augment, seed=seed, drop_last=True)
            trainer.train_epoch(0)
        warm = dynamo_counts()
        trainer.loader = Loader(trainer.train_data.subset(batch * iters), batch, shuffle=True, augment=shape.augment,
                                seed=seed, drop_last=True)
        sync(device)
        seconds = float(trainer.train_epoch(1)["seconds"])  # ends with the epoch's one host read
        summary, failed = dynamo_report(before, warm, dynamo_counts(), fallbacks.count) if compile else ("", False)
        if failed:
            summary = f"FAILED: the timed steps compiled again or ran eagerly ({summary})"
            log.error("%s / %s / batch %d / amp %s: %s", model, method, batch, amp, summary)
        return seconds, summary, failed
    finally:
        if compile:
            logging.getLogger("torch._dynamo").removeHandler(fallbacks)
            torch._dynamo.reset()


def time_reference(model: str, method: str, batch: int, iters: int, warmup: int, steps: int,
                   device: torch.device, *, seed: int = 0) -> float:
    """Seconds for ``iters`` steps of the baseline, :func:`reference_style_step`, data loading
    included (after ``warmup``)."""
    shape = shape_for(model)
    x, y = synthetic_uint8(shape, batch * (iters + warmup), seed)
    loader = torch.utils.data.DataLoader(PerSampleData(x, y, shape.augment), batch_size=batch, shuffle=True,
                                         num_workers=0, drop_last=True)  # the ARoW reference: num_workers=0
    net = _build(model, shape, seed).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the reference sets it too
    np.random.seed(seed)
    t0 = None
    for i, (xb, yb) in enumerate(loader):
        if i == warmup:
            t0 = now(device)
        reference_style_step(net, opt, xb.to(device), yb.to(device, non_blocking=True), method, shape.eps, steps)
    return now(device) - t0


def time_pgd20(model: str, n: int, device: torch.device, *, batch: int = 500, seed: int = 0) -> float:
    """Seconds for PGD-20 on ``n`` fixed images, all of them attacked, in the evaluation's settings:
    strict float32 with cuDNN's autotuner off (:func:`arow.evaluation.cascade.float32_kernels`, as
    ``arow eval`` pins them unless ``--tf32``), whatever the run pinned for training.

    The warm-up attacks the first batch and, if ``n`` is not a multiple of ``batch``, the last
    one: every batch shape the timed loop sees has run once before it (cuDNN's kernel choice,
    the allocator's blocks), so no first-call cost lands in the timed loop.
    """
    shape = shape_for(model)
    x, y = synthetic_uint8(shape, n, seed)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255.0).to(device)
    yt = torch.from_numpy(y).to(device)
    net = _build(model, shape, seed).to(device).eval()
    attack = get_attack("pgd20", shape.eps)
    with float32_kernels():
        for i in sorted({0, (n - 1) // batch * batch}):  # warm-up: the timed batch shapes
            attack(net, xt[i : i + batch], yt[i : i + batch])
        with Stopwatch(device) as t:
            for i in range(0, n, batch):
                attack(net, xt[i : i + batch], yt[i : i + batch])
    return t.seconds


# --------------------------------------------------------------------------- the run
@dataclass
class Row:
    model: str
    method: str
    batch: int
    steps: int
    ours_img_s: float
    ref_img_s: Optional[float]
    gflop_per_img: float  # useful work per image (the method's passes cost x forward FLOPs)
    ours_gflops: float
    ref_gflops: Optional[float]
    peak_fraction: float
    epoch_s: float  # est. one epoch of the dataset the shape stands for, at our rate
    ours_cost: int
    ref_cost: Optional[int]
    amp: str = "auto"  # our step's precision: off (float32) or bf16 autocast
    precision: str = "float32"  # bf16, float32, or on CUDA "float32 (TF32 on)" / "float32 (TF32 off)"
    dynamo: str = ""  # with compile: graphs, compilations (after the warm-up: must be 0), fallbacks
    failed: bool = False  # with compile: the timed steps compiled again or ran eagerly (``dynamo`` says which)


@dataclass
class BenchResult:
    device: str
    peak_gflops: float
    peak_what: str
    rows: list[Row]
    pgd20: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "peak_gflops": self.peak_gflops, "peak_what": self.peak_what,
                "rows": [asdict(r) for r in self.rows], "pgd20": self.pgd20, "meta": self.meta}

    @property
    def failed(self) -> list[Row]:
        """The compiled rows whose timed steps compiled again or ran eagerly."""
        return [r for r in self.rows if r.failed]

    def markdown(self) -> str:
        """The tables docs/performance.md shows."""
        f = lambda v, fmt: "n/a" if v is None else _num(v)  # noqa: E731
        head = ["model", "method", "precision", "batch", "K", "ours img/s", "reference img/s", "speed-up",
                "ours GFLOP/s", "reference GFLOP/s", "% of peak", "est. epoch (ours)", "passes ours/ref"]
        compiled = any(r.dynamo for r in self.rows)
        head += ["dynamo (compile)"] if compiled else []
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            speed = None if r.ref_img_s is None else r.ours_img_s / r.ref_img_s
            cells = [r.model, r.method, r.precision, str(r.batch), str(r.steps), f(r.ours_img_s, ".1f"), f(r.ref_img_s, ".1f"),
                     "n/a" if speed is None else f"{speed:.2f}x", f(r.ours_gflops, ".1f"), f(r.ref_gflops, ".1f"),
                     f"{100 * r.peak_fraction:.1f}%", _duration(r.epoch_s),
                     f"{r.ours_cost}/{'n/a' if r.ref_cost is None else r.ref_cost}"] + ([r.dynamo] if compiled else [])
            lines.append("| " + " | ".join(cells) + " |")
        peaks = "; ".join(f"{k} {v:.1f} GFLOP/s" for k, v in self.meta.get("peaks", {}).items())
        out = [f"Device: {self.device}; peak {self.peak_gflops:.1f} GFLOP/s ({self.peak_what})"
               + (f"; matmul peaks by precision: {peaks} (% of peak: against the row's own precision)" if peaks else "")
               + ".", "", *lines]
        if self.failed:
            out += ["", f"FAILED: {len(self.failed)} compiled row(s) compiled again or ran eagerly in their timed "
                        f"steps; their images/s are not compiled code's (the dynamo column says which)."]
        if self.meta.get("tf32"):
            out += ["", f"CUDA: TF32 pinned {self.meta['tf32']} for the whole run (float32 rows and their peak); "
                        f"PGD-20 runs as arow eval does (TF32 off, cuDNN autotuner off)."]
        if self.pgd20:
            out += ["", "| model | PGD-20 images | seconds | img/s |", "|---|---|---|---|"]
            out += [f"| {p['model']} | {p['n']} | {p['seconds']:.2f} | {_num(p['n'] / p['seconds'])} |"
                    for p in self.pgd20]
        return "\n".join(out)


def _num(v: float) -> str:
    """Three significant digits for small rates, one decimal for large ones."""
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def float32_label(device: torch.device, tf32_on: bool) -> str:
    """How a float32 row's precision is written: with the TF32 setting on CUDA, where it matters."""
    if device.type != "cuda":
        return "float32"
    return f"float32 (TF32 {'on' if tf32_on else 'off'})"


def _peaks(dev: torch.device, fp32: str) -> dict[str, float]:
    """The matmul peak of each precision a row can have, measured under the TF32 setting in force."""
    return {fp32: matmul_peak(dev, dtype=torch.float32)[0], "bf16": matmul_peak(dev, dtype=torch.bfloat16)[0]}


def _check_args(models: Sequence[str], methods: Sequence[str], steps: int, repeats: int, sizes: list[int],
                iters: Optional[int], threads: Optional[int], amp: str, tf32: str) -> list[str]:
    """One-line ValueErrors for bad arguments, before any timing; returns the precisions of ``amp``."""
    for m in models:
        MODELS.get(m)
    if steps < 0:
        raise ValueError(f"--attack-steps must be >= 0, got {steps}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    for name, v in [*(("--batch-size", b) for b in sizes), ("--iters", iters), ("--threads", threads)]:
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    for m in methods:
        ours_cost(m, steps)  # an unknown method, or one without `passes`, fails before any timing
    if tf32 not in ("on", "off"):
        raise ValueError(f"--tf32 takes on or off, got {tf32!r}")
    precisions = [p.strip() for p in amp.split(",") if p.strip()]
    if not precisions or any(p not in ("auto", "off", "bf16") for p in precisions):
        raise ValueError(f"--amp takes auto, off, bf16 or a comma-separated list of them, got {amp!r}")
    return precisions


def run(models: Sequence[str] = ("small-cnn", "resnet18", "wrn-34-10"), methods: Sequence[str] = ("arow", "trades"),
        *, device: str = "auto", batch_size: Union[int, Sequence[int], None] = None, iters: Optional[int] = None,
        warmup: Optional[int] = None, steps: int = 10, pgd_n: Optional[int] = None, reference: bool = True,
        compile: bool = False, amp: str = "auto", seed: int = 0, repeats: int = 1, threads: Optional[int] = None,
        tf32: str = "on", on_row: Optional[Callable[[str], None]] = None) -> BenchResult:
    """Measure every (model, method) pair; see the module docstring for what is timed.

    ``repeats`` > 1 alternates ours / reference that many times and keeps each one's best time
    (the fair summary on a machine shared with other jobs); ``threads`` sets
    ``torch.set_num_threads`` for the whole process first. Several ``batch_size`` values are timed
    side by side in the same alternation; without ``iters``, each runs the number of steps that
    gives the default batch's number of images. ``tf32`` (``"on"`` or ``"off"``) pins TF32 for
    float32 matmuls and convolutions on CUDA for the whole run, peaks included.

    >>> r = run(["small-cnn"], ["arow"], device="cpu", batch_size=4, iters=1, warmup=0, steps=1,
    ...         pgd_n=0)  # doctest: +SKIP
    """
    dev = distributed.resolve_device(device)
    sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size or [])
    precisions = _check_args(models, methods, steps, repeats, sizes, iters, threads, amp, tf32)
    if threads is not None:
        torch.set_num_threads(threads)
    fp32 = float32_label(dev, tf32 == "on")
    rows: list[Row] = []
    pgd: list[dict[str, Any]] = []
    with pinned_tf32(tf32 == "on"):
        peak, peak_what = matmul_peak(dev)
        peaks = _peaks(dev, fp32)
        for model in models:
            shape = shape_for(model)
            dflt = DEFAULTS[dev.type].get(model, DEFAULTS[dev.type]["resnet18"])
            wu = dflt[2] if warmup is None else warmup
            steps_of = {b: iters or max(1, round(dflt[0] * dflt[1] / b)) for b in sizes or [dflt[0]]}
            flops = model_flops(_build(model, shape, seed), (shape.channels, shape.size, shape.size))
            for method in methods:
                rows += _measure(model, method, steps_of, wu, steps, dev, precisions, fp32, flops, reference=reference,
                                 compile=compile, seed=seed, repeats=repeats, on_row=on_row)
            n = dflt[3] if pgd_n is None else pgd_n
            if n > 0:
                seconds = min(time_pgd20(model, n, dev, seed=seed) for _ in range(repeats))
                pgd.append({"model": model, "n": n, "seconds": seconds})
        peak = max(peak, matmul_peak(dev)[0])  # again at the end: each peak is the better of the two
        peaks = {k: max(v, peaks[k]) for k, v in _peaks(dev, fp32).items()}
    for r in rows:
        r.peak_fraction = r.ours_gflops / peaks[r.precision]
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "device_type": dev.type, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "compile": compile, "amp": amp, "steps": steps, "repeats": repeats, "peaks": peaks,
            "tf32": tf32 if dev.type == "cuda" else None}
    return BenchResult(device_name(dev), peak, peak_what, rows, pgd, meta)


def _measure(model: str, method: str, steps_of: dict[int, int], wu: int, steps: int, dev: torch.device,
             precisions: list[str], fp32: str, flops: int, *, reference: bool, compile: bool, seed: int, repeats: int,
             on_row: Optional[Callable[[str], None]]) -> list[Row]:
    """The rows of one (model, method): ours at every batch size and precision, beside the reference."""
    shape = shape_for(model)
    cost = ours_cost(method, steps)
    log.info("bench %s / %s: batch %s, %s step(s) timed, best of %d", model, method,
             ",".join(map(str, steps_of)), ",".join(map(str, steps_of.values())), repeats)
    t_ours: dict[tuple[int, str], list[float]] = {(b, p): [] for b in steps_of for p in precisions}
    summaries: dict[tuple[int, str], str] = {}
    failed: dict[tuple[int, str], bool] = {}  # any repeat failed: the row fails, with that repeat's summary
    t_ref: dict[int, list[float]] = {b: [] for b in steps_of}
    for _ in range(repeats):  # alternate, so every side sees the same background load
        for b, it in steps_of.items():
            for p in precisions:
                seconds, summary, bad = time_ours(model, method, b, it, wu, steps, dev, compile=compile, amp=p,
                                                  seed=seed)
                if bad or not failed.get((b, p)):
                    summaries[b, p], failed[b, p] = summary, bad
                t_ours[b, p].append(seconds)
            if reference and method in REFERENCE_METHODS:
                t_ref[b].append(time_reference(model, method, b, it, wu, steps, dev, seed=seed))
    gflop = cost * flops / 1e9
    rows = []
    for (b, p), times in t_ours.items():
        it = steps_of[b]
        ref = b * it / min(t_ref[b]) if t_ref[b] else None
        ours = b * it / min(times)
        prec = "bf16" if use_amp(p, dev) else fp32
        rows.append(Row(model, method, b, steps, ours, ref, gflop, ours * gflop, None if ref is None else ref * gflop,
                        0.0, shape.train_images / ours, cost,
                        reference_style_cost(method, steps) if ref is not None else None, p, prec, summaries[b, p],
                        failed[b, p]))
        if on_row is not None:
            on_row(f"{model} / {method} / batch {b} / {prec}: ours {ours:.1f} img/s"
                   + ("" if ref is None else f", reference {ref:.1f} img/s")
                   + (f"; dynamo: {summaries[b, p]}" if summaries[b, p] else ""))
    return rows
