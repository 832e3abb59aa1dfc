"""Compare run folders the way the paper does: one table, mean ± std over seeds of the same recipe.

Run folders are read with :func:`arow.reporting.records.read_run`: ``config.json`` (the resolved
config), ``metrics.jsonl`` (one line per epoch) and, once evaluated, ``eval.json`` (full test
set); a run evaluated on the first N test images only (``eval_n<N>.json``) shows those numbers
marked ``(n=N)``. Runs whose configs agree on everything but ``seed`` and ``out`` (and the
runtime details that do not change the result: device, data folder, logging) are one recipe;
their numbers are aggregated. Runs evaluated on a different number of test points are never
mixed into one mean.

>>> rep = build_report(["runs/fmnist-arow-s0", "runs/fmnist-arow-s1"])  # doctest: +SKIP
>>> print(rep.markdown())  # doctest: +SKIP
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from ..config.schema import TrainConfig
from ..runs.rundir import RunDir, RunFolderError  # noqa: F401  (RunFolderError: part of this module's API)
from .labels import attack_label, attack_order, subset_text
from .records import EvalFile, RunRecord, read_run
from .stats import Summary, summarize
from ..threat import format_eps, norm_label
from ..runs.checkpoint import atomic_write_text
from ..runs.selection import reported_prefix, selection_key

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
DASH = "–"  # an en dash marks a number the run does not have

# Config keys that say where or how a run was executed, not what was trained.
RUNTIME_KEYS = TrainConfig.runtime_keys() | {"seed", "resolved"}


@dataclass
class Run:
    """A run as a report row sees it: its folder's record (:func:`arow.reporting.records.read_run`)
    and the evaluation reported for it (``eval``: ``eval.json``, else the final model's largest
    subset evaluation; ``eval_file`` says which and whether it is a full-test-set number)."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    eval: Optional[dict[str, Any]]
    eval_file: Optional[EvalFile] = None
    record: Optional[RunRecord] = None

    @property
    def subset(self) -> bool:
        """The reported evaluation covers part of the test set only."""
        return self.eval_file.subset if self.eval_file is not None else bool((self.eval or {}).get("subset"))

    @property
    def resolved(self) -> dict[str, Any]:
        return self.config.get("resolved") or {}

    @property
    def eps(self) -> Optional[float]:
        if self.eval is not None and self.eval.get("eps") is not None:
            return float(self.eval["eps"])
        eps = self.resolved.get("eps", self.config.get("eps"))
        return None if eps is None else float(eps)

    @property
    def norm(self) -> str:
        """The threat model of the reported numbers: the evaluation's, else the training's (L-inf before L2 existed)."""
        if self.eval is not None and self.eval.get("norm"):
            return str(self.eval["norm"])
        return str(self.resolved.get("norm") or self.config.get("norm") or "linf")

    @property
    def val_attack(self) -> str:
        return self.config.get("val_attack", "pgd20")

    @property
    def eval_dataset(self) -> Optional[str]:
        """The data set the reported evaluation ran on, when it says one (None: not evaluated)."""
        name = (self.eval or {}).get("dataset")
        return None if name is None else str(name)

    @property
    def dataset_text(self) -> str:
        """The run's data set, and the evaluation's where that is another (a run trained on the user's
        own data, ``custom``, evaluated on a standard test set): ``"custom (eval: fashion-mnist)"``."""
        train, ev = str(self.config.get("dataset")), self.eval_dataset
        return train if ev is None or ev == train else f"{train} (eval: {ev})"

    def final_val(self) -> dict[str, Optional[float]]:
        """Validation accuracy of the reported model at the last epoch (the SWA/EMA model when one ran)."""
        if not self.metrics:
            return {"clean": None, "pgd": None}
        last = self.metrics[-1]
        pre = reported_prefix(last)
        return {"clean": last.get(f"{pre}val_clean_acc"), "pgd": last.get(f"{pre}val_pgd_acc")}

    def best_epoch(self) -> tuple[Optional[int], Optional[float]]:
        """The epoch ``best.pt`` holds: highest validation PGD accuracy, first one on ties (as the Trainer)."""
        best: tuple[Optional[int], Optional[float]] = (None, None)
        for r in self.metrics:
            score = r.get(selection_key(r))
            if score is not None and (best[1] is None or score > best[1]):
                best = (int(r["epoch"]), float(score))
        return best

    def recipe(self) -> str:
        """A canonical string of everything that defines what was trained and how it was evaluated."""
        key = {k: v for k, v in self.config.items() if k not in RUNTIME_KEYS}
        res = self.resolved
        for k in ("eps", "attack_steps", "step_size", "method_args", "amp"):
            if k in res:
                key[f"resolved.{k}"] = res[k]
        if self.eval is not None:
            key["eval.n"] = self.eval.get("n")
            key["eval.norm"] = self.eval.get("norm", "linf")
            key["eval.attacks"] = sorted(self.eval.get("accuracy", {}))
            key["eval.dataset"] = self.eval_dataset
        return json.dumps(key, sort_keys=True, default=str)


