"""Studies: a grid of methods x seeds trained and evaluated alike, then compared with paired statistics.

A study folder holds ``study.json`` (the resolved study), one ordinary run folder per cell under
``cells/<label>-s<seed>``, and the comparison (``results.md``, ``results.csv``, ``results.json`` and
PNGs). Every cell is three ``arow`` commands, each skipped when its output exists:

1. ``arow train`` with the study's preset, the variant's method and overrides, the cell's seed; its
   final evaluation is clean + PGD-20 + CW-30 on the FULL test set with the robustness guards
   (``eval.json``); a killed training run continues with ``--resume``;
2. ``arow eval DIR --attacks clean,autoattack --n N`` on the first N test images, the same images
   for every cell (``eval_n<N>.json``; a killed evaluation continues from its saved state);
3. ``arow plot DIR --eps-curve --n M``: PGD-20 accuracy against eps (``eps_curve.json``).

Because every cell is scored on the same test images with the same attacks and seeds are shared,
differences between two methods are paired by seed: the comparison reports, per method against the
baseline, the mean paired difference with a 95% Student-t interval over seeds and the number of seeds
it won.

>>> spec = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0, 1]})
>>> [c.name for c in spec.cells()]
['arow-s0', 'trades-s0', 'arow-s1', 'trades-s1']
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import yaml

from ..runs.checkpoint import atomic_write_bytes, dump_json
from ..runs.rundir import RunDir
from ..config.schema import _UniqueKeyLoader
from ..attacks import get_attack
from ..config.schema import TrainConfig
from ..methods import METHODS
from ..config.schema import method_flags
from ..reporting.plots import study_plots
from ..reporting.tables import markdown_table

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

STUDY_FILE = "study.json"
FAILED_FILE = "study_failed.json"
LOG_FILE = "study.log"
#: the reported model's last validation on the held-out training split (never the test set)
VAL_METRICS = ("val_robust", "val_clean")
METRIC_LABELS = {"val_robust": "validation robust", "val_clean": "validation clean", "autoattack": "AutoAttack", "pgd20": "PGD-20", "cw": "CW-30", "fgsm": "FGSM", "clean": "clean"}


def metric_names(spec: Union["StudySpec", dict[str, Any]]) -> list[str]:
    """The study's columns, headline first: AutoAttack, the other attacks in order, clean accuracy last."""
    aa_n, attacks = (spec["aa_n"], spec["attacks"]) if isinstance(spec, dict) else (spec.aa_n, spec.attacks)
    names = [a.strip() for a in attacks.split(",") if a.strip()]
    return (["autoattack"] if aa_n else []) + [a for a in names if a != "clean"] + (["clean"] if "clean" in names else [])

# Two-sided 95% quantiles of Student's t distribution, t_{0.975, df}, df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95% interval)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 paired values (df >= 1), got df={df}")
    if df <= len(_T975):
        return _T975[df - 1]
    return 1.960 + 2.4 / df  # within 0.002 of the exact quantile for df > 30


class StudyError(ValueError):
    """The study definition or folder is wrong; the message says which and why."""


@dataclass(frozen=True)
class Variant:
    """One row of the study: a method plus overrides, under its own label.

    ``method_args`` are the method's hyper-parameters, ``overrides`` any other config fields;
    ``aa=False`` skips the AutoAttack step for this row (e.g. ablations on a slow machine).
    """

    label: str
    method: str
    method_args: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    aa: bool = True
    seeds: Optional[tuple[int, ...]] = None  # this row's own seeds (None: the study's)

    @staticmethod
    def parse(item: Union[str, dict[str, Any]]) -> "Variant":
        if isinstance(item, str):
            return Variant(label=item, method=item)
        if not isinstance(item, dict) or "method" not in item:
            raise StudyError(f"a study method is a name or a mapping with 'method' (and optional 'label', "
                             f"'method_args', 'overrides', 'aa'), got {item!r}")
        unknown = set(item) - {"method", "label", "method_args", "overrides", "aa", "seeds"}
        if unknown:
            raise StudyError(f"unknown key(s) {sorted(unknown)} in study method {item!r}")
        for key in ("method_args", "overrides"):
            if not isinstance(item.get(key, {}), dict):
                raise StudyError(f"{key} of study method {item!r} must be a mapping")
        return Variant(label=str(item.get("label", item["method"])), method=str(item["method"]),
                       method_args=dict(item.get("method_args") or {}), overrides=dict(item.get("overrides") or {}),
                       aa=bool(item.get("aa", True)), seeds=_seeds(item["seeds"]) if item.get("seeds") is not None else None)


