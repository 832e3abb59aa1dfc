"""Run configuration: one dataclass is the source of truth; YAML presets hold recipes; flags override.

>>> cfg = TrainConfig(method="arow", epochs=2)
>>> TrainConfig.from_dict(cfg.to_dict()) == cfg
True
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and why."""


@dataclass
class TrainConfig:
    # what to train
    method: str = "arow"
    method_args: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    model: str = "small-cnn"
    normalize: bool = False  # the paper trains on [0, 1] inputs without normalisation
    # optimisation
    # The defaults are the embedded Fashion-MNIST recipe that `make demo` runs on a 2-core CPU
    # within 15 minutes (2 epochs at ~200 img/s); the paper's CIFAR recipes are presets.
    epochs: int = 2
    batch_size: int = 128  # GLOBAL batch: split across ranks under torchrun
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # step | cosine | onecycle (linear warm-up, then linear decay to 0)
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.83])  # fractions or epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.15
    swa_start: Optional[int] = None  # 1-based epoch from which weights are averaged
    # threat model of the training attack
    eps: Optional[float] = None  # dataset default (F-MNIST 0.1, others 8/255)
    attack_steps: Optional[int] = None  # method default (10)
    step_size: Optional[float] = None  # eps / 4
    # data
    limit_train: Optional[int] = None
    val_size: int = 1000
    val_attack: str = "pgd20"
    augment: Optional[str] = None  # dataset default
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    channels_last: str = "auto"
    compile: bool = False
    sync_bn: bool = True  # SyncBatchNorm under DDP (a DDP run then equals a 1-process run)
    out: Optional[str] = None
    tensorboard: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (a preset, a checkpoint), checking keys and value types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        return cls(**{k: _typed(k, v, fields[k].type) for k, v in d.items()})

    def milestone_epochs(self) -> list[float]:
        """The step schedule's milestones in epochs (all values < 1 are fractions of --epochs)."""
        if self.milestones and all(0 < m < 1 for m in self.milestones):
            return [m * self.epochs for m in self.milestones]
        return list(self.milestones)

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        fractions = [0 < m < 1 for m in self.milestones]
        if any(not (m > 0 and math.isfinite(m)) for m in self.milestones) or (any(fractions) and not all(fractions)):
            raise ConfigError(f"--milestones must be epochs (>= 1) or all fractions in (0, 1), got {self.milestones}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.eps is not None and not self.eps >= 0:
            raise ConfigError(f"--eps must be >= 0, got {self.eps}")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(f"--step-size must be > 0, got {self.step_size}")
        if self.attack_steps is not None and self.attack_steps < 0:
            raise ConfigError(f"--attack-steps must be >= 0, got {self.attack_steps}")
        if self.limit_train is not None and self.limit_train < 2:
            raise ConfigError(f"--limit-train must be >= 2, got {self.limit_train}")
        if self.val_size < 0:
            raise ConfigError(f"--val-size must be >= 0, got {self.val_size}")
        if self.schedule not in ("step", "cosine", "onecycle", "constant"):
            raise ConfigError(f"--schedule must be step, cosine, onecycle or constant, got {self.schedule!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"--amp must be auto, bf16 or off, got {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.swa_start is not None and not 1 <= self.swa_start <= self.epochs:
            raise ConfigError(f"--swa-start must be in [1, epochs={self.epochs}], got {self.swa_start} "
                              f"(--swa-start 0 turns SWA off)")
        return self


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _typed(key: str, value: Any, annotation: str) -> Any:
    """``value`` if it fits the field's annotation (ints pass as floats), else a one-line ConfigError."""
    ann = str(annotation).replace("Optional[", "").rstrip("]")
    if value is None:
        if "Optional" in str(annotation):
            return None
        raise ConfigError(f"config key {key!r} must not be empty")
    if ann.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise ConfigError(f"config key {key!r}: expected a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if ann.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    want = _SCALARS.get(ann)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
        raise ConfigError(f"config key {key!r}: expected {ann}, got {type(value).__name__} {value!r}")
    return value


def preset_names() -> list[str]:
    files = resources.files("arow") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The settings of a preset by name (``arow list``) or of a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        text = path.read_text()
    else:
        res = resources.files("arow") / "presets" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}; choose one of: {', '.join(preset_names())}")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {name_or_path}: not valid YAML ({e})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name_or_path}: expected a mapping of config keys")
    data.pop("description", None)
    TrainConfig.from_dict({k: v for k, v in data.items()})  # reject unknown keys early
    return data
