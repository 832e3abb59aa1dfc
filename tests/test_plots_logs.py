"""Runs side by side (``compare_runs``, ``arow plot A B --out DIR``) and logs that talk: step records
(``--log-every``), TensorBoard groups, histogram and hyper-parameters, the best.pt marker, loss labels."""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest
import torch

from arow.reporting import plots
from arow.cli.commands import main
from arow.config.schema import TrainConfig
from arow.data import TensorData, from_tensors
from arow.pipelines import build_trainer
from arow.reporting.tables import load_run
from arow.runs.rundir import RunDir
from arow.training.trainer import Trainer
from conftest import tiny_cnn, write_aa_study_cell

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = {"name": "tiny-cnn", "custom": True}


def resolved_config(method: str, out: Path, seed: int = 0, **cfg) -> dict:
    """The config.json a real run of ``method`` writes (built by a Trainer that never trains)."""
    data = from_tensors(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    c = TrainConfig(method=method, epochs=3, batch_size=8, eps=0.1, attack_steps=1, val_size=0, seed=seed,
                    device="cpu", out=str(out), **cfg)
    return Trainer(c, tiny_cnn(), data, model_spec=SPEC).resolved_config()


def fabricate_run(root: Path, name: str, method: str, *, seed: int = 0, val=(0.30, 0.40, 0.45),
                  with_eval: bool = True, averaged: str = "", test_acc=(0.70, 0.35), n: int = 10000, **cfg) -> Path:
    """A run folder as Trainer and `arow eval` write it: config.json, metrics.jsonl, and an evaluation
    of ``n`` test images: eval.json on the full test set (10000), eval_n<N>.json on a subset."""
    d = root / name
    d.mkdir(parents=True)
    RunDir(d).write_config(resolved_config(method, d, seed, **cfg))
    records = []
    for e, v in enumerate(val, 1):
        first = "adv_bce" if method == "mart" else "natural"
        rec = {"epoch": e, "lr": 0.1 / e, "train_loss": 2.0 / e, f"train_{first}": 1.5 / e, "train_robust": 0.5 / e,
               "train_clean_acc": 0.4 + 0.1 * e, "train_adv_acc": 0.2 + 0.05 * e}
        if method in ("arow", "mart"):
            hist = [0.0] * 20
            hist[19 - 3 * e], hist[4 + seed] = 150.0, 50.0 * e
            rec.update(train_weight_mean=0.8 - 0.1 * e, weight_hist=hist)
        rec.update(val_clean_acc=v + 0.3, val_pgd_acc=v)
        if averaged and e >= 2:  # the averaged model scores better than the trained one
            rec.update({f"{averaged}_val_clean_acc": v + 0.32, f"{averaged}_val_pgd_acc": v + 0.05})
        rec["seconds"] = 2.5
        records.append(rec)
    RunDir(d).write_metrics(records)
    if with_eval:
        acc = {"clean": test_acc[0], "pgd20": test_acc[1]}
        RunDir(d).write_json(RunDir(d).eval_path("final", n, 10000).name, {
            "n": n, "norm": "linf", "eps": 0.1, "threat_model": "L-inf eps 0.1", "accuracy": acc,
            "per_class": {k: [min(1.0, v + 0.03 * (c - 5)) for c in range(10)] for k, v in acc.items()},
            "seconds": {"clean": 0.1, "pgd20": 1.0}, "attacks": {}, "attack_settings": {}, "eval_seed": 0,
            "dataset": "fashion-mnist", "test_set_size": 10000, "subset": n < 10000, "checkpoint": str(d / "final.pt"),
            "which": "final", "method": method, "model": "tiny-cnn", "seed": seed})
    return d


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def capture_figures(monkeypatch) -> dict[str, object]:
    """Record every figure plots saves, by file name (the PNG is still written)."""
    figures: dict[str, object] = {}
    save = plots.common.save

    def keep(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots.common, "save", keep)
    return figures


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for leg in [ax.get_legend(), *[a for a in ax.artists]]
            if leg is not None and hasattr(leg, "get_texts") for t in leg.get_texts()]


