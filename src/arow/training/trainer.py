"""One training loop for every method: the loop never asks which method it runs.

:class:`Trainer` takes a model and data tensors; :func:`arow.pipelines.train_run` builds them
from a :class:`~arow.config.schema.TrainConfig`. The loop is DDP-ready: under torchrun each rank trains
on its slice of every global batch, only rank 0 writes (through callbacks), and metrics are
summed on the device and read once per epoch (no host synchronisation in the hot loop).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .. import __version__, distributed
from ..attacks import get_attack
from ..config.plan import ensure_resolved
from ..config.schema import ConfigError, TrainConfig
from ..data import TensorData, as_data
from ..data.extra import ExtraData, train_loader
from ..evaluation.cascade import evaluate, quiet_attack_lines
from ..modules import unwrap
from ..methods import Method, MethodOutput, build_method
from ..models.spec import ModelSpec
from ..rng import BatchRNG
from ..runs.checkpoint import CheckpointError, plain_state_dict, rng_state, set_rng_state
from ..runs.selection import reported_model, reported_prefix, selection_key
from ..threat import ThreatModel
from .averaging import EMA, SWA, short_ema_warning
from .callbacks import Callbacks, RunWriter, call_hook, callback_list
from .errors import TrainingDiverged
from .runtime import batch_memory_format, check_logits_once, eager_unless_full, prepare_model, use_amp

log = logging.getLogger(__name__)
Tensor = torch.Tensor
WEIGHT_BINS = 20  # histogram of ARoW's per-example weight, per epoch
NONFINITE_CHECK_EVERY = 20  # steps between reads of the device-side "first non-finite loss" record
#: an epoch's mean training loss above max(FLOOR, FACTOR x the first epoch's) stops the run ("exploded")
EXPLODED_LOSS_FLOOR = 1e4
EXPLODED_LOSS_FACTOR = 1000.0


@dataclass
class TrainResult:
    model: nn.Module  # the reported model (the SWA or EMA average if one ran, else the last epoch's), eval mode
    history: list[dict[str, Any]]
    out: Optional[Path]
    best_epoch: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)


def lr_at(cfg: TrainConfig, t: float) -> float:
    """Learning rate at fractional epoch ``t`` (0-based) of the configured schedule."""
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        return cfg.lr * min((t + 1e-3) / cfg.warmup_epochs, 1.0)  # never above the peak, however short
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(t >= m for m in cfg.milestone_epochs())
    frac = (t - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return cfg.lr * max(1.0 - frac, 0.0)  # onecycle: linear decay after the warm-up


def threat_for(cfg: TrainConfig) -> ThreatModel:
    """The training attack's threat model of a resolved config (:func:`arow.config.plan.resolve`)."""
    if cfg.eps is None:
        raise ConfigError(f"--eps is needed: {cfg.dataset!r} is not a known data set with a default eps")
    return ThreatModel(eps=cfg.eps, steps=cfg.attack_steps, step=cfg.step_size, norm=cfg.norm)


def _step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_003 + step & 0x7FFF_FFFF_FFFF


