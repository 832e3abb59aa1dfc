"""What the GPU check's rows share: its scales, its table, its time budget, the Trainer it times,
and the count of host synchronisations (``gpu_check.py`` runs the rows; ``gpu_rows.py`` holds the
training loop's rows; ``ddp_check.py`` reuses both).
"""
from __future__ import annotations

import contextlib
import functools
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from unittest import mock

START = time.monotonic()  # the budget counts from here: imports and CUDA start-up included

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_timing, also when imported from elsewhere

from arow.config.schema import TrainConfig  # noqa: E402
from arow.data import Loader, TensorData  # noqa: E402
from arow.models import PreActResNet, ResNet, build_model, wide_resnet  # noqa: E402
from arow.training.callbacks import Callbacks  # noqa: E402
from arow.training.trainer import Trainer  # noqa: E402

from bench_timing import Stopwatch  # noqa: E402

Tensor = torch.Tensor

EPS, CLASSES = 8 / 255, 10
EPOCH_IMAGES = 50_000
EXTRA_FRACTION = 0.7  # the generated-data recipes' share of extra images per batch
KINDS = ("train", "epoch-overhead", "agreement", "ddp", "loader", "checkpoint", "autoattack", "eval-batch", "bf16-stem",
         "syncbn", "attack-compile", "compiled")
ATTACK_BATCHES = (16, 128)  # per-rank batches of the attack-compile rows: 8 GPUs x 16, and one GPU's 128
TRAIN_RATE: dict[tuple[str, str], float] = {}  # images/s of the eager train rows per (model, precision)


@dataclass(frozen=True)
class Scale:
    """Shapes and step counts: :data:`FULL` on a GPU, :data:`DRY` for ``--dry-run``."""

    batch: int
    size: int
    k: int  # attack steps of the training attack
    warmup: int  # untimed steps before anything is measured (cuDNN autotuning, compilation)
    timed: int  # at most this many timed steps (fewer when the row's time limit is near)
    aa_n: int
    aa_n_iter: Optional[int]  # None: AutoAttack's standard budget
    aa_queries: Optional[int]
    loader_real: int
    loader_extra: int
    loader_batches: int
    agree_steps: int
    dry: bool
    caps: dict[str, float] = field(default_factory=dict)  # seconds each kind of row may take
    needs: dict[str, float] = field(default_factory=dict)  # seconds that must be left to start one
    attack_batches: tuple[int, ...] = ATTACK_BATCHES
    eval_n: int = 500  # images of the eval-batch rows (AutoAttack at evaluation batch 100 and 500)
    eval_batches: tuple[int, int] = (100, 500)
    stem_train: int = 150  # PGD-AT steps that make the bf16-stem row's model robust enough to measure
    stem_n: int = 1000  # test images of the bf16-stem row
    val_n: int = 1000  # held-out images validated per epoch (epoch-overhead rows)
    epoch_images: int = EPOCH_IMAGES  # images of the epoch the epoch-overhead rows recalibrate BatchNorm over


FULL = Scale(batch=128, size=32, k=10, warmup=3, timed=20, aa_n=256, aa_n_iter=None, aa_queries=None,
             loader_real=50_000, loader_extra=100_000, loader_batches=50, agree_steps=5, dry=False,
             caps={"train": 75, "epoch-overhead": 45, "agreement": 45, "ddp": 45, "loader": 30, "checkpoint": 60,
                   "autoattack": 150, "eval-batch": 60, "bf16-stem": 45, "syncbn": 30, "attack-compile": 90,
                   "compiled": 150, "epoch-overhead wrn-34-10": 120},
             needs={"train": 20, "epoch-overhead": 15, "agreement": 15, "ddp": 15, "loader": 10, "checkpoint": 25,
                    "autoattack": 60, "eval-batch": 30, "bf16-stem": 20, "syncbn": 10, "attack-compile": 45,
                    "compiled": 60, "epoch-overhead wrn-34-10": 60})
DRY = Scale(batch=4, size=8, k=2, warmup=1, timed=1, aa_n=8, aa_n_iter=2, aa_queries=5, loader_real=16,
            loader_extra=64, loader_batches=2, agree_steps=2, dry=True, caps={k: 60 for k in KINDS},
            needs={k: 0 for k in KINDS}, attack_batches=(4,), eval_n=8, eval_batches=(4, 8), stem_train=2,
            stem_n=8, val_n=8, epoch_images=16)


