"""The one resolver: a :class:`~arow.config.schema.TrainConfig` becomes the config a run trains on.

:func:`resolve` fills what one setting derives from another (the data set's eps in the chosen norm
and its augmentation, the method's attack steps; for your own model and data their names and the
eps you chose), checks the result and marks it resolved. :func:`resolve_config` layers the
command line first: defaults < preset (or a run's ``config.json``) < the resumed run's saved config
< the flags given now, then resolves. An entry point (``arow train``, :func:`arow.pipelines.train_run`,
a :class:`~arow.training.trainer.Trainer`) resolves what it is given once, with :func:`ensure_resolved`;
everything below it trusts the resolved config.

>>> cfg = resolve(TrainConfig(dataset="cifar10"))
>>> cfg.augment, round(cfg.eps * 255), cfg.attack_steps, is_resolved(cfg)
('crop+flip', 8, 10, True)
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

from ..data import DATASETS
from ..methods import METHODS
from ..methods.base import Method
from ..runs.rundir import RunDir
from ..threat import NORMS, check_eps
from .presets import load_preset
from .schema import ConfigError, TrainConfig

log = logging.getLogger(__name__)

#: set (outside the dataclass fields) on a config that :func:`resolve` produced; a copy made with
#: ``dataclasses.replace`` lacks it, so a changed config is resolved again where it enters
_RESOLVED = "_arow_resolved"


def is_resolved(cfg: TrainConfig) -> bool:
    """Whether ``cfg`` came out of :func:`resolve` (and was not changed since)."""
    return bool(vars(cfg).get(_RESOLVED, False))


def resolve(cfg: TrainConfig, *, model_name: Optional[str] = None, data_name: Optional[str] = None,
            method_eps: Optional[float] = None, method_attack: Optional[tuple[int, float]] = None) -> TrainConfig:
    """THE resolver: ``cfg`` with every default that depends on another setting filled in where the
    field is unset, checked, frozen and marked resolved.

    Filled: the data set's augmentation and its default eps in ``cfg.norm``
    (``DATASETS.get(dataset).default_eps(norm)``), the method's attack steps (or where neither they nor
    the step size is set, the data set's training attack). For your own model
    and data (a :class:`~arow.training.trainer.Trainer` passes what it was given): ``model_name``
    names the model (your class, not the default small-cnn); ``data_name`` a data set that is not a
    built-in one names the run's data and then needs an eps (``cfg.eps``, else ``method_eps``, the
    radius of a method built by the caller). ``method_attack``: the (steps, step size) of a method built
    by the caller, recorded where the config sets neither (that method's attack is the one that runs);
    with it, the data set's own hyper-parameter values are not written (that method runs its own).

    >>> resolve(TrainConfig(eps=0.1), model_name="MyNet", data_name="my-scans").dataset
    'my-scans'
    """
    changes: dict[str, Any] = {}
    if model_name is not None and cfg.model != model_name:
        changes["model"] = model_name
    if data_name is not None and data_name not in DATASETS:  # from_tensors / as_data: the user's data
        if cfg.eps is None and method_eps is None:
            raise ConfigError(f"eps must be given for your own data ({data_name!r}): TrainConfig(eps=...); the "
                              f"defaults (e.g. L-inf 0.1 on Fashion-MNIST, 8/255 on CIFAR) belong to the built-in "
                              f"data sets")
        if cfg.eps is None:
            changes["eps"] = method_eps
        if cfg.dataset != data_name:
            changes["dataset"] = data_name
    if method_attack is not None and cfg.attack_steps is None and cfg.step_size is None:
        changes["attack_steps"] = method_attack[0]
        if 0 < method_attack[1] <= 1:  # the config's bounds on a step
            changes["step_size"] = method_attack[1]
    cfg = dataclasses.replace(cfg, **changes)
    cfg = dataclasses.replace(cfg, **derived_defaults(cfg, method_given=method_attack is not None)).validate()
    if cfg.norm == "l2" and cfg.eps is not None and cfg.dataset in DATASETS:  # L-inf: checked by validate()
        info = DATASETS.get(cfg.dataset)
        try:
            check_eps(cfg.eps, cfg.norm, info.in_channels * info.image_size ** 2)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    object.__setattr__(cfg, _RESOLVED, True)
    return cfg


def ensure_resolved(cfg: TrainConfig, **facts: Any) -> TrainConfig:
    """``cfg`` itself if it is resolved already, else :func:`resolve` (``facts``: its keywords)."""
    return cfg if is_resolved(cfg) else resolve(cfg, **facts)


def derived_defaults(cfg: TrainConfig, *, method_given: bool = False) -> dict[str, Any]:
    """The unset fields of ``cfg`` that its other settings decide, with their values: augmentation and
    eps from the data set, attack steps from the method, and where neither the steps nor the step
    size is set, the data set's L-inf training attack (Fashion-MNIST: 5 steps of eps/2) for a method
    on the common default of 10 steps; in L-inf, the data set's own values of the method's
    hyper-parameters the run leaves unset (Fashion-MNIST: ARoW's lambda 2.5; not for a method the
    caller built, ``method_given``, which runs its own), written into ``method_args`` so that a run's
    saved config names them (empty when nothing is left to fill).

    >>> derived_defaults(TrainConfig())["attack_steps"], derived_defaults(TrainConfig())["step_size"]
    (5, 0.05)
    >>> derived_defaults(TrainConfig(attack_steps=10)).get("step_size")   # eps/4, the unset default
    >>> derived_defaults(TrainConfig(dataset="cifar10"))["attack_steps"]
    10
    >>> derived_defaults(TrainConfig())["method_args"]     # Fashion-MNIST's lambda for ARoW
    {'lam': 2.5}
    >>> derived_defaults(TrainConfig(method_args={"lam": 3.5})).get("method_args")   # given: kept"""
    filled: dict[str, Any] = {}
    if cfg.dataset in DATASETS:
        info = DATASETS.get(cfg.dataset)
        if cfg.augment is None:
            filled["augment"] = info.augmentation
        if cfg.eps is None and cfg.norm in NORMS:
            filled["eps"] = info.default_eps(cfg.norm)
        own = {k: v for m, k, v in info.method_defaults if m == cfg.method and k not in cfg.method_args}
        if own and cfg.norm == "linf" and not method_given:
            filled["method_args"] = {**cfg.method_args, **own}
    if cfg.attack_steps is None and cfg.method in METHODS:
        steps = METHODS.get(cfg.method).default_steps
        eps = filled.get("eps", cfg.eps)
        # the data set's training attack: for a method on the common default of 10 steps, in L-inf
        # (eps <= 1, so eps/2 stays a valid step), where the run sets neither the steps nor the step
        if (steps == Method.default_steps and cfg.step_size is None and cfg.norm == "linf"
                and cfg.dataset in DATASETS and eps is not None and eps > 0):
            steps, fraction = DATASETS.get(cfg.dataset).train_attack
            if fraction != 0.25:  # eps/4 is the step of an unset step_size anyway
                filled["step_size"] = fraction * eps
        filled["attack_steps"] = steps
    return filled


def saved_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved config with the defaults it derived filled in (older versions saved them
    unset), to compare key by key with the config a resumed run is given, and to resume from; a
    config that is no longer valid comes back as it was saved (so it shows as changed). Ours is not
    resolved again. A data set's own hyper-parameter values are written into every config resolved
    since they exist, so one missing from a saved config ran with the method's own default (arow
    0.8 and earlier: ARoW's lambda 3.5 on Fashion-MNIST), and that is what it resumes with."""
    try:
        cfg = TrainConfig.from_dict(dict(saved))
        filled = derived_defaults(cfg)
        if "method_args" in filled and cfg.method in METHODS:
            defaults = METHODS.get(cfg.method).defaults()
            filled["method_args"] = {**cfg.method_args, **{k: defaults[k] for k in filled["method_args"]
                                                           if k not in cfg.method_args and k in defaults}}
        return dataclasses.replace(cfg, **filled).validate().to_dict()
    except ValueError:
        return dict(saved)


# --------------------------------------------------------------------------- method flags
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


# --------------------------------------------------------------------------- the command line's layers
def resolve_config(overrides: dict[str, Any], method_overrides: Optional[dict[str, Any]] = None, *,
                   preset: Optional[str] = None, resume: bool = False) -> TrainConfig:
    """The config of ``arow train``, in this order of precedence (last wins): the defaults, a preset
    (or a run's ``config.json``), the saved config of the run being resumed, the flags given now
    (``overrides``: config fields; ``method_overrides``: hyper-parameter flags by dest name, see
    :func:`method_flags`); then :func:`resolve`. ``out`` defaults to
    ``runs/<dataset>-<method>-<model>-s<seed>``.

    Args:
        overrides: config fields given now (None: not given)
        method_overrides: method hyper-parameters given now, by flag name (None: not given)
        preset: recipe name (see `arow list`), YAML file, or a run's config.json to replay it (its recipe:
            never its out folder); the fields given override it
        resume: continue the run in the config's out folder from its last.pt, with the config saved
            there (only how it runs may change)

    >>> resolve_config({"method": "trades"}, {"beta": 3.0}).method_args
    {'beta': 3.0}
    """

    if resume and preset:
        raise ConfigError("--preset cannot be combined with --resume: a resumed run continues with the config "
                          "saved in its folder (flags given with --resume may only change how it runs)")
    base: dict[str, Any] = load_preset(preset) if preset else {}
    if preset and str(preset).endswith(".json"):  # a run's config.json replays what that run ran
        base = saved_config(base)
    if base.get("out") is not None:  # a replayed config.json never chooses where this run writes
        log.info("ignoring out=%s of %s: the run goes to --out (or the default folder)", base["out"], preset)
        base["out"] = None
    if resume and overrides.get("out"):
        run = RunDir(overrides["out"])
        if run.has_checkpoint():  # the resumed run's own experiment is the base; changes are refused later
            base = saved_config(run.load_resume_state()["config"])
    preset_method = base.get("method", "arow")
    preset_norm = base.get("norm", "linf")
    preset_epochs = base.get("epochs")
    base.update({k: v for k, v in overrides.items() if v is not None and k != "method_args"})
    if not resume and preset_epochs is not None:
        base.update(fit_epoch_values(base, preset_epochs, given=[k for k, v in overrides.items() if v is not None]))
    if not resume and base.get("norm", "linf") != preset_norm and overrides.get("eps") is None \
            and base.get("eps") is not None:
        # a preset's eps is a radius in its own norm (8/255 L-inf): --norm l2 takes the data set's L2 default
        log.info("ignoring the preset's eps %s: it is an %s radius, not an %s one", base["eps"], preset_norm,
                 base["norm"])
        base["eps"] = None
    base["method_args"] = _method_args(base, preset_method, method_overrides or {})
    if base.get("swa_start") == 0:  # --swa-start 0 turns off a preset's SWA
        base["swa_start"] = None
    cfg = TrainConfig.from_dict(base)
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=f"runs/{cfg.dataset}-{cfg.method}-{cfg.model}-s{cfg.seed}")
    return resolve(cfg)


