"""Reports and pictures: run folders written by hand with known numbers, plus one tiny training run."""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from arow.cli.commands import main
from arow.reporting.tables import RunFolderError, build_report, format_eps, load_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, *, seed: int = 0, method: str = "arow", accuracy: dict | None = None,
             val: tuple[float, ...] = (0.5, 0.6, 0.55), n: int = 300, with_eval: bool = True, **cfg) -> Path:
    """A run folder as the Trainer and `arow eval` write it, with known numbers."""
    d = root / name
    d.mkdir(parents=True)
    margs = {"arow": {"lam": 3.5, "smoothing": 0.2, "detach_weight": False, "weight": "arow"},
             "trades": {"beta": 6.0}}[method]
    config = {"method": method, "method_args": {}, "dataset": "fashion-mnist", "model": "small-cnn", "epochs": len(val),
              "lr": 0.1, "seed": seed, "out": str(d), "device": "auto", "val_attack": "pgd20", **cfg,
              "resolved": {"eps": 0.1, "attack_steps": 10, "step_size": 0.025, "method_args": margs, "device": "cpu"}}
    (d / "config.json").write_text(json.dumps(config))
    lines = []
    for e, v in enumerate(val, 1):
        rec = {"epoch": e, "lr": 0.1 if e < len(val) else 0.01, "train_loss": 2.0 / e, "train_natural": 1.5 / e,
               "train_robust": 0.5 / e, "train_clean_acc": 0.4 + 0.1 * e, "train_adv_acc": 0.2 + 0.05 * e,
               "val_clean_acc": v + 0.2, "val_pgd_acc": v, "seconds": 3.0}
        if method == "arow":
            hist = [0.0] * 20
            hist[19 - e], hist[5] = 900.0, 100.0 * e
            rec.update(train_weight_mean=0.9 - 0.1 * e, weight_hist=hist)
        lines.append(json.dumps(rec))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if with_eval:
        accuracy = accuracy or {"clean": 0.8, "pgd20": 0.4}
        per_class = {k: [min(1.0, v + 0.02 * (c - 5)) for c in range(10)] for k, v in accuracy.items()}
        (d / "eval.json").write_text(json.dumps({
            "n": n, "eps": 0.1, "accuracy": accuracy, "per_class": per_class, "dataset": "fashion-mnist",
            "method": method, "model": "small-cnn", "seed": seed, "subset": n < 10000, "test_set_size": 10000}))
    return d


def md_row(text: str, first_cell: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} ")]
    assert len(rows) == 1, text
    return [c.strip() for c in rows[0].strip("|").split("|")]


def md_header(text: str) -> list[str]:
    return [c.strip() for c in text.splitlines()[2].strip("|").split("|")]


# --------------------------------------------------------------------------- report
def test_two_seeds_aggregate_to_mean_and_sample_std(tmp_path):
    a = make_run(tmp_path, "s0", seed=0, accuracy={"clean": 0.80, "pgd20": 0.40, "cw": 0.35, "worst_case": 0.34},
                 val=(0.30, 0.50, 0.45))
    b = make_run(tmp_path, "s1", seed=1, accuracy={"clean": 0.84, "pgd20": 0.46, "cw": 0.37, "worst_case": 0.36},
                 val=(0.30, 0.40, 0.55))
    rep = build_report([b, a])
    assert len(rep.groups) == 1
    md = rep.markdown()
    head, row = md_header(md), md_row(md, "arow")
    cell = dict(zip(head, row))
    assert cell["seeds"] == "0, 1"
    # evaluated on 300 of 10000 test images: every test number says so
    assert cell["clean"] == "82.00 ± 2.83 (n=300)"  # mean 82, stdev(80, 84) = 2.828
    assert cell["PGD-20"] == f"43.00 ± {100 * statistics.stdev([0.40, 0.46]):.2f} (n=300)"
    assert cell["CW-30"] == "36.00 ± 1.41 (n=300)"
    assert cell["worst case"] == "35.00 ± 1.41 (n=300)"
    assert cell["eps"] == "0.1"
    assert cell["n test"] == "300 of 10000 (SUBSET)"
    assert cell["val PGD-20 (last)"] == "50.00 ± 7.07"  # last epochs: 0.45, 0.55
    assert cell["val clean (last)"] == "70.00 ± 7.07"
    assert cell["best epoch (val PGD-20)"] == "2, 3 (52.50 ± 3.54)"  # best: 0.50 at epoch 2, 0.55 at epoch 3
    assert "SUBSET" in md and "AutoAttack" not in head


