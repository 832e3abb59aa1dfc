"""What an evaluation is asked to do, declared once: :class:`EvalSettings` (attacks, test subset,
threat model, checkpoint, device, outputs) and :class:`GuardSettings` (the robustness guards).

Each field carries its ``arow eval`` flag in its metadata (help text, group, choices, the flag's
name where it is not the field's), as :class:`~arow.config.schema.TrainConfig` does for ``arow
train``: :func:`arow.cli.flags.add_dataclass_flags` builds the flags from these classes, and
:meth:`EvalSettings.check` / :meth:`GuardSettings.check` are the one place their values are
checked. :func:`resolve_threat` is the one place the radius and norm of an evaluation are decided:
given, the model's own, or the data set's default (``DATASETS.get(name).default_eps(norm)``).

>>> s = EvalSettings(attacks=["clean", "pgd20"], n=500).check()
>>> s.attacks, s.n, GuardSettings().n
(['clean', 'pgd20'], 500, 200)
>>> resolve_threat(None, None, dataset="cifar10", trained_eps=8 / 255, trained_norm="linf") == (8 / 255, "linf")
True
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import torch

from ..attacks import Attack
from ..data import DATASETS
from ..threat import NORMS, check_eps, check_norm
from .cascade import EVAL_BATCH_SIZE, EVAL_BATCH_SIZE_CUDA

S = TypeVar("S", bound="_Flagged")


def setting(default: Any = None, help: str = "", *, group: str = "evaluation", flag: Optional[str] = None,
            lo: Optional[int] = None, comma: bool = False, metavar: Optional[str] = None, factory: Any = None) -> Any:
    """A settings field with its flag declared beside it: ``help``, the ``group`` of ``--help`` it is
    listed in, the ``flag`` name where it is not the field's, ``lo`` (the smallest whole number it
    takes), ``comma`` (a list given comma-separated) and ``metavar`` (its value's placeholder in
    ``--help``). Choices come from ``Literal`` types."""
    meta = {"help": help, "group": group, "lo": lo, "comma": comma, "metavar": metavar,
            **({"flag": flag} if flag else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Flagged:
    """Building settings from flags or keyword options named like the flags (``guards_n`` for
    ``--guards-n``)."""

    @classmethod
    def flag_names(cls) -> dict[str, str]:
        """Flag name (``--`` and dashes left out) -> field name."""
        return {f.metadata.get("flag", f.name): f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_flags(cls: type[S], values: Mapping[str, Any], base: Optional[S] = None) -> S:
        """``base`` (default: the defaults) with the flags in ``values`` that were given (not None)."""
        names = cls.flag_names()
        given = {names[k]: v for k, v in values.items() if k in names and v is not None}
        return dataclasses.replace(base if base is not None else cls(), **given)  # type: ignore[type-var]


def _whole(value: Any, flag: str, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"--{flag.replace('_', '-')} must be a whole number >= {lo}, got {value!r}")


def _check_ranges(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value, lo = getattr(obj, f.name), f.metadata.get("lo")
        if lo is not None and value is not None:
            _whole(value, f.metadata.get("flag", f.name), lo)


@dataclass(frozen=True)
class EvalSettings(_Flagged):
    """What to evaluate and how: the ``arow eval`` flags other than the model's source."""

    attacks: list[Union[str, Attack]] = setting(
        help="the attacks, in order: clean, pgd20, cw, fgsm, autoattack (standard; runs on what the attacks "
             "before it left robust), apgd-monitor, ... (`arow list`)", comma=True,
        factory=lambda: ["clean", "pgd20", "cw"])
    n: Optional[int] = setting(None, "first N test examples only (default: the full test set)", lo=1)
    eps: Optional[float] = setting(None, "radius, e.g. 0.1 or 8/255 (default: the eps the model was trained with; "
                                         "with another --norm, that norm's data-set default; required for your own "
                                         "model)")
    norm: Optional[Literal["linf", "l2"]] = setting(None, "threat model (default: the norm the model was trained "
                                                          "with; L-inf for your own model)")
    which: Literal["final", "best", "last"] = setting("final", "the run's checkpoint: final, best (by validation) "
                                                               "or last")
    dataset: Optional[str] = setting(None, "test set (default: the dataset the model was trained on; required for "
                                           "your own model)")
    data_dir: Optional[str] = setting(None, "folder with the dataset files (default: the run's)", metavar="DIR")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    batch_size: Optional[int] = setting(None, f"examples per attack batch (default: {EVAL_BATCH_SIZE} on the CPU, "
                                              f"the fastest measured there, {EVAL_BATCH_SIZE_CUDA} on CUDA); the "
                                              f"verdicts of PGD and CW do not depend on it", lo=1)
    resume: bool = setting(True, "continue an interrupted evaluation from DIR/eval_state instead of recomputing "
                                 "everything")
    json_out: Optional[str] = setting(None, "where to write the results (default: DIR/eval.json of a run, "
                                            "DIR/eval_n<N>.json on a subset; your own model's next to its weights "
                                            "or file, eval_<file name>.json)", flag="json", metavar="FILE")
    robustbench: Optional[str] = setting(None, "RobustBench model-info JSON (default for a run whenever clean and "
                                               "autoattack ran: DIR/robustbench.json on the full test set in the "
                                               "trained norm, else DIR/robustbench_n<N>[_l2].json)",
                                      metavar="FILE")
    tf32: bool = setting(False, "let float32 matmuls and convolutions use TF32 on CUDA (Ampere and later) during the "
                                "attacks: faster, but 10-bit mantissas instead of float32's (default: off, strict "
                                "float32 whatever the process set; the guards' own checks always run so; recorded in "
                                "the results as float32_matmul; no effect on the CPU)")

    def check(self) -> "EvalSettings":
        """The settings with every value checked (one line naming the flag otherwise) and the attack
        names stripped. The radius is checked against its norm by :func:`resolve_threat`."""
        _check_ranges(self)
        attacks = [a.strip() if isinstance(a, str) else a for a in self.attacks]
        attacks = [a for a in attacks if not isinstance(a, str) or a]
        if not attacks:
            raise ValueError("--attacks is empty")
        if self.norm is not None:
            check_norm(self.norm)
        eps = self.eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps)
                                or eps < 0):
            raise ValueError(f"--eps must be a finite number >= 0, got {eps!r}")
        if self.which not in ("final", "best", "last"):
            raise ValueError(f"--which must be final, best or last, got {self.which!r}")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS.names())}, got {self.dataset!r}")
        _check_device(self.device)
        if not isinstance(self.tf32, bool):
            raise ValueError(f"--tf32 must be True or False, got {self.tf32!r}")
        names = {a if isinstance(a, str) else a.name for a in attacks}
        if self.robustbench and not {"clean", "autoattack"} <= names:
            raise ValueError("--robustbench needs both clean and autoattack in --attacks")
        return dataclasses.replace(self, attacks=attacks)

    def resolved(self, eps: float, norm: str) -> "EvalSettings":
        """A copy with the threat model decided (see :func:`resolve_threat`)."""
        return dataclasses.replace(self, eps=eps, norm=norm)


