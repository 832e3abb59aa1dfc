"""A study's evidence travels without its checkpoints, and a study that grew after its results were
seen says so on its page."""
import json
from pathlib import Path

import pytest

from arow.runs.studydir import StudyDir
from arow.study.collect import collect, publish_study
from arow.study.spec import StudyError, StudySpec

ACC = {"arow": {0: (0.85, 0.75, 0.74), 1: (0.84, 0.74, 0.73), 2: (0.86, 0.76, 0.75)},
       "trades": {0: (0.84, 0.75, 0.745), 1: (0.845, 0.73, 0.72), 2: (0.85, 0.74, 0.74)}}


def _study(path: Path, seeds) -> StudySpec:
    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": list(seeds), "aa_n": 0, "eps_curve_n": 0})
    path.mkdir(exist_ok=True)
    StudyDir(path).write_spec(spec.to_dict())
    for label, by_seed in ACC.items():
        for seed in seeds:
            d = path / "cells" / f"{label}-s{seed}"
            if d.exists():
                continue
            d.mkdir(parents=True)
            clean, pgd, cw = by_seed[seed]
            (d / "config.json").write_text(json.dumps({"method": label, "seed": seed}))
            (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 10.0 + seed, "val_clean_acc": 0.8,
                                                         "val_pgd_acc": 0.7}) + "\n")
            (d / "eval.json").write_text(json.dumps({
                "accuracy": {"clean": clean, "pgd20": pgd, "cw": cw}, "n": 10000, "test_set_size": 10000,
                "subset": False, "guards_ran": True, "verdicts": {"pgd20": "packed-bits"}}))
            for junk in ("final.pt", "last.pt", "best.pt", "study.log"):  # what publishing leaves behind
                (d / junk).write_bytes(b"not for the repository")
            (d / "eval_state").mkdir()
            (d / "eval_state" / "pgd20.pt").write_bytes(b"x")
    return spec


def test_published_study_rebuilds_every_table_from_its_small_files(tmp_path):
    src = tmp_path / "study"
    _study(src, [0, 1, 2])
    first = collect(src, plots=False)
    assert first["cells"][0]["seconds_per_epoch"] == 10.0  # an evaluated cell counts as trained
    dest = tmp_path / "docs" / "results" / "pub"
    published = publish_study(src, dest, plots=False)
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".pt") or "eval_state" in f or f.endswith(".log")], files
    assert "cells/arow-s1/eval.json" in files and "cells/arow-s1/config.json" in files and "study.json" in files
    assert json.loads((dest / "cells/arow-s1/eval.json").read_text())["verdicts"] == {"pgd20": "packed-bits"}
    assert published["rows"] == first["rows"]
    # nothing outside the published folder is needed to rebuild it
    for p in sorted(src.rglob("*"), key=lambda p: -len(p.parts)):
        p.unlink() if p.is_file() else p.rmdir()
    again = collect(dest, plots=False)
    assert again["rows"] == first["rows"]
    assert (dest / "results.md").read_text().count("| arow ") >= 1


def test_publishing_refuses_a_target_inside_the_study_or_a_foreign_folder(tmp_path):
    src = tmp_path / "study"
    _study(src, [0, 1])
    with pytest.raises(StudyError, match="outside the study folder"):
        publish_study(src, src / "pub", plots=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="not a published study"):
        publish_study(src, other, plots=False)


def test_seeds_added_after_results_were_seen_are_marked(tmp_path):
    src = tmp_path / "study"
    _study(src, [0, 1])
    assert collect(src, plots=False)["added_after_results"] is None
    assert "Added after results were seen" not in (src / "results.md").read_text()
    _study(src, [0, 1, 2])  # the study grows by a seed once its first comparison exists
    res = collect(src, plots=False)
    added = res["added_after_results"]
    assert added["cells"] == ["arow-s2", "trades-s2"]
    assert added["seen"] == ["arow-s0", "arow-s1", "trades-s0", "trades-s1"]
    md = (src / "results.md").read_text()
    assert "**Added after results were seen.**" in md and "arow-s2, trades-s2" in md
    # recorded for good: a later collection still says so
    assert collect(src, plots=False)["added_after_results"]["cells"] == ["arow-s2", "trades-s2"]


