"""The comparison of a study, rebuilt from its folder alone: ``results.md``, ``.csv``, ``.json`` and
the figures (``arow study --collect DIR`` runs only this).

Each cell's run folder is read with :func:`arow.reporting.records.read_run`; a cell counts as done
when it has the study's evaluation (see :mod:`arow.study.cells`), and a damaged file shows as that
cell's error, never as a silently missing number. Per row and metric: mean ± sample std over the
seeds that finished (:func:`arow.reporting.stats.summarize`); against the baseline, paired by seed:
:func:`arow.reporting.comparison.comparison_table` with the study's analysis plan (its primary
tests corrected, everything else exploratory). AutoAttack, which runs on the first ``aa_n`` test
images only, has its own table: beside it each run's other accuracies and the worst case over every
attack on those same images, read from the per-example verdicts its evaluations store. An
exploratory study (``eval_n``: every run on the first N test images) is marked so on every page,
and its plan is not applied: no comparison on a subset is a primary test.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import time
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..methods import METHODS
from ..reporting.comparison import comparison_table, seed_values
from ..reporting.labels import metric_label
from ..reporting.plots import study_plots
from ..reporting.records import EvalFile
from ..evaluation.cascade import unpack_verdicts
from ..reporting.stats import mcnemar, paired, paired_bootstrap, summarize
from ..reporting.tables import markdown_table
from ..runs.checkpoint import atomic_write_text, dump_json
from ..runs.rundir import RunFolderError
from ..runs.selection import reported_prefix
from ..runs.studydir import StudyDir
from .cells import Evaluation, autoattack_eval, eps_curve_of, has_main_eval, main_eval, read_record
from .spec import Cell, StudyError, StudySpec, metric_names

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
#: the reported model's last validation on the held-out training split (never the test set)
VAL_METRICS = ("val_robust", "val_clean")
VAL_KEYS = (("val_pgd_acc", "val_robust"), ("val_clean_acc", "val_clean"))


def load_study(path: PathLike) -> tuple[StudyDir, StudySpec]:
    """The study folder ``path`` and the study its ``study.json`` holds."""
    folder = StudyDir(path)
    stored = folder.read_spec()
    if stored is None:
        raise StudyError(f"{folder.path} is not a study folder (no {StudyDir.SPEC})")
    return folder, StudySpec.from_dict(stored)


def images_text(spec: StudySpec) -> str:
    """Which test images the study's attacks ran on, as a column heading says it."""
    return "full test set" if spec.eval_n is None else f"first {spec.eval_n} test images, SUBSET"


