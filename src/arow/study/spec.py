"""What a study is: its rows (methods with their settings), seeds, recipe and evaluation, checked
completely before anything runs.

A study file (YAML or JSON) or the flags of ``arow study`` give the keys of :class:`StudySpec`.
Every value is checked for its type here (a seed is an integer, ``guards`` is true or false, a
row label can name a folder); :func:`arow.study.cells.resolve_cells` then resolves each cell's
training config through the resolver ``arow train`` uses, so a bad learning rate or
hyper-parameter fails before the first cell starts. Non-finite numbers are refused everywhere:
JSON cannot hold them, and a study folder must say exactly what was run.

>>> spec = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0, 1]})
>>> [c.name for c in spec.cells()]
['arow-s0', 'trades-s0', 'arow-s1', 'trades-s1']
"""
from __future__ import annotations

import json
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from ..attacks import get_attack
from ..config import TrainConfig
from ..config.presets import UniqueKeyLoader
from ..methods import METHODS
from ..reporting.stats import check_plan
from ..runs.studydir import StudyDir

PathLike = Union[str, os.PathLike]

#: a row label names the cells' run folders (``cells/<label>-s<seed>``): no path separators, no ``..``
LABEL = re.compile(r"[A-Za-z0-9._-]+")
#: config keys the study sets for every cell itself (from its own keys, the row and the seed)
RESERVED = frozenset({"method", "method_args", "seed", "out", "eval_attacks", "guards", "eval_n"})
#: study keys that ``--set KEY=VALUE`` may also set (everything else it sets is a config override)
STUDY_SETTINGS = ("eval_n",)
#: config keys whose values are words (``--set amp=off`` must stay the word, not YAML's boolean)
_STR_FIELDS = {k: str in (typing.get_args(h) or (h,)) for k, h in typing.get_type_hints(TrainConfig).items()}
VARIANT_KEYS = ("method", "label", "method_args", "overrides", "aa", "seeds")


class StudyError(ValueError):
    """The study definition or folder is wrong; the message says which and why, on one line."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_label(label: Any, where: str = "study method") -> str:
    """``label`` if it can name a cell folder: letters, digits, ``.``, ``_`` and ``-`` (not ``.`` or ``..``)."""
    if not isinstance(label, str) or not LABEL.fullmatch(label) or set(label) == {"."}:
        raise StudyError(f"{where}: a row label may hold letters, digits, '.', '_' and '-' only (it names the "
                         f"cells' folders), got {label!r}")
    return label


def check_finite(value: Any, where: str) -> None:
    """Refuse a NaN or infinity anywhere in ``value`` (a number, or mappings and lists of them)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise StudyError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_finite(v, where)


