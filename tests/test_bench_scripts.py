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
