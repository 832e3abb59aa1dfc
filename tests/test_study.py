"""`arow study`: a grid of methods x seeds, resumable, compared with paired statistics."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fmnist_available

from arow.study.core import Cell, Study, StudyError, StudySpec, Variant, cell_steps, collect, paired, t975

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
# a few hundred images, one epoch, cheap attacks on the full test set, tiny AutoAttack and eps curve
TINY = ["--set", "limit_train=400", "--set", "epochs=1", "--set", "val_size=100", "--set", "attack_steps=2",
        "--set", "batch_size=100", "--attacks", "clean,fgsm", "--aa-n", "10", "--eps-curve-n", "20", "--no-guards"]


def arow(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "arow", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


# --------------------------------------------------------------------------- statistics
def test_t_quantiles_are_the_table_values():
    assert t975(1) == pytest.approx(12.706) and t975(2) == pytest.approx(4.303)
    assert t975(30) == pytest.approx(2.042)
    assert t975(60) == pytest.approx(2.000, abs=0.002) and t975(1000) == pytest.approx(1.962, abs=0.002)
    with pytest.raises(ValueError):
        t975(0)


def test_paired_interval_matches_a_hand_computation():
    a = {0: 0.70, 1: 0.72, 2: 0.71, 7: 0.5}  # seed 7 has no partner: not paired
    b = {0: 0.69, 1: 0.70, 2: 0.72}
    d = [0.01, 0.02, -0.01]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.303 * sd / math.sqrt(3)
    p = paired(a, b)
    assert p.n == 3 and p.wins == 2
    assert p.mean == pytest.approx(mean) and p.low == pytest.approx(mean - half) and p.high == pytest.approx(mean + half)
    one = paired({0: 0.8}, {0: 0.7})
    assert one.n == 1 and one.low is None and one.mean == pytest.approx(0.1)
    assert paired({}, b).mean is None


# --------------------------------------------------------------------------- the definition
def test_spec_parses_variants_and_rejects_mistakes(tmp_path):
    spec = StudySpec.from_dict({"methods": ["arow", {"method": "trades", "label": "trades-ls",
                                                     "method_args": {"smoothing": 0.2}, "aa": False}],
                                "seeds": "0,1", "baseline": "arow"})
    assert [c.name for c in spec.cells()] == ["arow-s0", "trades-ls-s0", "arow-s1", "trades-ls-s1"]
    assert spec.variants[1] == Variant("trades-ls", "trades", {"smoothing": 0.2}, {}, aa=False)
    for bad, needle in [({"methods": []}, "at least one method"),
                        ({"methods": ["nope"], "baseline": "nope"}, "unknown method"),
                        ({"methods": ["arow", "arow"]}, "unique"),
                        ({"methods": ["arow"]}, "baseline 'trades'"),
                        ({"methods": [{"method": "arow", "method_args": {"beta": 1}}], "baseline": "arow"},
                         "no hyper-parameter"),
                        ({"methods": ["arow"], "baseline": "arow", "overrides": {"epoch": 3}}, "unknown config"),
                        ({"methods": ["arow"], "baseline": "arow", "overrides": {"seed": 3}}, "set by the study"),
                        ({"methods": ["arow"], "baseline": "arow", "attacks": "clean,autoattack"}, "aa_n"),
                        ({"methods": ["arow"], "baseline": "arow", "seedz": [1]}, "unknown study key")]:
        with pytest.raises(StudyError, match=needle):
            StudySpec.from_dict(bad)
    f = tmp_path / "s.yaml"
    f.write_text("methods: [arow]\nmethods: [trades]\n")
    with pytest.raises(ValueError, match="duplicate"):
        StudySpec.load(f)


def test_a_study_may_grow_but_not_change_what_it_measured(tmp_path):
    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0]})
    Study(tmp_path, spec).save()
    Study(tmp_path, StudySpec.from_dict({"methods": ["arow", "trades", "mart"], "seeds": [0, 1]}))  # grows: fine
    with pytest.raises(StudyError, match="aa_n"):
        Study(tmp_path, StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0], "aa_n": 5}))
    with pytest.raises(StudyError, match="defined differently"):
        Study(tmp_path, StudySpec.from_dict({"methods": [{"method": "mart", "label": "arow"}, "trades"]}))


def test_each_phase_resumes_from_what_the_cell_folder_holds(tmp_path):
    """The step a rerun takes after a kill in each phase: train, resume, evaluate, AutoAttack, eps curve."""
    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "aa_n": 10, "eps_curve_n": 20})
    cell = Cell(spec.variants[0], 0)
    d = tmp_path / "c"

    def steps():
        return [(w, c[2:4]) for w, c in cell_steps(spec, cell, d, ["arow"])]

    assert [w for w, _ in steps()] == ["train", "autoattack", "eps-curve"]
    d.mkdir()
    (d / "last.pt").write_bytes(b"x")  # killed during training, after an epoch
    assert steps()[0] == ("train", ["--resume", "--out"])
    (d / "final.pt").write_bytes(b"x")  # killed during the final evaluation
    assert steps()[0][0] == "eval"
    done = {"accuracy": {"clean": 0.5, "pgd20": 0.4, "cw": 0.4}, "subset": False}
    (d / "eval.json").write_text(json.dumps({**done, "guards_ran": False}))  # the study runs the guards
    assert steps()[0][0] == "eval"
    (d / "eval.json").write_text(json.dumps({**done, "guards_ran": True}))
    assert [w for w, _ in steps()] == ["autoattack", "eps-curve"]
    (d / "eval_n10.json").write_text(json.dumps({"accuracy": {"autoattack": 0.3}}))
    (d / "eps_curve.json").write_text(json.dumps({"n": 20, "points": []}))
    assert steps() == []
    # a row without AutoAttack never gets that step
    no_aa = Cell(Variant("x", "arow", aa=False), 0)
    assert "autoattack" not in [w for w, _ in cell_steps(spec, no_aa, tmp_path / "none", ["arow"])]


def test_variant_overrides_reach_the_config_and_the_loss():
    """The study's command line for an ablation row sets the hyper-parameter, and the loss uses it."""
    from arow import losses
    from arow.cli.commands import _config_from_args, build_parser

    spec = StudySpec.from_dict({"methods": ["trades", {"method": "trades", "label": "trades-ls",
                                                       "method_args": {"smoothing": 0.2}},
                                            {"method": "arow", "label": "arow-no-ls", "method_args": {"smoothing": 0.0}},
                                            {"method": "arow", "label": "arow-detach",
                                             "method_args": {"detach_weight": True}},
                                            {"method": "arow", "label": "arow-cow", "method_args": {"weight": "cow"}}],
                                "preset": "fmnist-arow", "seeds": [3]})
    cfgs = {}
    for cell in spec.cells():
        cmd = cell_steps(spec, cell, Path("/nonexistent") / cell.name, ["arow"])[0][1]
        cfgs[cell.variant.label] = _config_from_args(build_parser().parse_args(cmd[1:]))
    assert cfgs["trades"].method_args == {}  # fmnist-arow's smoothing is ARoW's, not TRADES's
    assert cfgs["trades-ls"].method_args == {"smoothing": 0.2}
    assert cfgs["arow-no-ls"].method_args == {"lam": 3.5, "smoothing": 0.0}
    assert cfgs["arow-detach"].method_args["detach_weight"] is True
    assert cfgs["arow-cow"].method_args["weight"] == "cow" and cfgs["arow-cow"].seed == 3
    z, za = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    kl = losses.kl_per_example(z, za).mean()
    assert losses.trades(z, za, y, beta=6.0, smoothing=0.2) == pytest.approx(
        float(losses.smooth_cross_entropy(z, y, 0.2) + 6.0 * kl), rel=1e-5)
    assert losses.trades(z, za, y, smoothing=0.2) != pytest.approx(float(losses.trades(z, za, y)))


