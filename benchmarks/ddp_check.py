"""DDP check: the training loop's questions that only several GPUs answer, one table on rank 0.

    torchrun --nproc-per-node=N benchmarks/ddp_check.py                  # N >= 2 GPUs of one machine
    torchrun --nproc-per-node=N benchmarks/ddp_check.py --json ddp-check.json
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/ddp_check.py --dry-run

ResNet-18, ARoW with K = 10 at eps 8/255, synthetic CIFAR-shaped tensors (the GPU check's shapes and
helpers, ``gpu_base.py`` and ``gpu_check.py``), global batch 128 (128/N per rank). Rows:

- ``ARoW step, SyncBatchNorm`` / ``GlobalBatchNorm``, compile off and on: ARoW steps through arow's
  own ``Trainer.train_epoch`` under DDP with the BatchNorm statistics of the global batch from
  PyTorch's ``SyncBatchNorm`` (what arow uses on CUDA) and from arow's ``GlobalBatchNorm`` (the
  CPU's conversion: two differentiable all-reduces per layer), eager and with arow's ``--compile``
  (the model compiled, then wrapped in DDP): global images/s after a warm-up with the timed shapes.
  Compiled rows add dynamo's counters (graphs, compilations, recompiles after the warm-up, graph
  breaks, eager fallbacks; a recompile or a fallback fails the row) and the graph breaks of one
  training forward (``torch._dynamo.explain`` of the model in train mode on one rank's batch).
- ``attack PGD-10, batch 128/N``: the training attack (bf16 autocast) at the per-rank batch, eager
  against ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), on every rank at once (the GPU
  check's attack-compile row; rank 0's numbers).

Each row starts on every rank together (a barrier); rank 0 prints the table and what each row
decides. ``--dry-run``: gloo on the CPU, the GPU check's tiny shapes (ResNet [1,1,1,1], 8x8 images,
global batch 4, K = 2, one timed step), ``torch.compile`` with the ``eager`` backend; SyncBatchNorm
refuses CPU tensors, so its rows are listed as skipped. A rank that stops inside a collective call
ends the others after the process group's timeout (300 s). Exit status: 0, 1 if a row failed or
raised an error, 2 for bad input (one line), also when not started by torchrun with >= 2 processes.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_base puts src/ on the path

import gpu_check  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from arow import distributed  # noqa: E402
from arow.runs.checkpoint import atomic_write_text  # noqa: E402

from arow.training.trainer import Trainer  # noqa: E402

from gpu_base import (DRY, EPOCH_IMAGES, FULL, START, Budget, Row, Scale, arow_trainer, build, label,  # noqa: E402
                      markdown, run_steps)
from train_step import FallbackLog, dynamo_counts, dynamo_report  # noqa: E402

NORMS = ("SyncBatchNorm", "GlobalBatchNorm")
TIMEOUT_S = 300  # the process group's: a rank stopped inside a collective call ends the others after it
COLUMNS = ["row", "model", "precision", "compile", "images/s", "implied", "dynamo", "check", "notes"]
COMPILE_GAIN = 1.1  # --compile pays under DDP at >= 1.1x eager
CAPTURE_GAIN = 1.2  # a captured attack is worth an option at >= 1.2x eager


def train_row(norm: str, compiled: bool, sc: Scale, device: torch.device) -> Row:
    """ARoW steps of arow's Trainer under DDP with ``norm`` as the model's BatchNorm layers."""
    world = dist.get_world_size()
    row = Row(f"ARoW step, {norm}", "resnet18", label("bf16", device), "on" if compiled else "off")
    if norm == "SyncBatchNorm" and device.type != "cuda":
        row.notes = "skipped: SyncBatchNorm refuses CPU tensors"
        return row
    torch.manual_seed(0)
    net, keep = build("resnet18", sc), contextlib.nullcontext()
    if norm == "GlobalBatchNorm":  # converted here (the CPU's conversion); the Trainer's CUDA conversion kept out
        net = distributed.convert_sync_batchnorm(net, torch.device("cpu"))
        keep = mock.patch.object(nn.SyncBatchNorm, "convert_sync_batchnorm", lambda module, *a, **k: module)
    fallbacks = FallbackLog()
    logging.getLogger("torch._dynamo").addHandler(fallbacks)
    try:
        torch._dynamo.reset()
        before = dynamo_counts()
        with keep:
            trainer = arow_trainer("resnet18", sc, device, "bf16", compile=compiled, model=net)
        found = {type(m).__name__ for m in trainer.model.modules()}
        if norm not in found:
            raise RuntimeError(f"the Trainer's model has no {norm} layer ({', '.join(sorted(found))})")
        dist.barrier()
        warm_s = run_steps(trainer, sc.warmup)
        warm = dynamo_counts()
        row.images_s = sc.batch * sc.timed / run_steps(trainer, sc.timed, 2)
        row.implied = f"{EPOCH_IMAGES / row.images_s:.1f} s / 50k epoch"
        row.notes = f"{world} ranks x batch {sc.batch // world}; warm-up {sc.warmup} step(s) {warm_s:.1f} s, " \
                    f"{sc.timed} timed; global images/s"
        if compiled:
            row.dynamo, row.failed = dynamo_report(before, warm, dynamo_counts(), fallbacks.count)
            row.check = f"graph breaks per training forward: {forward_breaks(trainer, sc, device)}"
    finally:
        logging.getLogger("torch._dynamo").removeHandler(fallbacks)
        torch._dynamo.reset()
    return row


def forward_breaks(trainer: Trainer, sc: Scale, device: torch.device) -> str:
    """The graph breaks dynamo finds in one training forward of the Trainer's model (train mode, one
    rank's batch, bf16 autocast on CUDA), with their reasons; every rank runs it (BatchNorm's
    collectives)."""
    x = trainer.train_data.x[: sc.batch // dist.get_world_size()]
    x = x.contiguous(memory_format=trainer.loader.memory_format or torch.contiguous_format)
    trainer.model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = torch._dynamo.explain(trainer.model)(x)
    reasons = sorted({str(r.reason).splitlines()[0][:60] for r in out.break_reasons})
    return f"{out.graph_break_count}" + (f" ({'; '.join(reasons[:3])})" if reasons else "")


def attack_row(sc: Scale, device: torch.device) -> Row:
    """The GPU check's attack-compile row at the per-rank batch, run on every rank at once."""
    batch = sc.batch // dist.get_world_size()
    dist.barrier()
    row = gpu_check.attack_compile_row(batch, sc, device, Budget(3600))
    row.decides = (f"whether arow should offer the attack captured with CUDA graphs at {dist.get_world_size()} GPUs' "
                   f"per-rank batch ({batch}): worth it at >= {CAPTURE_GAIN:g}x eager")
    return row


