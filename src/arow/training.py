"""One training loop for every method: the loop never asks which method it runs.

:func:`train` builds everything from a :class:`~arow.config.TrainConfig`; :class:`Trainer`
takes a model and data tensors you built yourself. The loop is DDP-ready: under torchrun
each rank trains on its slice of every global batch, only rank 0 writes, and metrics are
summed on the device and read once per epoch (no host synchronisation in the hot loop).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from . import __version__, distributed
from .attacks import get_attack
from .checkpoint import CheckpointError, plain_state_dict, rng_state, set_rng_state
from .config import ConfigError, TrainConfig
from .data import DATASETS, Loader, TensorData, load_dataset, train_val_split
from .evaluation import evaluate
from .methods import Method, build_method
from .models import build_model
from .rng import BatchRNG
from .runs import RunDir
from .swa import SWA
from .threat import ThreatModel

log = logging.getLogger(__name__)
Tensor = torch.Tensor
#: config keys a resumed run may change (how it runs, not what it computes; epochs extends a run)
RESUMABLE_CHANGES = TrainConfig.runtime_keys() | {"epochs"}
WEIGHT_BINS = 20  # histogram of ARoW's per-example weight, per epoch
NONFINITE_CHECK_EVERY = 20  # steps between reads of the device-side "first non-finite loss" record


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; the run stopped before saving anything from it."""


class Callbacks:
    """Hooks the CLI uses for progress bars; the library itself never prints."""

    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def on_step(self, step: int) -> None: ...
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...
    def on_validation_start(self) -> None: ...


@dataclass
class TrainResult:
    model: nn.Module  # the final model (SWA-averaged if SWA was on), eval mode
    history: list[dict[str, Any]]
    out: Optional[Path]
    best_epoch: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)


