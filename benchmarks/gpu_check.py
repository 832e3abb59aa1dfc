"""GPU check: one command, one table, at most 8 minutes on one H100.

    python benchmarks/gpu_check.py                        # on a CUDA machine (default budget 450 s)
    python benchmarks/gpu_check.py --json gpu-check.json  # also the rows as JSON
    python benchmarks/gpu_check.py --dry-run              # the same code on the CPU, tiny shapes, < 1 min
    python benchmarks/gpu_check.py --only compiled --models wrn-34-10 --budget 300   # one part again

Rows, in the order they run (the budget skips what no longer fits, and says so in the table):

- ``train``: ARoW training steps (K = 10, eps 8/255, crop+flip) through arow's own
  ``Trainer.train_epoch`` on ResNet-18, PreAct ResNet-18 and WRN-34-10 with CIFAR-shaped synthetic
  tensors (3x32x32, 10 classes; the machine needs no data files) at batch 128, in bf16 autocast
  and in float32 with TF32 (pinned on: ``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32``); images/s and the implied seconds per 50k-image epoch,
  beside the H100 targets. Each row also times a plain-PyTorch TRADES step written inline below
  (:func:`plain_trades_step`, not arow's code; the same passes, precision and memory format) and
  reports ours/plain, and runs one step with CUDA's sync debug mode set to ``"error"`` around the
  training step (forward, attack, backward, optimiser): "pass" means no host synchronisation.
  "peak GiB": ``torch.cuda.max_memory_allocated()`` over the timed steps (reset just before them,
  so the weights, optimiser state and data already there count): the headroom at batch 128.
- ``agreement``: the same ARoW steps in bf16 and in strict float32 (TF32 off) from the same
  weights and batches: per-step losses within 2% (relative).
- ``ddp``: one step with the model wrapped in DistributedDataParallel (world size 1, process
  group initialised in this process: NCCL on CUDA, gloo on the CPU) equals one step without DDP,
  bit for bit, with deterministic cuDNN kernels; a second run without DDP is the control.
- ``loader``: the extra-data loader (``MixedLoader``, 70% extra images from a memory-mapped
  ``.npz``) in images/s, and its host synchronisations per batch, with the extra images kept on the
  GPU and, as for a set too large for it, gathered into pinned host memory (``gpu_rows.py``).
- ``epoch-overhead`` and ``checkpoint`` (``gpu_rows.py``): what validation, BatchNorm recalibration
  and the epoch's checkpoint write cost the training loop on a GPU.
- ``autoattack``: arow's ``autoattack`` (standard: APGD-CE, APGD-T, FAB-T, Square 5000) on 256
  images with ResNet-18 in float32 (TF32 on), on a model whose predictions no attack can change
  (:class:`Unbreakable`), so every sub-attack runs its whole budget on every image: an upper bound
  on the time per image, projected to the 10k test set.
- ``eval-batch``: AutoAttack through the evaluation cascade at evaluation batch 100 (the CPU's
  default) and 500 (CUDA's) on 500 :class:`Unbreakable` images, iterations cut (NON-STANDARD; the
  throughput per iteration is compared): a cascade attack gets one evaluation batch per call.
- ``bf16-stem``: PGD-20 accuracy at eps 8/255 of one ResNet-18 (made robust by a short PGD-AT run on
  synthetic class patterns) with its input and first convolution in float32 and in bf16, from the
  same random starts: whether bf16 there weakens the attack.
- ``syncbn``: PyTorch's ``SyncBatchNorm`` against arow's ``GlobalBatchNorm`` in a train-mode forward
  and backward, process group of one: at world size 1 only the host-sync count means something
  (SyncBatchNorm runs plain BatchNorm; GlobalBatchNorm is sent through its all-reduces).
- ``attack-compile``: the training attack (PGD-K, bf16 autocast) on ResNet-18 at per-rank batch 16
  and 128, eager against ``torch.compile(mode="reduce-overhead")`` (CUDA graphs): whether capturing
  the attack pays where launches dominate.
- ``compiled``: the ``train`` rows with ``torch.compile`` (``--compile`` of arow), dynamo's caches
  reset before and after each row (``torch._dynamo.reset()``); reports the graphs, the compilations
  of each frame (arow's model compiles three times by design: training, attack, clean target),
  those after the warm-up (a recompile in the timed steps: must be 0), graph breaks and fallbacks
  to eager.

Every timing warms up first with the shapes it then times (cuDNN autotuning stays outside the
timed loop) and sits between ``torch.cuda.synchronize()`` calls. Every row runs under its own time
limit (SIGALRM) inside ``--budget``; below the table, each row that settles a question says which
and with what threshold. ``--dry-run`` runs everything on the CPU with tiny models
(ResNet [1,1,1,1], PreAct ResNet [1,1,1,1], WRN-10-1; 8x8 images; batch 4; K = 2; 1 step each),
``torch.compile`` with the ``eager`` backend and a NON-STANDARD AutoAttack budget; on the CPU the
host-sync column counts host-syncing operators with a dispatch mode instead. Exit status: 0 if
no check failed (targets are reported, not enforced; rows skipped or timed out are listed as
such), 1 if one failed or a row raised an error, 2 for bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_base, train_step, also when imported from elsewhere

from gpu_base import (ATTACK_BATCHES, CLASSES, DRY, EPOCH_IMAGES, EPS, FULL, KINDS, START, TRAIN_RATE,  # noqa: E402,F401
                      Budget, HostSyncOps, Recorder, Row, RowTimeout, Scale, arow_trainer, build, count_syncs, label,
                      markdown, peak_gib, rate, run_steps, synthetic)

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from arow.attacks import ce_loss, pgd  # noqa: E402
from arow.attacks.autoattack import AutoAttackSettings, get_autoattack, run_autoattack  # noqa: E402
from arow.distributed import GlobalBatchNorm, convert_sync_batchnorm  # noqa: E402
from arow.evaluation.cascade import evaluate as run_attacks, float32_kernels  # noqa: E402
from arow.threat import ThreatModel  # noqa: E402
from arow.runs.checkpoint import atomic_write_text  # noqa: E402
from arow.training.trainer import Trainer  # noqa: E402

from bench_timing import Stopwatch  # noqa: E402
from gpu_rows import checkpoint_row, epoch_overhead_row, loader_row  # noqa: E402
from train_step import FallbackLog, dynamo_counts, dynamo_report  # noqa: E402
from train_step import pinned_tf32 as tf32  # noqa: E402

Tensor = torch.Tensor

MODELS = ("resnet18", "preact-resnet18", "wrn-34-10")
PRECISIONS = ("bf16", "tf32", "fp32")  # bf16 autocast; float32 with TF32 on; float32 with TF32 off
AA_IMAGES = 10_000
#: the H100 targets: seconds per 50k-image ARoW epoch, and AutoAttack on the 10k test set
EPOCH_TARGET_S = {"resnet18": 6.0, "wrn-34-10": 60.0}
AA_TARGET_S = 300.0
AGREEMENT_TOLERANCE = 0.02  # bf16 vs float32 training loss, relative, per step
STEM_MARGIN = 0.01  # PGD-20 accuracy a bf16 stem may add (1 point) before it counts as weakening the attack
PLAIN: dict[tuple[str, str], float] = {}  # images/s of the plain TRADES step per (model, precision)



def _guarded(fn: Callable[..., Any], enter: Callable[[], Any], leave: Callable[[], Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        enter()
        try:
            return fn(*args, **kwargs)
        finally:
            leave()

    return call


def step_sync_verdict(trainer: Trainer, compiled: bool) -> tuple[str, bool, float]:
    """One training step with the step itself (``_forward_backward`` and the optimiser step, not
    the loader or the loop's once-every-20-steps loss check) watched for host synchronisation:
    CUDA's sync debug mode ``"error"`` on a GPU, :class:`HostSyncOps` on the CPU (eager only: a
    dispatch mode would change what dynamo traces). Returns ``(verdict, failed, seconds)``."""
    cuda = trainer.device.type == "cuda"
    if not cuda and compiled:
        return "n/a (CPU, compiled)", False, run_steps(trainer, 1, 1)
    counter = HostSyncOps()
    if cuda:
        enter, leave = (lambda: torch.cuda.set_sync_debug_mode("error")), (lambda: torch.cuda.set_sync_debug_mode(0))
    else:
        enter, leave = counter.__enter__, (lambda: counter.__exit__(None, None, None))
    trainer._forward_backward = _guarded(trainer._forward_backward, enter, leave)
    trainer.opt.step = _guarded(trainer.opt.step, enter, leave)
    try:
        seconds = run_steps(trainer, 1, 1)
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return f"FAIL: {str(e).splitlines()[0][:80]} at {arow_frame(e)}", True, math.nan
    finally:
        vars(trainer).pop("_forward_backward", None)
        vars(trainer.opt).pop("step", None)
    if counter.ops:
        return f"FAIL: {len(counter.ops)} ops ({', '.join(sorted(set(counter.ops)))})", True, seconds
    return ("pass (sync debug mode: error)" if cuda else "pass (0 syncing ops)"), False, seconds


def arow_frame(e: BaseException) -> str:
    """``file:line`` of the innermost frame of arow's code in ``e``'s traceback (where a sync was asked for)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(src)]
    return f"{Path(frames[-1].filename).relative_to(src)}:{frames[-1].lineno}" if frames else "?"