def compare(rows: dict[tuple[str, bool], Row], sc: Scale) -> None:
    """Each train row against its counterpart: GlobalBatchNorm against SyncBatchNorm, compiled against eager."""
    sync, glob = rows.get(("SyncBatchNorm", False)), rows.get(("GlobalBatchNorm", False))
    if sync and glob and sync.images_s and glob.images_s:
        r = glob.images_s / sync.images_s
        verdict = "n/a (dry run)" if sc.dry else "could replace SyncBatchNorm" if r >= 1.0 else "keep SyncBatchNorm"
        glob.check = f"{verdict}: {r:.2f}x SyncBatchNorm's images/s"
    for norm in NORMS:
        eager, comp = rows.get((norm, False)), rows.get((norm, True))
        if eager and comp and eager.images_s and comp.images_s:
            r = comp.images_s / eager.images_s
            verdict = "n/a (dry run)" if sc.dry else "compile pays" if r >= COMPILE_GAIN else "compile does not pay"
            comp.implied += f"; {r:.2f}x eager"
            comp.check = f"{verdict}; {comp.check}"
    for row in rows.values():
        row.decides = (f"which BatchNorm synchronisation CUDA runs use (GlobalBatchNorm only if at least as fast as "
                       f"SyncBatchNorm eager and with no more graph breaks compiled), and whether --compile pays under "
                       f"DDP (>= {COMPILE_GAIN:g}x eager, no recompiles, graph breaks per training forward: 0 keeps "
                       f"each forward one graph)")