#: the settings that count epochs, which a shorter --epochs may leave beyond the run's end
EPOCH_VALUES = ("swa_start", "warmup_epochs", "milestones")


def fit_epoch_values(base: dict[str, Any], preset_epochs: Any, given: Any = ()) -> dict[str, Any]:
    """The epoch-counting settings of a preset (:data:`EPOCH_VALUES`) that a shorter ``--epochs``
    leaves beyond the run's end (they would never take effect, or be refused), scaled by
    ``epochs / preset_epochs``, each with one logged line: milestones become fractions of
    ``--epochs``. Those ``given`` on the command line are kept as they are (and refused if out of
    range by :meth:`TrainConfig.validate`).

    >>> fit_epoch_values({"epochs": 4, "swa_start": 51, "warmup_epochs": 0}, 120)
    {'swa_start': 2}
    """
    epochs = base.get("epochs")
    if not (isinstance(epochs, int) and isinstance(preset_epochs, (int, float)) and 0 < epochs < preset_epochs):
        return {}
    scale, fitted = epochs / preset_epochs, {}
    swa, warmup, milestones = (base.get(k) for k in EPOCH_VALUES)
    if "swa_start" not in given and isinstance(swa, (int, float)) and swa > epochs:
        fitted["swa_start"] = min(max(1, round(swa * scale)), epochs)
    if "warmup_epochs" not in given and isinstance(warmup, (int, float)) and warmup >= epochs:
        fitted["warmup_epochs"] = warmup * scale
    numbers = isinstance(milestones, list) and all(isinstance(m, (int, float)) for m in milestones)
    if "milestones" not in given and numbers and milestones and all(1 <= m < preset_epochs for m in milestones) \
            and any(m >= epochs for m in milestones):  # fractions (< 1) follow --epochs by themselves
        fitted["milestones"] = [round(m / preset_epochs, 6) for m in milestones]
    for k, v in fitted.items():
        log.info("%s %s of the preset (set for %s epochs) is past --epochs %d: scaled to %s%s", k, base[k],
                 preset_epochs, epochs, v, " (fractions of --epochs)" if k == "milestones" else "")
    return fitted


def _method_args(base: dict[str, Any], preset_method: str, method_overrides: dict[str, Any]) -> dict[str, Any]:
    """The chosen method's hyper-parameters: those of ``base`` that it takes, then the flags given."""
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
    for dest, value in method_overrides.items():
        if value is None:
            continue
        if method not in table.get(dest, {}):
            takes = sorted({"--" + d.replace("_", "-") for d, m in table.items() if method in m})
            raise ConfigError(f"--{dest.replace('_', '-')} does not apply to method {method!r} "
                              f"(it takes: {', '.join(takes) or 'none'})")
        margs[table[dest][method]] = value
    for k, v in margs.items():  # each value within its stated range now, not when training starts
        try:
            allowed[k].check(k, v)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return margs
