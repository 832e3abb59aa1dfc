"""Run configuration: one dataclass is the source of truth; YAML presets hold recipes; flags override.

Every setting is declared once, with its group of ``arow train --help``, help text and range
(:func:`opt`). A config is frozen (change one with ``dataclasses.replace``); :mod:`arow.config.plan`
fills the defaults that depend on other settings. This module imports nothing else of arow.

>>> cfg = TrainConfig(method="arow", epochs=2)
>>> TrainConfig.from_dict(cfg.to_dict()) == cfg
True
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and why."""


def opt(group: str, default: Any = None, help: str = "", *, lo: Optional[float] = None, hi: Optional[float] = None,
        lo_open: bool = False, hi_open: bool = False, choices: Optional[Sequence[str]] = None,
        runtime: bool = False, factory: Any = None) -> Any:
    """A config field with its rule, declared once: its group of ``arow train --help``, help text,
    range, choices, and whether it is runtime-only (how a run executes, not what it computes: it
    may change on ``--resume``).

    Numbers must be finite and within ``lo``/``hi`` (``lo_open``/``hi_open`` exclude the bound).
    """
    meta = {"help": help, "group": group, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "choices": tuple(choices) if choices else None, "runtime": runtime}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, with its default (the embedded Fashion-MNIST recipe)."""

    # what to train
    method: str = opt("method", "arow", "training method")
    method_args: dict[str, Any] = opt("method", help="the method's hyper-parameters", factory=dict)
    dataset: str = opt("data", "fashion-mnist", "data set")
    data_dir: Optional[str] = opt("data", None, "folder with the dataset files", runtime=True)
    model: str = opt("model", "small-cnn", "architecture")
    normalize: bool = opt("model", False, "a normalisation layer in the model (default: [0, 1] inputs as is)")
    activation: str = opt("model", "relu", "activation of the WideResNets, ResNets and small-cnn (silu: the "
                          "generated-data papers' WRN-28-10/70-16); saved with the model", choices=("relu", "silu"))
    # optimisation
    # The defaults are the embedded Fashion-MNIST recipe (preset fmnist-arow) that `make demo` runs
    # on a 2-core CPU within 15 minutes, set-up included; the paper's CIFAR recipes are presets.
    epochs: int = opt("optimisation", 11, "training epochs", lo=1, hi=10_000)
    batch_size: int = opt("optimisation", 128, "GLOBAL batch (split across torchrun processes)", lo=1, hi=65_536)
    optimizer: str = opt("optimisation", "sgd", "optimiser: sgd (with --momentum, --nesterov) or adamw "
                         "(torch.optim.AdamW with --lr and --weight-decay as decoupled decay, default betas)",
                         choices=("sgd", "adamw"))
    lr: float = opt("optimisation", 0.1, "peak learning rate", lo=0, lo_open=True, hi=100)
    momentum: float = opt("optimisation", 0.9, "SGD momentum", lo=0, hi=1, hi_open=True)
    nesterov: bool = opt("optimisation", False, "Nesterov momentum")
    weight_decay: float = opt("optimisation", 5e-4, "weight decay", lo=0, hi=1)
    no_bn_decay: bool = opt("optimisation", False, "no weight decay on BatchNorm parameters: the scale (weight) "
                            "and shift (bias) of every BatchNorm layer; all other parameters (conv and linear "
                            "weights, linear biases) keep --weight-decay (the generated-data scripts)")
    grad_accum: int = opt("optimisation", 1, "gradient accumulation: each step splits the batch into K "
                          "micro-batches (memory of batch/K) and sums their gradients; equal to the full batch "
                          "except BatchNorm statistics, which are per micro-batch (docs/method.md)", lo=1)
    schedule: str = opt("optimisation", "onecycle",
                        "learning-rate schedule (onecycle: linear warm-up, then linear decay to 0)",
                        choices=("step", "cosine", "onecycle", "constant"))
    milestones: list[float] = opt("optimisation", help="step schedule: epochs, or all fractions < 1 of --epochs "
                                  "(the presets use fractions, so a shorter --epochs still decays)",
                                  factory=lambda: [0.5, 0.83])
    gamma: float = opt("optimisation", 0.1, "step schedule: learning-rate factor at each milestone",
                       lo=0, lo_open=True, hi=1)
    warmup_epochs: float = opt("optimisation", 0.15, "linear learning-rate warm-up, in epochs", lo=0)
    swa_start: Optional[int] = opt("optimisation", None, "1-based epoch from which weights are averaged (SWA)", lo=1)
    ema: Optional[float] = opt("optimisation", None, "exponential moving average of the weights with this decay "
                               "(e.g. 0.995), updated every step and evaluated as the model (validation, best.pt, "
                               "final.pt); off by default", lo=0, hi=1, lo_open=True, hi_open=True)
    ema_warmup: bool = opt("optimisation", False, "EMA decay warm-up min(decay, (1+t)/(10+t)) at step t "
                           "(Gowal et al. 2020)")
    ema_bn: str = opt("optimisation", "recompute", "BatchNorm statistics of the EMA model: recomputed on the "
                      "training data before it is evaluated, or copied from the trained model every step",
                      choices=("recompute", "copy"))
    # threat model of the training attack
    norm: str = opt("attack", "linf", "threat model of training and evaluation: linf or l2 (L2 ball, normalised "
                    "gradient steps)", choices=("linf", "l2"))
    eps: Optional[float] = opt("attack", None, "radius of the ball in --norm's units (default per data set: L-inf "
                               "F-MNIST 0.1, others 8/255; L2 F-MNIST 1.5, others 0.5, RobustBench's CIFAR-10 L2)",
                               lo=0)
    attack_steps: Optional[int] = opt("attack", None, "training attack steps (default: the method's 10, or with "
                                      "--step-size unset too the data set's L-inf one: 5 on Fashion-MNIST)", lo=0, hi=10_000)
    step_size: Optional[float] = opt("attack", None, "training attack step (default eps/4, or with --attack-steps "
                                     "unset too the data set's L-inf one: eps/2 on Fashion-MNIST)", lo=0, lo_open=True, hi=1)
    # data
    limit_train: Optional[int] = opt("data", None, "train on the first N training examples only", lo=2)
    val_size: int = opt("evaluation", 1000, "held-out training examples for model selection", lo=0)
    val_attack: str = opt("evaluation", "pgd20", "attack of the per-epoch validation")
    eval_attacks: str = opt("evaluation", "clean,pgd20", "attacks of the final test-set evaluation ('' skips it)",
                            runtime=True)
    eval_n: Optional[int] = opt("evaluation", None, "final evaluation on the first N test images only", lo=1,
                                runtime=True)
    guards: bool = opt("evaluation", True, "robustness guards before the final evaluation", runtime=True)
    allow_guard_failures: bool = opt("evaluation", False, "report the final evaluation's numbers even when a "
                                     "robustness guard trips (default: stop with an error, exit status 3)",
                                     runtime=True)
    augment: Optional[str] = opt("data", None, "augmentation (dataset default)",
                                 choices=("none", "flip", "crop+flip"))
    extra_data: list[str] = opt("data", help="extra training data: an .npz with image and label or an RST pickle "
                                "(docs/extra-data.md); repeatable", factory=list)
    extra_fraction: float = opt("data", 0.7, "fraction of every batch drawn from --extra-data", lo=0, hi=1,
                                hi_open=True)
    extra_take: Optional[int] = opt("data", None, "use the first N extra examples only", lo=1)
    epoch_batches: Optional[int] = opt("data", None, "batches per epoch with --extra-data (default: as many as "
                                       "without it, ceil(real training examples / batch))", lo=1)
    labels_kept: Optional[str] = opt("data", None, "keep the labels of N real training examples (balanced over "
                                     "the classes, by --seed) or of the positions in a .txt/.npy file; the "
                                     "other real examples are not used")
    # runtime
    seed: int = opt("runtime", 0, "random seed", lo=0, hi=2**63 - 1)
    device: str = opt("runtime", "auto", "auto | cpu | cuda | cuda:N", runtime=True)
    amp: str = opt("runtime", "auto", "bf16 autocast of training (auto: on CUDA and on CPUs with native bf16)",
                   choices=("auto", "bf16", "off"))
    channels_last: str = opt("runtime", "auto", "channels-last memory format", choices=("auto", "on", "off"),
                             runtime=True)
    compile: bool = opt("runtime", False, "torch.compile the model", runtime=True)
    sync_bn: bool = opt("runtime", True, "SyncBatchNorm under DDP (a DDP run then equals a 1-process run)")
    out: Optional[str] = opt("runtime", None, "run folder", runtime=True)
    tensorboard: bool = opt("runtime", False, "also log to TensorBoard", runtime=True)
    wandb: bool = opt("runtime", False, "also log to Weights & Biases (pip install -e '.[wandb]'); W&B's own "
                      "settings apply: WANDB_MODE=offline logs without network, WANDB_DIR (default: the run "
                      "folder) says where its files go", runtime=True)
    wandb_project: str = opt("runtime", "arow", "W&B project of --wandb", runtime=True)
    mlflow: bool = opt("runtime", False, "also log to MLflow (pip install -e '.[mlflow]')", runtime=True)
    mlflow_uri: Optional[str] = opt("runtime", None, "MLflow tracking URI of --mlflow (default: MLFLOW_TRACKING_URI "
                                    "if set, else a local file store, file:DIR/mlruns)", runtime=True)
    log_every: int = opt("runtime", 0, "also log a step record (loss and its parts, lr, gradient norm) to "
                         "metrics.jsonl and TensorBoard every N optimiser steps (0: once per epoch only)",
                         lo=0, runtime=True)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain values (what config.json and a checkpoint's ``config`` hold)."""
        return dataclasses.asdict(self)

    @classmethod
    def runtime_keys(cls) -> frozenset[str]:
        """Keys that say how a run executes, not what it computes (they may change on resume)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))

    @classmethod
    def resumable_keys(cls) -> frozenset[str]:
        """Keys a resumed run may change: the runtime keys, and ``epochs`` (which extends a run)."""
        return cls.runtime_keys() | {"epochs"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (a preset, a checkpoint), checking keys and value types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(k, v, hints[k]) for k, v in d.items()})

    def _check_eps(self) -> None:
        """eps within what its norm allows without knowing the data: [0, 1] for L-inf, >= 0 for L2
        (:func:`arow.config.plan.resolve` bounds an L2 eps by sqrt(d), d the data set's input size)."""

        eps = self.eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
            return  # the field's own rule reports it
        hi: Optional[float] = 1.0 if self.norm != "l2" else None
        if eps < 0 or (hi is not None and eps > hi):
            rule = f"in [0, {hi:.4g}]" if hi is not None else ">= 0"
            raise ConfigError(f"--eps must be {rule} for --norm {self.norm}, got {eps!r}")

    def milestone_epochs(self) -> list[float]:
        """The step schedule's milestones in epochs (all values < 1 are fractions of --epochs)."""
        if self.milestones and all(0 < m < 1 for m in self.milestones):
            return [round(m * self.epochs, 6) for m in self.milestones]  # 5/6 of 120 is epoch 100, exactly
        return list(self.milestones)

    def validate(self) -> "TrainConfig":
        """Check every field against its declared rule, then the rules between fields."""
        self._check_eps()
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        fractions = [0 < m < 1 for m in self.milestones]
        if any(not (m > 0 and math.isfinite(m)) for m in self.milestones) or (any(fractions) and not all(fractions)):
            raise ConfigError(f"--milestones must be epochs (>= 1) or all fractions in (0, 1), got {self.milestones}")
        if not self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.nesterov and self.optimizer != "sgd":
            raise ConfigError(f"--nesterov applies to --optimizer sgd only, not {self.optimizer}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size {self.batch_size} must be divisible by --grad-accum {self.grad_accum} "
                              f"(micro-batches of equal size)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not self.extra_data and (self.extra_take is not None or self.epoch_batches is not None):
            raise ConfigError("--extra-take and --epoch-batches apply to training with --extra-data only")
        kept = (self.labels_kept or "").strip()
        if self.labels_kept is not None and not ((kept.isdigit() and int(kept) >= 1)
                                                 or Path(kept).suffix in (".txt", ".npy")):
            raise ConfigError(f"--labels-kept must be a number >= 1 or an index file (.txt, .npy), got {kept!r}")
        if self.swa_start is not None and not self.swa_start <= self.epochs:
            raise ConfigError(f"--swa-start must be in [1, epochs={self.epochs}], got {self.swa_start} "
                              f"(--swa-start 0 turns SWA off)")
        if self.ema is not None and self.swa_start is not None:
            raise ConfigError("--ema and --swa-start both average the weights; choose one (--swa-start 0 turns a "
                              "preset's SWA off)")
        return self


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """One field against its metadata: finite numbers within range, strings among the choices."""
    m = f.metadata
    if value is None:
        return
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(m['choices'])}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{_flag(f.name)} must be a finite number, got {value!r}")
    lo, hi = m.get("lo"), m.get("hi")
    if (lo is not None and (value < lo or (m["lo_open"] and value == lo))) or (
            hi is not None and (value > hi or (m["hi_open"] and value == hi))):
        if hi is None:
            rule = f"{'>' if m['lo_open'] else '>='} {lo:g}"
        elif lo is None:
            rule = f"{'<' if m['hi_open'] else '<='} {hi:g}"
        else:
            rule = f"in {'(' if m['lo_open'] else '['}{lo:g}, {hi:g}{')' if m['hi_open'] else ']'}"
        raise ConfigError(f"{_flag(f.name)} must be {rule}, got {value!r}")


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` if it fits the field's type hint (ints pass as floats), else a one-line ConfigError."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} must not be empty")
    origin = typing.get_origin(hint) or hint
    if origin is list and typing.get_args(hint) == (str,):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key!r}: expected a list of strings, got {value!r}")
        return list(value)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise ConfigError(f"config key {key!r}: expected a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    wrong = not isinstance(value, origin) or (origin is int and isinstance(value, bool))
    if origin in (int, float, str, bool) and wrong:
        hint = (" (YAML reads off/on/yes/no as booleans: quote the word, e.g. 'off')"
                if origin is str and isinstance(value, bool) else "")
        raise ConfigError(f"config key {key!r}: expected {origin.__name__}, got {type(value).__name__} {value!r}{hint}")
    return value
