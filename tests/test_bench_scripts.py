"""The timing record of run_autoattack (attacked_by, seconds_by) and the benchmark scripts' helpers.

Tiny models and NON-STANDARD budgets only (a few iterations/queries): these check bookkeeping,
not robustness.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from arow.attacks.autoattack import STANDARD_ATTACKS, AutoAttackSettings, run_autoattack
from arow.runs.checkpoint import atomic_save

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
FAST = AutoAttackSettings(n_iter=2, square_queries=5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench_autoattack():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_autoattack

        yield bench_autoattack
    finally:
        sys.path.remove(str(BENCH))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def data(model: nn.Module, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 10  # three misclassified: never attacked
    return x, y


def check_record(info: dict, n_correct: int, attacks=STANDARD_ATTACKS) -> None:
    assert list(info["attacked_by"]) == list(info["seconds_by"]) == list(info["broken_by"]) == list(attacks)
    still = n_correct
    for sub in attacks:  # each sub-attack runs on exactly what the ones before it left robust
        assert info["attacked_by"][sub] == still
        assert 0 <= info["broken_by"][sub] <= still
        assert info["seconds_by"][sub] >= 0.0
        still -= info["broken_by"][sub]
    counts = [info["attacked_by"][s] for s in attacks]
    assert counts == sorted(counts, reverse=True)


def test_run_autoattack_records_attacked_and_seconds():
    model = tiny()
    x, y = data(model)
    x_adv, info = run_autoattack(model, x, y, 0.3, settings=FAST, timing=True)
    check_record(info, n_correct=len(x) - 3)
    assert sum(info["broken_by"].values()) > 0  # eps 0.3 on a linear-ish model: something breaks
    with torch.no_grad():  # the verdicts agree with the record
        robust = int((model(x_adv).argmax(1) == y).sum())
    assert robust == len(x) - 3 - sum(info["broken_by"].values())


def test_resumed_run_reports_the_saved_record_and_reads_old_state_files(tmp_path):
    model = tiny()
    x, y = data(model)
    path = tmp_path / "aa.pt"
    x1, info1 = run_autoattack(model, x, y, 0.3, settings=FAST, state_path=path, timing=True)
    x2, info2 = run_autoattack(model, x, y, 0.3, settings=FAST, state_path=path, timing=True)  # all skipped
    assert torch.equal(x1, x2)
    assert info2["broken_by"] == info1["broken_by"] and info2["attacked_by"] == info1["attacked_by"]
    assert info2["seconds_by"] == pytest.approx(info1["seconds_by"])
    # a state file from before the timing record (no "attacked"/"seconds"): still resumes
    state = torch.load(path, weights_only=True)
    del state["attacked"], state["seconds"]
    atomic_save(state, path)
    x3, info3 = run_autoattack(model, x, y, 0.3, settings=FAST, state_path=path, timing=True)
    assert torch.equal(x1, x3) and info3["broken_by"] == info1["broken_by"]
    assert info3["attacked_by"] == {} and info3["seconds_by"] == {}


def test_timing_does_not_change_the_attack():
    model = tiny()
    x, y = data(model)
    a, ia = run_autoattack(model, x, y, 0.3, settings=FAST)
    b, ib = run_autoattack(model, x, y, 0.3, settings=FAST, timing=True)
    assert "seconds_by" not in ia and set(ib) - set(ia) == {"seconds_by"}  # without timing: deterministic
    assert torch.equal(a, b) and ia == {k: v for k, v in ib.items() if k != "seconds_by"}


def test_breakdown_table_and_cost_model(bench_autoattack):
    model = tiny()
    x, y = data(model)
    rows, info, record = bench_autoattack.breakdown(model, x, y, 0.3, FAST)
    check_record(info, n_correct=len(x) - 3)
    cost = bench_autoattack.cost_model(record)  # from the settings: 2 iterations, 9 targets, 5 queries
    assert cost == {"apgd-ce": {"fb": 2, "f": 0}, "apgd-t": {"fb": 18, "f": 0},
                    "fab-t": {"fb": 18, "f": 18}, "square": {"fb": 0, "f": 5}}
    assert [r[0] for r in rows] == ["APGD-CE", "APGD-T", "FAB-T", "Square"]
    assert [int(r[1]) for r in rows] == [info["attacked_by"][s] for s in STANDARD_ATTACKS]
    assert rows[2][5] == "18 F+B + 18 F" and rows[2][6] == "54"
    table = bench_autoattack.markdown(rows, bench_autoattack.BREAKDOWN_HEADER)
    assert table.count("\n") == 5 and table.startswith("| sub-attack")


# --------------------------------------------------------------------------- bench_eval, profile_epoch
needs_fmnist = pytest.mark.skipif(not (Path("/usr/share/datasets/fashion-mnist") / "train-labels-idx1-ubyte.gz")
                                  .is_file(), reason="Fashion-MNIST not installed")


def test_bench_eval_settings_and_verdict_comparison(bench_autoattack):
    import bench_eval

    rows = bench_eval.settings_for([50, 100], [1, 2], [100])
    assert [(s.threads, s.batch, s.channels_last) for s in rows] == [
        (1, 50, False), (1, 100, False), (2, 50, False), (2, 100, False), (1, 100, True), (2, 100, True)]
    a, b = rows[0], rows[1]
    a.correct = {"clean": torch.tensor([True, True, False]), "pgd20": torch.tensor([True, False, False])}
    b.correct = {"clean": a.correct["clean"].clone(), "pgd20": torch.tensor([False, False, False])}
    assert bench_eval.compare(a, a) == "yes"
    assert bench_eval.compare(b, a) == "NO (pgd20 1)"


@needs_fmnist
def test_bench_eval_runs(bench_autoattack, capsys):
    import bench_eval

    assert bench_eval.main(["--n", "20", "--batch-sizes", "10,20", "--threads", "1", "--repeats", "1",
                            "--train-steps", "2", "--channels-last", "20"]) == 0
    out = capsys.readouterr().out
    assert "| 1       | 20    | channels_last |" in out and "same verdicts as row 1" in out


@needs_fmnist
def test_profile_epoch_runs(bench_autoattack, tmp_path, capsys):
    import profile_epoch

    out = tmp_path / "profile.txt"
    assert profile_epoch.main(["--warmup", "2", "--steps", "1", "--batch-size", "8", "--threads", "1",
                               "--amp", "off", "--rows", "5", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Self CPU time total" in text and "| attack (method.attack" in text and "amp off" in text
    assert "unprofiled warm-up steps 2..2" in text
    assert text in capsys.readouterr().out


def test_bench_train_times_several_batch_sizes_side_by_side(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_train
    finally:
        sys.path.remove(str(BENCH))
    argv = ["--models", "small-cnn", "--methods", "arow", "--iters", "1", "--warmup", "0", "--attack-steps", "1",
            "--pgd-n", "0", "--no-reference", "--amp", "off", "--device", "cpu"]
    assert bench_train.main([*argv, "--batch-size", "4,8"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| small-cnn")]
    assert [r.split("|")[4].strip() for r in rows] == ["4", "8"]  # one row per batch size
    assert bench_train.main([*argv, "--batch-size", "4,x"]) == 2
    assert "whole numbers" in capsys.readouterr().err


# --------------------------------------------------------------------------- gpu_check
@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(BENCH))


def _table(out: str) -> list[list[str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")][1:]  # the header row left out
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]


def test_gpu_check_dry_run_runs_every_row_on_the_cpu():
    """The GPU check's own code, end to end, on the CPU (tiny models): it must not rot before a GPU comes."""
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _table(r.stdout)
    kinds = [row[0] for row in rows]
    assert kinds.count("ARoW train step") == 12  # 3 models x (bf16, float32/TF32) x compile off/on
    assert {"bf16 vs float32 loss", "DDP world size 1 = no DDP", "extra-data loader",
            "AutoAttack (NON-STANDARD budget)"} <= set(kinds)
    assert not any(row[-1].startswith(("error", "timed out", "skipped")) for row in rows), r.stdout
    train = [row for row in rows if row[0] == "ARoW train step"]
    assert all(float(row[4]) > 0 and "/ 50k epoch" in row[5] and "x)" in row[7] for row in train)
    assert [row[8] for row in train if row[3] == "off"] == ["pass (0 syncing ops)"] * 6
    assert all(", 0 after warm-up," in row[9] and "eager fallbacks 0" in row[9] for row in train if row[3] == "on")
    by_kind = {row[0]: row for row in rows}
    assert by_kind["DDP world size 1 = no DDP"][10] == "pass: bit for bit"
    assert by_kind["AutoAttack (NON-STANDARD budget)"][10].startswith("pass: 8 of 8 robust")
    assert by_kind["extra-data loader"][8] == "0 per batch"
    assert "DRY RUN" in r.stdout and ": 0 failed, 0 timed out, 0 skipped" in r.stdout