# --------------------------------------------------------------------------- compare_runs
def test_compare_runs_draws_four_figures_and_leaves_out_what_a_run_lacks(tmp_path, monkeypatch, caplog):
    runs = [fabricate_run(tmp_path, "arow-s0", "arow"),
            fabricate_run(tmp_path, "trades-s0", "trades", val=(0.25, 0.35, 0.38), test_acc=(0.78, 0.30)),
            fabricate_run(tmp_path, "mart-s1", "mart", seed=1, val=(0.2, 0.3, 0.33), with_eval=False)]
    figures = capture_figures(monkeypatch)
    with caplog.at_level(logging.INFO, logger="arow.reporting.plots"):
        paths = plots.compare_runs(runs, tmp_path / "figures")
    assert [p.name for p in paths] == ["compare_curves.png", "compare_per_class.png", "compare_weights.png",
                                       "compare_tradeoff.png"]
    for p in paths:
        assert p.parent == tmp_path / "figures"
        assert_png(p)
    # the run without eval.json: left out of the per-class and scatter figures, said in the log and the figure
    assert "mart-s1: no evaluation with per-class numbers" in caplog.text
    for name in ("compare_per_class.png", "compare_tradeoff.png"):
        title = figures[name].axes[0].get_title()
        assert "left out (no " in title and "mart-s1" in title and "subset" not in title
    # TRADES has no per-example weight: not in the weight figure, and the figure says so
    title = figures["compare_weights.png"].axes[0].get_title()
    assert "left out (no per-example weight): trades-s0" in title
    weight_labels = legend_texts(figures["compare_weights.png"])
    assert any(t.startswith("arow-s0: ARoW weight") for t in weight_labels)
    assert any(t.startswith("mart-s1: MART weight") for t in weight_labels)
    # one colour per run on the curves: robust solid, clean dashed, labelled by folder name
    ax = figures["compare_curves.png"].axes[0]
    robust = {ln.get_label(): ln for ln in ax.get_lines()
              if ln.get_linestyle() == "-" and not ln.get_label().startswith("_")}
    assert set(robust) == {"arow-s0", "trades-s0", "mart-s1"}
    assert list(robust["trades-s0"].get_ydata()) == pytest.approx([25.0, 35.0, 38.0])
    # the scatter: one point per evaluated run at its final eval.json numbers
    points = {c.get_label(): c.get_offsets()[0].tolist() for c in figures["compare_tradeoff.png"].axes[0].collections}
    assert points == {"arow-s0": pytest.approx([70.0, 35.0]), "trades-s0": pytest.approx([78.0, 30.0])}


def test_compare_runs_refuses_a_run_folder_as_output(tmp_path):
    a, b = fabricate_run(tmp_path, "a", "trades"), fabricate_run(tmp_path, "b", "trades", seed=1)
    with pytest.raises(ValueError, match="is a run folder"):
        plots.compare_runs([a, b], a)
    assert not (a / "compare_curves.png").exists()


def test_cli_plot_several_runs_with_out(tmp_path, capsys):
    a, b = fabricate_run(tmp_path, "x/s0", "arow"), fabricate_run(tmp_path, "y/s0", "trades", with_eval=False)
    out = tmp_path / "cmp"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("compare_curves.png", "compare_weights.png", "compare_per_class.png", "compare_tradeoff.png"):
        assert_png(out / name)
        assert str(out / name) in printed
    assert_png(a / "curves.png") and assert_png(b / "curves.png")  # each run's own PNGs as before
    assert main(["plot", str(a), str(b), "--out", str(a)]) == 2
    assert "is a run folder" in capsys.readouterr().err


def test_cli_plot_compares_into_the_current_directory_and_one_run_as_before(tmp_path, monkeypatch):
    a, b = fabricate_run(tmp_path, "a", "trades"), fabricate_run(tmp_path, "b", "trades", seed=1)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["plot", str(a)]) == 0
    assert not list((tmp_path / "here").glob("*.png")) and (a / "curves.png").is_file()
    assert main(["plot", str(a), str(b)]) == 0
    assert sorted(p.name for p in (tmp_path / "here").glob("*.png")) == [
        "compare_curves.png", "compare_per_class.png", "compare_tradeoff.png"]  # TRADES logs no weight