def lr_at(cfg: TrainConfig, t: float) -> float:
    """Learning rate at fractional epoch ``t`` (0-based) of the configured schedule."""
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        return cfg.lr * (t + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(t >= m for m in cfg.milestone_epochs())
    frac = (t - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return cfg.lr * max(1.0 - frac, 0.0)  # onecycle: linear decay after the warm-up


def threat_for(cfg: TrainConfig, method_name: str) -> ThreatModel:
    from .methods import METHODS

    eps = cfg.eps if cfg.eps is not None else DATASETS.get(cfg.dataset).eps
    steps = cfg.attack_steps if cfg.attack_steps is not None else METHODS.get(method_name).default_steps
    return ThreatModel(eps=eps, steps=steps, step=cfg.step_size)


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_003 + step & 0x7FFF_FFFF_FFFF


class Trainer:
    """Adversarial training of ``model`` on in-memory data with ``method``.

    >>> from arow.data import from_tensors
    >>> from arow.models import build_model
    >>> data = from_tensors(torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    >>> model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    >>> cfg = TrainConfig(epochs=1, batch_size=32, eps=0.1, attack_steps=2, val_size=0)
    >>> result = Trainer(cfg, model, data).fit()
    >>> len(result.history)
    1
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train_data: TensorData,
        val_data: Optional[TensorData] = None,
        *,
        method: Optional[Method] = None,
        model_spec: Optional[dict[str, Any]] = None,
        callbacks: Optional[Callbacks] = None,
        resume: bool = False,
    ) -> None:
        self.cfg = cfg.validate()
        self.dist = distributed.setup(cfg.device)
        self.device = distributed.resolve_device(cfg.device, self.dist.local_rank)
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                              f"number of processes {self.dist.world_size}")
        self.callbacks = callbacks or Callbacks()
        self.out = Path(cfg.out) if cfg.out else None
        self.run = RunDir(self.out) if self.out is not None else None
        self.model_spec = model_spec or {"name": type(model).__name__, "custom": True}
        self.threat = threat_for(cfg, cfg.method) if method is None else method.threat
        self.method = method or build_method(cfg.method, self.threat, **cfg.method_args)
        self.val_attack = get_attack(cfg.val_attack, self.threat.eps)  # a typo fails now, not after an epoch
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.train_data = train_data.to(self.device)
        self.val_data = val_data.to(self.device) if val_data is not None and len(val_data) else None
        aug = cfg.augment or "none"
        self.loader = Loader(self.train_data, cfg.batch_size, shuffle=True, augment=aug, seed=cfg.seed,
                             drop_last=False, rank=self.dist.rank, world_size=self.dist.world_size)

        self.model = model.to(self.device)
        channels_last = cfg.channels_last in ("on", "auto")  # measured: +9% on this CPU, standard on GPUs
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.sync_bn:  # global-batch BN statistics: N ranks train like one
            self.model = distributed.convert_sync_batchnorm(self.model, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                                   **_sgd_kernel(self.device))
        self.swa = SWA(self.model) if cfg.swa_start is not None else None
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.best: dict[str, Any] = {"val_pgd_acc": -1.0, "epoch": None}
        self._tb: Any = None  # TensorBoard SummaryWriter, created when the first epoch is written
        error = None
        if self.dist.is_main:  # only rank 0 touches the run folder; the others learn its verdict
            try:
                if cfg.tensorboard:
                    _require_tensorboard()  # fail now, not after the first epoch
                    if self.out is None:
                        raise ConfigError("--tensorboard needs a run folder (--out) to write DIR/tensorboard into")
                if self.out is not None:
                    self._prepare_out(resume)
            except ValueError as e:
                if not self.dist.enabled:
                    raise
                error = str(e)
        distributed.raise_together(error, ConfigError)  # and waits until rank 0 is done with the folder
        if resume:
            try:
                self._resume()
            except BaseException:
                if self.run is not None:
                    self.run.unlock()
                raise
            if self.dist.is_main and self.out is not None:
                self._write_config()
        self.train_model: nn.Module = self.model
        if cfg.compile:
            self.train_model = torch.compile(self.model)
        if self.dist.enabled:
            # Compile first, then wrap: attacks.unwrap() peels DDP off and the attack runs the
            # compiled module with no collective call inside its loop. With SyncBatchNorm the
            # BN buffers are identical on every rank, so DDP need not broadcast them each forward.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids,
                                                                   **_buffer_sync(not cfg.sync_bn))

    # ----------------------------------------------------------------- run folder
    def _prepare_out(self, resume: bool) -> None:
        assert self.run is not None
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a run folder")
        try:
            self.run.lock()
        except OSError as e:
            raise ConfigError(f"--out {self.out}: cannot write the run folder ({e.strerror or e})") from None
        try:
            if self.run.has_checkpoint() and not resume:
                raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it "
                                  f"or choose another --out (nothing is deleted)")
            if not resume:  # a resumed run rewrites it only once its checkpoint has been accepted
                # a run killed before its first checkpoint saved nothing: start its files afresh
                self.run.write_metrics([])
                self.run.clear_diverged()
                self._write_config()
        except BaseException:
            self.run.unlock()
            raise

    def _write_config(self) -> None:
        assert self.run is not None
        self.run.write_config(self._resolved_config())

    def _resolved_config(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        d["resolved"] = {"eps": self.threat.eps, "attack_steps": self.threat.steps,
                         "step_size": self.threat.step_size, "method_args": self.method.config,
                         "world_size": self.dist.world_size, "amp": "bf16" if self.amp else "off",
                         "device": str(self.device), "model_spec": self.model_spec, "version": __version__}
        return d

    def _resume(self) -> None:
        if self.run is None:
            raise ConfigError("--resume needs --out pointing at the run folder to continue")
        if not self.run.has_checkpoint():
            diverged = self.run.diverged()
            hint = (" (the run diverged in its first epoch: start it again without --resume, e.g. with a "
                    "smaller --lr)") if diverged else ""
            raise ConfigError(f"--resume: {self.run.file(RunDir.LAST)} does not exist (nothing to resume){hint}")
        ckpt = self.run.load_resume_state()
        path = Path(ckpt["path"])
        saved = ckpt.get("config", {})
        allowed = set(RESUMABLE_CHANGES)
        diverged = self.run.diverged()
        if diverged is not None:  # the documented exception: continue a diverged run with a smaller lr
            allowed.add("lr")
            if self.cfg.lr >= saved.get("lr", float("inf")):
                raise ConfigError(f"{self.out} stopped because training diverged ({diverged.get('reason')}); "
                                  f"resume it with a smaller --lr than {saved.get('lr')}")
        changed = sorted(k for k, v in self.cfg.to_dict().items()
                         if k not in allowed and k in saved and saved[k] != v)
        if changed:
            diffs = ", ".join(f"{k}: {saved[k]!r} -> {getattr(self.cfg, k)!r}" for k in changed)
            raise ConfigError(f"--resume would change the run in {self.out}: {diffs}; resume with its settings "
                              f"(only {', '.join(sorted(allowed))} may change) or start a new --out")
        done = int(ckpt["epoch"])
        if self.cfg.epochs < done:
            raise ConfigError(f"--resume --epochs {self.cfg.epochs}: {path} has already trained {done} epochs; "
                              f"--epochs must be at least {done}")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.swa is not None and ckpt.get("swa") is not None:
            self.swa.load_state_dict(ckpt["swa"])
        set_rng_state(ckpt["rng"])
        self.start_epoch = done
        self.history = ckpt.get("history", [])
        self.best = ckpt.get("best", self.best)
        if self.dist.is_main:  # drop lines of an epoch that did not reach last.pt before the crash
            self.run.write_metrics(self.history)
            if diverged is not None:
                self.run.clear_diverged()
        log.info("resumed %s at epoch %d", path, self.start_epoch)

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        return {"model": plain_state_dict(self.model), "optimizer": self.opt.state_dict(),
                "swa": self.swa.state_dict() if self.swa is not None else None, "rng": rng_state(),
                "epoch": epoch, "config": self.cfg.to_dict(), "model_spec": self.model_spec,
                "history": self.history, "best": self.best, "version": __version__,
                "threat": {"eps": self.threat.eps, "steps": self.threat.steps, "step": self.threat.step_size}}

    # ----------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            if self.run is not None:
                self.run.unlock()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.epochs):
            record = self.train_epoch(epoch)
            self._check_finite_weights(epoch)
            if self.swa is not None and epoch + 1 >= cfg.swa_start:
                self.swa.update(self.model)
            record.update(self.validate())
            if self.swa is not None and self.swa.n_averaged > 0 and self.val_data is not None:
                self.swa.recalibrate(self.loader, amp=self.amp)
                record.update({f"swa_{k}": v for k, v in self.validate(self.swa.model).items()})
            self.history.append(record)
            if self.dist.is_main and self.out is not None:
                self._write_epoch(record)
            self.callbacks.on_epoch_end(record)
        final = self.final_model()
        if self.dist.is_main and self.out is not None:
            ck = self.checkpoint(cfg.epochs)
            ck["model"] = plain_state_dict(final)
            ck["final_source"] = "swa" if self.swa is not None and self.swa.n_averaged else "last"
            self.run.save_final(ck)
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            _plot_run(self.out)
        distributed.barrier()
        return TrainResult(final.eval(), self.history, self.out, self.best.get("epoch"))

    def final_model(self) -> nn.Module:
        """The model a run reports: the SWA average (BatchNorm recomputed) if SWA ran, else the last."""
        if self.swa is not None and self.swa.n_averaged > 0:
            if not self.swa.calibrated:
                self.swa.recalibrate(self.loader, amp=self.amp)
            return self.swa.model
        return self.model

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, dev = self.cfg, self.device
        self.method.set_epoch(epoch, cfg.epochs)
        self.loader.set_epoch(epoch)
        steps = len(self.loader)
        self.callbacks.on_epoch_start(epoch, cfg.epochs, steps)
        self.train_model.train()
        # Metrics are summed on the device and read once per epoch: nothing in this loop waits
        # for the GPU (no .item(), no float(tensor), no host-to-device tensor creation).
        sums: dict[str, Tensor] = {}
        hist = torch.zeros(WEIGHT_BINS, device=dev)
        bins = torch.arange(WEIGHT_BINS, device=dev)
        count, lr_sum = 0, 0.0
        first_bad = torch.full((), -1, dtype=torch.long, device=dev)
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(self.loader):
            lr = lr_at(cfg, epoch + step / steps)
            lr_sum += lr
            for g in self.opt.param_groups:
                g["lr"] = lr
            rng = BatchRNG(_step_seed(cfg.seed, epoch, step), offset=self.dist.rank * len(x),
                           total=len(x) * self.dist.world_size)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
                out = self.method(self.train_model, x, y, rng=rng)
            # The first non-finite loss is recorded on the device and read every few steps (a read
            # per step would stall a GPU); nothing of an epoch is saved before its end, so the run
            # stops with every earlier checkpoint intact and names the exact step.
            bad = ~torch.isfinite(out.loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
            if (step + 1) % NONFINITE_CHECK_EVERY == 0 or step + 1 == steps:
                self._check_finite_loss(first_bad, epoch)
            self.opt.zero_grad(set_to_none=True)
            out.loss.backward()
            self.opt.step()
            self.method.after_step(self.model)
            n = len(x)
            count += n
            _acc(sums, "train_loss", out.loss.detach().float() * n)
            for k, v in out.parts.items():
                _acc(sums, f"train_{k}", v.detach().float() * n)
            if out.logits_clean is not None:
                _acc(sums, "train_clean_acc", (out.logits_clean.argmax(1) == y).sum().float())
            if out.logits_adv is not None:
                _acc(sums, "train_adv_acc", (out.logits_adv.argmax(1) == y).sum().float())
            if out.weight is not None:
                _acc(sums, "train_weight_mean", out.weight.detach().float().sum())
                b = (out.weight.detach().float() * WEIGHT_BINS).long().clamp_(0, WEIGHT_BINS - 1)
                hist += (b[:, None] == bins).sum(0)  # histc's bins, without its atomics
            self.callbacks.on_step(step)
        keys = sorted(sums)
        packed = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys] + list(hist)))
        totals = dict(zip(keys, packed[: len(keys)].tolist()))
        count *= self.dist.world_size  # the Loader gives every rank the same number of examples
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_sum / max(steps, 1)}  # mean over the epoch's steps
        record.update({k: v / count for k, v in totals.items()})
        if out.weight is not None:
            record["weight_hist"] = packed[len(keys):].tolist()
        record["seconds"] = time.perf_counter() - t0
        return record

    @torch.no_grad()
    def validate(self, model: Optional[nn.Module] = None) -> dict[str, float]:
        """Clean and PGD accuracy on the held-out split of the TRAINING data (never the test set)."""
        if self.val_data is None:
            return {}
        self.callbacks.on_validation_start()
        with torch.enable_grad():
            res = evaluate(model or self.model, self.val_data.x, self.val_data.y,
                           ["clean", self.val_attack], eps=self.threat.eps,
                           num_classes=self.val_data.num_classes, seed=self.cfg.seed)
        return {"val_clean_acc": res.accuracy["clean"], "val_pgd_acc": res.accuracy[self.cfg.val_attack]}

    def _log_tensorboard(self, record: dict[str, Any]) -> None:
        """The scalars of metrics.jsonl, under the same names, to DIR/tensorboard (rank 0 only)."""
        assert self.out is not None
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        epoch = record["epoch"]
        for k, v in record.items():
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, epoch)
        self._tb.flush()  # a killed run keeps its curves

    def _check_finite_loss(self, first_bad: Tensor, epoch: int) -> None:
        found = distributed.all_reduce_sum((first_bad >= 0).float())  # every rank stops together
        if bool(found):
            step = int(first_bad)
            self._diverged(epoch, step if step >= 0 else None, "non-finite loss")

    def _check_finite_weights(self, epoch: int) -> None:
        flags = [torch.isfinite(p.detach()).all() for p in self.model.parameters()]
        if flags and not bool(torch.stack(flags).all()):
            self._diverged(epoch, None, "non-finite weights")

    def _diverged(self, epoch: int, step: Optional[int], reason: str) -> None:
        """Stop: nothing of this epoch is saved; every earlier checkpoint stays as it is."""
        where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
        last = None
        if self.run is not None and epoch > 0 and self.run.has_checkpoint():
            last = f"{self.run.file(RunDir.LAST)} (epoch {epoch})"
        if self.run is not None and self.dist.is_main:
            self.run.mark_diverged({"epoch": epoch + 1, "step": None if step is None else step + 1,
                                    "reason": reason, "lr": self.cfg.lr})
        resume = (f"; the last good checkpoint is {last}: continue it with --resume --out {self.out} "
                  f"and a smaller --lr" if last else "; no epoch had finished, so nothing was saved")
        raise TrainingDiverged(f"training diverged at {where} ({reason}){resume}")

    def _write_epoch(self, record: dict[str, Any]) -> None:
        assert self.run is not None
        epoch = record["epoch"]
        score = record.get("swa_val_pgd_acc", record.get("val_pgd_acc"))
        is_best = score is not None and math.isfinite(score) and score > self.best["val_pgd_acc"]
        if is_best:
            self.best = {"val_pgd_acc": score, "epoch": epoch}
        self.run.append_metrics(record)
        if self.cfg.tensorboard:
            self._log_tensorboard(record)
        ckpt = self.checkpoint(epoch)
        best = None
        if is_best:
            best = dict(ckpt)
            if "swa_val_pgd_acc" in record:
                best["model"] = plain_state_dict(self.swa.model)
        self.run.save_epoch(ckpt, best)


def _require_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError as e:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'arow[tensorboard]'") from e


def _plot_run(out: Path) -> None:
    """The run's PNGs; a plotting problem must never cost the trained model, so it only warns."""
    try:
        from .plots import plot_run

        paths = plot_run(out)
        log.info("plots in %s: %s", out, ", ".join(p.name for p in paths) or "none")
    except Exception as e:  # noqa: BLE001
        log.warning("could not draw the plots of %s (%s: %s); the run itself is saved. Retry with `arow plot %s`",
                    out, type(e).__name__, e, out)


def _buffer_sync(every_forward: bool) -> dict[str, bool]:
    """DDP's switch for broadcasting buffers from rank 0 before every forward (renamed in torch 2.13)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": every_forward}


def _sgd_kernel(device: torch.device) -> dict[str, bool]:
    """SGD's fused CUDA kernel (one launch for all parameters) where this PyTorch has it."""
    if device.type != "cuda":
        return {}
    import inspect

    fused = "fused" in inspect.signature(torch.optim.SGD).parameters
    return {"fused": True} if fused else {"foreach": True}


def _acc(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


def train(cfg: TrainConfig, *, callbacks: Optional[Callbacks] = None, resume: bool = False) -> TrainResult:
    """Train from a config alone: load the dataset, split off validation, build model and method.

    >>> result = train(TrainConfig(method="arow", epochs=1, limit_train=256))  # doctest: +SKIP
    """
    cfg.validate()
    info = DATASETS.get(cfg.dataset)
    cfg = dataclasses.replace(cfg, augment=cfg.augment or info.augmentation)
    data = load_dataset(cfg.dataset, root=cfg.data_dir, split="train")
    if cfg.limit_train is not None:
        data = data.subset(cfg.limit_train)
    val_size = min(cfg.val_size, len(data) // 5)
    train_data, val_data = train_val_split(data, val_size, seed=cfg.seed) if val_size > 0 else (data, None)
    spec = {"name": cfg.model, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size, "mean": None, "std": None, "dataset": cfg.dataset}
    if cfg.normalize:
        spec["mean"] = train_data.x.mean(dim=(0, 2, 3)).tolist()
        spec["std"] = train_data.x.std(dim=(0, 2, 3)).tolist()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                        image_size=spec["image_size"], mean=spec["mean"], std=spec["std"])
    trainer = Trainer(cfg, model, train_data, val_data, model_spec=spec, callbacks=callbacks, resume=resume)
    return trainer.fit()