@dataclass(frozen=True)
class Cell:
    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.label}-s{self.seed}"


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
    attacks: str = field(default="clean,pgd20,cw", metadata={"help": "full-test-set attacks of every run"})
    aa_n: int = field(default=1000, metadata={"help": "standard AutoAttack on the first N test images (0 skips)"})
    eps_curve_n: int = field(default=1000, metadata={"help": "PGD-20 against eps on the first N test images "
                                                             "(0 skips)"})
    guards: bool = field(default=True, metadata={"help": "run the robustness guards before each run's evaluation"})
    plan: Optional[dict[str, Any]] = field(default=None, metadata={
        "help": "the analysis plan, fixed before the first run (primary metrics, comparisons, margin, correction)"})

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "StudySpec":
        d = dict(d)
        known = {"methods", "seeds", "preset", "overrides", "baseline", "attacks", "aa_n", "eps_curve_n", "guards", "plan"}
        unknown = set(d) - known
        if unknown:
            raise StudyError(f"unknown study key(s) {sorted(unknown)}; known: {sorted(known)}")
        methods = d.pop("methods", None)
        if not methods:
            raise StudyError("a study needs at least one method ('methods: [arow, trades, ...]' or --methods)")
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        seeds = list(_seeds(d.pop("seeds", [0, 1, 2])))
        if d.get("plan") is not None and not isinstance(d["plan"], dict):
            raise StudyError(f"plan must be a mapping, got {d['plan']!r}")
        spec = StudySpec(variants=[Variant.parse(m) for m in methods], seeds=seeds, **d)
        spec.check()
        return spec

    @staticmethod
    def load(path: PathLike) -> "StudySpec":

        p = Path(path)
        if not p.is_file():
            raise StudyError(f"study file {p} does not exist")
        try:
            data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) if p.suffix != ".json" else json.loads(p.read_text())
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise StudyError(f"{p}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise StudyError(f"{p}: expected a mapping (methods, seeds, preset, ...)")
        data.pop("name", None)
        return StudySpec.from_dict(data)

    @staticmethod
    def resolve(path: Optional[PathLike], flags: dict[str, Any], sets: Sequence[str] = ()) -> "StudySpec":
        """A study file (optional), then the flags given (None: not given), then ``KEY=VALUE``
        config overrides for every cell (``--set``; values read as YAML)."""
        data = StudySpec.load(path).to_dict() if path else {}
        data.update({k: v for k, v in flags.items() if v is not None})
        for item in sets:
            key, sep, value = item.partition("=")
            if not sep:
                raise StudyError(f"--set takes KEY=VALUE, got {item!r}")
            data.setdefault("overrides", {})[key.strip().replace("-", "_")] = yaml.safe_load(value)
        return StudySpec.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = d.pop("variants")
        return d

    def check(self) -> None:

        labels = [v.label for v in self.variants]
        if len(set(labels)) != len(labels):
            raise StudyError(f"study method labels must be unique, got {labels}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise StudyError(f"seeds must be distinct and at least one, got {self.seeds}")
        for v in self.variants:
            if v.method not in METHODS.names():
                raise StudyError(f"unknown method {v.method!r} in study; choose from {METHODS.names()}")
            hp = METHODS.get(v.method).hparams
            bad = set(v.method_args) - set(hp)
            if bad:
                raise StudyError(f"{v.label}: {v.method} has no hyper-parameter(s) {sorted(bad)}; it has {sorted(hp)}")
        fields = set(TrainConfig.__dataclass_fields__)
        reserved = {"method", "method_args", "seed", "out", "eval_attacks", "guards", "eval_n"}
        for where, ov in [("overrides", self.overrides)] + [(v.label, v.overrides) for v in self.variants]:
            bad = set(ov) - fields
            if bad:
                raise StudyError(f"{where}: unknown config key(s) {sorted(bad)}")
            if set(ov) & reserved:
                raise StudyError(f"{where}: {sorted(set(ov) & reserved)} are set by the study itself")
        if self.baseline not in labels:
            raise StudyError(f"baseline {self.baseline!r} is not one of the study's methods {labels} (--baseline)")
        if self.aa_n < 0 or self.eps_curve_n < 0:
            raise StudyError("aa_n and eps_curve_n must be >= 0 (0 skips that step)")
        attacks = [a.strip() for a in self.attacks.split(",") if a.strip()]
        if "autoattack" in attacks:
            raise StudyError("AutoAttack is the study's own step on the first aa_n test images; leave it out of attacks")
        for a in attacks:
            get_attack(a, 0.1)

    def cells(self) -> list[Cell]:
        """Seed-major order: a stopped study leaves whole seeds finished, which pair."""
        order = list(dict.fromkeys([*self.seeds, *(s for v in self.variants for s in (v.seeds or ()))]))
        return [Cell(v, s) for s in order for v in self.variants if s in (v.seeds or self.seeds)]


# --------------------------------------------------------------------------- the commands of a cell
def _seeds(seeds: Any) -> tuple[int, ...]:
    if isinstance(seeds, str):
        seeds = [s.strip() for s in seeds.split(",") if s.strip()]
    try:
        out = tuple(int(s) for s in seeds)
    except (TypeError, ValueError):
        raise StudyError(f"seeds must be integers, got {seeds!r}") from None
    if not out or len(set(out)) != len(out) or any(isinstance(s, float) and s != int(s) for s in seeds):
        raise StudyError(f"seeds must be distinct integers, at least one, got {seeds!r}")
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config_flags(overrides: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, bool):
            out.append(_flag(k) if v else "--no-" + k.replace("_", "-"))
        elif isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            for x in v:  # list-of-strings flags repeat (--extra-data A --extra-data B)
                out += [_flag(k), x]
        elif isinstance(v, (list, tuple)):
            out += [_flag(k), ",".join(str(x) for x in v)]
        else:
            out += [_flag(k), str(v)]
    return out


def _method_flags(method: str, args: dict[str, Any]) -> list[str]:

    table = method_flags()
    out: list[str] = []
    for k, v in args.items():
        dests = sorted((d for d, owners in table.items() if owners.get(method) == k), key=len, reverse=True)
        flag = _flag(dests[0])
        if isinstance(v, bool):
            if v:
                out.append(flag)
            continue
        out += [flag, str(v)]
    return out


def _aa_file(n: int) -> str:
    return f"eval_n{n}.json"


def cell_steps(spec: StudySpec, cell: Cell, cell_dir: Path, arow: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The commands still needed to finish ``cell`` (each skipped when its output exists)."""
    run = RunDir(cell_dir)
    steps: list[tuple[str, list[str]]] = []
    guards = [] if spec.guards else ["--no-guards"]
    if not _has_eval(run, spec):
        if run.file("final.pt").exists():
            steps.append(("eval", [*arow, "eval", str(cell_dir), "--attacks", spec.attacks, *guards]))
        elif run.file("last.pt").exists():
            steps.append(("train", [*arow, "train", "--resume", "--out", str(cell_dir)]))
        else:
            preset = ["--preset", spec.preset] if spec.preset else []
            steps.append(("train", [*arow, "train", *preset, "--method", cell.variant.method,
                                    *_method_flags(cell.variant.method, cell.variant.method_args),
                                    *_config_flags({**spec.overrides, **cell.variant.overrides}),
                                    "--seed", str(cell.seed), "--eval-attacks", spec.attacks, *guards,
                                    "--out", str(cell_dir)]))
    if spec.aa_n and cell.variant.aa and not _has_aa(run, spec):
        steps.append(("autoattack", [*arow, "eval", str(cell_dir), "--attacks", "clean,autoattack",
                                     "--n", str(spec.aa_n), "--no-guards"]))
    if spec.eps_curve_n and not _has_eps_curve(run, spec):
        steps.append(("eps-curve", [*arow, "plot", str(cell_dir), "--eps-curve", "--n", str(spec.eps_curve_n)]))
    return steps


def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _has_eval(run: RunDir, spec: StudySpec) -> bool:
    """A full-test-set evaluation with the study's attacks, after the guards when the study runs them
    (an evaluation without them, e.g. a run folder copied in from elsewhere, is redone)."""
    e = _read(run.file("eval.json"))
    want = {a.strip() for a in spec.attacks.split(",") if a.strip()}
    return (bool(e) and want <= set(e.get("accuracy", {})) and not e.get("subset") and not e.get("error")
            and (not spec.guards or e.get("guards_ran") is True))


def _has_aa(run: RunDir, spec: StudySpec) -> bool:
    e = _read(run.file(_aa_file(spec.aa_n)))
    return bool(e) and "autoattack" in e.get("accuracy", {})


def _has_eps_curve(run: RunDir, spec: StudySpec) -> bool:
    e = _read(run.file("eps_curve.json"))
    return bool(e) and e.get("n") == spec.eps_curve_n


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("arow: "):
            return ln
    return lines[-1] if lines else "no output"


# --------------------------------------------------------------------------- the study folder
class Study:
    """A study folder: its spec, its cells' run folders, and its comparison files."""

    def __init__(self, path: PathLike, spec: Optional[StudySpec] = None) -> None:
        self.path = Path(path)
        stored = self.path / STUDY_FILE
        if spec is None:
            if not stored.is_file():
                raise StudyError(f"{self.path} is not a study folder (no {STUDY_FILE})")
            spec = StudySpec.from_dict(json.loads(stored.read_text()))
        elif stored.is_file():
            old = StudySpec.from_dict(json.loads(stored.read_text()))
            _check_compatible(old, spec, self.path)
        self.spec = spec

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dump_json(self.spec.to_dict()).encode(), self.path / STUDY_FILE)

    def cell_dir(self, cell: Cell) -> Path:
        return self.path / "cells" / cell.name

    def commands(self, arow: Sequence[str] = ("arow",)) -> list[tuple[Cell, list[tuple[str, list[str]]]]]:
        return [(c, cell_steps(self.spec, c, self.cell_dir(c), arow)) for c in self.spec.cells()]

    def run(self, *, jobs: int = 1, echo: Callable[[str], None] = print) -> dict[str, str]:
        """Run every unfinished cell (``jobs`` at a time); returns {cell: 'done' | 'failed: ...'}.

        ``echo`` gets one line per step started and finished, stamped with the local time."""
        say = echo
        echo = lambda line: say(f"{time.strftime('%H:%M:%S')} {line}")  # noqa: E731
        if jobs < 1:
            raise StudyError(f"--jobs must be >= 1, got {jobs}")
        self.save()
        arow = [sys.executable, "-m", "arow"]
        todo = [(c, s) for c, s in self.commands(arow)]
        env_base = dict(os.environ)
        gpus = _visible_gpus()
        if not gpus and jobs > 1:  # N processes share the CPU threads
            env_base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        status: dict[str, str] = {}
        procs: set[subprocess.Popen] = set()
        lock = threading.Lock()
        stopping = threading.Event()

        def run_cell(i: int, cell: Cell, steps: list[tuple[str, list[str]]]) -> None:
            cdir = self.cell_dir(cell)
            cdir.mkdir(parents=True, exist_ok=True)
            (cdir / FAILED_FILE).unlink(missing_ok=True)
            env = dict(env_base)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            for what, cmd in steps:
                if stopping.is_set():
                    return
                echo(f"[{cell.name}] {what} ...")
                t0 = time.perf_counter()
                with open(cdir / LOG_FILE, "a") as logf:
                    logf.write(f"$ {shlex.join(cmd)}\n")
                    logf.flush()
                    p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.PIPE, text=True, env=env)
                    with lock:
                        procs.add(p)
                    _, err = p.communicate()
                    with lock:
                        procs.discard(p)
                    logf.write(err)
                if stopping.is_set():
                    return
                if p.returncode != 0:
                    msg = _last_error(err)
                    atomic_write_bytes(dump_json({"step": what, "returncode": p.returncode, "error": msg,
                                                  "command": shlex.join(cmd)}).encode(), cdir / FAILED_FILE)
                    status[cell.name] = f"failed ({what}): {msg}"
                    echo(f"[{cell.name}] FAILED in {what} (exit {p.returncode}): {msg}")
                    return
                echo(f"[{cell.name}] {what} done in {time.perf_counter() - t0:.0f}s")
            status[cell.name] = "done"

        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            futures = [pool.submit(run_cell, i, c, s) for i, (c, s) in enumerate(todo)]
            for f in futures:
                while not f.done():
                    time.sleep(0.2)
                f.result()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the running commands, which save and exit
            stopping.set()
            with lock:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return status


def study_commands(path: PathLike, spec: StudySpec) -> str:
    """The ``arow`` commands that finish each cell, as a shell script (for a scheduler); saves the
    study first, so that ``arow study --collect`` knows it."""
    study = Study(path, spec)
    study.save()
    lines = []
    for cell, steps in study.commands():
        lines.append(f"# {cell.name}" + ("" if steps else ": finished"))
        lines += [shlex.join(cmd) for _, cmd in steps]
    return "\n".join(lines)


def run_study(path: PathLike, spec: StudySpec, *, jobs: int = 1,
              echo: Callable[[str], None] = print) -> tuple[list[str], str]:
    """Run every unfinished cell of the study in ``path`` (:meth:`Study.run`), then build the comparison
    (:func:`collect`); returns the names of the cells that failed and the text of ``results.md``.

    Args:
        path: study folder (run folders go into PATH/cells)
        spec: what the study trains and how it scores it
        jobs: runs at once (one per GPU when several are visible, else sharing the CPU threads)
        echo: where the progress lines go
    """
    study = Study(path, spec)
    log.info("study %s: %d runs (%d methods x %d seeds), %d at a time", path, len(spec.cells()),
             len(spec.variants), len(spec.seeds), jobs)
    status = study.run(jobs=jobs, echo=echo)
    collect(path)
    return [k for k, v in status.items() if v != "done"], (Path(path) / "results.md").read_text()


def _check_compatible(old: StudySpec, new: StudySpec, path: Path) -> None:
    """A study may grow (more seeds, more methods); what it measured may not change under it."""
    for key in ("preset", "overrides", "attacks", "aa_n", "eps_curve_n", "guards"):
        if getattr(old, key) != getattr(new, key):
            raise StudyError(f"{path} was run with {key}={getattr(old, key)!r}, not {getattr(new, key)!r}: "
                             f"use a new --out for a different study")
    old_v = {v.label: v for v in old.variants}
    for v in new.variants:
        if v.label in old_v and old_v[v.label] != v:
            raise StudyError(f"{path}: method label {v.label!r} was defined differently before; give it a new label")


def _visible_gpus() -> list[str]:
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        n = 0
    if n < 2:
        return []
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [d.strip() for d in vis.split(",")] if vis else [str(i) for i in range(n)]


# --------------------------------------------------------------------------- statistics
@dataclass
class Summary:
    mean: Optional[float]
    std: Optional[float]  # sample std (n - 1); None with fewer than 2 values
    n: int


def summarize(values: Sequence[float]) -> Summary:
    n = len(values)
    if n == 0:
        return Summary(None, None, 0)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Summary(mean, std, n)


@dataclass
class Paired:
    """``method - baseline`` over the seeds both finished."""

    mean: Optional[float]
    low: Optional[float]  # 95% Student-t interval; None with fewer than 2 pairs
    high: Optional[float]
    wins: int
    n: int


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if not d:
        return Paired(None, None, None, 0, 0)
    s = summarize(d)
    wins = sum(x > 0 for x in d)
    if len(d) < 2:
        return Paired(s.mean, None, None, wins, 1)
    half = t975(len(d) - 1) * s.std / math.sqrt(len(d))
    return Paired(s.mean, s.mean - half, s.mean + half, wins, len(d))


# --------------------------------------------------------------------------- collecting the results
def _cell_result(study: Study, cell: Cell) -> dict[str, Any]:
    run = RunDir(study.cell_dir(cell))
    spec = study.spec
    r: dict[str, Any] = {"label": cell.variant.label, "method": cell.variant.method, "seed": cell.seed,
                         "folder": str(run.path.relative_to(study.path)), "status": "missing", "accuracy": {}}
    failed = _read(run.file(FAILED_FILE))
    e = _read(run.file("eval.json"))
    if e and _has_eval(run, spec):
        for k, v in e["accuracy"].items():
            if k in metric_names(spec):
                r["accuracy"][k] = v
        r["per_class"] = e.get("per_class", {})
        r["test_set_size"] = e.get("test_set_size")
        r["eps"] = e.get("eps")
        r["dataset"] = e.get("dataset")
        r["guards_ran"] = e.get("guards_ran")
        r["status"] = "done"
    elif run.file("last.pt").exists() or run.file("final.pt").exists():
        r["status"] = "unfinished"
    aa = _read(run.file(_aa_file(spec.aa_n))) if spec.aa_n else None
    if aa and "autoattack" in aa.get("accuracy", {}):
        r["accuracy"]["autoattack"] = aa["accuracy"]["autoattack"]
    elif spec.aa_n and cell.variant.aa and r["status"] == "done":
        r["status"] = "unfinished"
    curve = _read(run.file("eps_curve.json")) if spec.eps_curve_n else None
    if curve and curve.get("n") == spec.eps_curve_n:
        r["eps_curve"] = [(p["eps"], p["accuracy"]) for p in curve["points"]]
    metrics = [m for m in run.read_metrics() if "seconds" in m] if run.file("metrics.jsonl").exists() else []
    if metrics and run.file("final.pt").exists():  # a finished training run (not one still going)
        r["seconds_per_epoch"] = sum(m["seconds"] for m in metrics) / len(metrics)
        r["epochs"] = len(metrics)
        last = metrics[-1]  # the reported model's validation on the held-out training split
        pre = next((p for p in ("swa_", "ema_") if f"{p}val_pgd_acc" in last), "")
        for key, name in (("val_pgd_acc", "val_robust"), ("val_clean_acc", "val_clean")):
            if last.get(pre + key) is not None:
                r["accuracy"][name] = last[pre + key]
    if failed:
        r["status"] = "failed"
        r["error"] = failed.get("error")
        r["failed_step"] = failed.get("step")
    return r


def collect(path: PathLike, *, plots: bool = True, baseline: Optional[str] = None) -> dict[str, Any]:
    """Build the comparison from whatever cells have finished; writes results.md/.csv/.json (+ PNGs).

    ``baseline`` compares against another row than the study's own baseline; those results go to
    ``results_vs_<baseline>.md/.csv/.json`` (no PNGs), next to the study's own."""
    study = Study(path)
    spec = study.spec
    stem = "results"
    if baseline is not None and baseline != spec.baseline:
        if baseline not in [v.label for v in spec.variants]:
            raise StudyError(f"--baseline {baseline!r} is not a row of {study.path} "
                             f"({', '.join(v.label for v in spec.variants)})")
        spec = StudySpec(**{**spec.__dict__, "baseline": baseline})
        stem, plots = f"results_vs_{baseline}", False
    cells = [_cell_result(study, c) for c in spec.cells()]
    by_label: dict[str, list[dict[str, Any]]] = {v.label: [] for v in spec.variants}
    for r in cells:
        by_label[r["label"]].append(r)
    metrics_ = metric_names(spec)
    rows = []
    for v in spec.variants:
        done = [r for r in by_label[v.label] if r["status"] != "failed"]
        row: dict[str, Any] = {"label": v.label, "method": v.method, "method_args": v.method_args,
                               "overrides": v.overrides, "metrics": {}, "paired": {}}
        for m in metrics_ + list(VAL_METRICS) + ["seconds_per_epoch"]:
            vals = {r["seed"]: (r.get(m) if m == "seconds_per_epoch" else r["accuracy"].get(m)) for r in done}
            vals = {s: x for s, x in vals.items() if x is not None}
            row["metrics"][m] = {"per_seed": vals, **asdict(summarize(list(vals.values())))}
        rows.append(row)
    base = next(r for r in rows if r["label"] == spec.baseline)
    for row in rows:
        for m in metrics_ + list(VAL_METRICS):
            row["paired"][m] = asdict(paired(row["metrics"][m]["per_seed"], base["metrics"][m]["per_seed"]))
    result = {"spec": spec.to_dict(), "metrics": metrics_, "cells": cells, "rows": rows, "baseline": spec.baseline,
              "interval": "95% Student-t interval of the mean paired difference over seeds (df = pairs - 1)",
              "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_bytes(dump_json(result).encode(), study.path / f"{stem}.json")
    atomic_write_bytes(_csv(cells, metrics_).encode(), study.path / f"{stem}.csv")
    atomic_write_bytes(markdown(result).encode(), study.path / f"{stem}.md")
    result["files"] = [f"{stem}.md", f"{stem}.csv", f"{stem}.json"]
    if plots:

        result["plots"] = [str(p) for p in study_plots(result, study.path)]
    return result


def _pct(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _ms(s: dict[str, Any], scale: float = 100.0, unit: str = "") -> str:
    if s["mean"] is None:
        return "-"
    mean = f"{scale * s['mean']:.2f}{unit}"
    return mean if s["std"] is None else f"{mean} ± {scale * s['std']:.2f}"


def markdown(result: dict[str, Any]) -> str:

    spec = result["spec"]
    rows = result["rows"]
    cells = result["cells"]
    n_test = next((c.get("test_set_size") for c in cells if c.get("test_set_size")), None)
    eps = next((c.get("eps") for c in cells if c.get("eps") is not None), None)
    aa_label = f"AutoAttack (first {spec['aa_n']})" if spec["aa_n"] else None
    metric_cols = [(m, aa_label if m == "autoattack" else f"{METRIC_LABELS.get(m, m)} (full test set)")
                   for m in metric_names(spec)]
    out = [f"# Study results ({result['written']})", ""]
    out.append(f"Preset `{spec['preset'] or 'default'}`"
               + (f" with {spec['overrides']}" if spec["overrides"] else "")
               + f"; seeds {spec['seeds']}; eps {eps}; test set of {n_test} images. Accuracy in %, "
               "mean ± sample std over the seeds that finished (n). "
               + (f"AutoAttack is the standard version on the first {spec['aa_n']} test images (the same images "
                  "for every run); the other attacks and clean accuracy are on the full test set." if spec["aa_n"]
                  else "AutoAttack was not run; the attacks and clean accuracy are on the full test set."))
    out += ["", "## Mean over seeds", ""]
    table = []
    for r in rows:
        n = max((r["metrics"][m]["n"] for m, _ in metric_cols), default=0)
        table.append([r["label"], str(n)] + [_ms(r["metrics"][m]) for m, _ in metric_cols]
                     + [_ms(r["metrics"]["seconds_per_epoch"], 1.0, " s")])
    out.append(markdown_table(table, ["method", "n"] + [lab for _, lab in metric_cols] + ["s / epoch"]))
    out += ["", f"## Paired difference against `{result['baseline']}`", "",
            "Mean over seeds of (method - baseline) in accuracy points, with a 95% Student-t interval "
            "(df = seeds - 1) and the number of seeds the method scored higher. An interval that contains 0 "
            "does not separate the two methods at this number of seeds.", ""]
    table = []
    for r in rows:
        if r["label"] == result["baseline"]:
            continue
        line = [r["label"]]
        for m, _ in metric_cols:
            p = r["paired"][m]
            if p["mean"] is None:
                line.append("-")
            elif p["low"] is None:
                line.append(f"{100 * p['mean']:+.2f} (1 seed)")
            else:
                line.append(f"{100 * p['mean']:+.2f} [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}], "
                            f"won {p['wins']}/{p['n']}")
        table.append(line)
    out.append(markdown_table(table, ["method"] + [lab for _, lab in metric_cols]))
    out += ["", "## Held-out validation (last epoch)", "",
            "Accuracy of the reported model on the held-out split of the TRAINING set (the number model "
            "selection and recipe choices use; never the test set), mean ± sample std over seeds, and the "
            f"paired difference against `{result['baseline']}`.", ""]
    table = []
    for r in rows:
        line = [r["label"]]
        for m in VAL_METRICS:
            line.append(_ms(r["metrics"][m]))
        for m in VAL_METRICS:
            p = r["paired"][m]
            line.append("-" if p["mean"] is None or r["label"] == result["baseline"] else
                        f"{100 * p['mean']:+.2f}" + ("" if p["low"] is None else
                                                     f" [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]"))
        table.append(line)
    out.append(markdown_table(table, ["method", "val robust", "val clean", "paired robust", "paired clean"]))
    out += ["", "## Every run", ""]
    table = []
    for c in cells:
        acc = c["accuracy"]
        status = c["status"] if c["status"] != "failed" else f"failed ({c.get('failed_step')}): {c.get('error')}"
        table.append([c["label"], str(c["seed"])] + [_pct(acc.get(m)) for m, _ in metric_cols]
                     + [_pct(acc.get("val_robust")), _pct(acc.get("val_clean"))]
                     + [f"{c['seconds_per_epoch']:.0f}" if c.get("seconds_per_epoch") else "-", status])
    out.append(markdown_table(table, ["method", "seed"] + [lab for _, lab in metric_cols]
                              + ["val robust", "val clean", "s / epoch", "status"]))
    pending = [c for c in cells if c["status"] != "done"]
    if pending:
        out += ["", f"{len(pending)} of {len(cells)} runs are not finished or failed; the statistics above use "
                "the finished ones only."]
    return "\n".join(out) + "\n"


def _csv(cells: list[dict[str, Any]], metrics: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    metrics = [*metrics, *VAL_METRICS]
    w.writerow(["label", "method", "seed", *metrics, "seconds_per_epoch", "status", "error", "folder"])
    for c in cells:
        w.writerow([c["label"], c["method"], c["seed"], *[c["accuracy"].get(m, "") for m in metrics],
                    c.get("seconds_per_epoch", ""), c["status"], c.get("error", ""), c["folder"]])
    return buf.getvalue()
