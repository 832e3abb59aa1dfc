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


# --------------------------------------------------------------------------- timing on a GPU, checked on the CPU
@pytest.fixture
def bench_path():
    """The benchmark scripts importable (``import train_step``) for one test."""
    sys.path.insert(0, str(BENCH))
    try:
        yield
    finally:
        sys.path.remove(str(BENCH))


def _flags() -> tuple[bool, bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark


@pytest.fixture
def flags_on():
    """TF32 (matmuls and convolutions) and cuDNN's autotuner on, as a training run leaves them; the
    process's own flags put back after the test."""
    saved = _flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


@pytest.fixture
def cuda_syncs(monkeypatch) -> list:
    """``torch.cuda.synchronize`` recorded instead of called, so a ``cuda`` device's timing runs on the CPU."""
    events: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    return events


def test_stopwatch_waits_for_the_device_before_each_clock_read(bench_path, cuda_syncs, monkeypatch):
    import bench_timing

    clock = iter([10.0, 12.5, 20.0, 20.25])
    monkeypatch.setattr(bench_timing.time, "perf_counter", lambda: cuda_syncs.append("clock") or next(clock))
    with bench_timing.Stopwatch(torch.device("cuda", 0)) as t:
        cuda_syncs.append("work")
    assert cuda_syncs == ["sync cuda:0", "clock", "work", "sync cuda:0", "clock"] and t.seconds == 2.5
    cuda_syncs.clear()
    with bench_timing.Stopwatch(torch.device("cpu")) as t:
        pass
    assert cuda_syncs == ["clock", "clock"] and t.seconds == 0.25  # nothing to wait for on the CPU


def test_bench_train_divides_each_row_by_the_peak_of_its_own_precision(bench_path, monkeypatch, flags_on):
    """float32 rows against a float32 peak measured with the TF32 setting the rows ran under, bf16 rows
    against a bf16 peak; the precision column and the peaks line say which."""
    import train_step

    seen = []

    def peak(device, n=None, reps=10, dtype=None):
        seen.append((dtype, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return (400.0, "bf16") if dtype == torch.bfloat16 else (100.0, "float32")

    monkeypatch.setattr(train_step, "matmul_peak", peak)
    res = train_step.run(["small-cnn"], ["arow"], device="cpu", batch_size=4, iters=1, warmup=0, steps=1, pgd_n=0,
                         reference=False, amp="off,bf16", tf32="off")
    assert [r.precision for r in res.rows] == ["float32", "bf16"]
    assert [r.peak_fraction for r in res.rows] == [res.rows[0].ours_gflops / 100.0, res.rows[1].ours_gflops / 400.0]
    assert "matmul peaks by precision: float32 100.0 GFLOP/s; bf16 400.0 GFLOP/s" in res.markdown()
    assert {tuple(flags) for _, *flags in seen} == {(False, False)}  # every peak measured under the pinned setting
    assert _flags() == (True, True, True)  # and the flags came back
    cuda = torch.device("cuda")  # on a GPU a float32 row says its TF32 setting and has a peak of that name
    assert train_step.float32_label(cuda, True) == "float32 (TF32 on)"
    assert set(train_step._peaks(cuda, train_step.float32_label(cuda, False))) == {"float32 (TF32 off)", "bf16"}


def test_pgd20_timing_warms_up_every_timed_shape_in_the_evaluations_settings(bench_path, monkeypatch, flags_on):
    import train_step

    events: list = []

    def attack(net, x, y):
        events.append((len(x), _flags()))
        return x

    class Marked(train_step.Stopwatch):
        def __enter__(self):
            events.append("start")
            return super().__enter__()

        def __exit__(self, *exc):
            events.append("stop")
            return super().__exit__(*exc)

    monkeypatch.setattr(train_step, "get_attack", lambda name, eps: attack)
    monkeypatch.setattr(train_step, "Stopwatch", Marked)
    assert train_step.time_pgd20("small-cnn", 5, torch.device("cpu"), batch=2) >= 0
    start, stop = events.index("start"), events.index("stop")
    warm, timed = events[:start], events[start + 1 : stop]
    assert [n for n, _ in timed] == [2, 2, 1] and {n for n, _ in timed} <= {n for n, _ in warm}
    assert {f for _, f in warm + timed} == {(False, False, False)}  # strict float32, no autotuner: as arow eval
    assert _flags() == (True, True, True)  # the flags training left came back


def test_dynamo_fallback_to_eager_is_counted_once_and_flagged(bench_path):
    """A frame over dynamo's recompile limit runs eagerly: the warning and the failed frame are one fallback."""
    import logging

    import train_step

    fallbacks = train_step.FallbackLog()
    logging.getLogger("torch._dynamo").addHandler(fallbacks)
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            torch._dynamo.reset()
            f = torch.compile(lambda x: x * 2 + 1, backend="eager")
            before = train_step.dynamo_counts()
            f(torch.ones(2))
            warm = train_step.dynamo_counts()
            for dtype in (torch.float64, torch.int32, torch.int64):  # each a recompile: over the limit at once
                f(torch.ones(3, dtype=dtype))
            text, bad = train_step.dynamo_report(before, warm, train_step.dynamo_counts(), fallbacks.count)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(fallbacks)
        torch._dynamo.reset()
    assert fallbacks.count == 1 and bad
    assert text.endswith("eager fallbacks 1"), text


def test_bench_train_fails_a_compiled_row_that_ran_eagerly(bench_path, monkeypatch, capsys):
    import functools

    import bench_train

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # no code generation
    argv = ["--models", "small-cnn", "--methods", "arow", "--batch-size", "4", "--iters", "1", "--warmup", "1",
            "--attack-steps", "1", "--pgd-n", "0", "--no-reference", "--amp", "off", "--device", "cpu", "--compile"]
    try:
        with torch._dynamo.config.patch(recompile_limit=1):  # arow's model compiles 3 times: over the limit
            assert bench_train.main(argv) == 1
    finally:
        torch._dynamo.reset()
    out, err = capsys.readouterr()
    row = next(ln for ln in out.splitlines() if ln.startswith("| small-cnn"))
    assert "FAILED: the timed steps compiled again or ran eagerly" in row and "eager fallbacks 0" not in row
    assert "FAILED: 1 compiled row(s)" in out
    assert "1 compiled row(s) compiled again or ran eagerly" in err and "small-cnn/arow/batch 4/float32" in err


def test_bench_eval_defaults_to_the_gpu_and_times_between_synchronisations(bench_autoattack, cuda_syncs, monkeypatch,
                                                                           flags_on):
    from types import SimpleNamespace

    import bench_eval

    assert bench_eval.build_parser().parse_args([]).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench_eval.resolve_device("auto") == torch.device("cuda", 0)

    def evaluate(model, x, y, attacks, eps, batch_size):
        cuda_syncs.append(("evaluate", batch_size, _flags()))
        verdicts = torch.tensor([True, False])
        return SimpleNamespace(seconds={"pgd20": 0.5}, correct={"clean": verdicts, "pgd20": verdicts},
                               accuracy={"clean": 0.5, "pgd20": 0.5})

    monkeypatch.setattr(bench_eval, "evaluate", evaluate)
    s = bench_eval.Setting(threads=torch.get_num_threads(), batch=7)
    bench_eval.run_one(None, SimpleNamespace(device=torch.device("cuda", 0)), None, s, 0.1)
    assert cuda_syncs == ["sync cuda:0", ("evaluate", 7, (False, False, False)), "sync cuda:0"]
    assert len(s.seconds) == 1 and s.pgd_seconds == [0.5] and s.accuracy == {"clean": 0.5, "pgd20": 0.5}
    assert _flags() == (True, True, True)  # the process's flags came back


def test_profile_epoch_on_cuda_records_kernels_and_waits_for_the_device_at_its_marks(bench_autoattack, cuda_syncs):
    from types import SimpleNamespace

    from torch.profiler import ProfilerActivity

    import profile_epoch

    assert profile_epoch.profiler_settings(torch.device("cuda", 0)) == (
        [ProfilerActivity.CPU, ProfilerActivity.CUDA], "self_device_time_total")
    assert profile_epoch.profiler_settings(torch.device("cpu")) == ([ProfilerActivity.CPU], "self_cpu_time_total")
    prof = SimpleNamespace(start=lambda: cuda_syncs.append("start"), stop=lambda: cuda_syncs.append("stop"))
    cb = profile_epoch.ProfileSteps(prof, warmup=1, steps=2, device=torch.device("cuda", 0))
    cb.on_epoch_start(0, 1, 3)
    for step in range(3):
        cb.on_step(step)
        cuda_syncs.append(f"step {step}")
    sync = "sync cuda:0"
    # the epoch's start and the warm-up step are marked on the device's clock; the profiled steps are
    # not waited for one by one, only at the profile's start and before its stop
    assert cuda_syncs == [sync, sync, sync, "start", "step 0", "step 1", sync, "stop", "step 2"]
    assert cb.seconds >= 0 and cb.t1 is not None


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
    header = next(ln for ln in r.stdout.splitlines() if ln.startswith("| row "))
    peak = [c.strip() for c in header.strip().strip("|").split("|")].index("peak GiB")
    assert [row[peak] for row in train] == ["-"] * 12  # every train row has the column; no GPU memory on the CPU
    assert all(row[peak] == "" for row in rows if row[0] != "ARoW train step")
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


def test_gpu_check_peak_memory_is_reset_before_the_timed_steps_and_read_after(gpu_check, monkeypatch):
    events: list = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append(f"reset {device}"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: events.append(f"read {device}") or 7 * 2**29)  # 3.5 GiB
    assert gpu_check.peak_gib(torch.device("cuda", 0), lambda: events.append("steps") or 1.5) == (1.5, "3.50")
    assert events == ["reset cuda:0", "steps", "read cuda:0"]
    events.clear()
    assert gpu_check.peak_gib(torch.device("cpu"), lambda: events.append("steps") or 2.0) == (2.0, "-")
    assert events == ["steps"]  # nothing to reset or read on the CPU


# --------------------------------------------------------------------------- bench_autoattack on a GPU
def test_bench_autoattack_defaults_to_the_gpu_and_times_both_sides_in_arow_evals_kernels(
        bench_autoattack, cuda_syncs, monkeypatch, flags_on, capsys):
    """Without a GPU, ``--device cuda`` is one line and exit 2; ``auto`` (the default) picks CUDA when
    PyTorch sees it, and each side (a, b, a, b) runs in strict float32 between synchronisations."""
    import logging
    from types import SimpleNamespace

    import pyautoattack

    parser = bench_autoattack.build_parser()
    assert parser.parse_args([]).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_autoattack.main(["--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "no CUDA device" in err[-1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    y = torch.tensor([0, 1])
    x = SimpleNamespace(device=cuda)  # where the images would be; the fakes below never read them
    placed: list = []

    def ready_model(ckpt, train_steps, eps, attack_steps, device, seed):
        placed.append(("model", device))
        return (lambda inputs: torch.tensor([[1.0, 0.0], [1.0, 0.0]])), "fake model", 0.0

    class Test:
        def subset(self, n):
            return self

        def to(self, device):
            placed.append(("images", device))
            return SimpleNamespace(x=x, y=y)

    def evaluate(model, xs, ys, attacks, eps, batch_size):
        cuda_syncs.append(("ours", tuple(attacks), eps, batch_size, _flags()))
        return SimpleNamespace(correct={"worst_case": torch.tensor([True, True]), "pgd20": torch.tensor([True, True])},
                               accuracy={"clean": 1.0, "pgd20": 1.0})

    class AutoAttack:
        def __init__(self, model, device, eps, norm, seed, version):
            self.logger = logging.getLogger("fake-autoattack")
            assert (device, eps, norm, version) == (cuda, 0.1, "Linf", "standard")

        def run_standard_evaluation(self, xs, ys, batch_size):
            cuda_syncs.append(("direct", batch_size, _flags()))
            return torch.zeros(2, 1), ys

    monkeypatch.setattr(bench_autoattack, "ready_model", ready_model)
    monkeypatch.setattr(bench_autoattack, "load_dataset", lambda name, split: Test())
    monkeypatch.setattr(bench_autoattack, "evaluate", evaluate)
    monkeypatch.setattr(pyautoattack, "AutoAttack", AutoAttack)
    assert bench_autoattack.main(["--repeats", "2", "--guards-n", "0", "--batch-size", "7"]) == 0
    assert placed == [("model", cuda), ("images", cuda)]
    sync, strict = "sync cuda:0", (False, False, False)
    one_pair = [sync, ("ours", ("clean", "pgd20", "autoattack"), 0.1, 7, strict), sync,
                sync, ("direct", 7, strict), sync]
    assert cuda_syncs == one_pair * 2
    assert _flags() == (True, True, True)  # the process's flags came back
    out = capsys.readouterr().out
    assert "device cuda:0" in out and "strict float32" in out
    assert "same per-example verdicts: no (robust only in (a): 1, only in (b): 0)" in out


# --------------------------------------------------------------------------- gpu_check: the training loop's rows
@pytest.fixture()
def train_rates(gpu_check):
    """The GPU check's record of the eager train rows' images/s, emptied for one test and put back after."""
    saved = dict(gpu_check.TRAIN_RATE)
    gpu_check.TRAIN_RATE.clear()
    yield gpu_check.TRAIN_RATE
    gpu_check.TRAIN_RATE.clear()
    gpu_check.TRAIN_RATE.update(saved)


def test_gpu_check_plan_runs_the_epoch_overhead_after_the_train_rows_and_wrn_last(gpu_check):
    rows = gpu_check.plan(["resnet18", "wrn-34-10"], ["bf16"], [False, True], set(gpu_check.KINDS))
    kinds = [kind for kind, _ in rows]
    assert rows[2] == ("epoch-overhead", ("resnet18",)) and kinds[:2] == ["train", "train"]
    assert rows[-1] == ("epoch-overhead", ("wrn-34-10",)) and kinds[-2] == "compiled"  # if the budget allows
    assert [args for kind, args in rows if kind == "loader"] == [("device",), ("pinned",)]
    assert "checkpoint" in kinds and "epoch-overhead" not in [k for k, _ in gpu_check.plan(
        ["wrn-34-10"], ["bf16"], [False], set(gpu_check.KINDS) - {"epoch-overhead"})]
    assert gpu_check.FULL.needs["epoch-overhead wrn-34-10"] > gpu_check.FULL.needs["epoch-overhead"]
    budget = gpu_check.Budget(1e-9)  # WRN-34-10's own need, not the kind's, decides that it is skipped
    row = gpu_check.run_row("epoch-overhead", ("wrn-34-10",), gpu_check.FULL, torch.device("cpu"), budget)
    assert row.what == "epoch-overhead wrn-34-10" and row.notes.startswith("skipped")


def test_gpu_check_train_steps_keep_the_loaders_batch_layout(gpu_check):
    """``run_steps`` replaces the Trainer's loader: the batches keep the layout the Trainer chose
    (channels-last on CUDA), and each rank takes its share of the global batch."""
    trainer = gpu_check.arow_trainer("resnet18", gpu_check.DRY, torch.device("cpu"), "tf32")
    trainer.loader.memory_format = torch.channels_last
    assert gpu_check.run_steps(trainer, 1) > 0
    assert trainer.loader.memory_format is torch.channels_last
    x, _ = next(iter(trainer.loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert (trainer.loader.rank, trainer.loader.world_size) == (0, 1)


def test_gpu_check_epoch_overhead_is_a_share_of_the_train_rows_epoch(gpu_check, train_rates):
    import re

    cpu = torch.device("cpu")
    train_rates[("resnet18", "bf16")] = 50.0  # a 1,000 s epoch
    row = gpu_check.epoch_overhead_row("resnet18", gpu_check.DRY, cpu, gpu_check.Budget(1e9))
    validate_s, recal_s = (float(v) for v in re.findall(r"(?:validate|recalibrate) ([0-9.]+) s", row.implied))
    assert validate_s > 0 and recal_s > 0 and "of a 1000.0 s epoch" in row.implied
    assert f"({100 * validate_s / 1000:.1f}%)" in row.implied
    share = 100 * (2 * validate_s + recal_s) / 1000
    assert row.check.startswith("n/a (dry run): ") and f"{share:.1f}% of an epoch" in row.check
    assert "PGD-20 on 8 images at eval batch 100" in row.notes and "its bf16 train row" in row.notes
    assert "over 4 batches of 4" in row.notes  # the whole (dry) epoch of 16 images
    assert "10%" in row.decides
    train_rates.clear()  # no train row ran: the row measures the training epoch itself
    row = gpu_check.epoch_overhead_row("resnet18", gpu_check.DRY, cpu, gpu_check.Budget(1e9))
    assert "measured in this row" in row.notes and not row.failed


def test_gpu_check_pinned_loader_row_asks_for_pinned_memory_and_compares_with_the_train_step(
        gpu_check, train_rates, monkeypatch):
    import arow.data.loader as data_loader

    gpu_rows = sys.modules["gpu_rows"]
    shares: list = []
    real_load = gpu_rows.load_extra

    def load_extra(*args, **kwargs):
        shares.append(data_loader.EXTRA_ON_DEVICE_SHARE)  # what ExtraFeed will read at the first batch
        return real_load(*args, **kwargs)

    monkeypatch.setattr(gpu_rows, "load_extra", load_extra)
    train_rates[("wrn-34-10", "bf16")], train_rates[("resnet18", "bf16")] = 10.0, 40.0
    cpu = torch.device("cpu")
    pinned = gpu_check.loader_row("pinned", gpu_check.DRY, cpu, gpu_check.Budget(1e9))
    on_device = gpu_check.loader_row("device", gpu_check.DRY, cpu, gpu_check.Budget(1e9))
    assert shares == [0.0, 0.25] and data_loader.EXTRA_ON_DEVICE_SHARE == 0.25
    assert (pinned.what, on_device.what) == ("extra-data loader, pinned", "extra-data loader")
    assert pinned.check.startswith("n/a (CPU: host mode); n/a (dry run): ") and pinned.sync == "0 per batch"
    assert f"{pinned.images_s / 40:.1f}x the fastest train step (resnet18 bf16, 40 images/s" in pinned.check
    assert pinned.decides and not on_device.decides and not pinned.failed
    full = gpu_check.FULL  # the verdict on a GPU: >= 2x the fastest step keeps up
    assert gpu_rows.keeps_up(80.0, full).startswith("keeps up: 2.0x")
    assert gpu_rows.keeps_up(79.0, full).startswith("TOO SLOW")
    assert gpu_rows.keeps_up(60.0, full).startswith("TOO SLOW: 1.5x")
    train_rates.clear()
    assert gpu_rows.keeps_up(60.0, full) == "no train row ran to compare with"


def test_gpu_check_checkpoint_row_times_what_blocks_the_loop(gpu_check, monkeypatch):
    """A slow disk (each write takes 1 s): the foreground save blocks the loop for it, the
    background one does not, and training steps run while it writes."""
    import re
    import time

    from arow.runs.rundir import RunDir

    real_save = RunDir.save_epoch

    def slow_save(self, ckpt, best=None):
        time.sleep(1.0)
        real_save(self, ckpt, best)

    monkeypatch.setattr(RunDir, "save_epoch", slow_save)
    row = gpu_check.checkpoint_row(gpu_check.DRY, torch.device("cpu"), gpu_check.Budget(1e9))
    blocked = re.search(r"blocked ([0-9.]+) s foreground, ([0-9.]+) s background", row.check)
    fg, bg = float(blocked[1]), float(blocked[2])
    assert fg >= 1.0 and bg < 0.5, row.check
    written = re.search(r"write ([0-9.]+) s foreground, ([0-9.]+) s background; (\d+) steps", row.notes)
    assert float(written[1]) >= 1.0 and float(written[2]) >= 1.0 and int(written[3]) >= 2, row.notes
    assert row.images_s > 0 and "x the" in row.implied and "MB checkpoint" in row.notes
    assert row.check.startswith("n/a (dry run): ") and "stays on by default on CUDA" in row.decides


# --------------------------------------------------------------------------- ddp_check
def test_ddp_check_dry_run_under_torchrun_with_two_gloo_processes(tmp_path):
    """The multi-GPU check's own code on 2 CPU processes (gloo, tiny shapes): one table, on rank 0."""
    import json
    import os
    import re
    import subprocess

    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(BENCH / "ddp_check.py"), "--dry-run", "--json", str(out)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("| row ") == 1 and r.stdout.count("DDP check: 2 CPU processes, gloo") == 1
    rows = {(row[0], row[3]): row for row in _table(r.stdout)}
    assert set(rows) == {("ARoW step, SyncBatchNorm", "off"), ("ARoW step, SyncBatchNorm", "on"),
                         ("ARoW step, GlobalBatchNorm", "off"), ("ARoW step, GlobalBatchNorm", "on"),
                         ("attack PGD-2, batch 2", "eager backend")}
    assert all(rows[("ARoW step, SyncBatchNorm", c)][-1].startswith("skipped: SyncBatchNorm refuses CPU tensors")
               for c in ("off", "on"))
    eager, compiled = rows[("ARoW step, GlobalBatchNorm", "off")], rows[("ARoW step, GlobalBatchNorm", "on")]
    assert float(eager[4]) > 0 and float(compiled[4]) > 0 and "2 ranks x batch 2" in eager[-1]
    assert ", 0 after warm-up," in compiled[6] and "eager fallbacks 0" in compiled[6]
    assert re.search(r"graph breaks per training forward: \d+", compiled[7]) and "x eager" in compiled[5]
    assert "eager" in rows[("attack PGD-2, batch 2", "eager backend")][5]
    assert "- ARoW step: which BatchNorm" in r.stdout and "- attack PGD-2: " in r.stdout
    assert "5 rows in" in r.stdout and "0 failed, 2 skipped" in r.stdout
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == 5 and saved["device"].startswith("DDP check: 2 CPU processes")


def test_ddp_check_bad_input_is_one_line_and_exit_2(gpu_check, monkeypatch, capsys):
    import ddp_check

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert ddp_check.main(["--dry-run"]) == 2  # not under torchrun
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun --nproc-per-node=N (N >= 2)" in err[0]
    monkeypatch.setenv("WORLD_SIZE", "3")  # the dry run's global batch of 4 does not split over 3
    assert ddp_check.main(["--dry-run"]) == 2
    assert "does not split over 3 processes" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # only rank 0 says it
    assert ddp_check.main(["--dry-run"]) == 2 and capsys.readouterr().err == ""


def test_bf16_stem_keeps_the_first_layer_in_float32_and_restores_the_model(bench_path, tmp_path):
    import bench_bf16_stem as b

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()
    seen: dict[str, torch.dtype] = {}
    net[0].register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0].dtype, out=out.dtype))
    x = torch.rand(6, 1, 6, 6)
    for which, want in (("float32", torch.float32), ("bf16", torch.bfloat16), ("bf16, float32 stem", torch.float32)):
        with b.precision(net, which):
            net(x)
        assert seen["out"] == want, which
    assert isinstance(net[0], nn.Conv2d)  # restored
    assert b.parse_eps("0.1, 8/255") == [0.1, 8 / 255]
    with pytest.raises(SystemExit, match="--eps"):
        b.parse_eps("8/0")


def test_bf16_stem_uses_the_runs_own_attack_and_the_same_starts_in_every_precision(bench_path, tmp_path):
    import bench_bf16_stem as b

    (tmp_path / "config.json").write_text('{"method": "trades", "method_args": {"beta": 3.5}, "attack_steps": 3, '
                                          '"eps": 0.1, "epochs": 2}')
    train, pgd20 = b.attacks_of(tmp_path, 0.1)
    assert train.method.name == "trades" and train.method.attack_threat.start == "normal"
    assert train.method.threat.steps == 3 and pgd20.threat.steps == 20 and pgd20.threat.start == "uniform"
    (tmp_path / "config.json").write_text('{"method": "mart", "attack_steps": 2, "eps": 0.1, "step_size": 0.02}')
    mart = b.attacks_of(tmp_path, 0.05)[0]
    assert mart.method.name == "mart" and mart.method.threat.step == pytest.approx(0.01)  # step keeps its ratio to eps
    # a model whose only weighted layer is the first: "bf16 with a float32 stem" is float32 throughout, so
    # it must give exactly the float32 numbers (the same starts, the same steps) in any batching
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.rand(6, 1, 4, 4)
    y = net(x).argmax(1)
    for attack in (train, pgd20):
        ref = b.measure(net, x, y, attack, "float32", batch_size=6)
        for which, bs in (("bf16, float32 stem", 6), ("float32", 4), ("bf16, float32 stem", 2)):
            got = b.measure(net, x, y, attack, which, batch_size=bs)
            assert torch.equal(got.correct, ref.correct) and got.kl == pytest.approx(ref.kl, abs=1e-6), (which, bs)
        assert 0 <= ref.accuracy <= 1 and ref.ce >= 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="oneDNN with bf16 support is not available on this CPU build")
def test_fused_conv_relu_benchmark_gives_the_same_gradients(bench_path, capsys):
    import bench_conv_relu

    assert bench_conv_relu.main(["--batch", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| fused |" in out and "| NO |" not in out and "speed-up of the fused model" in out


def test_attack_layer_rewrites_benchmark_compares_gradients(bench_path, capsys):
    import bench_attack_layers

    assert bench_attack_layers.main(["--batch", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    # ReLU after max-pooling gives the same gradients bit for bit; the matmul rewrite only to bf16 round-off
    assert "| relu-after-pool |" in out and out.split("| relu-after-pool |")[1].split("\n")[0].endswith("yes, bit for bit |")
    assert "| conv1-matmul |" in out and "oneDNN input gradient" in out


def test_first_conv_input_gradient_by_matmul_matches_autograd(bench_path):
    import bench_attack_layers

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 32, 3).double()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    g = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, x, g)
    got = bench_attack_layers.conv1_input_grad_matmul(g, conv.weight.detach(), (28, 28))
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def test_step_floor_benchmark_prints_kernels_operators_and_parts(bench_path, capsys):
    import bench_step_floor

    threads = torch.get_num_threads()
    try:
        assert bench_step_floor.main(["--batch", "8", "--repeats", "1", "--blocks", "2", "--block", "1",
                                      "--threads", "2", "--attack-steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    layers = [ln.split("|")[1].strip() for ln in out.splitlines() if ln.startswith("| conv") or ln.startswith("| fc")]
    assert layers == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "fc3"]
    assert "of the bf16 peak at most" in out and "| max-pool backward | 8x32x24x24 |" in out
    # each half of the batch attacked on its own worker thread gives the whole batch's x_adv
    assert out.splitlines()[-1].endswith("| yes, bit for bit |")


def test_step_floor_ceiling_counts_the_passes_of_an_arow_step(bench_path):
    import bench_step_floor

    rows = [{"layer": "conv1", "flops": 3, "fwd": 1.0, "grad_in": 5.0, "grad_w": 2.0, "grad_both": 6.0},
            {"layer": "conv2", "flops": 7, "fwd": 2.0, "grad_in": 3.0, "grad_w": 4.0, "grad_both": 6.5}]
    ms, flops = bench_step_floor.step_ceiling(rows, 5)
    # 8 forwards (3.0 each), 5 attack input gradients (8.0), 2 training backwards: conv1's weight
    # gradient alone (2.0; the images need none) and conv2's two gradients from one call (6.5)
    assert ms == 8 * 3.0 + 5 * 8.0 + 2 * (2.0 + 6.5)
    assert flops == 17 * 10  # ARoW at K = 5: 17 forward-equivalents, as bench_train.py counts them