def test_seeds_planned_before_any_result_are_not_marked(tmp_path):
    """A comparison built while nothing had finished saw no results: growing after it is planning."""
    src = tmp_path / "study"
    _study(src, [0])
    for d in (src / "cells").iterdir():
        (d / "eval.json").unlink()
    collect(src, plots=False)
    _study(src, [0, 1])
    for label in ACC:  # seed 0's evaluations arrive later
        d = src / "cells" / f"{label}-s0"
        (d / "eval.json").write_text((src / "cells" / f"{label}-s1" / "eval.json").read_text())
    assert collect(src, plots=False)["added_after_results"] is None


def test_the_frontier_joins_a_methods_rows_in_the_order_of_the_hyperparameter_they_vary(tmp_path):
    from arow.reporting.plots.study import frontier_lines

    def row(label, method, **args):
        m = {"n": 2, "mean": 0.8, "std": 0.01, "lo": 0.79, "hi": 0.81}
        return {"label": label, "method": method, "method_args": args, "overrides": {},
                "metrics": {"clean": dict(m), "pgd20": dict(m, mean=0.7, lo=0.69, hi=0.71)}}

    rows = [row("arow", "arow"), row("trades", "trades"), row("trades-b9", "trades", beta=9.0),
            row("trades-b2", "trades", beta=2.0), row("arow-ls", "arow", label_smoothing=0.1, lam=5.0)]
    lines = {m: (k, [v for v, _ in pts]) for m, k, pts in frontier_lines({"rows": rows})}
    assert lines["trades"] == ("beta", [2.0, 6.0, 9.0])  # the default row takes the method's default
    assert lines["arow"] == (None, ["arow", "arow-ls"])  # two hyper-parameters vary: not a line
    cells = [{"label": r["label"], "seed": 0, "status": "done", "accuracy": {"clean": 0.8, "pgd20": 0.7}}
             for r in rows]
    from arow.reporting.plots.study import study_plots
    written = study_plots({"rows": rows, "cells": cells, "metrics": ["pgd20", "clean"], "spec": {}}, tmp_path)
    assert tmp_path / "frontier.png" in written
    alone = [r for r in rows if r["method"] == "arow"][:1] + [r for r in rows if r["label"] == "trades"]
    study_plots({"rows": alone, "cells": cells[:2], "metrics": ["pgd20", "clean"], "spec": {}}, tmp_path / "b")
    assert not (tmp_path / "b" / "frontier.png").exists()  # one row per method: no frontier to draw


def test_per_image_tests_come_from_the_stored_verdicts(tmp_path):
    import numpy as np
    import torch

    from arow.evaluation.cascade import pack_verdicts

    src = tmp_path / "study"
    _study(src, [0, 1])
    rng, n = np.random.default_rng(0), 10000
    for seed in (0, 1):
        base = rng.random(n) < 0.75
        row = base.copy()
        row[rng.choice(np.flatnonzero(~base), 200, replace=False)] = True  # only arow right on 200 images
        row[rng.choice(np.flatnonzero(base), 100, replace=False)] = False  # only trades right on 100
        for label, v in (("arow", row), ("trades", base)):
            f = src / "cells" / f"{label}-s{seed}" / "eval.json"
            ev = json.loads(f.read_text())
            ev["verdicts"] = pack_verdicts({"pgd20": torch.from_numpy(v), "clean": torch.ones(n, dtype=torch.bool)})
            f.write_text(json.dumps(ev))
    res = collect(src, plots=False)
    tests = {(t["metric"], t["seed"]): t for t in res["image_tests"]}
    for seed in (0, 1):
        t = tests["pgd20", seed]
        assert (t["only_row"], t["only_baseline"]) == (200, 100)
        assert t["diff"] == pytest.approx(0.01) and t["lo"] < t["diff"] < t["hi"]
        assert t["p"] < 0.05
        assert tests["clean", seed]["p"] == 1.0 and tests["clean", seed]["diff"] == 0  # no discordant image
    assert "## Per image, seed by seed" in (src / "results.md").read_text()
    assert not any("_verdicts" in c for c in res["cells"])  # not copied into results.json


