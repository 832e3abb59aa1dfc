"""Run configuration: one dataclass is the source of truth; YAML presets hold recipes; flags override.

>>> cfg = TrainConfig(method="arow", epochs=2)
>>> TrainConfig.from_dict(cfg.to_dict()) == cfg
True
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from ..data import DATASETS
from ..methods import METHODS
from ..threat import NORMS
from ..data import default_eps
from ..runs.rundir import RunDir

log = logging.getLogger(__name__)


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


@dataclass
class TrainConfig:
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
    epochs: int = opt("optimisation", 7, "training epochs", lo=1)
    batch_size: int = opt("optimisation", 128, "GLOBAL batch (split across torchrun processes)", lo=1)
    lr: float = opt("optimisation", 0.1, "peak learning rate", lo=0, lo_open=True, hi=100)
    momentum: float = opt("optimisation", 0.9, "SGD momentum", lo=0, hi=1, hi_open=True)
    nesterov: bool = opt("optimisation", False, "Nesterov momentum")
    weight_decay: float = opt("optimisation", 5e-4, "SGD weight decay", lo=0, hi=1)
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
    attack_steps: Optional[int] = opt("attack", None, "training attack steps (method default: 10)", lo=0, hi=10_000)
    step_size: Optional[float] = opt("attack", None, "training attack step (default eps/4)", lo=0, lo_open=True, hi=1)
    # data
    limit_train: Optional[int] = opt("data", None, "train on the first N training examples only", lo=2)
    val_size: int = opt("evaluation", 1000, "held-out training examples for model selection", lo=0)
    val_attack: str = opt("evaluation", "pgd20", "attack of the per-epoch validation")
    eval_attacks: str = opt("evaluation", "clean,pgd20", "attacks of the final test-set evaluation ('' skips it)",
                            runtime=True)
    eval_n: Optional[int] = opt("evaluation", None, "final evaluation on the first N test images only", lo=1,
                                runtime=True)
    guards: bool = opt("evaluation", True, "robustness guards before the final evaluation", runtime=True)
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
    log_every: int = opt("runtime", 0, "also log a step record (loss and its parts, lr, gradient norm) to "
                         "metrics.jsonl and TensorBoard every N optimiser steps (0: once per epoch only)",
                         lo=0, runtime=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def runtime_keys(cls) -> frozenset[str]:
        """Keys that say how a run executes, not what it computes (they may change on resume)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (a preset, a checkpoint), checking keys and value types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(k, v, hints[k]) for k, v in d.items()})

    def resolve(self) -> "TrainConfig":
        """The config with every default that depends on another setting filled in where the field
        is unset: the data set's eps and augmentation, the method's attack steps. Checked and
        idempotent; the Trainer and :func:`arow.pipelines.train_run` both train on exactly this.

        >>> cfg = TrainConfig(dataset="cifar10").resolve()
        >>> cfg.augment, round(cfg.eps * 255), cfg.attack_steps
        ('crop+flip', 8, 10)
        """

        filled: dict[str, Any] = {}
        if self.dataset in DATASETS:
            info = DATASETS.get(self.dataset)
            if self.augment is None:
                filled["augment"] = info.augmentation
            if self.eps is None and self.norm in NORMS:
                filled["eps"] = default_eps(self.dataset, self.norm)
        if self.attack_steps is None and self.method in METHODS:
            filled["attack_steps"] = METHODS.get(self.method).default_steps
        return dataclasses.replace(self, **filled).validate() if filled else self.validate()

    def _check_eps(self) -> None:
        """eps within its norm's range: [0, 1] for L-inf, [0, sqrt(d)] for L2 (d: the data set's input size)."""

        eps = self.eps
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
            return  # the field's own rule reports it
        hi: Optional[float] = 1.0
        if self.norm == "l2":
            info = DATASETS.get(self.dataset) if self.dataset in DATASETS else None
            hi = math.sqrt(info.in_channels * info.image_size ** 2) if info is not None else None
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
        raise ConfigError(f"config key {key!r}: expected {origin.__name__}, got {type(value).__name__} {value!r}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def preset_names() -> list[str]:
    files = resources.files("arow") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """The ``description`` of a built-in preset (``arow list`` shows :func:`preset_summary`)."""
    text = (resources.files("arow") / "presets" / f"{name}.yaml").read_text()
    return str((yaml.safe_load(text) or {}).get("description", ""))


def preset_summary(name: str, width: int = 100) -> str:
    """The first sentence (or clause) of a built-in preset's description on one line, cut at a word
    boundary with `` ...`` when longer than ``width`` characters (what ``arow list`` shows)."""
    desc = " ".join(preset_description(name).split())
    first = re.split(r"(?<!et al)\. (?=[A-Z])|: ", desc)[0]
    return first if len(first) <= width else first[:width - 3].rsplit(" ", 1)[0] + " ..."


def load_preset(name_or_path: str) -> dict[str, Any]:
    """The settings of a preset by name (``arow list``) or of a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json":  # a run's config.json replays the run
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        data.pop("resolved", None)  # what the run derived, recorded for reading, not a setting
        TrainConfig.from_dict(data)
        return data
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
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {name_or_path}: not valid YAML ({e})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name_or_path}: expected a mapping of config keys")
    data.pop("description", None)
    TrainConfig.from_dict({k: v for k, v in data.items()})  # reject unknown keys early
    return data


# --------------------------------------------------------------------------- resolution
def method_flags() -> dict[str, dict[str, str]]:
    """Each method hyper-parameter flag (dest name) -> {method: hyper-parameter} it sets.

    A name two methods use with different meanings gets the method's prefix (``--arow-lam``,
    ``--mart-lam``, ``--trades-beta``, ``--hat-beta``); the plain name (``--lam``, ``--beta``) stays
    as a shorthand for the chosen method's. AWP variants take their inner method's flags.
    """

    def base(name: str) -> str:
        inner = getattr(METHODS.get(name), "inner_cls", None)
        return inner.name if inner is not None else name

    meanings: dict[str, set[str]] = {}  # hyper-parameter name -> the help texts of its methods
    for name in METHODS.names():
        for k, h in METHODS.get(name).hparams.items():
            meanings.setdefault(k, set()).add(h.help)
    table: dict[str, dict[str, str]] = {}
    for name in METHODS.names():
        for k in METHODS.get(name).hparams:
            table.setdefault(k, {})[name] = k
            if len(meanings[k]) > 1:  # one name, several meanings: the method's prefix tells them apart
                table.setdefault(f"{base(name).replace('-', '_')}_{k}", {})[name] = k
    return table


def method_flag_help() -> dict[str, tuple[type, str]]:
    """Each method hyper-parameter flag (dest name, sorted) -> (type, help) for ``arow train --help``:
    the hyper-parameter's own help, or for a shorthand whose methods mean different things by it, a
    pointer to the prefixed flags."""

    out: dict[str, tuple[type, str]] = {}
    for dest, owners in sorted(method_flags().items()):
        first = next(iter(owners))
        h = METHODS.get(first).hparams[owners[first]]
        shorthand = len({METHODS.get(m).hparams[k].help for m, k in owners.items()}) > 1
        out[dest] = (h.type, f"shorthand for the chosen method's {dest} (see the prefixed flags)" if shorthand
                     else h.help)
    return out


def resolve_config(overrides: dict[str, Any], method_overrides: Optional[dict[str, Any]] = None, *,
                   preset: Optional[str] = None, resume: bool = False) -> TrainConfig:
    """The one place a training config is put together, in this order of precedence (last wins):
    the defaults, a preset (or a run's ``config.json``), the saved config of the run being resumed,
    the flags given now (``overrides``: config fields; ``method_overrides``: hyper-parameter
    flags by dest name, see :func:`method_flags`). Dataset defaults are filled by
    :meth:`TrainConfig.resolve`; ``out`` defaults to ``runs/<dataset>-<method>-<model>-s<seed>``.

    Args:
        overrides: config fields given now (None: not given)
        method_overrides: method hyper-parameters given now, by flag name (None: not given)
        preset: recipe name (see `arow list`), YAML file, or a run's config.json to replay it; the
            fields given override it
        resume: continue the run in the config's out folder from its last.pt, with the config saved
            there (only how it runs may change)

    >>> resolve_config({"method": "trades"}, {"beta": 3.0}).method_args
    {'beta': 3.0}
    """

    if resume and preset:
        raise ConfigError("--preset cannot be combined with --resume: a resumed run continues with the config "
                          "saved in its folder (flags given with --resume may only change how it runs)")
    base: dict[str, Any] = load_preset(preset) if preset else {}
    if resume and overrides.get("out"):

        run = RunDir(overrides["out"])
        if run.has_checkpoint():  # the resumed run's own experiment is the base; the Trainer refuses changes
            base = dict(run.load_resume_state()["config"])
    preset_method = base.get("method", "arow")
    preset_norm = base.get("norm", "linf")
    base.update({k: v for k, v in overrides.items() if v is not None and k != "method_args"})
    if not resume and base.get("norm", "linf") != preset_norm and overrides.get("eps") is None \
            and base.get("eps") is not None:
        # a preset's eps is a radius in its own norm (8/255 L-inf): --norm l2 takes the data set's L2 default
        log.info("ignoring the preset's eps %s: it is an %s radius, not an %s one", base["eps"], preset_norm,
                 base["norm"])
        base["eps"] = None
    method = base.get("method", "arow")
    if method != preset_method and base.get("method_args"):
        # a preset's hyper-parameters belong to its method, even where another method has a namesake
        # (fmnist-arow's smoothing 0.2 must not turn --method trades into label-smoothed TRADES)
        log.info("ignoring the preset's method_args %s: they are %s's, not %s's", base["method_args"],
                 preset_method, method)
        base["method_args"] = {}
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS.names())}")
    allowed = METHODS.get(method).hparams
    given = base.get("method_args") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"method_args must be a mapping of hyper-parameters, got {given!r}")
    table = method_flags()
    unknown = sorted(set(given) - {k for m in table.values() for k in m.values()})
    if unknown:
        raise ConfigError(f"method_args: unknown hyper-parameter(s) {', '.join(unknown)} (no method takes them; "
                          f"{method} takes: {', '.join(allowed) or 'none'})")
    margs = {k: v for k, v in given.items() if k in allowed}
    dropped = set(given) - set(margs)
    if dropped:  # a preset written for another method: its hyper-parameters do not carry over
        log.info("ignoring the preset's %s: not hyper-parameters of %s", ", ".join(sorted(dropped)), method)
    for dest, value in (method_overrides or {}).items():
        if value is None:
            continue
        if method not in table.get(dest, {}):
            takes = sorted({"--" + d.replace("_", "-") for d, m in table.items() if method in m})
            raise ConfigError(f"--{dest.replace('_', '-')} does not apply to method {method!r} "
                              f"(it takes: {', '.join(takes) or 'none'})")
        margs[table[dest][method]] = value
    base["method_args"] = margs
    if base.get("swa_start") == 0:  # --swa-start 0 turns off a preset's SWA
        base["swa_start"] = None
    cfg = TrainConfig.from_dict(base)
    if cfg.out is None:
        cfg.out = f"runs/{cfg.dataset}-{cfg.method}-{cfg.model}-s{cfg.seed}"
    return cfg.resolve()