# --------------------------------------------------------------------------- the rows
def plain_trades_step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, k: int, bf16: bool) -> None:
    """The reference: one TRADES step (PGD-k on the KL from a 0.001 N(0, 1) start, then CE + 6 KL)
    written in plain PyTorch, not arow's code, with the passes of arow's step: the clean
    distribution once per batch, weights frozen during the attack, softmax/KL/CE in float32, no
    host read, no augmentation."""
    dev = x.device.type
    params = list(net.parameters())
    net.eval()
    for p in params:
        p.requires_grad_(False)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            p_clean = F.softmax(net(x).float(), dim=1)
        lo, hi = x - EPS, x + EPS
        x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(k):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(net(x_adv).float(), dim=1), p_clean, reduction="sum")
            (g,) = torch.autograd.grad(kl, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + EPS / 4 * g.sign(), lo), hi).clamp(0, 1)
    for p in params:
        p.requires_grad_(True)
    net.train()
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        logits, logits_adv = net(x).float(), net(x_adv).float()
        loss = F.cross_entropy(logits, y) + 6.0 * F.kl_div(F.log_softmax(logits_adv, dim=1),
                                                           F.softmax(logits, dim=1), reduction="batchmean")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed_steps(sc: Scale, probe_s: float, seconds: float) -> int:
    """How many steps to time: ``sc.timed``, fewer if one step (``probe_s``) would not fit ``seconds``."""
    if sc.timed <= 1 or not math.isfinite(probe_s):
        return max(sc.timed, 1)
    return max(1, min(sc.timed, int(seconds / max(probe_s, 1e-9))))