def test_arow_study_publish_on_the_command_line(tmp_path, capsys):
    from arow.cli.commands import main

    src = tmp_path / "study"
    _study(src, [0, 1])
    assert main(["study", "--publish", str(src), "--to", str(tmp_path / "pub")]) == 0
    assert (tmp_path / "pub" / "results.md").is_file() and not list((tmp_path / "pub").rglob("*.pt"))
    capsys.readouterr()
    assert main(["study", "--publish", str(src)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("arow: error: ") and "--to" in err and len(err.splitlines()) == 1


def test_rows_runs_some_rows_now_and_keeps_the_whole_study(tmp_path, monkeypatch):
    import arow.study.runner as runner

    seen = []
    monkeypatch.setattr(runner.Study, "run", lambda self, plans, **kw: seen.extend(p.name for p in plans) or {})
    monkeypatch.setattr(runner, "collect", lambda path: StudyDir(path).results(StudyDir.RESULTS, "md").write_text("x"))
    spec = StudySpec.from_dict({"methods": ["arow", "trades", {"method": "trades", "label": "trades-b3.5",
                                                                "method_args": {"beta": 3.5}}],
                                "seeds": [0, 1], "aa_n": 0, "eps_curve_n": 0,
                                "plan": {"primary_metrics": ["clean"], "baseline": "trades",
                                         "comparisons": ["arow", "trades-b3.5"], "correction": "holm",
                                         "alpha": 0.05}})
    runner.run_study(tmp_path / "s", spec, rows="arow,trades")
    assert seen == ["arow-s0", "trades-s0", "arow-s1", "trades-s1"]
    stored = StudyDir(tmp_path / "s").read_spec()
    assert [m if isinstance(m, str) else m["label"] for m in stored["methods"]] == ["arow", "trades", "trades-b3.5"]
    assert (tmp_path / "s" / "cells" / "trades-b3.5-s1" / "cell.json").is_file()  # prepared, not run
    with pytest.raises(StudyError, match="--rows trades-b9: not rows of the study"):
        runner.run_study(tmp_path / "s", spec, rows="trades-b9")


def test_frontier_axes_follow_the_means_and_cut_intervals_longer_than_their_spread():
    from arow.reporting.plots.study import frontier_limits

    # 8 seeds (short intervals) and 2 seeds (t factor 12.7): the long one must not set the axis
    rows = [(84.2, 84.0, 84.4), (85.2, 85.0, 85.4), (83.4, 78.0, 88.8), (86.1, 84.5, 87.7)]
    lo, hi = frontier_limits(rows)
    assert lo < 83.4 and hi > 86.1  # every mean inside
    assert lo < 84.0 and hi > 87.7  # every interval no longer than the means' spread (2.7) inside
    assert lo > 78.0 + 4 and hi < 88.8  # the long one (5.4 each side) cut at the edge
    assert frontier_limits([(80.0, 80.0, 80.0)]) == (79.8, 80.2)  # one point: a small margin


def test_the_frontier_places_a_row_at_the_values_its_runs_ran(tmp_path):
    from arow.reporting.plots.study import frontier_lines

    from arow.methods import METHODS

    runs = {"clean": {"per_seed": {0: 0.8}}}
    defaults = {k: h.default for k, h in METHODS.get("arow").hparams.items()}

    def row(label, ran, **args):  # a run's config.json holds every hyper-parameter of its method
        return {"label": label, "method": "arow", "method_args": args, "overrides": {},
                "ran_method_args": None if ran is None else {**defaults, **ran}, "metrics": runs}

    # Fashion-MNIST runs ARoW with its own lambda (2.5) where a row sets none: the row sits at 2.5, not at 3.5
    rows = [row("arow", {"lam": 2.5, "smoothing": 0.2}), row("arow-l35", {"lam": 3.5, "smoothing": 0.2}, lam=3.5),
            row("arow-l5", {"lam": 5.0, "smoothing": 0.2}, lam=5.0)]
    (method, key, points), = frontier_lines({"rows": rows})
    assert (key, [v for v, _ in points]) == ("lam", [2.5, 3.5, 5.0])
    # a row whose seeds ran different values: no line through the method's rows
    (_, key, points), = frontier_lines({"rows": rows[1:] + [row("arow", None)]})
    assert (key, [v for v, _ in points]) == (None, ["arow-l35", "arow-l5", "arow"])
    # a row whose runs recorded nothing yet counts with its study values (it has no point to draw)
    fresh = {k: v for k, v in row("arow-l2", None, lam=2.0).items() if k != "ran_method_args"}
    (_, key, points), = frontier_lines({"rows": rows[1:] + [fresh]})
    assert (key, [v for v, _ in points]) == ("lam", [2.0, 3.5, 5.0])
    # a results file collected before the ran values were kept: the method's defaults fill in
    old = [{k: v for k, v in r.items() if k != "ran_method_args"} for r in rows[1:] + [row("arow", None)]]
    (_, key, points), = frontier_lines({"rows": old})
    assert (key, [v for v, _ in points]) == ("lam", [3.5, 3.5, 5.0])
    # values that do not order (unset beside a number): the rows in study order, not an error
    mixed = [row("a", {"awp_start": None}), row("b", {"awp_start": 3})]
    assert frontier_lines({"rows": mixed})[0][1] is None


def test_collect_keeps_the_hyperparameters_each_row_ran(tmp_path):
    src = tmp_path / "study"
    _study(src, [0, 1])

    def config(seed, resolved, method="arow"):
        path = src / "cells" / f"{method}-s{seed}" / "config.json"
        path.write_text(json.dumps({"method": method, "seed": seed, "method_args": {}, "resolved": resolved}))

    for seed in (0, 1):  # what a run folder's config.json says it ran; the arow row of the study sets no lambda
        config(seed, {"method_args": {"lam": 2.5, "smoothing": 0.2}})
    rows = {r["label"]: r for r in collect(src, plots=False)["rows"]}
    assert rows["arow"]["method_args"] == {} and rows["arow"]["ran_method_args"] == {"lam": 2.5, "smoothing": 0.2}
    # a config.json that names no method arguments at all says nothing of what ran
    assert "ran_method_args" not in rows["trades"]
    for seed in (0, 1):
        config(seed, {}, method="trades")
    # run folders that record no resolved arguments ran their method's defaults with their own over them
    assert {r["label"]: r for r in collect(src, plots=False)["rows"]}["trades"]["ran_method_args"]["beta"] == 6.0
    config(1, {"method_args": {"smoothing": 0.2, "lam": 2.5}})  # the same values in another order agree
    assert {r["label"]: r for r in collect(src, plots=False)["rows"]}["arow"]["ran_method_args"]["lam"] == 2.5
    config(1, {"method_args": {"lam": 3.5, "smoothing": 0.2}})
    assert {r["label"]: r for r in collect(src, plots=False)["rows"]}["arow"]["ran_method_args"] is None  # seeds differ
    config(1, "not an object")  # a damaged record is read as one that records no resolved arguments, not a crash
    cell = next(c for c in collect(src, plots=False)["cells"] if (c["label"], c["seed"]) == ("arow", 1))
    assert cell["ran_method_args"]["lam"] == 3.5 and cell["status"] == "done"