class Trainer:
    """Adversarial training of ``model`` on in-memory data with ``method``: the loop, its state and
    model selection. A Trainer writes nothing itself.

    The config is resolved here once unless it already is (:func:`plan_training`): for your own
    model and data it is named after them and needs an eps. Side effects (the run folder,
    TensorBoard, plots, progress bars) are callbacks (:mod:`arow.training.callbacks`) passed in
    ``callbacks``; :func:`arow.pipelines.build_trainer` adds the writers of ``cfg.out``'s run folder
    and continues a run (``resume``), :func:`arow.pipelines.train_run` also loads the data and builds
    the model. To continue from a state yourself: :meth:`load_state_dict`.

    ``train_data`` (and ``val_data``) is a :class:`~arow.data.TensorData`, or anything
    :func:`arow.data.as_data` reads, as :func:`arow.evaluate` does: a torch ``Dataset`` of
    ``(image, label)`` pairs or a ``DataLoader`` of ``(images, labels)`` batches, read ONCE into
    memory. The Trainer then batches (``cfg.batch_size``), shuffles and augments (``cfg.augment``)
    itself every epoch: a DataLoader's own batch size, sampler and random transforms apply to that
    one read only. The model's forward must return the logits alone (checked on the first batch).
    ``callbacks`` are any objects with some of the hooks of :class:`~arow.training.callbacks.Callbacks`.

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
        train_data: Any,
        val_data: Any = None,
        *,
        method: Optional[Method] = None,
        model_spec: Union[ModelSpec, Mapping[str, Any], None] = None,
        callbacks: Union[Callbacks, Sequence[Any], Any, None] = None,
        extra: Optional[ExtraData] = None,
    ) -> None:
        train_data, val_data = in_memory(train_data, "train_data"), in_memory(val_data, "val_data")
        self.cfg = cfg = plan_training(cfg, model, train_data, model_spec=model_spec, method=method)
        self.dist = distributed.setup(cfg.device)
        self.device = distributed.resolve_device(cfg.device, self.dist.local_rank)
        _check_batch(cfg, self.dist.world_size)
        self.model_spec = as_model_spec(model_spec, model)
        self.threat = threat_for(cfg) if method is None else method.threat
        self.method = method or build_method(cfg.method, self.threat, **cfg.method_args)
        self.val_attack = get_attack(cfg.val_attack, self.threat.eps, norm=self.threat.norm)  # a typo fails now
        self.amp = use_amp(cfg.amp, self.device)
        self.train_data = train_data.to(self.device)
        self.val_data = val_data.to(self.device) if val_data is not None and len(val_data) else None
        # a MixedLoader with --extra-data (arow.data.extra), else a Loader of the real data
        self.loader = train_loader(cfg, self.train_data, extra, rank=self.dist.rank, world_size=self.dist.world_size)
        self.model, self.train_model = prepare_model(model, cfg, self.device, self.dist)
        # channels-last batches on CUDA for arow's own models (a model of yours: with --channels-last on only)
        self.loader.memory_format = batch_memory_format(cfg, self.device, own_model=not self.model_spec.custom)
        self.opt = build_optimizer(self.model, cfg, self.device)
        self.swa = SWA(self.model) if cfg.swa_start is not None else None
        self.ema = EMA(self.model, cfg.ema, warmup=cfg.ema_warmup, bn=cfg.ema_bn) if cfg.ema is not None else None
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.global_step = 0  # optimiser steps taken since the run began (step records, TensorBoard)
        self.best: dict[str, Any] = {"val_pgd_acc": -1.0, "epoch": None}
        self.callbacks = callback_list(callbacks)
        self._logits_check: Optional[RemovableHandle] = None  # set by fit() until the first step
        if cfg.out and self.dist.is_main and not any(isinstance(cb, RunWriter) for cb in self.callbacks):
            log.warning("nothing is written to %s: a Trainer keeps no run folder itself "
                        "(arow.pipelines.build_trainer adds its writers)", cfg.out)

    # ----------------------------------------------------------------- state
    def resolved_config(self) -> dict[str, Any]:
        """The config plus what was derived from it (eps, steps, method arguments, runtime), as saved."""
        d = self.cfg.to_dict()
        d["resolved"] = {"norm": self.threat.norm, "eps": self.threat.eps, "attack_steps": self.threat.steps,
                         "step_size": self.threat.step_size, "method_args": self.method.config,
                         "world_size": self.dist.world_size, "amp": "bf16" if self.amp else "off",
                         "device": str(self.device), "model_spec": self.model_spec.to_dict(), "version": __version__}
        return d

    @property
    def epochs_done(self) -> int:
        return int(self.history[-1]["epoch"]) if self.history else self.start_epoch

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as plain values (loads with ``weights_only=True``)."""
        return {"model": plain_state_dict(self.model), "optimizer": self.opt.state_dict(),
                "swa": self.swa.state_dict() if self.swa is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None, "rng": rng_state(),
                "epoch": self.epochs_done, "config": self.cfg.to_dict(), "model_spec": self.model_spec.to_dict(),
                "history": self.history, "best": self.best, "global_step": self.global_step, "version": __version__,
                "threat": {"norm": self.threat.norm, "eps": self.threat.eps, "steps": self.threat.steps,
                           "step": self.threat.step_size}}

    def best_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with the weights model selection picked this epoch (the SWA/EMA model if it scored)."""
        best = dict(state)
        prefix = reported_prefix(self.history[-1] if self.history else {})
        if prefix:
            best["model"] = plain_state_dict(self._averages()[prefix[:-1]].model)
            best["model_source"] = prefix[:-1]
        return best

    def final_state_dict(self, final: nn.Module) -> dict[str, Any]:
        """:meth:`state_dict` with the weights of ``final`` (:meth:`final_model`) and which model it is."""
        state = self.state_dict()
        state["model"] = plain_state_dict(final)
        state["final_source"] = self.reported()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a :meth:`state_dict`, e.g. ``last.pt``)."""
        path = state.get("path", "checkpoint")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: does not fit this model ({str(e).splitlines()[0]})") from None
        self.opt.load_state_dict(state["optimizer"])
        if self.swa is not None and state.get("swa") is not None:
            self.swa.load_state_dict(state["swa"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        self.best = state.get("best", self.best)
        self.global_step = int(state.get("global_step", self.start_epoch * len(self.loader)))
        log.info("resumed %s at epoch %d", path, self.start_epoch)

    # ----------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train up to ``cfg.epochs``; returns the final model (SWA average if SWA ran) in eval mode."""
        error: Optional[BaseException] = None
        # the model's output is checked where its logits are first used (the first step), then unhooked
        self._logits_check = check_logits_once(unwrap(self.train_model))
        try:
            self._call_start()
            self._warn_short_ema()
            for epoch in range(self.start_epoch, self.cfg.epochs):
                record = self.train_epoch(epoch)
                self._check_finite_weights(epoch)
                self._check_loss_exploded(record, epoch)
                record.update(self._validate_epoch(epoch))
                self._select(record)
                self.history.append(record)
                call_hook(self.callbacks, "on_epoch_end", record)
            final = self.final_model()
            out = Path(self.cfg.out) if self.cfg.out else None
            result = TrainResult(final.eval(), self.history, out, self.best.get("epoch"))
            call_hook(self.callbacks, "on_fit_end", result)
            distributed.barrier()
            return result
        except BaseException as e:
            error = e
            raise
        finally:
            self._end_logits_check()
            feed = getattr(self.loader, "feed", None)  # extra data kept on the GPU: freed for what follows
            if feed is not None:
                feed.release()
            call_hook(self.callbacks, "close", error)

    def _end_logits_check(self) -> None:
        if self._logits_check is not None:
            self._logits_check.remove()
            self._logits_check = None

    def _warn_short_ema(self) -> None:
        """One warning when the EMA model would stay close to the initial weights (see
        :func:`~arow.training.averaging.short_ema_warning`)."""
        if self.ema is not None and self.dist.is_main and self.start_epoch < self.cfg.epochs:
            updates = self.ema.n_averaged + (self.cfg.epochs - self.start_epoch) * len(self.loader)
            warning = short_ema_warning(self.ema, updates)
            if warning:
                log.warning(warning)

    def _call_start(self) -> None:
        error = None
        try:
            call_hook(self.callbacks, "on_fit_start", self)
        except ValueError as e:
            if not self.dist.enabled:
                raise
            error = str(e)
        distributed.raise_together(error, ConfigError)  # and waits until rank 0 is done with the folder

    def _validate_epoch(self, epoch: int) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if self.swa is not None and epoch + 1 >= self.cfg.swa_start:
            self.swa.update(self.model)
        record.update(self.validate())
        for prefix, avg in self._averages().items():
            if avg.n_averaged > 0 and self.val_data is not None:
                avg.recalibrate(self.loader, amp=self.amp)
                scores = self.validate(avg.model, label=f"{prefix.upper()} model")
                record.update({f"{prefix}_{k}": v for k, v in scores.items()})
        return record

    def _select(self, record: dict[str, Any]) -> None:
        """Model selection on the held-out split: a higher finite robust accuracy is the new best."""
        score = record.get(selection_key(record))
        if score is not None and math.isfinite(score) and score > self.best["val_pgd_acc"]:
            self.best = {"val_pgd_acc": score, "epoch": record["epoch"]}

    def reported(self) -> str:
        """Which model the run reports (:func:`arow.runs.selection.reported_model`): ``"swa"`` if SWA
        ran, else ``"ema"`` if EMA is on, else ``"last"``."""
        return reported_model(name for name, avg in self._averages().items() if avg.n_averaged > 0)

    def final_model(self) -> nn.Module:
        """The model a run reports: the SWA or EMA average (BatchNorm recomputed) if one ran, else the last."""
        name = self.reported()
        if name == "last":
            return self.model
        avg = self._averages()[name]
        if not avg.calibrated:
            avg.recalibrate(self.loader, amp=self.amp)
        return avg.model

    def _averages(self) -> dict[str, SWA]:
        """The weight averages this run keeps, by name (``swa``, ``ema``)."""
        return {name: avg for name, avg in (("swa", self.swa), ("ema", self.ema)) if avg is not None}

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, dev = self.cfg, self.device
        self.method.set_epoch(epoch, cfg.epochs)
        self.loader.set_epoch(epoch)
        steps = len(self.loader)
        call_hook(self.callbacks, "on_epoch_start", epoch, cfg.epochs, steps)
        self.train_model.train()
        # Metrics are summed on the device and read once per epoch (and on --log-every steps):
        # nothing else in this loop waits for the GPU (no .item(), no float(tensor), no
        # host-to-device tensor creation).
        sums: dict[str, Tensor] = {}
        hist = torch.zeros(WEIGHT_BINS, device=dev)
        bins = torch.arange(WEIGHT_BINS, device=dev)
        count, lr_sum = 0, 0.0
        first_bad = torch.full((), -1, dtype=torch.long, device=dev)
        window: dict[str, Any] = {"count": 0, "totals": {}}  # sums at the previous step record (--log-every)
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(self.loader):
            lr = lr_at(cfg, epoch + step / steps)
            lr_sum += lr
            for g in self.opt.param_groups:
                g["lr"] = lr
            with eager_unless_full(cfg.compile, len(x), cfg.batch_size // self.dist.world_size):
                outs = self._forward_backward(x, y, _step_seed(cfg.seed, epoch, step))  # partial batch: eager
            self._end_logits_check()
            # The first non-finite loss is recorded on the device and read every few steps (a read
            # per step would stall a GPU); nothing of an epoch is saved before its end, so the run
            # stops with every earlier checkpoint intact and names the exact step.
            bad = ~torch.stack([torch.isfinite(o.loss.detach()) for o, _ in outs]).all()  # any micro-batch
            first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
            if (step + 1) % NONFINITE_CHECK_EVERY == 0 or step + 1 == steps:
                self._check_finite_loss(first_bad, epoch)
            self.opt.step()
            self.global_step += 1
            self.method.after_step(self.model)
            if self.ema is not None:
                self.ema.update(self.model)
            for out, ym in outs:  # per micro-batch (one unless --grad-accum)
                n = len(ym)
                count += n
                _acc(sums, "train_loss", out.loss.detach().float() * n)
                for k, v in out.parts.items():
                    _acc(sums, f"train_{k}", v.detach().float() * n)
                if out.logits_clean is not None:
                    _acc(sums, "train_clean_acc", (out.logits_clean.argmax(1) == ym).sum().float())
                if out.logits_adv is not None:
                    _acc(sums, "train_adv_acc", (out.logits_adv.argmax(1) == ym).sum().float())
                if out.weight is not None:
                    _acc(sums, "train_weight_mean", out.weight.detach().float().sum())
                    b = (out.weight.detach().float() * WEIGHT_BINS).long().clamp_(0, WEIGHT_BINS - 1)
                    hist += (b[:, None] == bins).sum(0)  # histc's bins, without its atomics
            if cfg.log_every and self.global_step % cfg.log_every == 0:  # device values read only here
                self._log_step(epoch + (step + 1) / steps, lr, sums, count, window)
            call_hook(self.callbacks, "on_step", step)
        keys = sorted(sums)
        packed = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys] + list(hist)))
        totals = dict(zip(keys, packed[: len(keys)].tolist()))
        count *= self.dist.world_size  # the Loader gives every rank the same number of examples
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_sum / max(steps, 1)}  # mean over the epoch's steps
        record.update({k: v / count for k, v in totals.items()})
        if record.get("train_kl"):  # ARoW: E[w KL] / E[KL] over the epoch (see losses.arow_parts)
            record["train_effective_weight"] = record["train_weighted_kl"] / record["train_kl"]
        record.update(getattr(self.loader, "epoch_counts", dict)())  # train_real, train_extra with --extra-data
        if out.weight is not None:
            record["weight_hist"] = packed[len(keys):].tolist()
        record["seconds"] = time.perf_counter() - t0
        return record

    def _log_step(self, epoch_float: float, lr: float, sums: dict[str, Tensor], count: int,
                  window: dict[str, Any]) -> None:
        """A step record (``--log-every``): means since the previous one and the gradient norm now.

        The one host read of a logging step; every rank takes part (the sums are all-reduced).
        """
        keys = sorted(sums)
        grad_norm = gradient_norm(self.model, self.device)
        packed = distributed.all_reduce_sum(torch.stack([sums[k] for k in keys]))  # train_loss is always there
        values = torch.cat([packed, grad_norm.reshape(1)]).tolist()
        n = max((count - window["count"]) * self.dist.world_size, 1)
        record: dict[str, Any] = {"step": self.global_step, "epoch_float": epoch_float, "lr": lr}
        totals = dict(zip(keys, values[:-1]))
        record.update({k: (v - window["totals"].get(k, 0.0)) / n for k, v in totals.items()})
        record["grad_norm"] = values[-1]
        window.update(count=count, totals=totals)
        call_hook(self.callbacks, "on_step_record", record)

    def _forward_backward(self, x: Tensor, y: Tensor, seed: int) -> list[tuple[MethodOutput, Tensor]]:
        """The method's outputs and labels per micro-batch of this rank's batch, gradients summed.

        With ``--grad-accum K`` the batch runs as K micro-batches, each loss scaled by its share of
        the batch, so the summed gradient is the whole batch's; each micro-batch's attack draws the
        random start of its own rows of the global batch. Under DDP the gradients are all-reduced
        once, in the last micro-batch's backward (``no_sync`` before it).
        """
        n = len(x)
        micro = self.cfg.batch_size // (self.dist.world_size * self.cfg.grad_accum)
        chunks = list(zip(x.split(micro), y.split(micro))) if self.cfg.grad_accum > 1 else [(x, y)]
        ddp = isinstance(self.train_model, nn.parallel.DistributedDataParallel)
        outs: list[tuple[MethodOutput, Tensor]] = []
        self.opt.zero_grad(set_to_none=True)
        start = self.dist.rank * n  # this rank's first row of the global batch (see Loader)
        for i, (xm, ym) in enumerate(chunks):
            rng = BatchRNG(seed, offset=start, total=n * self.dist.world_size)
            last = i == len(chunks) - 1
            with self.train_model.no_sync() if ddp and not last else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    out = self.method(self.train_model, xm, ym, rng=rng)
                (out.loss if len(chunks) == 1 else out.loss * (len(ym) / n)).backward()
            outs.append((out, ym))
            start += len(ym)
        return outs

    @torch.no_grad()
    def validate(self, model: Optional[nn.Module] = None, *, label: str = "") -> dict[str, float]:
        """Clean and PGD accuracy on the held-out split of the TRAINING data (never the test set),
        logged as one line (``label`` names the model, e.g. ``"EMA model"``; none: the trained one)."""
        if self.val_data is None:
            return {}
        call_hook(self.callbacks, "on_validation_start")
        with torch.enable_grad(), quiet_attack_lines():  # its bare per-attack lines: one labelled line
            attacks = ["clean"] if self.cfg.val_attack == "clean" else ["clean", self.val_attack]
            res = evaluate(model or self.model, self.val_data.x, self.val_data.y, attacks, eps=self.threat.eps,
                           norm=self.threat.norm, num_classes=self.val_data.num_classes, seed=self.cfg.seed)
        if self.dist.is_main:
            accs = ", ".join(f"{k} {100 * v:.2f}%" for k, v in res.accuracy.items() if k != "worst_case")
            log.info("validation%s (held-out %d): %s", f", {label}" if label else "", len(self.val_data), accs)
        return {"val_clean_acc": res.accuracy["clean"], "val_pgd_acc": res.accuracy[self.cfg.val_attack]}

    def _check_finite_loss(self, first_bad: Tensor, epoch: int) -> None:
        found = distributed.all_reduce_sum((first_bad >= 0).float())  # every rank stops together
        if bool(found):
            step = int(first_bad)
            self._diverged(epoch, step if step >= 0 else None, "non-finite loss")

    def _check_loss_exploded(self, record: dict[str, Any], epoch: int) -> None:
        """Stop a run whose epoch mean training loss (already read on the host) exploded while staying
        finite: above ``max(EXPLODED_LOSS_FLOOR, EXPLODED_LOSS_FACTOR x`` the first epoch's loss)."""
        loss = record.get("train_loss")
        first = self.history[0].get("train_loss") if self.history else None
        if loss is not None and loss_exploded(float(loss), None if first is None else float(first)):
            self._diverged(epoch, None, "exploded")

    def _check_finite_weights(self, epoch: int) -> None:
        flags = [torch.isfinite(p.detach()).all() for p in self.model.parameters()]
        if flags and not bool(torch.stack(flags).all()):
            self._diverged(epoch, None, "non-finite weights")

    def _diverged(self, epoch: int, step: Optional[int], reason: str) -> None:
        """Stop: nothing of this epoch is saved; every earlier checkpoint stays as it is (the run
        folder's writer names the one to continue from, see :class:`~arow.training.callbacks.RunWriter`)."""
        where = f"epoch {epoch + 1}" + (f", step {step + 1}" if step is not None else "")
        info = {"epoch": epoch + 1, "step": None if step is None else step + 1, "reason": reason, "lr": self.cfg.lr}
        hint = "; no epoch had finished, so nothing was saved" if epoch == 0 else ""
        raise TrainingDiverged(f"training diverged at {where} ({reason})", info, hint)