def time_plain(name: str, sc: Scale, device: torch.device, precision: str, seconds: float) -> float:
    """images/s of :func:`plain_trades_step` (channels-last like arow's model; cuDNN autotuning and a
    probe step before the timed ones, all on the same batch shape)."""
    torch.manual_seed(0)
    net = build(name, sc).to(device).to(memory_format=torch.channels_last)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, **fused)
    data = synthetic(sc.batch, sc).to(device)
    step = functools.partial(plain_trades_step, net, opt, data.x, data.y, sc.k, precision == "bf16")

    def timed(n: int) -> float:
        with Stopwatch(device) as t:
            for _ in range(n):
                step()
        return t.seconds

    timed(sc.warmup)
    n = timed_steps(sc, timed(1) if sc.timed > 1 else math.nan, seconds)
    return sc.batch * n / timed(n)


def train_row(name: str, precision: str, compiled: bool, sc: Scale, device: torch.device, budget: Budget) -> Row:
    """ARoW steps of arow's Trainer, its host-sync check, and the plain TRADES reference."""
    row = Row("ARoW train step", name, label(precision, device), "on" if compiled else "off")
    fallbacks = FallbackLog()
    logging.getLogger("torch._dynamo").addHandler(fallbacks)
    try:
        with tf32(precision != "fp32"):
            torch._dynamo.reset()
            before = dynamo_counts()
            trainer = arow_trainer(name, sc, device, precision, compile=compiled)
            warm_s = run_steps(trainer, sc.warmup)  # compilation and cuDNN autotuning, with the timed shapes
            warm = dynamo_counts()
            row.sync, row.failed, probe_s = step_sync_verdict(trainer, compiled)
            n = timed_steps(sc, probe_s, 0.4 * budget.row_left())
            seconds, row.peak_gib = peak_gib(device, lambda: run_steps(trainer, n, 2))
            row.images_s = sc.batch * n / seconds
            row.notes = f"warm-up {sc.warmup} step(s) {warm_s:.1f} s, {n} timed"
            if compiled:
                row.dynamo, bad = dynamo_report(before, warm, dynamo_counts(), fallbacks.count)
                row.failed |= bad
            else:  # what the epoch-overhead and loader rows compare with
                TRAIN_RATE[(name, precision)] = row.images_s
            del trainer
            key = (name, precision)  # eager, so the compiled rows reuse the eager rows' measurement
            if key not in PLAIN:
                PLAIN[key] = time_plain(name, sc, device, precision, 0.4 * budget.row_left())
            plain = PLAIN[key]
    finally:
        logging.getLogger("torch._dynamo").removeHandler(fallbacks)
        torch._dynamo.reset()
    epoch = EPOCH_IMAGES / row.images_s
    row.implied = f"{epoch:.1f} s / 50k epoch" if epoch < 600 else f"{epoch / 60:.1f} min / 50k epoch"
    row.plain = f"{rate(plain)} ({row.images_s / plain:.2f}x)"
    target = EPOCH_TARGET_S.get(name)
    if target is not None:
        row.target = f"<= {target:.0f} s: " + ("n/a (dry run)" if sc.dry else "met" if epoch <= target else "MISSED")
    return row