def test_different_recipes_and_seeds_make_separate_rows(tmp_path):
    runs = [make_run(tmp_path, "a0", seed=0), make_run(tmp_path, "a1", seed=1),
            make_run(tmp_path, "lr", seed=0, lr=0.05),
            make_run(tmp_path, "t0", method="trades", accuracy={"clean": 0.9, "pgd20": 0.3, "autoattack": 0.25})]
    rep = build_report(runs)
    assert [len(g.runs) for g in rep.groups] == [2, 1, 1]
    md = rep.markdown()
    head = md_header(md)
    assert "AutoAttack" in head and "setting" in head  # lr differs between the arow rows
    rows = [line for line in md.splitlines() if line.startswith("| arow ")]
    assert len(rows) == 2 and "lr=0.05" in rows[1] and "lr=0.1" in rows[0]
    cell = dict(zip(head, md_row(md, "trades")))
    assert cell["AutoAttack"] == "25.00 (n=300)" and cell["seeds"] == "0"
    arow_cells = dict(zip(head, [c.strip() for c in rows[0].strip("|").split("|")]))
    assert arow_cells["AutoAttack"] == "–"  # missing column for this run: a dash, not a zero


def test_different_eval_size_is_not_pooled(tmp_path):
    rep = build_report([make_run(tmp_path, "a", seed=0, n=300), make_run(tmp_path, "b", seed=1, n=10000)])
    assert len(rep.groups) == 2


def test_run_without_eval_shows_validation_numbers_and_a_note(tmp_path):
    run = make_run(tmp_path, "noeval", with_eval=False, val=(0.2, 0.3))
    md = build_report([run]).markdown()
    cell = dict(zip(md_header(md), md_row(md, "arow")))
    assert cell["val PGD-20 (last)"] == "30.00"
    assert cell["n test"] == "–"
    assert "not evaluated" in cell["notes"] and "run `arow eval`" in cell["notes"]
    assert "clean" not in md_header(md)  # no run has test numbers: no test columns at all


def test_csv_has_mean_and_std_columns(tmp_path):
    runs = [make_run(tmp_path, "s0", seed=0, accuracy={"clean": 0.80, "pgd20": 0.40}),
            make_run(tmp_path, "s1", seed=1, accuracy={"clean": 0.84, "pgd20": 0.46})]
    rep, path = write_report(runs, tmp_path / "r.csv", fmt="csv")
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert len(rows) == 1
    r = rows[0]
    assert float(r["clean_mean"]) == pytest.approx(82.0)
    assert float(r["clean_std"]) == pytest.approx(100 * statistics.stdev([0.80, 0.84]), abs=1e-3)
    assert float(r["pgd20_mean"]) == pytest.approx(43.0)
    assert r["seeds"] == "0;1" and r["n_runs"] == "2" and r["subset"] == "True"
    assert "cw_mean" not in r