def test_gpu_check_bad_input_is_one_line_and_exit_2(gpu_check, capsys):
    assert gpu_check.main(["--dry-run", "--models", "resnet18,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--models" in err and "nope" in err
    assert gpu_check.main(["--dry-run", "--budget", "0"]) == 2
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_rows_that_do_not_fit_the_budget_are_listed_as_skipped(gpu_check):
    budget = gpu_check.Budget(1e-9)  # already spent; FULL's rows need 10 to 60 s left to start
    row = gpu_check.run_row("train", ("resnet18", "bf16", False), gpu_check.FULL, torch.device("cpu"), budget)
    assert row.notes.startswith("skipped") and not row.failed and row.images_s is None
    assert (row.what, row.model, row.compile) == ("ARoW train step", "resnet18", "off")


def test_gpu_check_row_time_limit(gpu_check):
    import time

    budget = gpu_check.Budget(1e9)
    with pytest.raises(gpu_check.RowTimeout):
        with budget.limit(0.2):
            time.sleep(5)
    assert budget.expired


def test_gpu_check_step_sync_check_can_fail(gpu_check):
    """A training step that reads a value back (``.item()``) fails the host-sync column."""
    trainer = gpu_check.arow_trainer("resnet18", gpu_check.DRY, torch.device("cpu"), "tf32")
    inner = trainer._forward_backward

    def reads_back(x, y, seed):
        outs = inner(x, y, seed)
        outs[0][0].loss.item()
        return outs

    trainer._forward_backward = reads_back
    verdict, failed, _ = gpu_check.step_sync_verdict(trainer, compiled=False)
    assert failed and verdict.startswith("FAIL: 1 ops") and "_local_scalar_dense" in verdict
    assert "step" not in vars(trainer.opt)  # the optimiser's step is its own again


def test_gpu_check_dynamo_report_flags_compiles_after_warm_up(gpu_check):
    zero = {"frames": 0, "compiles": 0, "graphs": 0, "breaks": 0, "failed": 0}
    warm = {"frames": 1, "compiles": 3, "graphs": 3, "breaks": 0, "failed": 0}
    text, bad = gpu_check.dynamo_report(zero, warm, warm, fallbacks=0)
    assert not bad
    assert text == "graphs 3, 3 compile(s) of 1 frame(s), 0 after warm-up, graph breaks 0, eager fallbacks 0"
    assert gpu_check.dynamo_report(zero, warm, {**warm, "compiles": 4}, fallbacks=0)[1]  # a recompile while timed
    assert gpu_check.dynamo_report(zero, warm, warm, fallbacks=1)[1]  # hit the recompile limit: ran eagerly


def test_gpu_check_unbreakable_model_keeps_every_image(gpu_check):
    """The AutoAttack row's worst case: no L-inf perturbation of 8/255 changes a prediction."""
    torch.manual_seed(0)
    net = gpu_check.Unbreakable(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))).eval()
    x, y = gpu_check.brightness_images(40, 8)
    assert x.min() >= 0 and x.max() <= 1
    with torch.no_grad():
        assert torch.equal(net(x).argmax(1), y)
        for sign in (-1, 1):  # the extreme corners of the ball, and random ones
            assert torch.equal(net((x + sign * gpu_check.EPS).clamp(0, 1)).argmax(1), y)
        noise = (torch.rand_like(x) * 2 - 1).sign() * gpu_check.EPS
        assert torch.equal(net((x + noise).clamp(0, 1)).argmax(1), y)