def agreement_row(sc: Scale, device: torch.device, budget: Budget) -> Row:
    """bf16 against strict float32 (TF32 off): the same weights, batches and steps, loss per step."""
    losses = {}
    for precision in ("bf16", "fp32"):
        with tf32(False):
            rec = Recorder()
            trainer = arow_trainer("resnet18", sc, device, precision, steps=sc.agree_steps, log_every=1,
                                   callbacks=[rec])
            run_steps(trainer, sc.agree_steps)
            losses[precision] = rec.losses
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["bf16"], losses["fp32"])]
    ok = len(rel) == sc.agree_steps and max(rel) <= AGREEMENT_TOLERANCE
    row = Row("bf16 vs float32 loss", "resnet18", "bf16 / float32, TF32 off", "off")
    verdict = "n/a (dry run: tiny model, batch 4)" if sc.dry else "pass" if ok else "FAIL"
    row.check = f"{verdict}: max rel. diff {100 * max(rel):.2f}% over {len(rel)} steps " \
                f"(<= {100 * AGREEMENT_TOLERANCE:.0f}%)"
    row.notes = "losses bf16 " + ", ".join(f"{v:.4f}" for v in losses["bf16"]) + "; float32 " + \
                ", ".join(f"{v:.4f}" for v in losses["fp32"])
    row.failed = not ok and not sc.dry
    return row


def _one_step_state(sc: Scale, device: torch.device, ddp: bool) -> dict[str, Tensor]:
    trainer = arow_trainer("resnet18", sc, device, "bf16", steps=1)
    if ddp:  # what arow.training.runtime.prepare_model does under torchrun
        ids = [device.index or 0] if device.type == "cuda" else None
        trainer.train_model = nn.parallel.DistributedDataParallel(trainer.train_model, device_ids=ids)
    old = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
           torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # after the Trainer set it
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an operator without a deterministic kernel: the control shows it
            run_steps(trainer, 1)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old[:2]
        torch.use_deterministic_algorithms(old[2], warn_only=old[3])
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def ddp_row(sc: Scale, device: torch.device, budget: Budget) -> Row:
    """One ARoW step under DDP with world size 1 against the same step without DDP."""
    cuda = device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    row = Row("DDP world size 1 = no DDP", "resnet18", "bf16", "off")
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0, world_size=1)
        try:
            plain, control, wrapped = (_one_step_state(sc, device, ddp) for ddp in (False, False, True))
        finally:
            dist.destroy_process_group()

    def diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[bool, float]:
        same = all(torch.equal(a[k], b[k]) for k in a)
        worst = max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()), default=0.0)
        return same, worst

    same, worst = diff(plain, wrapped)
    control_same, control_worst = diff(plain, control)
    row.check = ("pass: bit for bit" if same else
                 f"{'FAIL' if control_same else 'inconclusive'}: max |diff| {worst:.2g}")
    row.notes = f"{backend} process group in-process; one step; control run without DDP " + \
                ("equal" if control_same else f"differs by {control_worst:.2g} (nondeterministic kernels)")
    row.failed = not same and control_same
    return row


class Unbreakable(nn.Module):
    """``net``'s logits plus ``margin`` on the image's brightness class (``floor(10 * mean)``), which
    no L-inf perturbation of eps < 0.05 can change for :func:`brightness_images`: every image stays
    robust, so every AutoAttack sub-attack runs its whole budget on every image (the worst case for
    time), through the real network's forward and backward."""

    def __init__(self, net: nn.Module, margin: float = 1e3) -> None:
        super().__init__()
        self.net, self.margin = net, margin

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(x)
        c = (x.mean(dim=(1, 2, 3)) * CLASSES).floor().clamp(0, CLASSES - 1).long()
        return z + self.margin * F.one_hot(c, CLASSES).to(z.dtype)