def load_run(path: PathLike) -> Run:
    """Read a run folder with :func:`~arow.reporting.records.read_run`; the reported evaluation is
    ``eval.json``, else the final model's largest subset evaluation (``Run.subset``).

    >>> run = load_run("runs/fmnist-arow-s0")  # doctest: +SKIP
    >>> run.best_epoch()  # doctest: +SKIP
    (9, 0.7123)
    """
    rec = read_run(path)
    ev = rec.reported_eval()
    return Run(rec.path, rec.config, rec.metrics, None if ev is None else ev.data, ev, rec)


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A Markdown table with aligned columns.

    >>> print(markdown_table([["pgd20", "68.33%"]], ["attack", "accuracy"]))
    | attack | accuracy |
    |--------|----------|
    | pgd20  | 68.33%   |
    """
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# --------------------------------------------------------------------------- aggregation
@dataclass
class Stat:
    """Values of one quantity over the seeds of a recipe (fractions in [0, 1] or plain numbers),
    summarised by :func:`arow.reporting.stats.summarize` (the one implementation of the statistics)."""

    values: list[float] = field(default_factory=list)

    @property
    def summary(self) -> Summary:
        return summarize(self.values)

    @property
    def mean(self) -> Optional[float]:
        return self.summary.mean

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation (n - 1); None for fewer than two values."""
        return self.summary.std

    def fmt(self, scale: float = 100.0, digits: int = 2) -> str:
        return format_mean_std(self.mean, self.std, scale=scale, digits=digits)


def format_mean_std(mean: Optional[float], std: Optional[float], *, scale: float = 100.0, digits: int = 2,
                    unit: str = "", missing: str = DASH, n: Optional[int] = None, full: Optional[int] = None) -> str:
    """How every table writes a mean over seeds: ``"82.00 ± 2.83"`` (sample std), the mean alone
    without a std (one seed), ``missing`` without a mean; ``n`` below ``full``: measured on the first
    ``n`` test images only, marked ``"72.00 (n=20)"`` (see :func:`arow.reporting.labels.subset_text`).

    >>> format_mean_std(0.82, 0.0283), format_mean_std(0.72, None, n=20, full=10000), format_mean_std(None, None)
    ('82.00 ± 2.83', '72.00 (n=20)', '–')
    >>> format_mean_std(12.345, 0.5, scale=1.0, unit=" s")
    '12.35 s ± 0.50'
    """
    if mean is None:
        return missing
    out = f"{mean * scale:.{digits}f}{unit}"
    if std is not None:
        out += f" ± {std * scale:.{digits}f}"
    mark = subset_text(n, full) if n is not None else ""
    return f"{out} {mark}" if mark else out


def _stat(values: Sequence[Optional[float]]) -> Stat:
    return Stat([float(v) for v in values if v is not None and not math.isnan(float(v))])