# --------------------------------------------------------------------------- one cell
def cell_result(folder: StudyDir, spec: StudySpec, cell: Cell) -> dict[str, Any]:
    """What the cell's folder holds: status (done, unfinished, missing, failed, unreadable), the
    accuracies of the study's metrics, and what the figures use."""
    run, ev = folder.cell(cell.name), Evaluation.of(spec, cell.variant)
    r: dict[str, Any] = {"label": cell.variant.label, "method": cell.variant.method, "seed": cell.seed,
                         "folder": os.path.relpath(run.path, folder.path), "status": "missing", "accuracy": {}}
    try:
        rec, failed, curve = read_record(run), run.read_failure(), eps_curve_of(ev, run)
        points = [(float(p["eps"]), float(p["accuracy"])) for p in curve["points"]] if curve else None
    except (RunFolderError, KeyError, TypeError, ValueError) as e:
        return {**r, "status": "unreadable", "error": str(e).strip().splitlines()[0] if str(e).strip() else repr(e)}
    ran = ran_method_args(rec.config) if rec is not None else None
    if ran is not None:
        r["ran_method_args"] = ran
    e = main_eval(ev, run, rec)
    evaluated = has_main_eval(ev, e)
    if evaluated:
        assert e is not None
        r["accuracy"].update({k: v for k, v in e.accuracy.items() if k in metric_names(spec)})
        r.update(per_class=e.data.get("per_class", {}), test_set_size=e.test_set_size, n=e.n, subset=e.subset,
                 eps=e.data.get("eps"), dataset=e.data.get("dataset"), guards_ran=e.data.get("guards_ran"),
                 status="done")
        if isinstance(e.data.get("verdicts"), dict):  # for the per-image tests; not kept in results.json
            r["_verdicts"] = e.data["verdicts"]
    elif rec is not None:
        r["status"] = "unfinished"
    aa = autoattack_eval(ev, run, rec)
    if aa is not None:
        r["accuracy"]["autoattack"] = aa.accuracy["autoattack"]
        r["aa_n"] = aa.n
        r["on_aa_images"] = on_aa_images(e if evaluated else None, aa, metric_names(spec))
    elif ev.autoattack_n and r["status"] == "done":
        r["status"] = "unfinished"
    if points is not None:
        r["eps_curve"] = points
    metrics = [m for m in rec.metrics if "seconds" in m] if rec is not None else []
    # a finished training run (not one still going): its final model exists, or it was evaluated (a
    # published cell keeps its records, not its checkpoints)
    if metrics and rec is not None and (rec.finished or evaluated):
        r["seconds_per_epoch"] = sum(m["seconds"] for m in metrics) / len(metrics)
        r["epochs"] = len(metrics)
        last = metrics[-1]  # the reported model's validation on the held-out training split
        pre = reported_prefix(last)
        for key, name in VAL_KEYS:
            if last.get(pre + key) is not None:
                r["accuracy"][name] = last[pre + key]
    if failed:
        r.update(status="failed", error=failed.get("error"), failed_step=failed.get("step"))
    elif rec is not None and rec.failed and r["status"] != "done":
        r.update(status="failed", error=rec.failure, failed_step="train")
    return r


# --------------------------------------------------------------------------- AutoAttack's images
#: the worst case on AutoAttack's images: an image counts when every attack, AutoAttack included, left it correct
WORST = "worst_case"


def first_verdicts(e: Optional[EvalFile], n: int) -> Optional[dict[str, np.ndarray]]:
    """The per-example verdicts an evaluation file stores, on its first ``n`` images; None when it
    stores none, covers fewer images or holds unreadable ones or ones of another number of images
    than its own ``n`` (then with a line in the log)."""
    packed = e.data.get("verdicts") if e is not None else None
    if e is None or not isinstance(packed, dict) or not e.n or e.n < n or n < 1:
        return None
    try:
        return {k: v[:n] for k, v in unpack_verdicts(packed, int(e.n)).items()}
    except (ValueError, TypeError) as err:
        log.warning("%s: per-example verdicts left out of the AutoAttack table (%s)", e.path, err)
        return None


def on_aa_images(e: Optional[EvalFile], aa: EvalFile, metrics: Sequence[str]) -> dict[str, Optional[float]]:
    """The cell's accuracies on the images AutoAttack ran on (the first ``aa.n`` test images), from
    the per-example verdicts of its evaluation ``e`` (its other metrics) and of ``aa``: each metric
    but AutoAttack, and the worst case over every attack, AutoAttack included (:data:`WORST`).
    None where the verdicts needed are not stored."""
    n = int(aa.n or 0)
    main, sub = first_verdicts(e, n), first_verdicts(aa, n)
    out: dict[str, Optional[float]] = {m: float(main[m].mean()) if main is not None and m in main else None
                                       for m in metrics if m != "autoattack"}
    both = main is not None and sub is not None and WORST in main and "autoattack" in sub
    out[WORST] = float((main[WORST] & sub["autoattack"]).mean()) if both else None
    return out


def aa_metrics(spec: StudySpec) -> list[str]:
    """The columns of the AutoAttack table: AutoAttack, the study's other metrics, the worst case."""
    return ["autoattack", *[m for m in metric_names(spec) if m != "autoattack"], WORST] if spec.aa_n else []


def _aa_value(cell: dict[str, Any], m: str) -> Optional[float]:
    return cell["accuracy"].get(m) if m == "autoattack" else (cell.get("on_aa_images") or {}).get(m)