def _count(value: Any, key: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise StudyError(f"{key} must be an integer >= {lo}, got {value!r}")
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise StudyError(f"{where} must be a mapping of names to values, got {value!r}")
    check_finite(value, where)
    return dict(value)


def parse_seeds(seeds: Any, where: str = "seeds") -> tuple[int, ...]:
    """Distinct integers >= 0, at least one, from a list or a comma-separated string."""
    items = [s.strip() for s in seeds.split(",") if s.strip()] if isinstance(seeds, str) else seeds
    if not isinstance(items, (list, tuple)):
        raise StudyError(f"{where} must be a list of integers, got {seeds!r}")
    out = []
    for s in items:
        if isinstance(s, str) and s.isdigit():
            s = int(s)
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise StudyError(f"{where} must be integers >= 0, got {seeds!r}")
        out.append(s)
    if not out or len(set(out)) != len(out):
        raise StudyError(f"{where} must be distinct integers, at least one, got {seeds!r}")
    return tuple(out)


def attack_names(attacks: str) -> list[str]:
    return [a.strip() for a in attacks.split(",") if a.strip()]


def metric_names(spec: Union["StudySpec", dict[str, Any]]) -> list[str]:
    """The study's columns, headline first: AutoAttack, the other attacks in order, clean accuracy last."""
    aa_n, attacks = (spec["aa_n"], spec["attacks"]) if isinstance(spec, dict) else (spec.aa_n, spec.attacks)
    names = attack_names(attacks)
    return (["autoattack"] if aa_n else []) + [a for a in names if a != "clean"] + (["clean"] if "clean" in names else [])


@dataclass(frozen=True)
class Variant:
    """One row of the study: a method plus settings, under its own label.

    ``method_args`` are the method's hyper-parameters, ``overrides`` any other config fields;
    ``aa=False`` skips the AutoAttack step for this row (e.g. ablations on a slow machine);
    ``seeds``: this row's own seeds (None: the study's).
    """

    label: str
    method: str
    method_args: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    aa: bool = True
    seeds: Optional[tuple[int, ...]] = None

    @staticmethod
    def parse(item: Union[str, dict[str, Any]]) -> "Variant":
        """A row from a method name or a mapping with ``method`` and optional ``label``, ``method_args``,
        ``overrides``, ``aa`` and ``seeds``."""
        if isinstance(item, str):
            return Variant(label=check_label(item), method=item)
        if not isinstance(item, dict) or not isinstance(item.get("method"), str):
            raise StudyError(f"a study method is a name or a mapping with 'method' (and optional "
                             f"{', '.join(repr(k) for k in VARIANT_KEYS[1:])}), got {item!r}")
        unknown = set(item) - set(VARIANT_KEYS)
        if unknown:
            raise StudyError(f"unknown key(s) {sorted(unknown)} in study method {item!r}; known: {list(VARIANT_KEYS)}")
        label = check_label(item.get("label", item["method"]))
        method_args = _mapping(item.get("method_args"), f"{label}: method_args")
        if any(v is None for v in method_args.values()):
            raise StudyError(f"{label}: method_args must not hold empty values, got {method_args!r}")
        aa = item.get("aa", True)
        if not isinstance(aa, bool):
            raise StudyError(f"{label}: aa must be true or false, got {aa!r}")
        seeds = item.get("seeds")
        return Variant(label=label, method=item["method"], method_args=method_args,
                       overrides=_mapping(item.get("overrides"), f"{label}: overrides"), aa=aa,
                       seeds=None if seeds is None else parse_seeds(seeds, f"{label}: seeds"))


@dataclass(frozen=True)
class Cell:
    """One (row, seed) of the study: one run folder, ``cells/<label>-s<seed>``."""

    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return StudyDir.cell_name(self.variant.label, self.seed)


@dataclass
class StudySpec:
    """What a study trains and how it scores it (``arow study STUDY.yaml`` or flags)."""

    variants: list[Variant] = field(metadata={"flag": "methods", "comma": True, "help": "methods, e.g. arow,trades,"
                                             "mart,pgd-at (variants with their own settings: in the YAML)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "the seeds of every method"})
    preset: Optional[str] = field(default=None, metadata={
        "help": "recipe of every run (name, YAML or config.json; default: the embedded one)"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "config overrides of every run"})
    baseline: str = field(default="trades", metadata={
        "help": "method the others are compared against, paired by seed (with --collect: another row, written "
                "to results_vs_<row>.*)"})
    attacks: str = field(default="clean,pgd20,cw", metadata={"help": "test-set attacks of every run"})
    aa_n: int = field(default=1000, metadata={"help": "standard AutoAttack on the first N test images (0 skips)"})
    eps_curve_n: int = field(default=1000, metadata={"help": "PGD-20 against eps on the first N test images "
                                                             "(0 skips)"})
    eval_n: Optional[int] = field(default=None, metadata={
        "help": "an exploratory study: every run evaluated on the first N test images only (a SUBSET; every page "
                "of the study says so; default: the full test set)"})
    guards: bool = field(default=True, metadata={"help": "run the robustness guards before each run's evaluation"})
    allow_guard_failures: bool = field(default=False, metadata={
        "help": "report a run's numbers even when a robustness guard trips (the page marks them; as for arow train)"})
    plan: Optional[dict[str, Any]] = field(default=None, metadata={
        "help": "the analysis plan, fixed before the first run (primary metrics, comparisons, margin, correction)"})

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "StudySpec":
        """The checked study of a mapping (a study file, flags, ``study.json``); StudyError names what is wrong."""
        if not isinstance(d, dict):
            raise StudyError(f"a study is a mapping (methods, seeds, preset, ...), got {d!r}")
        d = dict(d)
        known = {"methods", *(f for f in StudySpec.__dataclass_fields__ if f != "variants")}
        unknown = set(d) - known
        if unknown:
            raise StudyError(f"unknown study key(s) {sorted(unknown)}; known: {sorted(known)}")
        methods = d.pop("methods", None)
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        if not methods:
            raise StudyError("a study needs at least one method ('methods: [arow, trades, ...]' or --methods)")
        if not isinstance(methods, (list, tuple)):
            raise StudyError(f"methods must be a list of methods, got {methods!r}")
        spec = StudySpec(variants=[Variant.parse(m) for m in methods], seeds=list(parse_seeds(d.pop("seeds", [0, 1, 2]))),
                         **_settings(d))
        spec.check()
        return spec

    @staticmethod
    def read(path: PathLike) -> dict[str, Any]:
        """The mapping in a study file (YAML, or JSON for ``.json``), unchecked; ``name`` is dropped."""
        p = Path(path)
        if not p.is_file():
            raise StudyError(f"study file {p} does not exist")
        try:
            data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.load(p.read_text(), Loader=UniqueKeyLoader)
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StudyError(f"{p}: not valid YAML/JSON ({_one_line(e)})") from None
        if not isinstance(data, dict):
            raise StudyError(f"{p}: expected a mapping (methods, seeds, preset, ...)")
        data.pop("name", None)
        return data

    @staticmethod
    def load(path: PathLike) -> "StudySpec":
        return StudySpec.from_dict(StudySpec.read(path))

    @staticmethod
    def resolve(path: Optional[PathLike], flags: dict[str, Any], sets: Sequence[str] = ()) -> "StudySpec":
        """A study file (optional), then the flags given (None: not given), then ``KEY=VALUE`` items
        (``--set``; values read as YAML): config overrides of every cell, or one of the study's
        own settings (``eval_n``)."""
        data = StudySpec.read(path) if path else {}
        data.update({k: v for k, v in flags.items() if v is not None})
        for item in sets:
            key, sep, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not key:
                raise StudyError(f"--set takes KEY=VALUE, got {item!r}")
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise StudyError(f"--set {item}: not a YAML value ({_one_line(e)})") from None
            if isinstance(value, bool) and _STR_FIELDS.get(key) and text.strip().lower() not in ("true", "false"):
                value = text.strip()  # YAML 1.1 reads on/off/yes/no as booleans; amp=off means the word
            if key in STUDY_SETTINGS:
                data[key] = value
            else:
                overrides = data.get("overrides")
                data["overrides"] = {**(overrides if isinstance(overrides, dict) else {}), key: value}
        return StudySpec.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = d.pop("variants")
        return d

    def check(self) -> None:
        """The rules between the keys (each key's own type was checked when it was read)."""
        labels = [v.label for v in self.variants]
        if len(set(labels)) != len(labels):
            raise StudyError(f"study method labels must be unique, got {labels}")
        for v in self.variants:
            if v.method not in METHODS.names():
                raise StudyError(f"unknown method {v.method!r} in study; choose from {METHODS.names()}")
            hp = METHODS.get(v.method).hparams
            bad = set(v.method_args) - set(hp)
            if bad:
                raise StudyError(f"{v.label}: {v.method} has no hyper-parameter(s) {sorted(bad)}; it has {sorted(hp)}")
        fields = set(TrainConfig.__dataclass_fields__)
        for where, ov in [("overrides", self.overrides)] + [(f"{v.label}: overrides", v.overrides) for v in self.variants]:
            bad = set(ov) - fields
            if bad:
                raise StudyError(f"{where}: unknown config key(s) {sorted(bad)}")
            if set(ov) & RESERVED:
                raise StudyError(f"{where}: {sorted(set(ov) & RESERVED)} are set by the study itself (the test "
                                 f"subset of an exploratory study: eval_n at the top of the study, or --eval-n)")
        if self.baseline not in labels:
            raise StudyError(f"baseline {self.baseline!r} is not one of the study's methods {labels} (--baseline)")
        if self.eval_n is not None and self.aa_n == self.eval_n:
            raise StudyError(f"aa_n and eval_n are both {self.aa_n}: each writes eval_n{self.aa_n}.json; give "
                             f"AutoAttack another number of test images (or 0 to skip it)")
        attacks = attack_names(self.attacks)
        if not attacks:
            raise StudyError("attacks must name at least one attack, e.g. clean,pgd20,cw")
        if "autoattack" in attacks:
            raise StudyError("AutoAttack is the study's own step on the first aa_n test images; leave it out of attacks")
        for a in attacks:
            try:
                get_attack(a, 0.1)
            except (ValueError, KeyError) as e:
                raise StudyError(f"attacks: {_one_line(e)}") from None
        if self.plan is not None:
            try:
                check_plan(self.plan, labels, metric_names(self))
            except ValueError as e:
                raise StudyError(_one_line(e)) from None

    def cells(self) -> list[Cell]:
        """Seed-major order: a stopped study leaves whole seeds finished, which pair."""
        order = list(dict.fromkeys([*self.seeds, *(s for v in self.variants for s in (v.seeds or ()))]))
        return [Cell(v, s) for s in order for v in self.variants if s in (v.seeds or self.seeds)]

    @property
    def exploratory(self) -> bool:
        """Every run is evaluated on a subset of the test set (``eval_n``): a smoke study, not a result."""
        return self.eval_n is not None


def _settings(d: dict[str, Any]) -> dict[str, Any]:
    """The study's keys other than methods and seeds, each checked for its type."""
    out: dict[str, Any] = {}
    preset = d.get("preset")
    if preset is not None and not (isinstance(preset, str) and preset):
        raise StudyError(f"preset must be a preset name or a file, got {preset!r}")
    out["preset"] = preset
    out["overrides"] = _mapping(d.get("overrides"), "overrides")
    baseline = d.get("baseline", StudySpec.__dataclass_fields__["baseline"].default)
    if not isinstance(baseline, str):
        raise StudyError(f"baseline must be a row label, got {baseline!r}")
    out["baseline"] = baseline
    attacks = d.get("attacks", StudySpec.__dataclass_fields__["attacks"].default)
    if isinstance(attacks, (list, tuple)) and all(isinstance(a, str) for a in attacks):
        attacks = ",".join(attacks)
    if not isinstance(attacks, str):
        raise StudyError(f"attacks must be attack names such as clean,pgd20,cw, got {attacks!r}")
    out["attacks"] = attacks
    for key in ("aa_n", "eps_curve_n"):
        out[key] = _count(d.get(key, StudySpec.__dataclass_fields__[key].default), key, 0)
    out["eval_n"] = None if d.get("eval_n") is None else _count(d["eval_n"], "eval_n", 1)
    guards = d.get("guards", True)
    if not isinstance(guards, bool):
        raise StudyError(f"guards must be true or false, got {guards!r}")
    out["guards"] = guards
    allow = d.get("allow_guard_failures", False)
    if not isinstance(allow, bool):
        raise StudyError(f"allow_guard_failures must be true or false, got {allow!r}")
    out["allow_guard_failures"] = allow
    plan = d.get("plan")
    if plan is not None and not isinstance(plan, dict):
        raise StudyError(f"plan must be a mapping, got {plan!r}")
    if plan is not None:
        check_finite(plan, "plan")
    out["plan"] = plan
    return out