def brightness_images(n: int, size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images whose mean is exactly the centre of their class's brightness band ((c + 0.5) / 10)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    noise = (torch.rand(n, 3, size, size, generator=g) - 0.5) * 0.04
    noise -= noise.mean(dim=(1, 2, 3), keepdim=True)
    return ((y.float() + 0.5) / CLASSES).view(-1, 1, 1, 1) + noise, y


def autoattack_row(sc: Scale, device: torch.device, budget: Budget) -> Row:
    """arow's AutoAttack on ``aa_n`` images, every one robust throughout; projected to 10k images."""
    row = Row("AutoAttack (standard)" if sc.aa_n_iter is None else "AutoAttack (NON-STANDARD budget)", "resnet18",
              label("tf32", device), "off")
    torch.manual_seed(0)
    model = Unbreakable(build("resnet18", sc)).to(device).eval()
    x, y = brightness_images(sc.aa_n, sc.size)
    x, y = x.to(device), y.to(device)
    settings = AutoAttackSettings(n_iter=sc.aa_n_iter, square_queries=sc.aa_queries)
    with tf32(True):
        warm_up = AutoAttackSettings(n_iter=2, square_queries=2)  # the same images, so the same batch shapes
        run_autoattack(model, x, y, EPS, settings=warm_up)
        with Stopwatch(device) as t:
            _, info = run_autoattack(model, x, y, EPS, settings=settings, timing=True)
        seconds = t.seconds
    robust = sc.aa_n - sum(info["broken_by"].values())
    row.images_s = sc.aa_n / seconds
    projected = seconds * AA_IMAGES / sc.aa_n
    row.implied = f"{projected / 60:.1f} min / 10k images (all robust)"
    verdict = "n/a (dry run)" if sc.dry else "met" if projected <= AA_TARGET_S else \
        f"MISSED at 100% robust; about {projected / 120:.1f} min at 50%"
    row.target = f"<= {AA_TARGET_S / 60:.0f} min: {verdict}"
    row.check = f"{'pass' if robust == sc.aa_n else 'FAIL'}: {robust} of {sc.aa_n} robust to the end (the " \
                f"projection is an upper bound only if all are)"
    row.failed = robust != sc.aa_n
    row.notes = f"{sc.aa_n} images in {seconds:.1f} s: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in info["seconds_by"].items()) + "; time scales with the robust fraction"
    return row


# --------------------------------------------------------------------------- the GPU path's open questions
def eval_batch_row(sc: Scale, device: torch.device, budget: Budget) -> Row:
    """AutoAttack through the evaluation cascade at evaluation batch 100 and 500 (the CPU's and CUDA's
    defaults): a cascade attack gets at most one evaluation batch per call, so this is AutoAttack's
    own batch. :class:`Unbreakable` keeps every image robust (the whole budget runs on each); the
    iterations are cut (NON-STANDARD), the throughput per iteration is what is compared."""
    small, large = sc.eval_batches
    row = Row(f"AutoAttack at eval batch {small} vs {large}", "resnet18", label("fp32", device), "off")
    torch.manual_seed(0)
    model = Unbreakable(build("resnet18", sc)).to(device).eval()
    x, y = brightness_images(sc.eval_n, sc.size)
    x, y = x.to(device), y.to(device)
    n_iter, queries = (sc.aa_n_iter, sc.aa_queries) if sc.dry else (10, 100)
    rates, robust = {}, {}
    with float32_kernels(False):  # as the evaluation runs: strict float32, no cuDNN autotuning
        for b in (small, large):
            if not sc.dry:  # the same shapes once, kernels loaded
                run_attacks(model, x, y, ["clean", get_autoattack(EPS, n_iter=1, square_queries=1)], eps=EPS,
                            batch_size=b)
            atk = get_autoattack(EPS, n_iter=n_iter, square_queries=queries)
            with Stopwatch(device) as t:
                res = run_attacks(model, x, y, ["clean", atk], eps=EPS, batch_size=b)
            rates[b], robust[b] = sc.eval_n / t.seconds, int(res.correct[atk.name].sum())
    row.images_s = rates[large]
    row.implied = f"{rates[large] / rates[small]:.2f}x batch {small} ({rate(rates[small])} images/s)"
    row.check = f"{'pass' if robust[small] == robust[large] == sc.eval_n else 'FAIL'}: {robust[large]} and " \
                f"{robust[small]} of {sc.eval_n} robust to the end"
    row.failed = not robust[small] == robust[large] == sc.eval_n
    row.notes = f"NON-STANDARD budget ({n_iter} iterations, Square {queries} queries), {sc.eval_n} images"
    row.decides = (f"the CUDA default evaluation batch ({large}, arow.evaluation.cascade.EVAL_BATCH_SIZE_CUDA): kept "
                   f"if AutoAttack runs at least 1.1x faster at {large} than at {small}, else set back to {small}")
    return row


def prototype_images(n: int, sc: Scale, seed: int) -> tuple[Tensor, Tensor]:
    """A learnable CIFAR-shaped task: each class a fixed smooth pattern, under heavy noise."""
    protos = F.interpolate(torch.rand(CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(99)), size=sc.size,
                           mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return (0.4 * protos[y] + 0.6 * torch.rand(n, 3, sc.size, sc.size, generator=g)).clamp(0, 1), y


class BF16Conv(nn.Module):
    """``conv`` computed in bf16 (input, weight and bias rounded), its output back in float32."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        bias = c.bias.bfloat16() if c.bias is not None else None
        return F.conv2d(x.bfloat16(), c.weight.bfloat16(), bias, c.stride, c.padding, c.dilation, c.groups).float()


class BF16Stem(nn.Module):
    """``net`` with its input rounded to bf16 and its first convolution in bf16; the rest float32
    (``net`` itself is changed: its first convolution is replaced by a :class:`BF16Conv`)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        parent, name = next((m, k) for m in net.modules() for k, c in m.named_children() if isinstance(c, nn.Conv2d))
        setattr(parent, name, BF16Conv(getattr(parent, name)))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.bfloat16().float())


def bf16_stem_row(sc: Scale, device: torch.device, budget: Budget) -> Row:
    """PGD-20 accuracy at eps 8/255 of one model with the input and first convolution in float32 and
    in bf16, from the same random starts. The model is made robust enough to measure first: PGD-AT
    (PGD-3) for ``stem_train`` steps on a learnable synthetic task."""
    row = Row("bf16 vs float32 stem, PGD-20", "resnet18", "float32 / bf16 stem", "off")
    torch.manual_seed(0)
    net = build("resnet18", sc).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = prototype_images(sc.batch * 8, sc, seed=1)
    x, y = x.to(device), y.to(device)
    attack = ThreatModel(eps=EPS, steps=3)
    for step in range(sc.stem_train):
        j = torch.randint(0, len(x), (sc.batch,), device=device)
        x_adv = pgd(net, x[j], y[j], attack, ce_loss)
        net.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(net(x_adv).float(), y[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = prototype_images(sc.stem_n, sc, seed=2)
    xt, yt = xt.to(device), yt.to(device)
    with float32_kernels(False):
        fp32 = run_attacks(net, xt, yt, ["clean", "pgd20"], eps=EPS)
        bf16 = run_attacks(BF16Stem(net), xt, yt, ["clean", "pgd20"], eps=EPS)  # the same starts (seed 0)
    a32, a16 = fp32.accuracy["pgd20"], bf16.accuracy["pgd20"]
    differ = int((fp32.correct["pgd20"] != bf16.correct["pgd20"]).sum())
    meaningful = 0.1 <= a32 <= 0.9
    verdict = "n/a (dry run)" if sc.dry else "inconclusive" if not meaningful else \
        "bf16 stem weakens PGD" if a16 - a32 > STEM_MARGIN else "no difference beyond 1 point"
    row.check = f"{verdict}: PGD-20 {100 * a32:.1f}% float32, {100 * a16:.1f}% bf16 stem; {differ} verdicts differ"
    row.notes = (f"clean {100 * fp32.accuracy['clean']:.1f}% / {100 * bf16.accuracy['clean']:.1f}%; {sc.stem_n} images; "
                 f"model: {sc.stem_train} PGD-AT steps on synthetic patterns (needs PGD-20 in 10-90% to decide)")
    row.decides = ("whether bf16 autocast, which also runs the first convolution on bf16-rounded inputs (training's "
                   "attack on CUDA), weakens PGD at 8/255: if the bf16 stem raises PGD-20 accuracy by more than "
                   "1 point, keep the input and first convolution in float32 under autocast")
    return row


def _bn_step(net: nn.Module, x: Tensor, y: Tensor) -> None:
    F.cross_entropy(net(x).float(), y).backward()


def syncbn_row(sc: Scale, device: torch.device, budget: Budget) -> Row:
    """SyncBatchNorm against arow's GlobalBatchNorm in one train-mode forward and backward, in a
    process group of one. At world size 1 PyTorch's SyncBatchNorm runs plain BatchNorm, and
    GlobalBatchNorm is sent through its all-reduce path by reporting a world size of 2 to it (the
    all-reduces of one process change nothing): host syncs per step, and speed only as a hint."""
    cuda = device.type == "cuda"
    row = Row("SyncBatchNorm vs GlobalBatchNorm", "resnet18", label("fp32", device), "off")
    data = synthetic(sc.batch, sc).to(device)
    found: dict[str, tuple[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0,
                                world_size=1)
        try:
            for kind in ("GlobalBatchNorm", "SyncBatchNorm") if cuda else ("GlobalBatchNorm",):
                torch.manual_seed(0)
                net = build("resnet18", sc)
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if kind == "SyncBatchNorm" else \
                    convert_sync_batchnorm(net, torch.device("cpu"))  # the CPU's conversion: GlobalBatchNorm
                net = net.to(device).train()
                assert kind != "GlobalBatchNorm" or any(isinstance(m, GlobalBatchNorm) for m in net.modules())
                forced = mock.patch.object(dist, "get_world_size", lambda *a, **k: 2) if kind == "GlobalBatchNorm" \
                    else contextlib.nullcontext()
                with forced:
                    step = functools.partial(_bn_step, net, data.x, data.y)
                    step()  # warm-up
                    syncs, _ = count_syncs(step, device)
                    n = max(sc.timed, 1)
                    _, seconds = count_syncs(lambda: [step() for _ in range(n)], device)
                found[kind] = (syncs, sc.batch * n / seconds)
        finally:
            dist.destroy_process_group()
    row.images_s = found["GlobalBatchNorm"][1]
    row.sync = f"Global {found['GlobalBatchNorm'][0]}" + (f" / Sync {found['SyncBatchNorm'][0]}" if cuda else "") + \
        " per step"
    row.implied = f"SyncBatchNorm {rate(found['SyncBatchNorm'][1])} images/s" if cuda else \
        "SyncBatchNorm: n/a (refuses CPU tensors)"
    row.failed = found["GlobalBatchNorm"][0] > 0
    row.check = f"{'FAIL' if row.failed else 'pass'}: GlobalBatchNorm adds {found['GlobalBatchNorm'][0]} host syncs"
    row.notes = ("world size 1: shows the host-sync count only (SyncBatchNorm runs plain BatchNorm, GlobalBatchNorm's "
                 "all-reduces move nothing); their speeds compare only with >= 2 GPUs")
    row.decides = ("whether GlobalBatchNorm (the CPU/gloo conversion) could serve CUDA too: only if it adds no host "
                   "sync (this row) and is not slower than SyncBatchNorm with >= 2 GPUs (a multi-GPU run)")
    return row


def attack_compile_row(batch: int, sc: Scale, device: torch.device, budget: Budget) -> Row:
    """The training attack (PGD-K on cross-entropy, eval mode, frozen weights, bf16 autocast on CUDA)
    on ResNet-18 at per-rank batch ``batch``, eager against the model captured with
    ``torch.compile(mode="reduce-overhead")`` (inductor and CUDA graphs; the ``eager`` backend in a
    dry run). Compilation and graph capture happen in the warm-up, outside the timing."""
    row = Row(f"attack PGD-{sc.k}, batch {batch}", "resnet18", "bf16" if device.type == "cuda" else "float32 (CPU)",
              "reduce-overhead" if not sc.dry else "eager backend")
    torch.manual_seed(0)
    net = build("resnet18", sc).to(device).to(memory_format=torch.channels_last).eval()
    data = synthetic(batch, sc).to(device)
    threat = ThreatModel(eps=EPS, steps=sc.k)
    compiled = torch.compile(net, backend="eager") if sc.dry else torch.compile(net, mode="reduce-overhead")

    def attack(model: nn.Module) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pgd(model, data.x, data.y, threat, ce_loss)

    def timed(model: nn.Module, n: int) -> float:
        with Stopwatch(device) as t:
            for _ in range(n):
                attack(model)
        return t.seconds

    rates, warm = {}, {}
    for name, model in (("eager", net), ("compiled", compiled)):
        warm[name] = timed(model, sc.warmup)  # compilation, CUDA-graph capture, cuDNN autotuning
        n = timed_steps(sc, timed(model, 1), 0.3 * budget.row_left())
        rates[name] = batch * n / timed(model, n)
    row.images_s = rates["compiled"]
    row.implied = f"eager {rate(rates['eager'])} images/s: {rates['compiled'] / rates['eager']:.2f}x"
    row.notes = f"warm-up {warm['compiled']:.1f} s compiled, {warm['eager']:.1f} s eager; images/s of whole attacks"
    row.decides = (f"whether arow should capture the attack with CUDA graphs at small per-rank batches (many GPUs): "
                   f"worth an option if reduce-overhead is >= 1.2x eager at batch {sc.attack_batches[0]}")
    return row


# --------------------------------------------------------------------------- the run
def plan(models: list[str], precisions: list[str], compile_modes: list[bool], kinds: set[str],
         batches: tuple[int, ...] = ATTACK_BATCHES) -> list[tuple]:
    """The rows in the order they run: eager training and ResNet-18's epoch overhead, the checks, the
    loader and the checkpoint write, AutoAttack, the evaluation's and the attack's questions, compiled
    training, then WRN-34-10's epoch overhead if the budget allows."""
    rows: list[tuple] = []
    if "train" in kinds and False in compile_modes:
        rows += [("train", (m, p, False)) for m in models for p in precisions]
    overhead = [m for m in ("resnet18", "wrn-34-10") if m in models] if "epoch-overhead" in kinds else []
    rows += [("epoch-overhead", (m,)) for m in overhead if m == "resnet18"]
    rows += [(k, ()) for k in ("agreement", "ddp") if k in kinds]
    rows += [("loader", (mode,)) for mode in ("device", "pinned") if "loader" in kinds]
    rows += [(k, ()) for k in ("checkpoint", "autoattack", "eval-batch", "bf16-stem", "syncbn") if k in kinds]
    if "attack-compile" in kinds:
        rows += [("attack-compile", (b,)) for b in batches]
    if "compiled" in kinds and True in compile_modes:  # the models with a target first
        ranked = sorted(models, key=lambda m: m not in EPOCH_TARGET_S)
        rows += [("compiled", (m, p, True)) for p in precisions for m in ranked]
    return rows + [("epoch-overhead", (m,)) for m in overhead if m != "resnet18"]


def run_row(kind: str, args: tuple, sc: Scale, device: torch.device, budget: Budget) -> Row:
    """One row under its time limit; a row that does not fit the budget left is listed as skipped,
    one that runs out of time or fails is listed with why."""
    fn = {"train": train_row, "compiled": train_row, "agreement": agreement_row, "ddp": ddp_row,
          "loader": loader_row, "autoattack": autoattack_row, "eval-batch": eval_batch_row, "bf16-stem": bf16_stem_row,
          "syncbn": syncbn_row, "attack-compile": attack_compile_row, "epoch-overhead": epoch_overhead_row,
          "checkpoint": checkpoint_row}[kind]
    name = " ".join([kind, *map(str, args)])  # its own cap and need if it has one (a larger model), else its kind's
    stub = Row("ARoW train step", args[0], label(args[1], device), "on" if args[2] else "off") \
        if kind in ("train", "compiled") else Row(name)
    left = budget.left()
    if left < sc.needs.get(name, sc.needs[kind]):
        stub.notes = f"skipped: {max(left, 0):.0f} s of the budget left"
        return stub
    limit = min(sc.caps.get(name, sc.caps[kind]), left)
    try:
        with budget.limit(limit):
            return fn(*args, sc, device, budget)
    except Exception as e:  # noqa: BLE001 - the row says what happened and the check goes on
        if budget.expired:
            stub.notes = f"timed out: {limit:.0f} s limit"
        else:
            stub.failed = True
            first = (str(e).strip().splitlines() or [""])[0][:120]
            stub.notes = f"error: {type(e).__name__}: {first}"
        return stub
    finally:
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def decisions(rows: list[Row]) -> str:
    """What the rows that settle a question decide, one line per question ("" if none does)."""
    lines = dict.fromkeys(f"- {r.what.split(',')[0]}: {r.decides}" for r in rows if r.decides)
    return "\nWhat these rows decide:\n" + "\n".join(lines) if lines else ""


def describe(device: torch.device, sc: Scale, budget: float) -> str:
    if device.type == "cuda":
        what = (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}")
    else:
        what = f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    mode = "DRY RUN (tiny models and shapes, CPU): checks that the script works, not the numbers; " if sc.dry else ""
    return (f"GPU check: {what}. {mode}ARoW K={sc.k}, eps 8/255, batch {sc.batch}, synthetic {sc.size}x{sc.size}x3 "
            f"images, {CLASSES} classes; budget {budget:.0f} s.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="run on the CPU with tiny shapes (< 1 min)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run, start-up included (450)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--precisions", default="bf16,tf32", help="comma-separated, of bf16, tf32 (float32 with TF32), "
                   "fp32 (TF32 off)")
    p.add_argument("--compile", default="off,on", help="torch.compile off, on, or off,on (default)")
    p.add_argument("--only", default=",".join(KINDS), help=f"comma-separated row kinds, of {', '.join(KINDS)}")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p


def parse(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str], list[str], list[bool], set[str]]:
    a = build_parser().parse_args(argv)
    split = lambda v: [s.strip() for s in v.split(",") if s.strip()]  # noqa: E731
    models, precisions, kinds = split(a.models), split(a.precisions), set(split(a.only))
    modes = split(a.compile)
    for name, values, allowed in (("--models", models, MODELS), ("--precisions", precisions, PRECISIONS),
                                  ("--compile", modes, ("off", "on")), ("--only", kinds, KINDS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"{name} takes a comma-separated list of {', '.join(allowed)}, got {bad or 'nothing'}")
    if not a.budget > 0:
        raise ValueError(f"--budget must be > 0 seconds, got {a.budget}")
    return a, models, precisions, [m == "on" for m in modes], kinds


def main(argv: Optional[list[str]] = None) -> int:
    try:
        a, models, precisions, modes, kinds = parse(argv)
        if not a.dry_run and not torch.cuda.is_available():
            raise ValueError("no CUDA device: run it on a GPU, or pass --dry-run to check the script on the CPU")
    except ValueError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    sc, device = (DRY, torch.device("cpu")) if a.dry_run else (FULL, torch.device("cuda", 0))
    if a.dry_run:
        torch.set_num_threads(1)  # tiny operators: one thread is faster, and kinder to a shared machine
    budget = Budget(a.budget)
    rows = []
    for kind, args in plan(models, precisions, modes, kinds, sc.attack_batches):
        rows.append(run_row(kind, args, sc, device, budget))
        what = " ".join([kind, *(map(str, args[:2]))])
        print(f"gpu_check: {what} done ({time.monotonic() - START:.0f} s)", file=sys.stderr, flush=True)
    failed = sum(r.failed for r in rows)
    skipped = sum(r.notes.startswith("skipped") for r in rows)
    late = sum(r.notes.startswith("timed out") for r in rows)
    print(describe(device, sc, a.budget))
    print(markdown(rows) + decisions(rows))
    print(f"{len(rows)} rows in {time.monotonic() - START:.0f} s: {failed} failed, {late} timed out, {skipped} "
          f"skipped for the budget. "
          f"images/s: ours = arow's Trainer, plain = the inline TRADES step with the same passes; the targets are "
          f"for one H100.")
    if a.json:
        atomic_write_text(json.dumps({"device": describe(device, sc, a.budget), "rows": [asdict(r) for r in rows]},
                                     indent=2) + "\n", a.json)
        print(f"written {a.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