def test_not_a_run_folder_is_a_clear_value_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not an arow run folder"):
        build_report([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no such directory"):
        load_run(tmp_path / "missing")
    bad = make_run(tmp_path, "bad")
    (bad / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(RunFolderError, match="line 1"):
        load_run(bad)
    with pytest.raises(ValueError, match="md or csv"):
        write_report([make_run(tmp_path, "ok")], tmp_path / "x", fmt="html")


def test_format_eps():
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(0.1) == "0.1"
    assert format_eps(0.0) == "0"


@pytest.mark.parametrize("eps, text", [(8 / 255, "8/255"), (0.1, "0.1"), (0.2, "0.2"), (0.5, "0.5"),
                                       (1 / 255, "1/255"), (16 / 255, "16/255"), (1.0, "1")])
def test_format_eps_has_one_rule_for_tables_and_robustbench(eps, text):
    """k/255 only where that is how the radius is written: 0.2 is 51/255 but stays 0.2."""
    from arow.reporting import robustbench

    assert format_eps(eps) == text
    assert robustbench.format_eps(eps) == text
    assert robustbench.model_info({"accuracy": {"clean": 0.5, "autoattack": 0.25}, "eps": eps, "n": 10,
                                   "dataset": "cifar10"})["eps"] == text


def test_cli_report_prints_table_and_writes_file(tmp_path, capsys):
    runs = [str(make_run(tmp_path, "s0", seed=0)), str(make_run(tmp_path, "s1", seed=1))]
    out = tmp_path / "rep.md"
    assert main(["report", *runs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| arow " in printed and "80.00 ± 0.00" in printed
    assert out.read_text() in printed
    assert main(["report", str(tmp_path)]) == 2  # tmp_path itself is not a run
    assert "not an arow run folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- plots
def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))


def test_plots_of_a_hand_made_run(tmp_path):
    from arow.reporting.plots import plot_run

    run = make_run(tmp_path, "r", accuracy={"clean": 0.8, "pgd20": 0.4, "cw": 0.38})
    paths = plot_run(run)
    assert sorted(p.name for p in paths) == ["curves.png", "per_class.png", "weights.png"]
    for p in paths:
        assert_png(p)


def test_method_without_weight_skips_weights_png(tmp_path, caplog):
    from arow.reporting.plots import plot_run

    run = make_run(tmp_path, "t", method="trades", with_eval=False)
    with caplog.at_level("DEBUG", logger="arow.reporting.plots"):
        paths = plot_run(run)
    assert [p.name for p in paths] == ["curves.png"]
    assert "no weights.png" in caplog.text and "no per_class.png" in caplog.text


def test_eps_curve_json_and_png(tmp_path):
    from arow.reporting.plots import plot_eps_curve

    run = make_run(tmp_path, "e")
    # the numbers come from `arow plot --eps-curve` (covered with a real model below); here: the picture
    (run / "eps_curve.json").write_text(json.dumps({
        "dataset": "fashion-mnist", "method": "arow", "train_eps": 0.1, "attack": "pgd20", "checkpoint": "final",
        "n": 100, "test_set_size": 10000, "subset": True,
        "points": [{"factor": f, "eps": 0.1 * f, "accuracy": math.exp(-f)} for f in (0, 0.5, 1, 2)]}))
    assert_png(plot_eps_curve(run))


# --------------------------------------------------------------------------- a real tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of ARoW on 96 random images with TensorBoard on (skipped without tensorboard)."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
    from arow.config.schema import TrainConfig
    from arow.data import from_tensors
    from arow.models import build_model
    from arow.pipelines import build_trainer

    out = tmp_path_factory.mktemp("tb") / "run"
    g = torch.Generator().manual_seed(0)
    data = from_tensors(torch.rand(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g))
    val = from_tensors(torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    cfg = TrainConfig(epochs=1, batch_size=48, eps=0.1, attack_steps=1, val_size=0, out=str(out), tensorboard=True,
                      device="cpu")
    build_trainer(cfg, model, data, val, model_spec={"name": "small-cnn", "num_classes": 10, "in_channels": 1,
                                                     "image_size": 28, "dataset": "fashion-mnist"}).fit()
    return out


def test_tensorboard_writes_event_files_with_the_metrics(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    acc = EventAccumulator(str(tiny_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "val/pgd_acc", "lr", "train/weight_mean"} <= tags  # grouped: train/..., val/...
    logged = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[0])
    assert acc.Scalars("train/loss")[0].value == pytest.approx(logged["train_loss"], rel=1e-6)


def test_training_writes_its_pngs(tiny_run):
    assert_png(tiny_run / "curves.png")
    assert_png(tiny_run / "weights.png")


def test_cli_plot_eps_curve_on_a_real_run(tiny_run, capsys):
    assert main(["plot", str(tiny_run), "--eps-curve", "--n", "40", "--eps-factors", "0,1,2", "--device", "cpu"]) == 0
    d = json.loads((tiny_run / "eps_curve.json").read_text())
    accs = [p["accuracy"] for p in d["points"]]
    assert [p["eps"] for p in d["points"]] == pytest.approx([0.0, 0.1, 0.2])
    assert d["n"] == 40 and d["subset"] is True
    assert accs[1] <= accs[0] and accs[2] <= accs[0]  # the attack only ever flips clean-correct examples
    assert_png(tiny_run / "eps_curve.png")
    assert "eps_curve.png" in capsys.readouterr().out


def test_tensorboard_missing_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    from arow.config.schema import TrainConfig
    from arow.data import from_tensors
    from arow.models import build_model
    from arow.pipelines import build_trainer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    data = from_tensors(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), name="fashion-mnist")
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    cfg = TrainConfig(epochs=1, batch_size=8, eps=0.1, val_size=0, out=str(tmp_path / "r"), tensorboard=True)
    with pytest.raises(ValueError, match=r"needs the tensorboard package: pip install"):
        build_trainer(cfg, model, data)


# --------------------------------------------------------------------------- the run-folder reader
def write_eval(run: Path, name: str, *, n: int, accuracy: dict, full: int = 10000, **extra) -> Path:
    """An evaluation file as `arow eval` writes it (``eval_n<N>.json`` for a subset)."""
    path = run / name
    path.write_text(json.dumps({"n": n, "eps": 0.1, "norm": extra.pop("norm", "linf"), "accuracy": accuracy,
                                "per_class": {k: [v] * 10 for k, v in accuracy.items()}, "dataset": "fashion-mnist",
                                "test_set_size": full, "subset": n < full, "method": "arow", "seed": 0, **extra}))
    return path


def test_read_run_lists_every_evaluation_and_says_which_are_full(tmp_path):
    from arow.reporting.records import read_run

    d = make_run(tmp_path, "r", n=10000, accuracy={"clean": 0.8, "pgd20": 0.4})
    write_eval(d, "eval_n20.json", n=20, accuracy={"clean": 0.75, "autoattack": 0.3})
    write_eval(d, "eval_best.json", n=10000, accuracy={"clean": 0.81, "pgd20": 0.41})
    write_eval(d, "eval_l2.json", n=10000, accuracy={"clean": 0.8, "pgd20": 0.5}, norm="l2")
    write_eval(d, "eval_best_l2_n50.json", n=50, accuracy={"clean": 0.8, "pgd20": 0.5}, norm="l2")
    (d / "eval_state").mkdir()  # an interrupted evaluation's progress: not an evaluation
    (d / "eps_curve.json").write_text(json.dumps({"train_eps": 0.1, "points": [{"eps": 0.0, "accuracy": 0.8}]}))
    rec = read_run(d)
    assert list(rec.evals) == ["eval.json", "eval_best.json", "eval_best_l2_n50.json", "eval_l2.json", "eval_n20.json"]
    assert {k: e.full for k, e in rec.evals.items()} == {"eval.json": True, "eval_best.json": True,
                                                         "eval_best_l2_n50.json": False, "eval_l2.json": True,
                                                         "eval_n20.json": False}
    e = rec.evals["eval_best_l2_n50.json"]
    assert (e.which, e.other_norm, e.n, e.test_set_size, e.subset) == ("best", "l2", 50, 10000, True)
    assert e.size_text == "50 of 10000 test images (SUBSET)"
    assert rec.reported_eval().name == "eval.json"
    assert rec.eval("final", full=False).name == "eval_n20.json"
    assert rec.eval("best").accuracy == {"clean": 0.81, "pgd20": 0.41}
    assert rec.eval("final", other_norm="l2").name == "eval_l2.json"
    assert (rec.method, rec.dataset, rec.seed) == ("arow", "fashion-mnist", 0)
    assert len(rec.metrics) == 3 and rec.steps == [] and rec.config["method"] == "arow"
    assert rec.eps_curve["points"] == [{"eps": 0.0, "accuracy": 0.8}]
    assert not rec.finished and not rec.failed and rec.failure is None
    (d / "final.pt").write_bytes(b"")
    assert read_run(d).finished


def test_read_run_without_eval_json_reports_the_largest_subset(tmp_path):
    from arow.reporting.records import read_run

    d = make_run(tmp_path, "r", with_eval=False)
    write_eval(d, "eval_n20.json", n=20, accuracy={"clean": 0.7, "pgd20": 0.4})
    write_eval(d, "eval_n100.json", n=100, accuracy={"clean": 0.72, "pgd20": 0.42})
    write_eval(d, "eval_best_n500.json", n=500, accuracy={"clean": 0.9, "pgd20": 0.5})  # not the final model
    ev = read_run(d).reported_eval()
    assert ev.name == "eval_n100.json" and ev.subset and not ev.full
    assert read_run(d).eval("final") is None  # no full-test-set number


@pytest.mark.parametrize("name, content, message", [
    ("eval_n20.json", "{not json", "eval_n20.json: unreadable"),
    ("eval.json", '{"n": 5}', "eval.json has no 'accuracy' mapping"),
    ("eval_best.json", '{"accuracy": {"clean": "high"}}', "eval_best.json: 'accuracy' holds values"),
    ("eval_n20.json", '{"n": "20", "accuracy": {"clean": 0.5}}', "eval_n20.json: 'n' is '20'"),
    ("diverged.json", "[1", "diverged.json: unreadable"),
    ("diverged.json", "[1]", "diverged.json: not a JSON object"),
    ("metrics.jsonl", '{"epoch": 1}\n{"epoch": 2', "metrics.jsonl line 2: not JSON"),
    ("eps_curve.json", '{"points": [{"eps": "0.1", "accuracy": 0.5}]}', "eps_curve.json: no 'points' list"),
    ("eps_curve.json", "", "eps_curve.json: unreadable"),
])
def test_read_run_names_a_damaged_file_in_one_line(tmp_path, name, content, message):
    from arow.reporting.records import read_run

    d = make_run(tmp_path, "r")
    (d / name).write_text(content)
    with pytest.raises(RunFolderError) as err:
        read_run(d)
    assert message in str(err.value) and str(d / name) in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(RunFolderError, match=message.split(":")[0]):
        build_report([d])


def test_read_run_keeps_a_stopped_evaluation_and_a_divergence(tmp_path, capsys):
    from arow.reporting.records import read_run

    d = make_run(tmp_path, "r", with_eval=False)
    (d / "eval.json").write_text(json.dumps({"error": "robustness guard 'gradient' tripped: masked", "n": 300,
                                             "test_set_size": 10000, "guards": []}))
    (d / "diverged.json").write_text(json.dumps({"epoch": 2, "step": 17, "reason": "non-finite loss", "lr": 0.1}))
    rec = read_run(d)
    stopped = rec.evals["eval.json"]
    assert stopped.error.startswith("robustness guard") and not stopped.full and not stopped.subset
    assert rec.reported_eval() is None and rec.failed
    assert rec.failure == "diverged at epoch 2, step 17: non-finite loss"
    cell = dict(zip(md_header(md := build_report([d]).markdown()), md_row(md, "arow")))
    assert "eval.json holds no numbers (robustness guard 'gradient' tripped" in cell["notes"]
    assert "r: diverged at epoch 2, step 17" in cell["notes"]


# --------------------------------------------------------------------------- subset evaluations in reports
def test_report_shows_a_subset_evaluation_marked_and_apart_from_full_ones(tmp_path, capsys):
    full = make_run(tmp_path, "full", n=10000, accuracy={"clean": 0.80, "pgd20": 0.40})
    sub = make_run(tmp_path, "sub", seed=1, with_eval=False)
    write_eval(sub, "eval_n20.json", n=20, accuracy={"clean": 0.72, "pgd20": 0.35})
    rep = build_report([full, sub])
    assert [len(g.runs) for g in rep.groups] == [1, 1]  # never pooled with the full-test-set run
    md = rep.markdown()
    rows = [dict(zip(md_header(md), [c.strip() for c in line.strip("|").split("|")]))
            for line in md.splitlines() if line.startswith("| arow ")]
    assert (rows[0]["clean"], rows[0]["PGD-20"], rows[0]["n test"]) == ("80.00", "40.00", "10000")
    assert (rows[1]["clean"], rows[1]["PGD-20"]) == ("72.00 (n=20)", "35.00 (n=20)")
    assert rows[1]["n test"] == "20 of 10000 (SUBSET)"
    assert "SUBSET: eval_n20.json, 20 of 10000 test images" in rows[1]["notes"]
    assert "not evaluated" not in md and "(n=N)" in md
    rows_csv = list(csv.DictReader(io.StringIO(rep.csv())))
    assert [(r["subset"], r["eval_file"], r["n_test"]) for r in rows_csv] == [
        ("False", "eval.json", "10000"), ("True", "eval_n20.json", "20")]
    assert main(["report", str(sub), "--out", str(tmp_path / "r.md")]) == 0
    assert "72.00 (n=20)" in capsys.readouterr().out


def test_format_mean_std_is_the_one_formatter():
    from arow.reporting.tables import Stat, format_mean_std

    assert format_mean_std(0.82, 0.02828) == Stat([0.80, 0.84]).fmt() == "82.00 ± 2.83"
    assert format_mean_std(0.5, None) == Stat([0.5]).fmt() == "50.00"
    assert format_mean_std(None, None) == Stat([]).fmt() == "–"
    assert format_mean_std(None, None, missing="-") == "-"
    assert format_mean_std(0.72, None, n=20, full=10000) == "72.00 (n=20)"
    assert format_mean_std(0.72, None, n=10000, full=10000) == "72.00"
    assert format_mean_std(3.5, 0.25, scale=1.0, unit=" s") == "3.50 s ± 0.25"


# --------------------------------------------------------------------------- labels
def test_method_names_and_papers_come_from_the_method_classes(monkeypatch):
    from arow.methods import METHODS, Method
    from arow.reporting import robustbench
    from arow.reporting.labels import method_label, method_paper

    class ToyAT(Method):
        paper = "Doe, Roe: A Toy Defence, with Commas, Somewhere 2031"
        url = "https://example.org/toy"

    monkeypatch.setitem(METHODS._items, "toy-at", ToyAT)  # a new method file registers its class
    assert method_label("toy-at") == "Toy-AT"
    p = method_paper("toy-at")
    assert (p.authors, p.title, p.venue, p.url) == ("Doe, Roe", "A Toy Defence, with Commas", "Somewhere 2031",
                                                    "https://example.org/toy")
    info = robustbench.model_info({"accuracy": {"clean": 0.5, "autoattack": 0.25}, "eps": 0.1, "n": 10,
                                   "dataset": "fashion-mnist", "method": "toy-at", "model": "small-cnn"})
    assert (info["name"], info["link"], info["authors"], info["venue"]) == (
        "A Toy Defence, with Commas", "https://example.org/toy", "Doe, Roe", "Somewhere 2031")
    for name in METHODS.names():  # every registered method: its own class's link, nothing hand-kept
        cls = METHODS.get(name)
        assert robustbench.paper_entry(name).get("link") == (cls.url if cls.paper else None)
    assert [method_label(m) for m in ("arow", "trades", "pgd-at", "gair-at", "trades-awp", "natural")] == [
        "ARoW", "TRADES", "PGD-AT", "GAIR-AT", "TRADES-AWP", "natural"]
    no_paper = robustbench.model_info({"accuracy": {"clean": 0.5, "autoattack": 0.25}, "eps": 0.1, "n": 10,
                                       "dataset": "fashion-mnist", "method": "natural", "model": "small-cnn"})
    assert no_paper["name"] == "natural (small-cnn)" and no_paper["link"] == ""


def test_attack_and_metric_labels_are_the_same_everywhere(tmp_path):
    from arow.reporting.labels import attack_label, metric_label
    from arow.reporting.plots.study import metric_text

    assert [attack_label(a) for a in ("clean", "pgd20", "cw", "cw30", "fgsm", "autoattack", "worst_case")] == [
        "clean", "PGD-20", "CW-30", "CW-30", "FGSM", "AutoAttack", "worst case"]
    assert attack_label("pgd50r5") == "PGD-50 (5 restarts)" and attack_label("my-attack") == "my-attack"
    assert metric_label("val_robust") == "validation robust"
    assert metric_text("autoattack", {"aa_n": 1000}) == "AutoAttack (first 1000)"
    assert metric_text("cw", {"aa_n": 1000}) == "CW-30"
    run = make_run(tmp_path, "r", n=10000, accuracy={"clean": 0.8, "cw": 0.3, "autoattack": 0.28})
    head = md_header(build_report([run]).markdown())
    assert {"CW-30", "AutoAttack", "clean"} <= set(head)