# --------------------------------------------------------------------------- end to end
@needs_fmnist
def test_two_methods_two_seeds_end_to_end_then_partial_collect(tmp_path):
    out = tmp_path / "study"
    r = arow("study", "--methods", "arow,trades", "--seeds", "0,1", *TINY, "--out", str(out), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in res["cells"]] == ["done"] * 4
    for c in res["cells"]:
        assert set(c["accuracy"]) == {"clean", "fgsm", "autoattack", "val_robust", "val_clean"}
        assert c["folder"] == f"cells/{c['label']}-s{c['seed']}"  # relative: the study folder can move
        ev = json.loads((out / c["folder"] / "eval.json").read_text())
        assert ev["n"] == 10000 and not ev["subset"]  # the full test set
        aa = json.loads((out / c["folder"] / "eval_n10.json").read_text())
        assert c["accuracy"]["autoattack"] == aa["accuracy"]["autoattack"]
        assert c["accuracy"]["clean"] == ev["accuracy"]["clean"]
    arow_row = next(r for r in res["rows"] if r["label"] == "arow")
    diffs = [res["cells"][i]["accuracy"]["clean"] - res["cells"][i + 1]["accuracy"]["clean"] for i in (0, 2)]
    assert arow_row["paired"]["clean"]["mean"] == pytest.approx(sum(diffs) / 2)
    md = (out / "results.md").read_text()
    assert "Paired difference against `trades`" in md and "AutoAttack (first 10)" in md
    for png in ("tradeoff.png", "bars.png", "eps_curve.png"):
        assert (out / png).stat().st_size > 1000
    # a second run does nothing: every step's output exists
    r = arow("study", "--methods", "arow,trades", "--seeds", "0,1", *TINY, "--out", str(out), "--print-commands")
    assert r.returncode == 0 and "arow train" not in r.stdout and r.stdout.count("finished") == 4
    # --collect on a partly finished study: a cell whose evaluation is missing is left out, not guessed
    (out / "cells" / "trades-s1" / "eval.json").unlink()
    r = arow("study", "--collect", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    trades = next(r for r in res["rows"] if r["label"] == "trades")
    assert trades["metrics"]["clean"]["n"] == 1
    assert next(c for c in res["cells"] if c["label"] == "trades" and c["seed"] == 1)["status"] == "unfinished"
    assert "not finished or failed" in (out / "results.md").read_text()
    # the same runs against another baseline row, next to the study's own results
    r = arow("study", "--collect", str(out), "--baseline", "arow")
    assert r.returncode == 0, r.stderr
    vs = json.loads((out / "results_vs_arow.json").read_text())
    assert vs["baseline"] == "arow" and json.loads((out / "results.json").read_text())["baseline"] == "trades"
    assert "Paired difference against `arow`" in (out / "results_vs_arow.md").read_text()
    r = arow("study", "--collect", str(out), "--baseline", "nope")
    assert r.returncode == 2 and "not a row" in r.stderr


@needs_fmnist
def test_a_failed_cell_does_not_stop_the_others(tmp_path):
    out = tmp_path / "study"
    spec = tmp_path / "s.yaml"
    spec.write_text("methods: [trades, {method: trades, label: broken, overrides: {data_dir: /nonexistent/fm}}]\n"
                    "seeds: [0]\n")
    r = arow("study", str(spec), *TINY, "--aa-n", "0", "--eps-curve-n", "0", "--out", str(out))
    assert r.returncode == 1
    res = json.loads((out / "results.json").read_text())
    by = {c["label"]: c for c in res["cells"]}
    assert by["trades"]["status"] == "done"
    assert by["broken"]["status"] == "failed" and "/nonexistent/fm" in by["broken"]["error"]
    assert "failed (train): arow: error:" in (out / "results.md").read_text()


@needs_fmnist
def test_a_study_killed_during_training_continues(tmp_path):
    out = tmp_path / "study"
    args = ["study", "--methods", "trades", "--seeds", "0", "--baseline", "trades", *TINY,
            "--set", "limit_train=2000", "--set", "epochs=2", "--aa-n", "0", "--eps-curve-n", "0", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "arow", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    cell = out / "cells" / "trades-s0"
    deadline = time.time() + 300
    while not (cell / "last.pt").exists() and time.time() < deadline:  # wait for the first epoch's checkpoint
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "run the same command again" in err
    if (cell / "eval.json").exists():
        pytest.skip("the run finished before the kill arrived")
    r = arow(*args)
    assert r.returncode == 0, r.stderr
    log = (cell / "study.log").read_text()
    assert "train --resume" in log
    epochs = [json.loads(line)["epoch"] for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