@dataclass
class Group:
    """One row of the report: the runs of one recipe."""

    runs: list[Run]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def seeds(self) -> list[Any]:
        return [r.config.get("seed") for r in self.runs]

    def attack(self, name: str) -> Stat:
        return _stat([r.eval["accuracy"].get(name) for r in self.runs if r.eval is not None])

    def attack_text(self, name: str) -> str:
        """The cell of attack ``name``: mean ± std, marked ``(n=N)`` when the runs were evaluated on
        the first N test images only (never passed off as a full-test-set number)."""
        s, ev = self.attack(name), self.first.eval or {}
        if not s.values or not self.first.subset:
            return s.fmt()
        return format_mean_std(s.mean, s.std, n=ev.get("n"), full=ev.get("test_set_size"))

    def val(self, which: str) -> Stat:
        return _stat([r.final_val()[which] for r in self.runs])

    def best(self) -> tuple[list[Optional[int]], Stat]:
        pairs = [r.best_epoch() for r in self.runs]
        return [e for e, _ in pairs], _stat([s for _, s in pairs])

    def notes(self) -> list[str]:
        out = []
        ev, file = self.first.eval, self.first.eval_file
        if ev is None:
            out.append("not evaluated: validation numbers only (run `arow eval`)")
        elif self.first.subset:
            out.append(f"SUBSET: {file.name if file is not None else RunDir.EVAL}, {ev.get('n')} of "
                       f"{ev.get('test_set_size')} test images")
        for r in self.runs:
            rec = r.record
            if rec is None:
                continue
            failed = [e for e in rec.evals.values() if e.error is not None and e.which == "final"]
            if failed:
                out.append(f"{r.path.name}: {failed[0].name} holds no numbers ({failed[0].error})")
            if rec.failure:
                out.append(f"{r.path.name}: {rec.failure}")
        epochs = self.first.config.get("epochs")
        done = [len(r.metrics) for r in self.runs]
        if epochs is not None and min(done) < epochs:
            out.append(f"incomplete: {min(done)}/{epochs} epochs")
        last = self.first.metrics[-1] if self.runs and self.first.metrics else {}
        if "swa_val_pgd_acc" in last:
            out.append("SWA model")
        if "ema_val_pgd_acc" in last:
            out.append(f"EMA model (decay {self.first.config.get('ema')})")
        return out


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs with the same recipe (config except seed, out and runtime keys; same eval size) in one group,
    in the order the first run of each recipe was given; seeds sorted within a group."""
    groups: dict[str, Group] = {}
    for r in runs:
        groups.setdefault(r.recipe(), Group([])).runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: (str(type(r.config.get("seed"))), r.config.get("seed")))
    return list(groups.values())


#: how a setting left unset (None) reads in a report, for the settings whose None means something: the
#: first N examples of all of them, an averaging that is off, a value the data set or method chooses
UNSET_TEXT: dict[str, str] = {
    "limit_train": "all", "extra_take": "all", "eval_n": "all", "labels_kept": "all",
    "swa_start": "off", "ema": "off",
    "attack_steps": "default", "step_size": "default", "eps": "default", "augment": "default",
    "epoch_batches": "default", "data_dir": "default", "mlflow_uri": "default",
}


def unset_text(key: str) -> str:
    """How a setting left unset (None) reads in a report (``key`` may be flattened,
    ``resolved.attack_steps``): its word in :data:`UNSET_TEXT`, else ``unset`` (``out=unset``), never
    a guess.

    >>> unset_text("limit_train"), unset_text("resolved.attack_steps"), unset_text("ema"), unset_text("out")
    ('all', 'default', 'off', 'unset')
    """
    return UNSET_TEXT.get(key.rsplit(".", 1)[-1], "unset")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- the table
@dataclass
class Report:
    """The comparison table of a set of runs; render it with :meth:`markdown` or :meth:`csv`."""

    groups: list[Group]

    @property
    def attacks(self) -> list[str]:
        """Attack columns present in any run: the paper's order first, then the others by name."""
        seen: set[str] = set()
        for g in self.groups:
            for r in g.runs:
                if r.eval is not None:
                    seen.update(r.eval.get("accuracy", {}))
        robust = [a for a in seen if a not in ("clean", "worst_case")]
        if len(robust) < 2:
            seen.discard("worst_case")  # with one attack the worst case repeats that attack's column
        return attack_order(sorted(seen))

    def _flat_config(self, g: Group) -> dict[str, Any]:
        d = {k: v for k, v in g.first.config.items() if k not in RUNTIME_KEYS | {"method_args"}}
        d["resolved"] = {k: g.first.resolved.get(k) for k in ("method_args", "attack_steps", "step_size")}
        return _flat(d)

    def differing(self) -> list[str]:
        """Config keys (flattened) that differ between rows and are not already columns.

        A method's hyper-parameter counts only among the rows of that method: TRADES' beta
        and ARoW's lambda differ trivially.
        """
        if len(self.groups) < 2:
            return []
        shown = {"method", "model", "dataset", "eps"}
        flats = [(g.first.config.get("method"), self._flat_config(g)) for g in self.groups]
        out = []
        for k in sorted(set().union(*(f for _, f in flats)) - shown):
            if k.startswith("resolved.method_args."):
                differs = any(len({json.dumps(f.get(k), default=str) for m2, f in flats if m2 == m and k in f}) > 1
                              for m, _ in flats)
            else:
                differs = len({json.dumps(f.get(k), default=str) for _, f in flats}) > 1
            if differs:
                out.append(k)
        return out

    def _setting(self, g: Group, keys: list[str]) -> str:
        """``key=value`` of each differing key; a setting both in the config and resolved from it
        (``attack_steps``) once, with its value (the resolved one where the config left it unset)."""
        flat = self._flat_config(g)
        short = lambda k: k.replace("resolved.method_args.", "").replace("resolved.", "")  # noqa: E731
        shown: dict[str, Any] = {}
        for k in keys:
            if k in flat and shown.get(short(k)) is None:
                shown[short(k)] = flat[k]
        return ", ".join(f"{k}={unset_text(k) if v is None else v}" for k, v in shown.items())

    def columns(self) -> list[str]:
        val = attack_label(self.groups[0].first.val_attack) if self.groups else ""
        cols = ["method", "model", "dataset", "eps", "seeds", "n test"]
        cols += [attack_label(a) for a in self.attacks]
        cols += ["val clean (last)", f"val {val} (last)", f"best epoch (val {val})"]
        if self.differing():
            cols.append("setting")
        return cols + ["notes"]

    def _has_notes(self) -> bool:
        return any(g.notes() for g in self.groups)

    def rows(self) -> list[list[str]]:
        diff = self.differing()
        out = []
        for g in self.groups:
            r0 = g.first
            ev = r0.eval
            n = DASH if ev is None else f"{ev.get('n')}" + (
                f" of {ev.get('test_set_size')} (SUBSET)" if r0.subset else "")
            epochs, best = g.best()
            best_s = DASH if all(e is None for e in epochs) else (
                ", ".join(DASH if e is None else str(e) for e in epochs) + f" ({best.fmt()})")
            row = [str(r0.config.get("method")), str(r0.config.get("model")), r0.dataset_text,
                   format_eps(r0.eps) + ("" if r0.norm == "linf" else f" ({norm_label(r0.norm)})"),
                   ", ".join(str(s) for s in g.seeds), n]
            row += [g.attack_text(a) for a in self.attacks]
            row += [g.val("clean").fmt(), g.val("pgd").fmt(), best_s]
            if diff:
                row.append(self._setting(g, diff))
            row.append("; ".join(g.notes()))
            out.append(row)
        return out

    def markdown(self) -> str:
        """The table in Markdown with a line stating the protocol and how numbers aggregate."""
        cols, rows = self.columns(), self.rows()
        if not self._has_notes():  # an empty last column only widens the table
            cols, rows = cols[:-1], [r[:-1] for r in rows]
        runs = [r for g in self.groups for r in g.runs]
        protocol = sorted({f"{r.dataset_text} at eps={format_eps(r.eps)} ({norm_label(r.norm)})"
                           for r in runs})
        notes = [
            "Test accuracy in %, mean ± sample std (n-1) over the listed seeds; one seed: the number alone.",
            "Runs are pooled when their configs differ only in seed and run folder and they were evaluated "
            "on the same test points with the same attacks.",
            "val = held-out split of the TRAINING data at the last epoch (SWA model when SWA ran); "
            "best epoch = the checkpoint best.pt holds, selected on that split (never on the test set) "
            "with its validation robust accuracy in brackets.",
            "Threat model: " + "; ".join(protocol) + ".",
        ]
        notes += [f"{attack_label(a)}: {'; '.join(d)}." for a, d in self.descriptions().items()]
        if any(r.subset for r in runs):
            notes.append("SUBSET, (n=N): evaluated on the first N test images only (eval_n<N>.json when the run has "
                         "no full-test-set eval.json); not comparable with full-test-set numbers, never pooled "
                         "with them.")
        folders = [f"- {', '.join(str(r.path) for r in g.runs)}" for g in self.groups]
        return "\n".join(["# arow report", "", markdown_table(rows, cols), "",
                          *[f"- {n}" for n in notes], "", "Run folders, one line per row:", *folders, ""])

    def descriptions(self) -> dict[str, list[str]]:
        """Each attack column's settings as its evaluations describe them (several when runs differ)."""
        out: dict[str, list[str]] = {}
        for g in self.groups:
            for r in g.runs:
                described = (r.eval or {}).get("attacks")
                for a in self.attacks:
                    text = described.get(a) if isinstance(described, dict) else None
                    if a != "clean" and isinstance(text, str) and text not in out.setdefault(a, []):
                        out[a].append(text)
        return {a: d for a, d in out.items() if d}

    def csv(self) -> str:
        """One CSV row per recipe: mean and std columns in %, seeds separated by ';'."""
        val = self.groups[0].first.val_attack if self.groups else "pgd20"
        head = ["method", "model", "dataset", "eval_dataset", "eps", "seeds", "n_runs", "n_test", "test_set_size",
                "subset", "eval_file"]
        for a in self.attacks:
            head += [f"{a}_mean", f"{a}_std"]
        head += ["val_clean_mean", "val_clean_std", f"val_{val}_mean", f"val_{val}_std", "best_epochs",
                 "notes", "runs"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        num = lambda v: "" if v is None else f"{100 * v:.4f}"  # noqa: E731
        for g in self.groups:
            ev = g.first.eval or {}
            row: list[Any] = [g.first.config.get("method"), g.first.config.get("model"), g.first.config.get("dataset"),
                              g.first.eval_dataset or "", "" if g.first.eps is None else g.first.eps,
                              ";".join(str(s) for s in g.seeds), len(g.runs), ev.get("n", ""), ev.get("test_set_size", ""),
                              g.first.subset if ev else "", g.first.eval_file.name if g.first.eval_file else ""]
            for a in self.attacks:
                s = g.attack(a)
                row += [num(s.mean), num(s.std)]
            for which in ("clean", "pgd"):
                s = g.val(which)
                row += [num(s.mean), num(s.std)]
            row += [";".join(str(e) for e in g.best()[0]), "; ".join(g.notes()),
                    ";".join(str(r.path) for r in g.runs)]
            w.writerow(row)
        return buf.getvalue()


def build_report(paths: Sequence[PathLike]) -> Report:
    """Read the run folders and group them by recipe.

    >>> print(build_report(["runs/a-s0", "runs/a-s1"]).markdown())  # doctest: +SKIP
    """
    if not paths:
        raise RunFolderError("no run folders given")
    runs = [load_run(p) for p in paths]
    seen: dict[Path, Path] = {}
    for r in runs:
        key = r.path.resolve()
        if key in seen:
            raise RunFolderError(f"{r.path} is listed twice")
        seen[key] = r.path
    return Report(group_runs(runs))


def write_report(paths: Sequence[PathLike], out: Optional[PathLike] = None,
                 fmt: Literal["md", "csv"] = "md") -> tuple[Report, Path]:
    """Build the report of the run folders ``paths`` and write it to ``out``.

    >>> rep, path = write_report(["runs/a-s0", "runs/a-s1"], "report.md")  # doctest: +SKIP

    Args:
        paths: run folders
        out: file to write (default ./report.md, or ./report.csv with ``fmt`` csv)
        fmt: format of the file (the terminal gets Markdown)
    """
    if fmt not in ("md", "csv"):
        raise ValueError(f"--format must be md or csv, got {fmt!r}")
    rep = build_report(paths)
    path = Path(out) if out is not None else Path(f"report.{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)

    atomic_write_text(rep.markdown() if fmt == "md" else rep.csv(), path)
    log.debug("wrote %s", path)
    return rep, path