# --------------------------------------------------------------------------- the table
@dataclass
class Row:
    what: str
    model: str = "-"
    precision: str = "-"
    compile: str = "-"
    images_s: Optional[float] = None
    implied: str = ""  # seconds per 50k-image epoch, or the AutoAttack projection
    target: str = ""
    plain: str = ""  # plain TRADES images/s and ours / plain
    sync: str = ""  # host synchronisation inside the step: pass / FAIL / n/a
    dynamo: str = ""
    check: str = ""
    peak_gib: str = ""  # train rows: peak GPU memory of the timed steps, GiB ("-" on the CPU)
    notes: str = ""
    failed: bool = False
    decides: str = ""  # printed under the table: what the row's numbers settle

    def cells(self) -> list[str]:
        return [self.what, self.model, self.precision, self.compile, rate(self.images_s), self.implied, self.target,
                self.plain, self.sync, self.dynamo, self.check, self.peak_gib, self.notes]


def rate(images_s: Optional[float]) -> str:
    """images/s as the table writes it: whole numbers from 100 up, else three significant digits."""
    if images_s is None:
        return ""
    return f"{images_s:.0f}" if images_s >= 100 else f"{images_s:.3g}"


HEADER = ["row", "model", "precision", "compile", "images/s", "implied", "target (H100)", "plain TRADES (ours/plain)",
          "host syncs in step", "dynamo", "check", "peak GiB", "notes"]


def markdown(rows: list[Row], columns: Optional[list[str]] = None) -> str:
    """The one table: a Markdown table with padded columns (``columns`` of :data:`HEADER`; all by default)."""
    keep = [HEADER.index(c) for c in columns or HEADER]
    table = [[t[i] for i in keep] for t in [HEADER] + [r.cells() for r in rows]]
    widths = [max(len(t[i]) for t in table) for i in range(len(keep))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(t, widths)) + " |" for t in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# --------------------------------------------------------------------------- budget and settings
class RowTimeout(Exception):
    """A row ran past its time limit."""


class Budget:
    """The seconds left of ``--budget``, and a time limit per row (SIGALRM, main thread only)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.expired = seconds, False
        self.deadline = START + seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - START)

    @contextlib.contextmanager
    def limit(self, seconds: float) -> Iterator[float]:
        self.expired = False
        deadline = time.monotonic() + seconds
        self.deadline = deadline

        def expire(signum: int, frame: Any) -> None:
            self.expired = True
            signal.setitimer(signal.ITIMER_REAL, 2.0)  # again, should some code swallow the exception
            raise RowTimeout(f"over its {seconds:.0f} s limit")

        old = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
        try:
            yield seconds
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def row_left(self) -> float:
        """Seconds left to the current row."""
        return self.deadline - time.monotonic()


def amp_of(precision: str) -> str:
    return "bf16" if precision == "bf16" else "off"


def label(precision: str, device: torch.device) -> str:
    if device.type != "cuda" and precision != "bf16":
        return f"{precision} (CPU: float32)"
    return {"bf16": "bf16", "tf32": "float32, TF32 on", "fp32": "float32, TF32 off"}[precision]


# --------------------------------------------------------------------------- models and data
def build(name: str, sc: Scale) -> nn.Module:
    """The architecture ``name`` for CIFAR-shaped inputs; with ``--dry-run`` a tiny one of its family."""
    if not sc.dry:
        return build_model(name, num_classes=CLASSES, in_channels=3, image_size=sc.size)
    if name == "resnet18":
        return ResNet([1, 1, 1, 1], num_classes=CLASSES, in_channels=3)
    if name == "preact-resnet18":
        return PreActResNet([1, 1, 1, 1], num_classes=CLASSES, in_channels=3)
    return wide_resnet(10, 1, num_classes=CLASSES, in_channels=3, image_size=sc.size)


def synthetic(n: int, sc: Scale, seed: int = 0) -> TensorData:
    """``n`` random CIFAR-shaped images in [0, 1] and labels (timing does not depend on the pixels)."""
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.rand(n, 3, sc.size, sc.size, generator=g), torch.randint(0, CLASSES, (n,), generator=g),
                      CLASSES, check=False)


class Recorder(Callbacks):
    """Keeps the training loss of every step record (``log_every=1``)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_step_record(self, record: dict[str, Any]) -> None:
        self.losses.append(float(record["train_loss"]))