@dataclass(frozen=True)
class GuardSettings(_Flagged):
    """The robustness guards: checks against overstated robustness that run before the attacks."""

    enabled: bool = setting(True, "run the checks against overstated robustness first (when skipped, the results "
                                  "say so)", group="guards", flag="guards")
    n: int = setting(200, "test images the guards use", group="guards", flag="guards_n", lo=1)
    seed: Optional[int] = setting(None, "which random test images the guards use (default: derived from a hash of the "
                                  "model's weights and the test data: the same verdicts every time; recorded)",
                                  group="guards", flag="guards_seed", lo=0)
    allow_failures: bool = setting(False, "report the numbers even when a guard trips (default: stop with an "
                                          "error)", group="guards", flag="allow_guard_failures")

    def check(self) -> "GuardSettings":
        """The settings, every value checked (one line naming the flag otherwise)."""
        _check_ranges(self)
        return self


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None


def eval_settings(settings: Optional[EvalSettings] = None, guards: Union[GuardSettings, bool, None] = None, *,
                  attacks: Optional[Sequence[Union[str, Attack]]] = None,
                  **options: Any) -> tuple[EvalSettings, GuardSettings]:
    """Checked settings from settings objects and/or keyword options named like the ``arow eval``
    flags (``n=500``, ``guards_n=50``, ``json_out=...``; ``guards=False`` skips the guards), the
    options overriding the objects.

    >>> s, g = eval_settings(attacks=["clean"], n=20, guards_n=10)
    >>> s.attacks, s.n, g.n, g.enabled
    (['clean'], 20, 10, True)
    """
    settings = settings if settings is not None else EvalSettings()
    if isinstance(guards, bool):
        options["guards"] = guards
        guards = None
    guard_settings = guards if guards is not None else GuardSettings()
    if "json_out" in options:
        options["json"] = options.pop("json_out")
    if attacks is not None:
        options["attacks"] = attacks
    if isinstance(options.get("attacks"), str):  # "clean,pgd20", as on the command line
        options["attacks"] = options["attacks"].split(",")
    if options.get("attacks") is not None:
        options["attacks"] = list(options["attacks"])
    unknown = set(options) - set(EvalSettings.flag_names()) - set(GuardSettings.flag_names())
    if unknown:
        raise TypeError(f"unknown evaluation option(s): {', '.join(sorted(unknown))}")
    return (EvalSettings.from_flags(options, settings).check(), GuardSettings.from_flags(options, guard_settings).check())


def resolve_threat(eps: Optional[float], norm: Optional[str], *, dataset: Optional[str] = None,
                   dims: Optional[int] = None, trained_eps: Optional[float] = None,
                   trained_norm: Optional[str] = None) -> tuple[float, str]:
    """The radius and norm of an evaluation, decided once: ``norm`` if given, else the norm the
    model was trained in (``trained_norm``; L-inf when unknown); ``eps`` if given, else the
    model's training eps when evaluating in its training norm, else ``dataset``'s default in that
    norm (L-inf 0.1 or 8/255; L2 1.5 or 0.5). A model whose training is unknown (``trained_norm``
    None: your own model) needs ``eps``. The radius is checked against the norm's range on inputs
    of ``dims`` values (default: the data set's image size).

    >>> resolve_threat(None, "l2", dataset="fashion-mnist", trained_eps=0.1, trained_norm="linf")
    (1.5, 'l2')
    """
    norm = check_norm(norm) if norm is not None else (trained_norm or "linf")
    info = DATASETS.get(dataset) if dataset in DATASETS else None
    if eps is None:
        if trained_norm is None:
            raise ValueError("--eps is required for your own model (e.g. --eps 8/255): its training eps is not known")
        if trained_eps is not None and norm == trained_norm:
            eps = trained_eps
        else:
            eps = info.default_eps(norm) if info is not None else None
            if eps is None:
                raise ValueError(f"no default {norm} eps for data set {dataset!r}: pass --eps")
    return check_eps(eps, norm, dims if dims is not None else dataset_dims(str(dataset))), norm


def dataset_dims(dataset: str) -> int:
    """Values per input of a built-in data set (channels x height x width)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; choose one of: {', '.join(DATASETS.names())}")
    info = DATASETS.get(dataset)
    return info.in_channels * info.image_size ** 2


__all__ = ["EvalSettings", "GuardSettings", "eval_settings", "resolve_threat", "dataset_dims", "NORMS"]
