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
    assert cell["clean"] == "82.00 ± 2.83"  # mean 82, stdev(80, 84) = 2.828
    assert cell["PGD-20"] == f"43.00 ± {100 * statistics.stdev([0.40, 0.46]):.2f}"
    assert cell["CW"] == "36.00 ± 1.41"
    assert cell["worst case"] == "35.00 ± 1.41"
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
    assert cell["AutoAttack"] == "25.00" and cell["seeds"] == "0"
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
    assert "no eval.json" in cell["notes"]
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
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'arow[tensorboard]')")
    from arow.config.schema import TrainConfig
    from arow.data import from_tensors
    from arow.models import build_model
    from arow.training.trainer import Trainer

    out = tmp_path_factory.mktemp("tb") / "run"
    g = torch.Generator().manual_seed(0)
    data = from_tensors(torch.rand(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g))
    val = from_tensors(torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    cfg = TrainConfig(epochs=1, batch_size=48, eps=0.1, attack_steps=1, val_size=0, out=str(out), tensorboard=True,
                      device="cpu")
    Trainer(cfg, model, data, val, model_spec={"name": "small-cnn", "num_classes": 10, "in_channels": 1,
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
    from arow.training.trainer import Trainer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    data = from_tensors(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), name="fashion-mnist")
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    cfg = TrainConfig(epochs=1, batch_size=8, eps=0.1, val_size=0, out=str(tmp_path / "r"), tensorboard=True)
    with pytest.raises(ValueError, match=r"needs the tensorboard package: pip install"):
        Trainer(cfg, model, data)