def test_a_run_evaluated_on_a_subset_only_is_drawn_and_marked(tmp_path, monkeypatch, capsys):
    """`arow eval DIR --n 20` leaves eval_n20.json only: the run is in the trade-off figure as a hollow
    point labelled with its n, and its per-class figure names the subset file."""
    full = fabricate_run(tmp_path, "full", "trades")
    sub = fabricate_run(tmp_path, "sub", "trades", seed=1, n=20, test_acc=(0.60, 0.25))
    assert (sub / "eval_n20.json").is_file() and not (sub / "eval.json").exists()
    figures = capture_figures(monkeypatch)
    assert main(["plot", str(full), str(sub), "--out", str(tmp_path / "cmp")]) == 0
    ax = figures["compare_tradeoff.png"].axes[0]
    points = {c.get_label(): c for c in ax.collections}
    assert set(points) == {"full (n=10000)", "sub (n=20, subset)"}
    assert points["sub (n=20, subset)"].get_offsets()[0].tolist() == pytest.approx([60.0, 25.0])
    assert tuple(points["sub (n=20, subset)"].get_facecolor()[0]) == (1.0, 1.0, 1.0, 1.0)  # hollow
    assert tuple(points["full (n=10000)"].get_facecolor()[0]) != (1.0, 1.0, 1.0, 1.0)
    assert "hollow: evaluated on the first n test images only" in ax.get_title()
    per_class = figures["per_class.png"].axes[0].get_title()  # the last run drawn: sub
    assert "20 of 10000 test images (SUBSET: eval_n20.json)" in per_class
    assert any("n=20, subset" in t for t in legend_texts(figures["compare_per_class.png"]))


def study_result(aa_n: int = 100) -> dict:
    """A study's result dict as `collect` builds it: ARoW with one finished seed, TRADES with two,
    MART with none; AutoAttack on the first ``aa_n`` test images, PGD-20 and clean on all of them."""
    def stat(vals):
        m = sum(vals) / len(vals) if vals else None
        sd = statistics.stdev(vals) if len(vals) > 1 else None
        return {"per_seed": dict(enumerate(vals)), "mean": m, "std": sd, "n": len(vals)}

    acc = {"arow": [{"autoattack": 0.40, "pgd20": 0.45, "clean": 0.80}],
           "trades": [{"autoattack": 0.38, "pgd20": 0.43, "clean": 0.82}, {"autoattack": 0.36, "pgd20": 0.41,
                                                                            "clean": 0.84}],
           "mart": []}
    metrics = ["autoattack", "pgd20", "clean"]
    rows = [{"label": lab, "method": lab, "metrics": {m: stat([a[m] for a in runs]) for m in metrics}, "paired": {}}
            for lab, runs in acc.items()]
    cells = [{"label": lab, "seed": i, "status": "done", "accuracy": a, "dataset": "fashion-mnist", "eps": 0.1,
              "per_class": {"pgd20": [a["pgd20"]] * 10}} for lab, runs in acc.items() for i, a in enumerate(runs)]
    cells.append({"label": "mart", "seed": 0, "status": "failed", "accuracy": {}})
    return {"spec": {"aa_n": aa_n, "preset": "fmnist", "eps_curve_n": 0}, "metrics": metrics, "rows": rows,
            "cells": cells}