def ran_method_args(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Every hyper-parameter of the method as a run's ``config.json`` says it ran: its resolved
    method arguments (a data set's or a preset's own values included), else, for a run folder that
    records none, its method's defaults with the run's own ``method_args`` over them (what such a
    run ran); None where the config names no known method or no method arguments at all.

    >>> ran_method_args({"method": "arow", "resolved": {"method_args": {"lam": 2.5}}})
    {'lam': 2.5}
    >>> ran_method_args({"method": "arow", "method_args": {"smoothing": 0.1}})["lam"]
    3.5
    >>> ran_method_args({"method": "arow"}) is None
    True
    """
    resolved = config.get("resolved")
    if isinstance(resolved, dict) and isinstance(resolved.get("method_args"), dict):
        return resolved["method_args"]
    method, args = config.get("method"), config.get("method_args")
    if not isinstance(method, str) or method not in METHODS.names() or not isinstance(args, dict):
        return None
    return {**METHODS.get(method).defaults(), **args}


def _agreed(values: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The one dict all of ``values`` equal; None if they differ."""
    distinct = {json.dumps(v, sort_keys=True, default=repr): v for v in values}
    return next(iter(distinct.values())) if len(distinct) == 1 else None


# --------------------------------------------------------------------------- the rows
def _rows(spec: StudySpec, cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: each metric's values by seed with their summary, and the paired difference with the baseline."""
    metrics, rows = metric_names(spec), []
    for v in spec.variants:
        done = [r for r in cells if r["label"] == v.label and r["status"] not in ("failed", "unreadable")]
        row: dict[str, Any] = {"label": v.label, "method": v.method, "method_args": v.method_args,
                               "overrides": v.overrides, "metrics": {}, "paired": {}}
        ran = [r["ran_method_args"] for r in done if "ran_method_args" in r]
        if ran:  # what its runs ran, as far as their configs say (None: they ran different values)
            row["ran_method_args"] = _agreed(ran)
        for m in metrics + list(VAL_METRICS) + ["seconds_per_epoch"]:
            vals = {r["seed"]: (r.get(m) if m == "seconds_per_epoch" else r["accuracy"].get(m)) for r in done}
            vals = {s: x for s, x in vals.items() if x is not None}
            row["metrics"][m] = {"per_seed": vals, **dataclasses.asdict(summarize(list(vals.values())))}
        if spec.aa_n and v.aa:  # on the first aa_n test images, apart: never in one table with the others
            for m in aa_metrics(spec):
                vals = {r["seed"]: _aa_value(r, m) for r in done}
                vals = {s: x for s, x in vals.items() if x is not None}
                row.setdefault("on_aa_images", {})[m] = {"per_seed": vals,
                                                         **dataclasses.asdict(summarize(list(vals.values())))}
        rows.append(row)
    base = next(r for r in rows if r["label"] == spec.baseline)
    for row in rows:
        for m in metrics + list(VAL_METRICS):
            row["paired"][m] = dataclasses.asdict(paired(row["metrics"][m]["per_seed"], base["metrics"][m]["per_seed"]))
    return rows


def collect(path: PathLike, *, plots: bool = True, baseline: Optional[str] = None) -> dict[str, Any]:
    """Build the comparison from whatever cells have finished; writes results.md/.csv/.json (+ PNGs).

    ``baseline`` compares against another row than the study's own baseline; those results go to
    ``results_vs_<baseline>.md/.csv/.json`` (no PNGs), next to the study's own. An exploratory study
    (``eval_n``) gets no PNGs either: their axes speak of the full test set."""
    folder, spec = load_study(path)
    stem = StudyDir.RESULTS
    if baseline is not None and baseline != spec.baseline:
        if baseline not in [v.label for v in spec.variants]:
            raise StudyError(f"--baseline {baseline!r} is not a row of {folder.path} "
                             f"({', '.join(v.label for v in spec.variants)})")
        spec = dataclasses.replace(spec, baseline=baseline)
        stem, plots = f"{StudyDir.RESULTS}_vs_{baseline}", False
    cells = [cell_result(folder, spec, c) for c in spec.cells()]
    written = time.strftime("%Y-%m-%d %H:%M:%S")
    images = image_tests(cells, spec)
    result = {"spec": spec.to_dict(), "metrics": metric_names(spec), "cells": cells, "rows": _rows(spec, cells),
              "image_tests": images,
              "baseline": spec.baseline, "exploratory": spec.exploratory, "eval_n": spec.eval_n,
              "test_images": images_text(spec),
              "interval": "95% Student-t interval of the mean paired difference over seeds (df = pairs - 1)",
              "added_after_results": added_after_results(folder, spec, cells, written), "written": written}
    files = {ext: folder.results(stem, ext) for ext in ("md", "csv", "json")}
    atomic_write_text(dump_json(result) + "\n", files["json"])
    atomic_write_text(_csv(cells, result["metrics"], aa_metrics(spec)), files["csv"])
    atomic_write_text(markdown(result, spec), files["md"])
    result["files"] = [p.name for p in files.values()]
    if plots and not spec.exploratory:  # the figures' axes name the full test set: none for a subset study
        result["plots"] = [str(p) for p in study_plots(result, folder.path)]
    return result


def publish_study(path: PathLike, dest: PathLike, *, plots: bool = True) -> dict[str, Any]:
    """Copy what rebuilds and re-tests the study in ``path`` into ``dest`` (its spec, its collection
    history and each cell's config, records and evaluations with their per-example verdicts: a few kB a
    cell, no checkpoint; see :meth:`~arow.runs.studydir.StudyDir.published_files`), then build the
    comparison there with :func:`collect`, from those files alone."""
    folder, _ = load_study(path)
    target = StudyDir(dest)
    src, dst = folder.path.resolve(), target.path.resolve()
    if dst == src or src in dst.parents:
        raise StudyError(f"--to {target.path} must be outside the study folder {folder.path}")
    if target.path.exists() and target.read_spec() is None and any(target.path.iterdir()):
        raise StudyError(f"--to {target.path} exists and is not a published study: choose an empty or new folder")
    for rel in folder.published_files():
        out = target.path / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text((folder.path / rel).read_text(encoding="utf-8"), out)
    return collect(target.path, plots=plots)


# --------------------------------------------------------------------------- per image
def image_tests(cells: list[dict[str, Any]], spec: StudySpec) -> list[dict[str, Any]]:
    """Each row against the baseline, seed by seed, on the same test images: the images only one of the
    two classified correctly, the exact McNemar p-value and the paired bootstrap interval of the accuracy
    difference (:func:`~arow.reporting.stats.mcnemar`, :func:`~arow.reporting.stats.paired_bootstrap`),
    from the per-example verdicts each evaluation stores. This is the test-set sampling noise of one seed
    (how far one model pair's difference is from chance over these images), not the seed-to-seed
    variation the paired-by-seed comparison measures. Pops the cells' verdicts."""
    verdicts: dict[tuple[str, int], dict[str, Any]] = {}
    for c in cells:
        packed = c.pop("_verdicts", None)
        if packed is not None and c.get("n"):
            try:
                verdicts[c["label"], c["seed"]] = unpack_verdicts(packed, int(c["n"]))
            except (ValueError, TypeError) as err:
                c["verdicts_error"] = f"per-example verdicts unreadable: {err}"
                log.warning("%s: per-example verdicts left out of the per-image tests (%s)", c["folder"], err)
    out = []
    for v in spec.variants:
        if v.label == spec.baseline:
            continue
        for m in [m for m in metric_names(spec) if m != "autoattack"]:
            for seed in sorted({s for (lab, s) in verdicts if lab == v.label}):
                a, b = verdicts.get((v.label, seed), {}).get(m), verdicts.get((spec.baseline, seed), {}).get(m)
                if a is None or b is None or a.shape != b.shape:
                    continue
                mc, bs = mcnemar(a, b), paired_bootstrap(a, b, seed=seed)
                out.append({"row": v.label, "metric": m, "seed": seed, "only_row": mc.only_a,
                            "only_baseline": mc.only_b, "diff": bs.diff, "lo": bs.lo, "hi": bs.hi, "p": mc.p_value})
    return out


def _image_section(tests: list[dict[str, Any]], baseline: str) -> list[str]:
    if not tests:
        return []
    table, groups = [], {}
    for t in tests:
        groups.setdefault((t["row"], t["metric"]), []).append(t)
    for (row, metric), ts in groups.items():
        up = sum(t["p"] < 0.05 and t["diff"] > 0 for t in ts)
        down = sum(t["p"] < 0.05 and t["diff"] < 0 for t in ts)
        table.append([row, metric_label(metric), "; ".join(f"s{t['seed']} {100 * t['diff']:+.2f} (p {t['p']:.2g})"
                                                           for t in ts), f"{up} / {down} of {len(ts)}"])
    return ["", f"## Per image, seed by seed, against `{baseline}`", "",
            "Each seed's two models on the same test images: the accuracy difference in points and the exact "
            "McNemar p-value over the images only one of them classified correctly (nominal, uncorrected). "
            "It measures how far one pair of models differs beyond the sampling of test images, not whether "
            "the methods differ: that is the paired-by-seed comparison above. The per-seed counts of "
            "discordant images and bootstrap intervals are in results.json (`image_tests`).", "",
            markdown_table(table, ["row", "metric", "per seed: difference (McNemar p)",
                                   "seeds p < 0.05 higher / lower"])]


# --------------------------------------------------------------------------- what was added after results
def _planned(spec: StudySpec) -> dict[str, list[int]]:
    """The seeds each row of ``spec`` plans, by row label."""
    return {v.label: sorted(set(v.seeds or spec.seeds)) for v in spec.variants}


def added_after_results(folder: StudyDir, spec: StudySpec, cells: list[dict[str, Any]],
                        now: str) -> Optional[dict[str, Any]]:
    """The cells whose row or seed was added to the study after a comparison with finished runs had been
    built (``collected.jsonl``): ``{"since": time, "seen": [cells finished then], "cells": [added]}``, or
    None when every cell was planned before the first results. Records this collection too."""
    history = [h for h in folder.read_collects() if h.get("done")]
    done = sorted(StudyDir.cell_name(c["label"], c["seed"]) for c in cells if c["status"] == "done")
    if done:
        folder.record_collect({"time": now, "rows": _planned(spec), "done": done})
    if not history:
        return None
    first = history[0]
    planned = first.get("rows") if isinstance(first.get("rows"), dict) else {}
    added = [StudyDir.cell_name(label, seed) for label, seeds in _planned(spec).items() for seed in seeds
             if seed not in (planned.get(label) or [])]
    return {"since": first.get("time"), "seen": first.get("done"), "cells": added} if added else None


def _added_note(added: Optional[dict[str, Any]]) -> list[str]:
    if not added:
        return []
    seen = added.get("seen") or []
    return ["", f"**Added after results were seen.** The runs {', '.join(added['cells'])} were added to the study "
            f"after its comparison was first built from finished runs ({added.get('since')}, with "
            f"{len(seen)} run(s) finished: {', '.join(seen)}). Comparisons that use them were not fixed before "
            "the data were seen: read their intervals and p-values as exploratory."]


# --------------------------------------------------------------------------- the pages
def _pct(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _ms(s: dict[str, Any], scale: float = 100.0, unit: str = "") -> str:
    if s["mean"] is None:
        return "-"
    mean = f"{scale * s['mean']:.2f}{unit}"
    return mean if s["std"] is None else f"{mean} ± {scale * s['std']:.2f}"


def _columns(spec: StudySpec) -> list[tuple[str, str]]:
    """The columns of the tables on the study's test images: every metric but AutoAttack, which ran on
    fewer images and has its own table (:func:`_aa_section`)."""
    where = images_text(spec)
    return [(m, f"{metric_label(m)} ({where})") for m in metric_names(spec) if m != "autoattack"]


def _aa_section(result: dict[str, Any], spec: StudySpec) -> list[str]:
    """AutoAttack on its first ``aa_n`` test images, with each row's other accuracies and the worst case
    on those same images: mean over seeds, then every run."""
    rows = [r for r in result["rows"] if r.get("on_aa_images")]
    if not spec.aa_n or not rows:
        return []
    n, cols = spec.aa_n, aa_metrics(spec)
    labels = [metric_label(m, n=n) if m != WORST else f"worst case (first {n})" for m in cols]
    where = "the full test set" if not spec.exploratory else f"the first {spec.eval_n} test images"
    out = ["", f"## AutoAttack on the first {n} test images", "",
           f"AutoAttack (the standard version) ran on the first {n} test images only, the same images for every "
           f"run: compare it with the other columns of this table, which are on those same {n} images, not with "
           f"the tables on {where}. The other accuracies are read from the per-example verdicts of each run's "
           f"evaluation; worst case: the images that every attack, AutoAttack included, left classified "
           f"correctly. \"-\": the run stores no per-example verdicts (or none of the "
           f"images it was evaluated on: the log names it). Mean ± sample std over seeds (n).", ""]
    table = [[r["label"], str(max(r["on_aa_images"][m]["n"] for m in cols))]
             + [_ms(r["on_aa_images"][m]) for m in cols] for r in rows]
    out.append(markdown_table(table, ["method", "n", *labels]))
    aa_rows = {r["label"] for r in rows}
    runs = [[c["label"], str(c["seed"])] + [_pct(_aa_value(c, m)) for m in cols]
            for c in result["cells"] if c["label"] in aa_rows and c["status"] not in ("failed", "unreadable")]
    out += ["", "Every run:", "", markdown_table(runs, ["method", "seed", *labels])]
    return out


def _intro(result: dict[str, Any], spec: StudySpec) -> list[str]:
    cells = result["cells"]
    n_test = next((c.get("test_set_size") for c in cells if c.get("test_set_size")), None)
    eps = next((c.get("eps") for c in cells if c.get("eps") is not None), None)
    if spec.exploratory:
        title = [f"# EXPLORATORY study results: a test SUBSET of {spec.eval_n} images ({result['written']})", "",
                 f"**Every run was evaluated on the first {spec.eval_n} of the {n_test} test images only** "
                 "(`eval_n`): a smoke test of the set-up, not a result. These numbers are not full-test-set "
                 "numbers and must not be compared with any; no comparison below is a primary test (the "
                 "analysis plan is not applied to a subset). No figures are drawn for a subset study.", ""]
    else:
        title = [f"# Study results ({result['written']})", ""]
    where = "the full test set" if not spec.exploratory else f"the first {spec.eval_n} test images"
    aa = (f"AutoAttack is the standard version on the first {spec.aa_n} test images (the same images for every "
          f"run), in its own table beside the other accuracies on those images; the other tables' attacks and "
          f"clean accuracy are on {where}." if spec.aa_n else
          f"AutoAttack was not run; the attacks and clean accuracy are on {where}.")
    return title + [f"Preset `{spec.preset or 'default'}`" + (f" with {spec.overrides}" if spec.overrides else "")
                    + f"; seeds {spec.seeds}; eps {eps}; test set of {n_test} images. Accuracy in %, mean ± sample "
                    f"std over the seeds that finished (n). {aa}"]


def markdown(result: dict[str, Any], spec: StudySpec) -> str:
    """``results.md``: the means, the comparison with the baseline, the validation, every run."""
    rows, cells, cols = result["rows"], result["cells"], _columns(spec)
    out = _intro(result, spec) + _added_note(result.get("added_after_results")) + ["", "## Mean over seeds", ""]
    table = [[r["label"], str(max((r["metrics"][m]["n"] for m, _ in cols), default=0))]
             + [_ms(r["metrics"][m]) for m, _ in cols] + [_ms(r["metrics"]["seconds_per_epoch"], 1.0, " s")]
             for r in rows]
    out.append(markdown_table(table, ["method", "n"] + [lab for _, lab in cols] + ["s / epoch"]))
    out += _aa_section(result, spec)
    out += ["", f"## Against `{result['baseline']}`, paired by seed", ""]
    labels = {"autoattack": metric_label("autoattack", n=spec.aa_n)} if spec.aa_n else None
    out.append(comparison_table(seed_values(rows), result["baseline"], metric_names(spec),
                                None if spec.exploratory else spec.plan, labels=labels).rstrip("\n"))
    out += _image_section(result.get("image_tests") or [], result["baseline"])
    out += ["", "## Held-out validation (last epoch)", "",
            "Accuracy of the reported model on the held-out split of the TRAINING set (the number model "
            "selection and recipe choices use; never the test set), mean ± sample std over seeds, and the "
            f"paired difference against `{result['baseline']}` with its 95% Student-t interval.", ""]
    table = []
    for r in rows:
        line = [r["label"]] + [_ms(r["metrics"][m]) for m in VAL_METRICS]
        for m in VAL_METRICS:
            p = r["paired"][m]
            line.append("-" if p["mean"] is None or r["label"] == result["baseline"] else
                        f"{100 * p['mean']:+.2f}" + ("" if p["lo"] is None else
                                                     f" [{100 * p['lo']:+.2f}, {100 * p['hi']:+.2f}]"))
        table.append(line)
    out.append(markdown_table(table, ["method", "val robust", "val clean", "paired robust", "paired clean"]))
    out += ["", "## Every run", ""]
    table = []
    for c in cells:
        acc = c["accuracy"]
        status = c["status"] if c["status"] not in ("failed", "unreadable") else \
            f"{c['status']}" + (f" ({c['failed_step']})" if c.get("failed_step") else "") + f": {c.get('error')}"
        table.append([c["label"], str(c["seed"])] + [_pct(acc.get(m)) for m, _ in cols]
                     + [_pct(acc.get("val_robust")), _pct(acc.get("val_clean"))]
                     + [f"{c['seconds_per_epoch']:.0f}" if c.get("seconds_per_epoch") else "-", status])
    out.append(markdown_table(table, ["method", "seed"] + [lab for _, lab in cols]
                              + ["val robust", "val clean", "s / epoch", "status"]))
    pending = [c for c in cells if c["status"] != "done"]
    if pending:
        out += ["", f"{len(pending)} of {len(cells)} runs are not finished or failed; the statistics above use "
                "the finished ones only."]
    return "\n".join(out) + "\n"


def _csv(cells: list[dict[str, Any]], metrics: Sequence[str], aa: Sequence[str] = ()) -> str:
    """One line per run: its accuracies; ``test_images``: how many test images the metrics other than
    AutoAttack ran on; with AutoAttack (``aa``: :func:`aa_metrics`), ``autoattack_test_images`` (the first
    ``aa_n``) and each other metric and the worst case on those same images (``<metric>_on_aa_images``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    metrics = [*metrics, *VAL_METRICS]
    on_aa = [m for m in aa if m != "autoattack"]
    w.writerow(["label", "method", "seed", *metrics, "test_images", *(["autoattack_test_images"] if aa else []),
                *[f"{m}_on_aa_images" for m in on_aa], "seconds_per_epoch", "status", "error", "folder"])
    for c in cells:
        extra = [c.get("aa_n", "")] + [_blank(_aa_value(c, m)) for m in on_aa] if aa else []
        w.writerow([c["label"], c["method"], c["seed"], *[c["accuracy"].get(m, "") for m in metrics], c.get("n", ""),
                    *extra, c.get("seconds_per_epoch", ""), c["status"], c.get("error", ""), c["folder"]])
    return buf.getvalue()


def _blank(x: Optional[float]) -> Any:
    return "" if x is None else x