def arow_trainer(name: str, sc: Scale, device: torch.device, precision: str, *, compile: bool = False,
                 steps: int = 0, seed: int = 0, **changes: Any) -> Trainer:
    """arow's Trainer for ARoW on ``name`` with ``steps`` batches of synthetic data on ``device``.

    With ``--dry-run`` a compiled model uses dynamo's ``eager`` backend (no code generation on the CPU).
    ``val_data`` is the held-out split; ``model`` replaces the one built for ``name``.
    """
    callbacks, val_data, model = (changes.pop(k, None) for k in ("callbacks", "val_data", "model"))
    torch.manual_seed(seed)
    model = model if model is not None else build(name, sc)
    cfg = TrainConfig(method="arow", epochs=1, batch_size=sc.batch, eps=EPS, attack_steps=sc.k, augment="crop+flip",
                      device=str(device), amp=amp_of(precision), compile=compile, seed=seed, val_size=0,
                      schedule="constant", warmup_epochs=0, lr=0.01, **changes)
    data = synthetic(sc.batch * max(steps, sc.warmup + sc.timed + 1), sc, seed)
    eager = functools.partial(torch.compile, backend="eager")
    with mock.patch.object(torch, "compile", eager) if sc.dry and compile else contextlib.nullcontext():
        return Trainer(cfg, model, data, val_data, callbacks=callbacks)


def peak_gib(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, str]:
    """``fn()`` and the most GPU memory allocated while it ran, in GiB (what was allocated before
    counts: the peak is reset to it); "-" on the CPU."""
    if device.type != "cuda":
        return fn(), "-"
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    return out, f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}"


def run_steps(trainer: Trainer, n: int, epoch: int = 0) -> float:
    """Seconds for ``n`` training steps of the Trainer's own loop, full batches only, synchronised
    (the loop's own host reads, once at its end, included); under torchrun each rank its share of a
    global batch, in the batches' layout of the Trainer's own loader (channels-last on CUDA)."""
    if n < 1:
        return 0.0
    b, d = trainer.cfg.batch_size, trainer.dist
    layout = trainer.loader.memory_format
    trainer.loader = Loader(trainer.train_data.subset(b * n), b, shuffle=True, augment="crop+flip",
                            seed=trainer.cfg.seed, drop_last=True, rank=d.rank, world_size=d.world_size)
    trainer.loader.memory_format = layout
    with Stopwatch(trainer.device) as t:
        trainer.train_epoch(epoch)
    return t.seconds


# --------------------------------------------------------------------------- host synchronisation
class HostSyncOps:
    """Counts host-syncing aten operators with a dispatch mode (the CPU's stand-in for CUDA's sync
    debug mode): value reads (``.item()``, ``bool()``), ``nonzero``, ``masked_select``, ``unique``,
    ``equal``, indexing with a boolean mask, copies to the CPU."""

    READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_numpy", "argwhere", "masked_select",
             "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.ops: list[str] = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if outer.syncs(func, args, kwargs):
                    outer.ops.append(str(func))
                return func(*args, **kwargs)

        self.mode = Mode()

    def syncs(self, func: Any, args: tuple, kwargs: dict) -> bool:
        name = func._schema.name.split("::")[-1]
        if name in self.READS:
            return True
        if name in self.INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device")
            return isinstance(src, Tensor) and src.device.type != "cpu" and dst is not None \
                and torch.device(dst).type == "cpu"
        return False

    def __enter__(self) -> "HostSyncOps":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


def count_syncs(fn: Callable[[], Any], device: torch.device) -> tuple[int, float]:
    """Host synchronisations (CUDA's sync debug mode as warnings; :class:`HostSyncOps` on the CPU) and seconds."""
    with Stopwatch(device) as t:  # its own synchronisations fall outside the counting
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            n = sum("synchroniz" in str(w.message) for w in caught)
        else:
            with HostSyncOps() as counter:
                fn()
            n = len(counter.ops)
    return n, t.seconds