def test_study_bars_start_at_zero_and_keep_the_autoattack_subset_apart(tmp_path, monkeypatch):
    from matplotlib.container import ErrorbarContainer

    figures = capture_figures(monkeypatch)
    paths = plots.study_plots(study_result(), tmp_path)
    assert sorted(p.name for p in paths) == ["bars.png", "per_class.png", "tradeoff.png"]
    fig = figures["bars.png"]
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"full test set", "first 100 test images only"}
    full, aa = panels["full test set"], panels["first 100 test images only"]
    assert [t.get_text() for t in full.get_xticklabels()] == ["PGD-20", "clean"]
    assert [t.get_text() for t in aa.get_xticklabels()] == ["AutoAttack (first 100)"]
    for ax in (full, aa):
        assert ax.get_ylim()[0] == 0
        # TRADES (2 seeds) has an error bar per metric; ARoW (1 seed) none, and says n=1
        assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == len(ax.get_xticklabels())
        notes = [t.get_text() for t in ax.texts]
        assert notes.count("n=1") == len(ax.get_xticklabels()) and notes.count("n=2") == len(ax.get_xticklabels())
    heights = sorted(round(p.get_height(), 6) for p in full.patches)
    assert heights == sorted(round(v, 6) for v in [45.0, 80.0, 42.0, 83.0])
    # MART finished no run: no bar, no legend entry, and the others keep their colours
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend == ["arow", "trades"]
    colours = plots.study_colours(study_result())
    trades_bar = next(p for p in full.patches if round(p.get_height(), 6) == 42.0)
    assert tuple(trades_bar.get_facecolor()) == pytest.approx(tuple(colours["trades"]))


def test_study_tradeoff_uses_a_full_test_set_attack_and_names_subsets(tmp_path, monkeypatch):
    figures = capture_figures(monkeypatch)
    plots.study_plots(study_result(), tmp_path)
    ax = figures["tradeoff.png"].axes[0]
    assert ax.get_ylabel() == "robust accuracy: PGD-20, full test set (%)"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"arow", "trades"}
    assert len(figures["tradeoff.png"].axes) == 1  # no run has clean accuracy on AutoAttack's images
    result = study_result()  # a study whose only attack is AutoAttack on a subset says so on both axes
    result["metrics"] = ["autoattack", "clean"]
    for c in result["cells"]:
        c["accuracy"].pop("pgd20", None)
    assert "tradeoff.png" not in [p.name for p in plots.study_plots(result, tmp_path / "none")]  # never mixed
    for c in result["cells"]:
        c["on_aa_images"] = {"clean": c["accuracy"].get("clean", 0.0) - 0.05}
    plots.study_plots(result, tmp_path)
    ax = figures["tradeoff.png"].axes[0]
    assert ax.get_ylabel() == "robust accuracy: AutoAttack (first 100) (%)"
    assert ax.get_xlabel() == "clean accuracy (first 100) (%)"


def _study_with_autoattack(path: Path, without_verdicts: str) -> dict[str, dict[str, torch.Tensor]]:
    """A study folder of TRADES at two betas x two seeds on a 40-image test set, AutoAttack on its
    first 10 images, each cell with real per-example verdicts (none for ``without_verdicts``); the
    first 10 images are the easy ones, so clean accuracy on them differs from the full test set's."""
    from arow.runs.studydir import StudyDir
    from arow.study.spec import StudySpec

    spec = StudySpec.from_dict({"methods": ["trades", {"method": "trades", "label": "trades-b2",
                                                       "method_args": {"beta": 2.0}}],
                                "seeds": [0, 1], "attacks": "clean,pgd20", "aa_n": 10, "eps_curve_n": 0})
    path.mkdir()
    StudyDir(path).write_spec(spec.to_dict())
    g, made = torch.Generator().manual_seed(1), {}
    for label in ("trades", "trades-b2"):
        for seed in (0, 1):
            d = path / "cells" / f"{label}-s{seed}"
            clean = torch.cat([torch.rand(10, generator=g) < 0.95, torch.rand(30, generator=g) < 0.5])
            pgd = clean & (torch.rand(40, generator=g) < 0.7)
            aa = pgd[:10] & (torch.rand(10, generator=g) < 0.8)
            made[d.name] = {"clean": clean, "autoattack": aa}
            write_aa_study_cell(d, "trades", seed, clean, pgd, aa, verdicts=d.name != without_verdicts)
    return made