def loss_exploded(loss: float, first: Optional[float]) -> bool:
    """Whether an epoch's mean training loss ``loss`` exploded relative to ``first``, the run's first
    epoch's (None in the first epoch): above ``max(EXPLODED_LOSS_FLOOR, EXPLODED_LOSS_FACTOR * first)``.
    The losses of the methods here are O(1), so no normal run comes near.

    >>> loss_exploded(2.3, None), loss_exploded(1.95e34, None), loss_exploded(5e4, 80.0), loss_exploded(9e4, 80.0)
    (False, True, False, True)
    """
    limit = max(EXPLODED_LOSS_FLOOR, EXPLODED_LOSS_FACTOR * first) if first is not None and math.isfinite(first) \
        else EXPLODED_LOSS_FLOOR
    return loss > limit


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser of ``cfg.optimizer`` over :func:`sgd_param_groups`: ``sgd`` (``lr``, ``momentum``,
    ``weight_decay``, ``nesterov``; the fused kernel on CUDA) or ``adamw`` (``torch.optim.AdamW`` with
    ``lr`` and ``weight_decay``, default betas and eps)."""
    groups = sgd_param_groups(model, cfg.no_bn_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "sgd":
        raise ConfigError(f"--optimizer must be one of sgd, adamw, got {cfg.optimizer!r}")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov, **_sgd_kernel(device))


def sgd_param_groups(model: nn.Module, no_bn_decay: bool = False) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: one, or with ``no_bn_decay`` a second without weight decay
    holding the weight and bias of every BatchNorm layer (SyncBatchNorm included).

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    >>> [len(g["params"]) for g in sgd_param_groups(net, no_bn_decay=True)]
    [2, 2]
    """
    params = list(model.parameters())
    if not no_bn_decay:
        return [{"params": params}]
    bn = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
          for p in m.parameters(recurse=False)}
    groups = [{"params": [p for p in params if id(p) not in bn]},
              {"params": [p for p in params if id(p) in bn], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _sgd_kernel(device: torch.device) -> dict[str, bool]:
    """SGD's fused CUDA kernel (one launch for all parameters) where this PyTorch has it."""
    if device.type != "cuda":
        return {}
    fused = "fused" in inspect.signature(torch.optim.SGD).parameters
    return {"fused": True} if fused else {"foreach": True}


def gradient_norm(model: nn.Module, device: torch.device) -> Tensor:
    """The L2 norm of all of ``model``'s gradients together, in float32 on the device (nothing read
    back): the per-parameter norms in one multi-tensor kernel (``torch._foreach_norm``), then their norm.

    >>> net = nn.Linear(2, 1, bias=False); net.weight.grad = torch.tensor([[3.0, 4.0]])
    >>> gradient_norm(net, torch.device("cpu")).item()
    5.0
    """
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    # in float32 whatever the gradients' dtype: the norm of float16 gradients overflows (to inf) past 65504
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, dtype=torch.float32)))