def guarded(fn: Callable[[], Row], stub: Row) -> Row:
    """``fn()``, or ``stub`` saying why it failed (the check goes on with the next row)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the row says what happened
        stub.failed = True
        stub.notes = f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"
        return stub
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_rows(sc: Scale, device: torch.device) -> list[Row]:
    trains: dict[tuple[str, bool], Row] = {}
    for compiled in (False, True):
        for norm in NORMS:
            stub = Row(f"ARoW step, {norm}", "resnet18", label("bf16", device), "on" if compiled else "off")
            trains[(norm, compiled)] = guarded(lambda: train_row(norm, compiled, sc, device), stub)
            if distributed.info().is_main:
                print(f"ddp_check: {norm} compile {'on' if compiled else 'off'} done "
                      f"({time.monotonic() - START:.0f} s)", file=sys.stderr, flush=True)
    compare(trains, sc)
    attack = guarded(lambda: attack_row(sc, device), Row("attack, per-rank batch", "resnet18"))
    return [*trains.values(), attack]


def parse(argv: Optional[list[str]]) -> tuple[argparse.Namespace, int]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="gloo on the CPU, tiny shapes (2 processes: < 2 min)")
    p.add_argument("--json", help="also write the rows to this JSON file (rank 0)")
    a = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise ValueError("start it with torchrun --nproc-per-node=N (N >= 2), e.g. torchrun --nproc-per-node=2 "
                         "benchmarks/ddp_check.py")
    batch = (DRY if a.dry_run else FULL).batch
    if batch % world:
        raise ValueError(f"the global batch {batch} does not split over {world} processes")
    if not a.dry_run and not torch.cuda.is_available():
        raise ValueError("no CUDA device: run it on >= 2 GPUs, or pass --dry-run to check the script on the CPU")
    if not a.dry_run and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        raise ValueError(f"{os.environ.get('LOCAL_WORLD_SIZE', world)} processes on this machine, "
                         f"{torch.cuda.device_count()} GPU(s): one GPU per process")
    return a, world


def main(argv: Optional[list[str]] = None) -> int:
    try:
        a, world = parse(argv)
    except ValueError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ddp_check: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    sc = DRY if a.dry_run else FULL
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if a.dry_run else torch.device("cuda", local)
    if a.dry_run:
        torch.set_num_threads(1)
    else:
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if a.dry_run else "nccl", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        rows = run_rows(sc, device)
        failed = sum(r.failed for r in rows)
        if distributed.info().is_main:
            report(rows, sc, device, world, a.json)
        failed = distributed.broadcast_object(failed)  # rank 0's verdict: the same exit status everywhere
    finally:
        distributed.teardown()
    return 1 if failed else 0


def report(rows: list[Row], sc: Scale, device: torch.device, world: int, json_path: Optional[str]) -> None:
    """Rank 0's table, what its rows decide, and the JSON file if asked for."""
    cuda = device.type == "cuda"
    on = f"{world} x {torch.cuda.get_device_name(device)}, NCCL" if cuda else f"{world} CPU processes, gloo"
    mode = "DRY RUN (tiny models and shapes): checks that the script works, not the numbers; " if sc.dry else ""
    head = (f"DDP check: {on}, torch {torch.__version__}. {mode}ARoW K={sc.k}, eps 8/255, global batch {sc.batch} "
            f"({sc.batch // world} per rank), synthetic {sc.size}x{sc.size}x3 images.")
    print(head)
    print(markdown(rows, COLUMNS) + gpu_check.decisions(rows))
    failed, skipped = sum(r.failed for r in rows), sum(r.notes.startswith("skipped") for r in rows)
    print(f"{len(rows)} rows in {time.monotonic() - START:.0f} s: {failed} failed, {skipped} skipped. "
          f"images/s: global (all ranks), of arow's Trainer; rank 0's attack.")
    if json_path:
        atomic_write_text(json.dumps({"device": head, "rows": [asdict(r) for r in rows]}, indent=2) + "\n", json_path)
        print(f"written {json_path}")


if __name__ == "__main__":
    raise SystemExit(main())