def test_study_figures_plot_autoattack_against_clean_on_the_same_first_n_images(tmp_path, monkeypatch, caplog):
    from matplotlib.container import ErrorbarContainer

    from arow.study.collect import collect

    made = _study_with_autoattack(tmp_path / "s", without_verdicts="trades-b2-s1")
    full = {name: 100 * float(v["clean"].float().mean()) for name, v in made.items()}
    first = {name: 100 * float(v["clean"][:10].float().mean()) for name, v in made.items()}
    aa = {name: 100 * float(v["autoattack"].float().mean()) for name, v in made.items()}
    assert all(abs(full[k] - first[k]) > 1 for k in made)  # the two clean accuracies tell apart
    figures = capture_figures(monkeypatch)
    with caplog.at_level(logging.INFO, logger="arow"):
        collect(tmp_path / "s")

    def scattered(ax) -> dict[str, list[list[float]]]:
        return {c.get_label(): c.get_offsets().tolist() for c in ax.collections if not c.get_label().startswith("_")}

    full_ax, aa_ax = figures["tradeoff.png"].axes
    assert full_ax.get_xlabel() == "clean accuracy, full test set (%)"
    assert aa_ax.get_xlabel() == "clean accuracy (first 10) (%)"
    assert aa_ax.get_ylabel() == "robust accuracy: AutoAttack (first 10) (%)"
    assert [x for x, _ in scattered(full_ax)["trades-b2"]] == pytest.approx([full["trades-b2-s0"],
                                                                             full["trades-b2-s1"]])
    # AutoAttack's points: x is clean on its own 10 images; the cell without verdicts is left out, and says so
    points = scattered(aa_ax)
    assert set(points) == {"trades", "trades-b2"}
    assert sum(points["trades"], []) == pytest.approx([first["trades-s0"], aa["trades-s0"],
                                                       first["trades-s1"], aa["trades-s1"]])
    assert sum(points["trades-b2"], []) == pytest.approx([first["trades-b2-s0"], aa["trades-b2-s0"]])
    assert "trades-b2-s1" in aa_ax.get_title() and "left out" in aa_ax.get_title()
    assert any("tradeoff.png" in r.getMessage() and "trades-b2-s1" in r.getMessage() for r in caplog.records)
    # frontier.png: the rows' means, AutoAttack against clean on the same images over the seeds that have both
    panel = figures["frontier.png"].axes[1]
    assert panel.get_xlabel() == "clean accuracy (first 10) (%)"
    means = sorted((float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0]))
                   for c in panel.containers if isinstance(c, ErrorbarContainer))
    expected = sorted([((first["trades-s0"] + first["trades-s1"]) / 2, (aa["trades-s0"] + aa["trades-s1"]) / 2),
                       (first["trades-b2-s0"], aa["trades-b2-s0"])])  # trades-b2: seed 1 has no clean here
    assert aa["trades-b2-s0"] != aa["trades-b2-s1"]
    assert sum(means, ()) == pytest.approx(sum(expected, ()))
    assert "left out" in panel.get_title() and "trades-b2-s1" in panel.get_title()
    assert any("frontier.png" in r.getMessage() and "trades-b2-s1" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- curves.png
@pytest.mark.parametrize("averaged", ["swa", "ema"])
def test_best_marker_sits_on_the_curve_it_was_selected_on(tmp_path, averaged):
    run = load_run(fabricate_run(tmp_path, "r", "trades", val=(0.30, 0.42, 0.40), averaged=averaged))
    # plain validation peaks at epoch 2 (0.42); the averaged model scores 0.47 at 2 and 0.45 at 3
    assert plots.best_point(run) == (2, pytest.approx(0.47), f"{averaged}_val_pgd_acc")
    fig = plots.curves_figure(run)
    ax = fig.axes[1]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    marker = next(ln for label, ln in lines.items() if label.startswith("best.pt"))
    assert f"selected on {averaged.upper()} val PGD-20 (47.0%)" in marker.get_label()
    curve = lines[f"{averaged.upper()} val PGD-20"]
    on_curve = dict(zip(curve.get_xdata(), curve.get_ydata()))
    assert marker.get_xdata()[0] == 2 and marker.get_ydata()[0] == pytest.approx(on_curve[2])


def test_mart_first_loss_term_is_called_adversarial_bce(tmp_path):
    fig = plots.curves_figure(load_run(fabricate_run(tmp_path, "m", "mart")))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "adversarial BCE (MART)" in labels
    assert not any("natural" in t for t in labels)


# --------------------------------------------------------------------------- --log-every
@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """ARoW on 200 random images, batch 50 (4 steps an epoch), --log-every 2: one epoch, then resumed
    to two (TensorBoard on when the package is there)."""
    import importlib.util

    out = tmp_path_factory.mktemp("steps") / "run"
    g = torch.Generator().manual_seed(0)
    data = from_tensors(torch.rand(200, 1, 28, 28, generator=g), torch.randint(0, 10, (200,), generator=g))
    val = from_tensors(torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g))
    tb = importlib.util.find_spec("tensorboard") is not None
    for epochs in (1, 2):
        torch.manual_seed(0)
        cfg = TrainConfig(method="arow", epochs=epochs, batch_size=50, eps=0.1, attack_steps=1, val_size=0,
                          val_attack="fgsm", log_every=2, device="cpu", out=str(out), tensorboard=tb)
        build_trainer(cfg, tiny_cnn(), data, val, model_spec=SPEC, resume=epochs > 1).fit()
    return out