def _acc(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value



def in_memory(data: Any, what: str) -> Optional[TensorData]:
    """``data`` as a :class:`TensorData` (None stays None): a Dataset or a DataLoader (anything
    :func:`arow.data.as_data` reads) is read once into memory, with a note saying so."""
    if data is None or isinstance(data, TensorData):
        return data
    td = as_data(data)
    log.info("%s: read %d examples of the %s into memory; the Trainer batches, shuffles and augments them "
             "itself (cfg.batch_size, cfg.augment)", what, len(td), type(data).__name__)
    return td


def plan_training(cfg: TrainConfig, model: nn.Module, data: Any, *,
                  model_spec: Union[ModelSpec, Mapping[str, Any], None] = None,
                  method: Optional[Method] = None) -> TrainConfig:
    """The config a Trainer trains on: ``cfg`` itself if it is resolved already, else resolved once
    (:func:`arow.config.plan.resolve`) for this model and data: without a model spec the run is named
    after the model's class; data that is not a built-in data set (``from_tensors``, ``as_data``;
    a model spec may say which data set it is) names the run's data and needs an eps (the config's,
    or that of ``method`` when the caller built it); a Dataset or DataLoader is ``custom`` data, as
    :func:`arow.data.as_data` names it."""
    spec = as_model_spec(model_spec, model)
    return ensure_resolved(cfg, model_name=None if model_spec is not None else spec.name,
                           data_name=spec.dataset or getattr(data, "name", "custom"),
                           method_eps=method.threat.eps if method is not None else None,
                           method_attack=(method.threat.steps, method.threat.step_size) if method is not None else None)


def as_model_spec(model_spec: Union[ModelSpec, Mapping[str, Any], None], model: nn.Module) -> ModelSpec:
    """``model_spec`` as a :class:`~arow.models.spec.ModelSpec` (a dict is read as a checkpoint's);
    None: ``model`` is the user's own (its class name, ``custom``)."""
    if model_spec is None:
        return ModelSpec.of_user_model(model)
    return model_spec if isinstance(model_spec, ModelSpec) else ModelSpec.from_dict(model_spec)


def _check_batch(cfg: TrainConfig, world_size: int) -> None:
    """The global batch splits evenly over the processes, and each share over ``--grad-accum``."""
    if cfg.batch_size % world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                          f"number of processes {world_size}")
    if (cfg.batch_size // world_size) % cfg.grad_accum:
        raise ConfigError(f"--batch-size {cfg.batch_size} gives {cfg.batch_size // world_size} per "
                          f"process, not divisible by --grad-accum {cfg.grad_accum}")
