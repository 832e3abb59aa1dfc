"""Studies and big runs on Slurm through submitit, tested without a cluster.

submitit's own local executor runs the real job path here (pickled jobs, its controller process,
preemption signal, checkpoint and requeue); stand-ins for ``srun``, ``sbatch`` and ``sacct`` on PATH
let the Slurm executor write and "submit" its real sbatch script, whose lines are then checked.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import fmnist_available

from arow.cli.commands import _config_from_args, build_parser, main
from arow.config import resolve_config
from arow.runs.studydir import CellDir, StudyDir
from arow.study.cells import CellFailed
from arow.study.collect import collect
from arow.study.runner import run_study
from arow.study.slurm import (CellJob, Resources, SlurmError, TrainJob, make_executor, parse_sbatch_args, parse_time,
                              submit_study, submit_train)
from arow.study.spec import StudySpec
from arow.study.status import status_text, study_status

submitit = pytest.importorskip("submitit")

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
TINY = {"limit_train": 300, "val_size": 60, "epochs": 3, "attack_steps": 2, "batch_size": 60}


@pytest.fixture
def job_env(monkeypatch):
    """What submitit's local jobs inherit: this checkout, one OpenMP thread each."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """srun, sbatch (answers job 4242) and sacct (prints the file ``sacct.out`` beside it) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"srun": "exit 0",
               "sbatch": 'echo "Submitted batch job 4242"',
               "sacct": 'cat "$(dirname "$0")/sacct.out"'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "sacct.out").write_text("JobID|State|NodeList\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def tiny_spec(**more) -> StudySpec:
    d = {"methods": ["arow", "trades"], "seeds": [0, 1], "baseline": "trades", "attacks": "clean,fgsm",
         "aa_n": 0, "eps_curve_n": 0, "eval_n": 200, "guards": False, "overrides": dict(TINY)}
    return StudySpec.from_dict({**d, **more})


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _numbers(res: dict) -> dict:
    """What a study measured, without its timings and paths."""
    cells = {(c["label"], c["seed"]): (c["status"], c["accuracy"], c["per_class"]) for c in res["cells"]}
    rows = {r["label"]: ({k: v for k, v in r["metrics"].items() if k != "seconds_per_epoch"},
                         {k: v for k, v in r["paired"].items() if k != "seconds_per_epoch"}) for r in res["rows"]}
    return {"cells": cells, "rows": rows, "image_tests": res.get("image_tests")}


def _wait_for(path: Path, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {seconds}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the real submitit path, locally
@needs_fmnist
def test_a_study_through_submitit_with_a_preempted_cell_equals_the_local_pool(tmp_path, job_env):
    """2 methods x 2 seeds as submitit jobs; one cell gets the preemption signal after its first epoch,
    is requeued and continues from last.pt; the comparison equals that of the local pool, number for number."""
    spec = tiny_spec()
    lines: list[str] = []
    subs = submit_study(tmp_path / "sub", spec, time="30", gpus_per_cell=0, cluster="local", echo=lines.append)
    assert [s.name for s in subs] == ["arow-s0", "trades-s0", "arow-s1", "trades-s1"]
    assert lines[0] == f"arow-s0: job {subs[0].job_id}, log {subs[0].stdout}" and "--status" in lines[-1]
    jobs = StudyDir(tmp_path / "sub").read_jobs()
    assert {k: v["job_id"] for k, v in jobs.items()} == {s.name: s.job_id for s in subs}

    cell = tmp_path / "sub" / "cells" / "trades-s0"
    _wait_for(cell / "last.pt")  # epoch 1 of 3 is saved: the job is training epoch 2
    pid = int((cell / ".lock").read_text().split()[1])  # the job's process holds the run folder
    os.kill(pid, signal.SIGUSR2)  # what Slurm sends before it preempts a job (or at its time limit)
    results = {s.name: s.job.result() for s in subs}
    assert results["trades-s0"] == {"cell": "trades-s0", "steps": ["resume"], "requeues": 1}
    assert results["arow-s0"] == {"cell": "arow-s0", "steps": ["train"], "requeues": 0}
    log = (cell / "study.log").read_text()
    assert "requeued (1 of at most 3)" in log
    out = Path(subs[1].stdout).read_text()
    assert out.count("Starting with JobEnvironment") == 2 and "step resume of trades-s0" in out
    assert [json.loads(line)["epoch"] for line in (cell / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert [r.state for r in study_status(tmp_path / "sub")] == ["done"] * 4

    collect(tmp_path / "sub", plots=False)
    failed, _ = run_study(tmp_path / "pool", spec, jobs=2, echo=lambda s: None)
    assert failed == []
    sub = json.loads((tmp_path / "sub" / "results.json").read_text())
    pool = json.loads((tmp_path / "pool" / "results.json").read_text())
    assert [c["status"] for c in sub["cells"]] == ["done"] * 4
    assert _numbers(sub) == _numbers(pool)


def test_a_cell_that_fails_by_itself_is_not_requeued_and_status_shows_its_error(tmp_path, job_env, capsys):
    spec = StudySpec.from_dict({"methods": ["trades"], "baseline": "trades", "seeds": [0], "aa_n": 0,
                                "eps_curve_n": 0, "overrides": {"data_dir": str(tmp_path / "nonexistent"),
                                                                "limit_train": 100}})
    [sub] = submit_study(tmp_path / "s", spec, time="10", gpus_per_cell=0, cluster="local", echo=lambda s: None)
    error = sub.job.exception()
    assert error is not None and "trades-s0: train failed:" in str(error) and "nonexistent" in str(error)
    out = Path(sub.stdout).read_text() + Path(sub.stderr).read_text()
    assert out.count("Starting with JobEnvironment") == 1 and "Requeued" not in out  # ran once
    failure = CellDir(tmp_path / "s" / "cells" / "trades-s0").read_failure()
    assert failure["step"] == "train" and failure["exit_status"] == 2
    [row] = study_status(tmp_path / "s")
    assert row.state == "failed" and row.job == sub.job_id and "nonexistent" in row.detail
    assert main(["study", "--status", str(tmp_path / "s")]) == 0
    table = capsys.readouterr().out
    assert "trades-s0" in table and "failed" in table and f"train: {failure['error']}" in table
    assert table.strip().endswith("1 cells: 1 failed")


def test_requeues_are_bounded(tmp_path):
    cell = tmp_path / "cells" / "arow-s0" / "cell.json"
    again = CellJob(str(cell), max_requeues=2, requeues=1).checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, CellJob) and again.function.requeues == 2
    assert "requeued (2 of at most 2)" in (cell.parent / "study.log").read_text()
    with pytest.raises(CellFailed, match="after 2 requeue"):  # raised into the cell, which records it
        again.function.checkpoint()
    run = TrainJob({"out": str(tmp_path / "run")}, max_requeues=0)
    with pytest.raises(RuntimeError, match="--resume --out"):
        run.checkpoint()
    ex = make_executor(tmp_path / "slurm", Resources(10, max_requeues=2), name="x", cluster="local")
    assert ex._executor.max_num_timeout == 2  # submitit's own bound on time-limit requeues


# --------------------------------------------------------------------------- the Slurm executor's script
def test_the_sbatch_script_and_the_status_of_a_submitted_study(tmp_path, fake_slurm, capsys):
    out = tmp_path / "study"
    argv = ["study", "--methods", "arow,trades", "--seeds", "0,1", "--out", str(out), "--launcher", "slurm",
            "--partition", "gpu", "--account", "proj7", "--time", "3:30:00", "--gpus-per-cell", "1",
            "--cpus-per-cell", "8", "--mem", "32G", "--constraint", "a100|h100", "--array-parallelism", "2",
            "--sbatch-arg", "qos=high", "--sbatch-arg", "mail-type=END,FAIL", "--max-requeues", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:4] == [f"{c}: job 4242_{i}, log {out / 'slurm' / f'4242_{i}_0_log.out'}"
                           for i, c in enumerate(["arow-s0", "trades-s0", "arow-s1", "trades-s1"])]
    script = (out / "slurm" / "4242_submission.sh").read_text()
    for line in ["#SBATCH --partition=gpu", "#SBATCH --account=proj7", "#SBATCH --time=210",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G",
                 "#SBATCH --constraint='a100|h100'", "#SBATCH --array=0-3%2", "#SBATCH --qos=high",
                 "#SBATCH --mail-type=END,FAIL", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --signal=USR2@90", f"#SBATCH --output={out / 'slurm' / '%A_%a_0_log.out'}"]:
        assert line in script.splitlines(), (line, script)
    assert "-m submitit.core._submit" in script
    jobs = json.loads((out / "jobs.json").read_text())
    assert jobs["trades-s1"]["job_id"] == "4242_3" and jobs["trades-s1"]["cluster"] == "slurm"
    pickled = submitit.helpers.DelayedSubmission.load(out / "slurm" / "4242_1_submitted.pkl")  # our own file
    assert isinstance(pickled.function, CellJob) and pickled.function.max_requeues == 5
    assert pickled.function.cell == str((out / "cells" / "trades-s0" / "cell.json").resolve())

    (fake_slurm / "sacct.out").write_text("JobID|State|NodeList\n4242_0|RUNNING|n1\n4242_[1-2]|PENDING|None\n"
                                          "4242_3|TIMEOUT|n2\n")
    assert main(["study", "--status", str(out)]) == 0
    table = capsys.readouterr().out
    states = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:5]}
    assert states == {"arow-s0": "running", "trades-s0": "queued", "arow-s1": "queued", "trades-s1": "failed"}
    assert "its job ended (TIMEOUT)" in table and table.strip().endswith("1 running, 2 queued, 1 failed")
    # submitted again: the queued and running cells are left alone, the timed-out one goes again
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "arow-s0: its job 4242_0 is running; not submitted again" in printed
    assert "trades-s1: job 4242, log" in printed and json.loads((out / "jobs.json").read_text())["trades-s1"][
        "job_id"] == "4242"


def test_bad_launcher_settings_stop_with_one_line(tmp_path, fake_slurm, capsys):
    base = ["study", "--methods", "arow", "--baseline", "arow", "--seeds", "0", "--out", str(tmp_path / "s"),
            "--launcher", "slurm"]
    for more, needle in [([], "needs --time"), (["--time", "1:75:00"], "H:MM:SS"),
                         (["--time", "10", "--sbatch-arg", "=x"], "KEY=VALUE"),
                         (["--time", "10", "--mem", "lots"], "32G"),
                         (["--time", "10", "--gpus-per-cell", "-1"], "--gpus-per-cell must be"),
                         (["--time", "10", "--prepare"], "one or the other")]:
        assert main(base + more) == 2, more
        assert needle in one_line_error(capsys), more
    assert not (tmp_path / "s").exists()
    assert parse_time("90") == 90 and parse_time("0:00:01") == 1 and parse_time("2-0:00:00") == 2880
    assert parse_sbatch_args(["--qos=high", "exclusive"]) == {"qos": "high", "exclusive": True}
    with pytest.raises(SlurmError):
        parse_time("0")


def test_without_submitit_the_launcher_stops_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now fails as if not installed
    line = "arow: error: --launcher slurm needs submitit: pip install -e '.[slurm]'"
    assert main(["study", "--methods", "arow", "--baseline", "arow", "--seeds", "0", "--out", str(tmp_path / "s"),
                 "--launcher", "slurm", "--time", "10"]) == 2
    assert one_line_error(capsys) == line
    assert not (tmp_path / "s").exists()
    assert main(["train", "--out", str(tmp_path / "r"), "--launcher", "slurm", "--time", "10"]) == 2
    assert one_line_error(capsys) == line
    # --status needs no submitit: the folders alone tell
    StudyDir(tmp_path / "t").path.mkdir()
    StudyDir(tmp_path / "t").write_spec(StudySpec.from_dict({"methods": ["arow"], "baseline": "arow"}).to_dict())
    assert [r.state for r in study_status(tmp_path / "t")] == ["not started"] * 3
    assert "3 cells: 3 not started" in status_text(study_status(tmp_path / "t"))


# --------------------------------------------------------------------------- one run on several nodes
def test_train_on_two_nodes_of_eight_gpus(tmp_path, fake_slurm, capsys, monkeypatch):
    flags = ["--preset", "cifar10-wrn34-10", "--out", str(tmp_path / "run"), "--batch-size", "256"]
    assert main(["train", *flags, "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition",
                 "gpu", "--time", "12:00:00", "--cpus-per-task", "12", "--sbatch-arg", "exclusive"]) == 0
    assert capsys.readouterr().out.startswith(f"submitted {tmp_path / 'run'} as job 4242; its log: ")
    folder = tmp_path / "run" / "slurm"
    script = (folder / "4242_submission.sh").read_text().splitlines()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=720", "#SBATCH --cpus-per-task=12",
                 "#SBATCH --exclusive", "#SBATCH --signal=USR2@90"]:
        assert line in script, line
    job = submitit.helpers.DelayedSubmission.load(folder / "4242_submitted.pkl").function
    assert isinstance(job, TrainJob) and job.resume is False
    assert job.config == _config_from_args(build_parser().parse_args(["train", *flags])).to_dict()
    assert job.config["model"] == "wrn-34-10" and job.config["batch_size"] == 256
    assert main(["train", *flags[:-2], "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "3",
                 "--time", "60"]) == 2
    assert "divisible by the 6 training processes" in one_line_error(capsys)

    # in the job: task 9 of 16 (node 1, GPU 1) gets torchrun's variables from Slurm's, then trains
    seen = {}

    def fake_train(cfg, **kw):
        seen.update({k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                    "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")})
        seen["cfg"] = cfg.to_dict()
        return type("Report", (), {"evaluation": None, "is_main": False, "seconds": 1.0})()

    slurm_env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
                 "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
                 "SLURM_JOB_NODELIST": "gpu-a[07-08]", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    for k, v in slurm_env.items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # so that what the job exports is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setattr("arow.study.slurm.train_and_evaluate", fake_train)
    result = job()
    assert {k: seen[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")} == \
        {"MASTER_ADDR": "gpu-a07", "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    assert seen["MASTER_PORT"].isdigit() and seen["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert seen["cfg"] == job.config and result["rank"] == 9 and result["world_size"] == 16


@needs_fmnist
def test_a_ddp_run_through_submitit_trains_as_two_processes(tmp_path, job_env):
    """The same job on submitit's local executor with two tasks: a real 2-process gloo run."""
    cfg = resolve_config({"dataset": "fashion-mnist", "limit_train": 200, "val_size": 40, "epochs": 1,
                          "attack_steps": 1, "batch_size": 40, "eval_attacks": "clean,fgsm", "eval_n": 100,
                          "guards": False, "device": "cpu", "out": str(tmp_path / "run")})
    s = submit_train(cfg, nodes=1, gpus_per_node=2, time="10", cluster="local")
    ranks = s.job.results()
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["accuracy"] == ranks[1]["accuracy"] and set(ranks[0]["accuracy"]) >= {"clean", "fgsm"}
    assert json.loads((tmp_path / "run" / "eval_n100.json").read_text())["n"] == 100
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    logs = [Path(s.stdout.replace("_0_log", f"_{t}_log")).read_text() for t in (0, 1)]
    assert "fgsm" in logs[0] and "epoch 1 |" in logs[0] and "epoch 1 |" not in logs[1]  # rank 0 narrates