def test_log_every_writes_step_records_at_the_global_steps(logged_run):
    run = RunDir(logged_run)
    steps, epochs = run.read_steps(), run.read_metrics()
    assert [s["step"] for s in steps] == [2, 4, 6, 8]  # the resumed epoch continues the count
    assert [s["epoch_float"] for s in steps] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert all(s["grad_norm"] > 0 for s in steps)
    assert {"lr", "train_loss", "train_natural", "train_robust", "train_weight_mean"} <= set(steps[0])
    assert [r["epoch"] for r in epochs] == [1, 2] and all("step" not in r for r in epochs)
    # two windows of two equal batches make the epoch: their means average to the epoch's mean
    assert (steps[0]["train_loss"] + steps[1]["train_loss"]) / 2 == pytest.approx(epochs[0]["train_loss"], rel=1e-5)
    lines = [json.loads(line) for line in (logged_run / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("epoch", line.get("step")) for line in lines] == [2, 4, 1, 6, 8, 2]  # steps before their epoch
    assert load_run(logged_run).metrics == epochs


def test_curves_use_the_step_records(logged_run):
    fig = plots.curves_figure(load_run(logged_run), RunDir(logged_run).read_steps())
    lr_line = fig.axes[2].get_lines()[0]
    assert list(lr_line.get_xdata()) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert "step record" in fig.axes[2].get_title()
    assert_png(logged_run / "curves.png")


def test_tensorboard_groups_histogram_and_hparams(logged_run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/weight_mean", "val/pgd_acc", "val/clean_acc", "lr", "train_step/loss",
            "train_step/grad_norm"} <= tags
    assert not {"train_loss", "val_pgd_acc"} & tags
    assert [e.step for e in acc.Scalars("train_step/loss")] == [2, 4, 6, 8]
    assert [e.step for e in acc.Scalars("val/pgd_acc")] == [4, 8]  # epoch records at the epoch's last step
    assert [e.step for e in acc.Scalars("lr")] == [2, 4, 6, 8]  # with step records: the per-step schedule
    assert "train/weight" in acc.Tags()["histograms"]
    assert acc.PluginTagToContent("hparams")


# --------------------------------------------------------------------------- no host reads between logs
def _host_reads(steps: int, log_every: int, monkeypatch) -> int:
    torch.manual_seed(0)
    data = TensorData(torch.rand(4 * steps, 1, 28, 28), torch.arange(4 * steps) % 10, 10)
    cfg = TrainConfig(method="arow", epochs=1, batch_size=4, eps=0.1, attack_steps=1, device="cpu",
                      log_every=log_every, val_size=0)
    trainer = Trainer(cfg, tiny_cnn(), data)
    calls = [0]
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            calls[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    try:
        trainer.train_epoch(0)
    finally:
        monkeypatch.undo()
    return calls[0]


def test_log_every_reads_device_values_only_on_logging_steps(monkeypatch):
    per_log = _host_reads(3, 3, monkeypatch) - _host_reads(3, 0, monkeypatch)
    assert per_log > 0
    assert _host_reads(6, 3, monkeypatch) == _host_reads(6, 0, monkeypatch) + 2 * per_log
