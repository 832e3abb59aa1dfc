"""`arow study`: each cell an ordinary run from a resolved config, inputs checked up front, the study
folder locked, cells bound to the study's process, resumable, compared with paired statistics."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fmnist_available

from arow import losses
from arow.cli.commands import _config_from_args, build_parser, main
from arow.runs.studydir import CellDir, StudyDir
from arow.study.cells import Evaluation, pending_steps, resolve_cells, run_cell
from arow.study.runner import Study, prepare_study, study_commands
from arow.study.spec import StudyError, StudySpec, Variant

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
# a few hundred images, one epoch, cheap attacks on the full test set, tiny AutoAttack and eps curve
TINY = ["--set", "limit_train=400", "--set", "epochs=1", "--set", "val_size=100", "--set", "attack_steps=2",
        "--set", "batch_size=100", "--attacks", "clean,fgsm", "--aa-n", "10", "--eps-curve-n", "20", "--no-guards"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")


def arow(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "arow", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("arow: error: "), err
    return err


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
                        ({"methods": ["arow"], "baseline": "arow", "eval_n": 100, "aa_n": 100}, "eval_n100.json"),
                        ({"methods": ["arow"], "baseline": "arow", "seedz": [1]}, "unknown study key")]:
        with pytest.raises(StudyError, match=needle):
            StudySpec.from_dict(bad)
    f = tmp_path / "s.yaml"
    f.write_text("methods: [arow]\nmethods: [trades]\n")
    with pytest.raises(ValueError, match="duplicate"):
        StudySpec.load(f)


def test_the_frontier_study_keeps_its_cells_and_plan():
    """studies/fmnist-frontier.yaml (per-row seeds and an analysis plan) parses, resolves every cell, and
    keeps the cell names and order it was run with."""
    spec = StudySpec.load(ROOT / "studies" / "fmnist-frontier.yaml")
    main3, frontier = ["arow", "trades", "trades-b3.5"], ["trades-b2", "trades-b9", "arow-lam2", "arow-lam5"]
    expected = [f"{lab}-s{s}" for s in range(8) for lab in (main3 + frontier if s < 3 else main3)]
    assert [c.name for c in spec.cells()] == expected
    assert spec.plan["comparisons"] == ["arow", "trades-b3.5"] and spec.plan["equivalence_margin"] == 0.5
    plans = resolve_cells(spec)
    assert [p.name for p in plans] == expected
    by = {p.name: p for p in plans}
    assert by["trades-b3.5-s5"].config["method_args"] == {"beta": 3.5}
    assert by["arow-lam2-s1"].config["method_args"]["lam"] == 2.0 and by["arow-lam2-s1"].seed == 1
    assert by["trades-s0"].config["method_args"] == {}  # fmnist-arow's smoothing is ARoW's, not TRADES's


def test_each_cell_resolves_to_what_arow_train_resolves():
    """The study resolves a cell once, through `arow train`'s resolver: the same config as the command
    line with the row's flags, and the loss uses the row's hyper-parameter."""
    spec = StudySpec.from_dict({"methods": ["trades", {"method": "trades", "label": "trades-ls",
                                                       "method_args": {"smoothing": 0.2}},
                                            {"method": "arow", "label": "arow-no-ls", "method_args": {"smoothing": 0.0}},
                                            {"method": "arow", "label": "arow-detach",
                                             "method_args": {"detach_weight": True}},
                                            {"method": "arow", "label": "arow-cow", "method_args": {"weight": "cow"},
                                             "overrides": {"epochs": 3}}],
                                "preset": "fmnist-arow", "seeds": [3], "attacks": "clean,pgd20"})
    cfgs = {p.label: p.train_config("OUT") for p in resolve_cells(spec)}
    assert cfgs["trades"].method_args == {}
    assert cfgs["trades-ls"].method_args == {"smoothing": 0.2}
    assert cfgs["arow-no-ls"].method_args == {"lam": 2.5, "smoothing": 0.0}  # Fashion-MNIST's lambda, written out
    assert cfgs["arow-detach"].method_args["detach_weight"] is True
    assert cfgs["arow-cow"].method_args["weight"] == "cow" and cfgs["arow-cow"].seed == 3
    argv = ["train", "--preset", "fmnist-arow", "--method", "arow", "--weight", "cow", "--epochs", "3", "--seed", "3",
            "--eval-attacks", "clean,pgd20", "--out", "OUT"]
    assert cfgs["arow-cow"].to_dict() == _config_from_args(build_parser().parse_args(argv)).to_dict()
    z, za = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.randint(0, 10, (6,))
    kl = losses.kl_per_example(z, za).mean()
    assert losses.trades(z, za, y, beta=6.0, smoothing=0.2) == pytest.approx(
        float(losses.smooth_cross_entropy(z, y, 0.2) + 6.0 * kl), rel=1e-5)
    assert losses.trades(z, za, y, smoothing=0.2) != pytest.approx(float(losses.trades(z, za, y)))


BAD_STUDIES = [
    ("overrides: {lr: .nan}", "overrides.lr must be a finite number, got nan"),
    ("overrides: {lr: 1.0e+300}", "--lr must be in"),
    ("overrides: {lr: 1e300}", "expected float"),  # YAML reads 1e300 (no dot) as a string
    ("methods: [arow, {method: trades, method_args: {beta: .nan}}]", "trades: method_args.beta must be a finite"),
    ("methods: [arow, {method: trades, method_args: {beta: .inf}}]", "method_args.beta must be a finite number"),
    ("methods: [{method: arow, method_args: {lam: abc}}, trades]", "--lam must be a number"),
    ("methods: [{method: arow, method_args: {lam: -1.0}}, trades]", "--lam must be >= 0"),
    ("aa_n: .nan", "aa_n must be an integer"),
    ("aa_n: 1.5", "aa_n must be an integer"),
    ("aa_n: abc", "aa_n must be an integer"),
    ("eps_curve_n: .inf", "eps_curve_n must be an integer"),
    ("eval_n: 0", "eval_n must be an integer >= 1"),
    ("seeds: [0.7, 1.9]", "seeds must be integers"),
    ("seeds: [0, true]", "seeds must be integers"),
    ("guards: 'off'", "guards must be true or false"),
    ("attacks: 5", "attacks must be attack names"),
    ("attacks: clean,pgdx", "unknown attack"),
    ("methods: [{method: arow, label: ../escape}, trades]", "row label"),
    ("methods: [{method: arow, label: a/b}, trades]", "row label"),
    ("methods: [{method: arow, label: ..}, trades]", "row label"),
    ("methods: [{method: arow, aa: 'no'}, trades]", "aa must be true or false"),
    ("plan: {primary_metrics: [clean], baseline: trades, comparisons: [arow], correction: holm, alpha: .nan}",
     "plan.alpha must be a finite number"),
]


@pytest.mark.parametrize("text,needle", BAD_STUDIES)
def test_a_bad_study_is_refused_with_one_line_before_anything_is_written(tmp_path, capsys, text, needle):
    f = tmp_path / "s.yaml"
    base = {"methods": "[arow, trades]", "seeds": "[0]"}
    base.pop(text.partition(":")[0], None)  # the case's own key replaces the base's
    f.write_text("".join(f"{k}: {v}\n" for k, v in base.items()) + text + "\n")
    out = tmp_path / "study"
    for extra in ([], ["--print-commands"], ["--prepare"]):
        assert main(["study", str(f), "--out", str(out), *extra]) == 2
        assert needle in one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("sets,needle", [(["lr=.nan"], "overrides.lr must be a finite number"),
                                         (["lr=.inf"], "overrides.lr must be a finite number"),
                                         (["lr=1.0e+300"], "--lr must be in"),
                                         (["lr=0"], "--lr must be in"),
                                         (["beta=1"], "unknown config key"),
                                         (["eval_n=1.5"], "eval_n must be an integer"),
                                         (["eval_n=abc"], "eval_n must be an integer"),
                                         (["seed=3"], "set by the study"),
                                         (["lr"], "KEY=VALUE")])
def test_a_bad_set_is_refused_with_one_line(tmp_path, capsys, sets, needle):
    out = tmp_path / "study"
    argv = ["study", "--methods", "arow,trades", "--seeds", "0", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    assert needle in one_line_error(capsys)
    assert not out.exists()


def test_print_commands_writes_nothing_and_prepare_writes_the_cells(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "--methods", "arow,trades", "--seeds", "0,1", "--set", "epochs=2", "--out", str(out)]
    assert main([*argv, "--aa-n", "50", "--print-commands"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # no side effect: a different study may still use the folder
    assert [ln for ln in text.splitlines() if ln.startswith("# ") and ": " in ln and "-s" in ln] == [
        "# arow-s0: train, autoattack, eps-curve", "# trades-s0: train, autoattack, eps-curve",
        "# arow-s1: train, autoattack, eps-curve", "# trades-s1: train, autoattack, eps-curve"]
    assert text.count("-m arow.study.cell ") == 4
    assert main([*argv, "--aa-n", "0", "--prepare"]) == 0  # another aa_n than printed: not refused
    text = capsys.readouterr().out
    assert json.loads((out / "study.json").read_text())["aa_n"] == 0
    for name in ("arow-s0", "trades-s0", "arow-s1", "trades-s1"):
        cell = json.loads((out / "cells" / name / "cell.json").read_text())
        assert cell["name"] == name and cell["config"]["epochs"] == 2 and cell["autoattack_n"] == 0
        assert "out" not in cell["config"]  # the cell's folder is where it runs: the study folder can move
        assert f"{out / 'cells' / name / 'cell.json'}" in text
    assert main([*argv, "--aa-n", "50", "--prepare"]) == 2  # now the folder holds a study with aa_n 0
    assert "aa_n=0" in one_line_error(capsys)


def test_a_study_may_grow_but_not_change_what_it_measured(tmp_path):
    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0]})
    prepare_study(tmp_path, spec)
    grown = StudySpec.from_dict({"methods": ["arow", "trades", "mart"], "seeds": [0, 1]})
    prepare_study(tmp_path, grown)  # grows: fine
    assert (tmp_path / "cells" / "mart-s1" / "cell.json").is_file()
    for changed, needle in [({"aa_n": 5}, "aa_n"), ({"eval_n": 500}, "eval_n"), ({"guards": False}, "guards"),
                            ({"methods": [{"method": "mart", "label": "arow"}, "trades"]}, "defined differently"),
                            ({"baseline": "arow", "plan": {"primary_metrics": ["clean"], "baseline": "arow",
                                                           "comparisons": ["trades"], "correction": "holm",
                                                           "alpha": 0.05}}, "plan")]:
        with pytest.raises(StudyError, match=needle):
            Study(tmp_path, StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0], **changed}))
    cell = CellDir(tmp_path / "cells" / "arow-s0")
    data = json.loads(cell.file("cell.json").read_text())
    data["config"]["lr"] = 0.05  # as if the preset had changed since the cell was prepared
    cell.file("cell.json").write_text(json.dumps(data))
    with pytest.raises(StudyError, match="lr differ"):
        prepare_study(tmp_path, spec)


def test_a_second_study_on_the_same_folder_refuses_with_one_line(tmp_path, capsys):
    out = tmp_path / "study"
    holder = StudyDir(out)
    holder.lock()  # as a running `arow study` holds it
    try:
        assert main(["study", "--methods", "arow,trades", "--seeds", "0", "--out", str(out)]) == 2
        assert "is in use by pid" in one_line_error(capsys)
        assert not (out / "study.json").exists()
    finally:
        holder.unlock()


def _fake_run(d: Path, **files) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"method": "arow", "seed": 0}))
    for name, content in files.items():
        (d / name.replace("__", ".")).write_text(content if isinstance(content, str) else json.dumps(content))


def test_each_phase_resumes_from_what_the_cell_folder_holds(tmp_path):
    """The step a rerun takes after a kill in each phase: train, resume, evaluate, AutoAttack, eps curve."""
    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "aa_n": 10, "eps_curve_n": 20})
    plan = resolve_cells(spec)[0]
    d = tmp_path / "c"
    run = CellDir(d)

    def steps():
        return pending_steps(plan, run)

    assert steps() == ["train", "autoattack", "eps-curve"]
    _fake_run(d)
    (d / "last.pt").write_bytes(b"x")  # killed during training, after an epoch
    assert steps()[0] == "resume"
    (d / "final.pt").write_bytes(b"x")  # killed during the final evaluation
    assert steps()[0] == "eval"
    done = {"accuracy": {"clean": 0.5, "pgd20": 0.4, "cw": 0.4}, "subset": False, "n": 10000, "test_set_size": 10000}
    (d / "eval.json").write_text(json.dumps({**done, "guards_ran": False}))  # the study runs the guards
    assert steps()[0] == "eval"
    (d / "eval.json").write_text(json.dumps({**done, "guards_ran": True}))
    assert steps() == ["autoattack", "eps-curve"]
    (d / "eval_n10.json").write_text(json.dumps({"accuracy": {"clean": 0.5, "autoattack": 0.3}, "n": 10,
                                                  "test_set_size": 10000, "subset": True}))
    (d / "eps_curve.json").write_text(json.dumps({"n": 20, "points": []}))
    assert steps() == []
    (d / "eval.json").write_text("{not json")  # a damaged file is an error, never a silently missing number
    with pytest.raises(ValueError, match="eval.json"):
        steps()
    # a row without AutoAttack never gets that step; an exploratory study's evaluation is eval_n<N>.json
    assert Evaluation.of(spec, Variant("x", "arow", aa=False)).autoattack_n == 0
    sub = resolve_cells(StudySpec.from_dict({"methods": ["arow", "trades"], "aa_n": 0, "eps_curve_n": 0,
                                             "eval_n": 500}))[0]
    assert sub.config["eval_n"] == 500
    d2 = tmp_path / "sub"
    _fake_run(d2, final__pt="x", eval_n500__json={**done, "guards_ran": True, "n": 500, "subset": True})
    assert pending_steps(sub, CellDir(d2)) == []
    (d2 / "eval_n500.json").unlink()
    (d2 / "eval.json").write_text(json.dumps({**done, "guards_ran": True}))  # a full-set number is not the study's
    assert pending_steps(sub, CellDir(d2)) == ["eval"]


def test_a_cell_records_its_failure_in_its_folder(tmp_path):
    """A failing step writes study_failed.json (the runner reads that, never the cell's stderr)."""
    spec = StudySpec.from_dict({"methods": ["trades"], "baseline": "trades", "seeds": [0], "aa_n": 0,
                                "eps_curve_n": 0, "overrides": {"data_dir": str(tmp_path / "nonexistent"),
                                                                "limit_train": 100}})
    prepare_study(tmp_path / "s", spec)
    cell = tmp_path / "s" / "cells" / "trades-s0"
    r = subprocess.run([sys.executable, "-m", "arow.study.cell", str(cell / "cell.json")], capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    failure = json.loads((cell / "study_failed.json").read_text())
    assert failure["step"] == "train" and failure["exit_status"] == 2 and "nonexistent" in failure["error"]
    assert "Traceback" not in r.stdout + r.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="does not exist: prepare the study first"):
        run_cell(tmp_path / "empty")


def test_a_cell_dies_with_the_process_it_is_bound_to(tmp_path):
    """bind_to_parent: the kernel ends the cell when its study dies, even by SIGKILL."""
    child = ("import sys, time; from arow.study.cell import bind_to_parent; bind_to_parent(int(sys.argv[1])); "
             "print('bound', flush=True); time.sleep(120)")
    parent = ("import os, subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())], stdout=subprocess.PIPE, "
              "text=True); print(p.pid, flush=True); p.stdout.readline(); print('ready', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=ENV)
    child_pid = int(p.stdout.readline())
    assert p.stdout.readline().strip() == "ready"
    assert _alive(child_pid)
    p.kill()
    p.wait()
    assert _gone_within(child_pid, 20), "the cell outlived the study it was bound to"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status waits to be read


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


# --------------------------------------------------------------------------- end to end
@needs_fmnist
def test_two_methods_two_seeds_end_to_end_then_partial_collect(tmp_path):
    out = tmp_path / "study"
    r = arow("study", "--methods", "arow,trades", "--seeds", "0,1", *TINY, "--out", str(out), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert "[arow-s0] epoch 1 |" in r.stdout and "[trades-s1] step train done" in r.stdout  # streamed
    assert "[trades-s1] clean " in r.stdout and "[trades-s1] fgsm:" not in r.stdout  # each number once
    res = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in res["cells"]] == ["done"] * 4 and res["exploratory"] is False
    for c in res["cells"]:
        assert set(c["accuracy"]) == {"clean", "fgsm", "autoattack", "val_robust", "val_clean"}
        assert c["folder"] == f"cells/{c['label']}-s{c['seed']}"  # relative: the study folder can move
        ev = json.loads((out / c["folder"] / "eval.json").read_text())
        assert ev["n"] == 10000 and not ev["subset"]  # the full test set
        aa = json.loads((out / c["folder"] / "eval_n10.json").read_text())
        assert c["accuracy"]["autoattack"] == aa["accuracy"]["autoattack"]
        assert c["accuracy"]["clean"] == ev["accuracy"]["clean"]
        assert json.loads((out / c["folder"] / "config.json").read_text())["seed"] == c["seed"]
    arow_row = next(r for r in res["rows"] if r["label"] == "arow")
    diffs = [res["cells"][i]["accuracy"]["clean"] - res["cells"][i + 1]["accuracy"]["clean"] for i in (0, 2)]
    assert arow_row["paired"]["clean"]["mean"] == pytest.approx(sum(diffs) / 2)
    md = (out / "results.md").read_text()
    assert "paired by seed" in md and "AutoAttack (first 10)" in md and "EXPLORATORY" not in md
    for png in ("tradeoff.png", "bars.png", "eps_curve.png"):
        assert (out / png).stat().st_size > 1000
    # a second run does nothing: every step's output exists
    r = arow("study", "--methods", "arow,trades", "--seeds", "0,1", *TINY, "--out", str(out), "--print-commands")
    assert r.returncode == 0 and "arow.study.cell" not in r.stdout and r.stdout.count(": finished") == 4
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
    assert "Against `arow`" in (out / "results_vs_arow.md").read_text()
    r = arow("study", "--collect", str(out), "--baseline", "nope")
    assert r.returncode == 2 and "not a row" in r.stderr


@needs_fmnist
def test_a_subset_smoke_study_is_marked_and_never_mixed_with_full_test_set_cells(tmp_path):
    out = tmp_path / "smoke"
    args = ["study", "--methods", "trades", "--seeds", "0", "--baseline", "trades", *TINY, "--aa-n", "0",
            "--eps-curve-n", "0", "--out", str(out)]
    r = arow(*args, "--set", "eval_n=200")
    assert r.returncode == 0, r.stderr
    cell = out / "cells" / "trades-s0"
    ev = json.loads((cell / "eval_n200.json").read_text())
    assert ev["n"] == 200 and ev["subset"] is True and not (cell / "eval.json").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["exploratory"] is True and res["eval_n"] == 200 and res["cells"][0]["n"] == 200
    assert res["cells"][0]["status"] == "done" and res["cells"][0]["accuracy"]["clean"] == ev["accuracy"]["clean"]
    md = (out / "results.md").read_text()
    assert md.startswith("# EXPLORATORY study results: a test SUBSET of 200 images")
    assert "first 200 test images, SUBSET" in md and "separated after correction" not in md.split("## Against")[1]
    assert not list(out.glob("*.png"))  # figures whose axes say "full test set" would mislabel a subset
    r = arow(*args)  # the full test set in the same folder: refused, never mixed
    assert r.returncode == 2 and "eval_n=200" in r.stderr and len(r.stderr.strip().splitlines()) == 1


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
    assert by["broken"]["failed_step"] == "train"
    assert "failed (train): " in (out / "results.md").read_text()
    assert "1 run(s) failed: broken-s0" in r.stderr


def _study_process(out: Path, epochs: int) -> subprocess.Popen:
    args = ["study", "--methods", "trades", "--seeds", "0", "--baseline", "trades", *TINY,
            "--set", "limit_train=2000", "--set", f"epochs={epochs}", "--aa-n", "0", "--eps-curve-n", "0",
            "--out", str(out)]
    return subprocess.Popen([sys.executable, "-m", "arow", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def _wait_for(path: Path, text: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {path} within {seconds}s")


@needs_fmnist
def test_a_study_killed_during_training_continues(tmp_path):
    out = tmp_path / "study"
    p = _study_process(out, epochs=2)
    cell = out / "cells" / "trades-s0"
    deadline = time.time() + 300
    while not (cell / "last.pt").exists() and time.time() < deadline:  # wait for the first epoch's checkpoint
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "run the same command again" in err
    if (cell / "eval.json").exists():
        pytest.skip("the run finished before the kill arrived")
    assert not (cell / "study_failed.json").exists()  # interrupted, not failed
    p = _study_process(out, epochs=2)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "step resume of trades-s0 ..." in (cell / "study.log").read_text()
    epochs = [json.loads(line)["epoch"] for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


@needs_fmnist
def test_a_killed_study_leaves_no_cell_running(tmp_path):
    """SIGKILL gives the study no chance to stop its cells: the kernel does (the cell is bound to it). The
    cell's output reaches study.log while it runs (streamed, not held until the step ends)."""
    out = tmp_path / "study"
    p = _study_process(out, epochs=50)
    cell = out / "cells" / "trades-s0"
    _wait_for(cell / "study.log", "epoch 1 |")  # streamed while the cell trains on (50 epochs)
    holder = (cell / ".lock").read_text().split()
    assert holder[0] == "pid"
    pid = int(holder[1])
    assert _alive(pid) and pid != p.pid
    p.kill()
    p.communicate(timeout=60)
    assert _gone_within(pid, 60), "the cell trained on after its study was killed"
    assert not (cell / "final.pt").exists()


def test_set_keeps_words_that_yaml_would_read_as_booleans():
    """``--set amp=off``: the config's amp is a word ("off"), not YAML 1.1's boolean; a bool field
    still reads yes/no as booleans."""
    spec = StudySpec.resolve(None, {"methods": "arow,trades"}, ["amp=off", "ema=no"])
    assert spec.overrides == {"amp": "off", "ema": False}


def test_allow_guard_failures_reaches_every_cell_and_is_checked():
    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0], "allow_guard_failures": True})
    assert all(p.config["allow_guard_failures"] is True for p in resolve_cells(spec))
    default = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0]})
    assert not any(p.config["allow_guard_failures"] for p in resolve_cells(default))
    with pytest.raises(StudyError, match="allow_guard_failures must be true or false"):
        StudySpec.from_dict({"methods": ["arow", "trades"], "allow_guard_failures": "yes please"})
