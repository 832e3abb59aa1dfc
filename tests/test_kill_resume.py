"""A run killed at any moment and then resumed ends exactly like a run that was never interrupted.

Each case kills ``arow train`` (or ``arow eval``) abruptly, resumes it with the same flags, and
compares the result with one uninterrupted reference run: every tensor of ``final.pt``,
``last.pt`` and ``best.pt`` (model, optimiser, RNG state), ``metrics.jsonl`` (same epochs once
each; values equal except the ``seconds`` timing), and the evaluation's accuracies.

* a real SIGKILL at a (seeded) random moment of the first or second epoch;
* exact moments, reached through a small driver script that runs ``arow.cli.commands.main`` in the
  subprocess after wrapping ``os.replace`` / ``_Stage.save`` so that their Nth call ends the
  process with ``os._exit(137)`` (no ``finally``, no cleanup: like a SIGKILL):
  a checkpoint's temporary file written but not yet renamed; ``best.pt`` written but ``last.pt``
  not; the final evaluation half done;
* ``arow eval`` killed after its first saved batch, then run again.

All subprocesses run with one OpenMP thread: the numbers do not depend on it, the speed on the
shared 2-core machine does (a lot).
"""
from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from conftest import fmnist_available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed "
                                "(apt-get install dataset-fashion-mnist)")

# Seed 0 improves the validation PGD accuracy in epoch 2, so best.pt is rewritten in epoch 2
# (case "between best.pt and last.pt" checks this and says so if it stops being true).
TRAIN_FLAGS = ["--epochs", "2", "--limit-train", "200", "--val-size", "50", "--attack-steps", "1",
               "--batch-size", "50", "--eval-n", "100", "--eval-attacks", "clean,pgd20,pgd5", "--no-guards",
               "--seed", "0"]
EVAL_JSON = "eval_n100.json"  # 100 of the 10000 test images
EVAL_FLAGS = ["--attacks", "clean,pgd20", "--n", "100", "--batch-size", "8", "--no-guards"]
TIMEOUT = 300

# Runs arow.cli.commands.main(argv) in the subprocess, with one moment of the run turned into an abrupt death.
DRIVER = r'''
import json, os, sys
from pathlib import Path

plan = json.loads(sys.argv[1])
argv = sys.argv[2:]
import arow.cli.commands, arow.evaluation.cascade, arow.training.trainer  # noqa: E401


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(137)  # like SIGKILL: no finally blocks, no atexit, no unlock


kill = plan.get("kill")
if kill == "replace":  # the nth os.replace(src -> dst); src "*.tmp" is an atomic write's rename
    real_replace, seen = os.replace, [0]

    def replace(src, dst, *a, **kw):
        s, d = Path(src).name, Path(dst).name
        if d == plan["dst"] and (s.endswith(".tmp") if plan["src"] == "*.tmp" else s == plan["src"]):
            seen[0] += 1
            if seen[0] == plan["nth"]:
                print(f"DRIVER_KILL {s} -> {d}", file=sys.stderr)
                die()
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
elif kill == "eval_batch":  # right after the evaluation saved its nth finished batch
    Stage, seen = arow.evaluation.cascade._Stage, [0]
    real_save = Stage.save

    def save(self, *a, **kw):
        real_save(self, *a, **kw)
        seen[0] += 1
        if seen[0] == plan["nth"]:
            print(f"DRIVER_KILL after eval batch {seen[0]} of {self.path.name}", file=sys.stderr)
            die()

    Stage.save = save
elif kill is not None:
    raise SystemExit(f"driver: unknown kill {kill!r}")

if plan.get("mark_epochs"):  # tell the test when an epoch starts (the test then SIGKILLs us)
    Trainer = arow.training.trainer.Trainer
    real_epoch = Trainer.train_epoch

    def train_epoch(self, epoch):
        print(f"EPOCH_START {epoch + 1}", flush=True)
        return real_epoch(self, epoch)

    Trainer.train_epoch = train_epoch
    # every step lasts at least 0.1 s, so an epoch of 4 steps outlasts the test's largest delay
    # (0.3 s) however fast the machine (bf16 on a CPU with native bf16 made the run outpace it)
    import time as _time
    import arow.cli.progress
    real_step = arow.cli.progress.Progress.on_step

    def on_step(self, step):
        _time.sleep(0.1)
        return real_step(self, step)

    arow.cli.progress.Progress.on_step = on_step

sys.exit(arow.cli.commands.main(argv))
'''


# --------------------------------------------------------------------------- running
def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def arow(*args: str) -> subprocess.CompletedProcess:
    """The real command line, uninterrupted."""
    return subprocess.run([sys.executable, "-m", "arow", *args], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=TIMEOUT)


def _driver_cmd(driver: Path, plan: dict[str, Any], args: list[str]) -> list[str]:
    return [sys.executable, str(driver), json.dumps(plan), *args]


def driven(driver: Path, plan: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_driver_cmd(driver, plan, list(args)), capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=TIMEOUT)


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return arow("train", *TRAIN_FLAGS, "--out", str(out), *extra)


def assert_died_abruptly(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 137, f"the driver did not reach its kill point (exit {r.returncode}):\n{r.stderr[-3000:]}"
    assert "DRIVER_KILL" in r.stderr


def assert_clean_exit(r: subprocess.CompletedProcess, what: str) -> None:
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]


def has_checkpoint(out: Path) -> bool:
    return any((out / n).is_file() for n in ("last.pt", "last.prev.pt", "final.pt"))


def resume(out: Path) -> subprocess.CompletedProcess:
    """``arow train --resume --out DIR`` with the same flags; a run killed before its first
    checkpoint must be refused with one clear line, and a fresh start into that folder then works."""
    saved = has_checkpoint(out)
    r = train(out, "--resume")
    if not saved:
        errors = [l for l in r.stderr.splitlines() if l.startswith("arow: error:")]
        assert r.returncode == 2 and len(errors) == 1 and "nothing to resume" in errors[0], \
            f"--resume of a run with no checkpoint: exit {r.returncode}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr
        r = train(out)  # nothing was saved: the same command without --resume starts it afresh
    assert_clean_exit(r, "resumed run")
    return r


# --------------------------------------------------------------------------- comparing
def assert_same(a: Any, b: Any, where: str) -> None:
    """Exact equality of nested checkpoint values: tensors bit for bit, floats as stored."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ (max |diff| {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        pass  # NaN == NaN here
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def assert_same_run(ref: Path, out: Path, epochs: int = 2) -> None:
    ref_metrics, got_metrics = metrics(ref), metrics(out)
    assert [r["epoch"] for r in got_metrics] == list(range(1, epochs + 1)), \
        f"metrics.jsonl epochs {[r['epoch'] for r in got_metrics]} (duplicated or missing lines)"
    assert _untimed(got_metrics) == _untimed(ref_metrics)
    for name in ("final.pt", "last.pt", "best.pt"):
        a = torch.load(ref / name, map_location="cpu", weights_only=True)
        b = torch.load(out / name, map_location="cpu", weights_only=True)
        assert a["epoch"] == b["epoch"], f"{name}: epoch {a['epoch']} vs {b['epoch']}"
        assert a["model"], f"{name} holds no model tensors"
        assert_same(a["model"], b["model"], f"{name}:model")
        if name == "last.pt":  # best.pt and final.pt hold the model only
            assert_same(a["optimizer"], b["optimizer"], f"{name}:optimizer")
            # torch's generator drives every random number of a run; numpy's and Python's global RNGs
            # are saved too but never seeded by --seed nor used, so they differ between any two processes
            assert_same(a["rng"]["torch"], b["rng"]["torch"], f"{name}:rng.torch")
        else:
            assert not {"optimizer", "rng", "swa", "ema"} & set(b), f"{name} holds training state"
        assert _untimed(a["history"]) == _untimed(b["history"]), f"{name}: history"
        assert a["best"] == b["best"], f"{name}: best {a['best']} vs {b['best']}"
    ev_ref = json.loads((ref / EVAL_JSON).read_text())
    ev = json.loads((out / EVAL_JSON).read_text())
    assert ev["n"] == ev_ref["n"] == 100
    assert ev["accuracy"] == ev_ref["accuracy"]
    assert ev["per_class"] == ev_ref["per_class"]
    assert set(ev["accuracy"]) == {"clean", "pgd20", "pgd5", "worst_case"}
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left in the run folder: {leftovers}"
    _assert_unlocked(out)


def _assert_unlocked(out: Path) -> None:
    import fcntl

    fd = os.open(out / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a (zombie) process still holds it
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    r = train(out)
    assert_clean_exit(r, "uninterrupted run")
    assert [m["epoch"] for m in metrics(out)] == [1, 2]
    return out


@pytest.fixture
def driver(tmp_path) -> Path:
    p = tmp_path / "driver.py"
    p.write_text(DRIVER)
    return p


# --------------------------------------------------------------------------- (a) SIGKILL at a random moment
def _kill_in_epoch(driver: Path, out: Path, epoch: int, delay: float) -> str:
    """Start training, wait until ``epoch`` has started, sleep ``delay`` s, SIGKILL. Returns stderr."""
    err_path = out.parent / f"{out.name}.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(_driver_cmd(driver, {"mark_epochs": True}, ["train", *TRAIN_FLAGS, "--out", str(out)]),
                                stdout=subprocess.PIPE, stderr=err, text=True, env=_env(), cwd=ROOT)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + TIMEOUT
        try:
            while True:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
                assert line is not None, f"training ended before epoch {epoch} started:\n{err_path.read_text()[-3000:]}"
                if line.strip() == f"EPOCH_START {epoch}":
                    break
            time.sleep(delay)
            assert proc.poll() is None, f"training finished within {delay:.3f}s of epoch {epoch}'s start"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return err_path.read_text()


# seeded: the same moments every time; each within the ~0.3-0.5 s an epoch takes here
_MOMENTS = random.Random(20240611)
RANDOM_KILLS = [(1, round(_MOMENTS.uniform(0.02, 0.3), 3)), (2, round(_MOMENTS.uniform(0.02, 0.3), 3))]


@pytest.mark.parametrize("epoch,delay", RANDOM_KILLS, ids=[f"epoch{e}+{d}s" for e, d in RANDOM_KILLS])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(reference, driver, tmp_path, epoch, delay):
    out = tmp_path / "run"
    _kill_in_epoch(driver, out, epoch, delay)
    assert not (out / "final.pt").exists()
    done = [m["epoch"] for m in metrics(out)]
    assert done == list(range(1, len(done) + 1)) and len(done) <= epoch
    if epoch >= 2:  # epoch 1 finished before the kill: its checkpoint is what the resume starts from
        saved = [torch.load(p, weights_only=True)["epoch"] for p in (out / "last.pt", out / "last.prev.pt")
                 if p.is_file()]
        assert saved and max(saved) >= 1, "epoch 1's checkpoint is missing"
    resume(out)
    assert_same_run(reference, out)


# --------------------------------------------------------------------------- (b) temporary file written, not renamed
@pytest.mark.parametrize("target,nth", [("last.pt", 2), ("final.pt", 1)], ids=["last.pt-epoch2", "final.pt"])
def test_kill_between_tmp_write_and_rename_then_resume(reference, driver, tmp_path, target, nth):
    out = tmp_path / "run"
    r = driven(driver, {"kill": "replace", "src": "*.tmp", "dst": target, "nth": nth},
               "train", *TRAIN_FLAGS, "--out", str(out))
    assert_died_abruptly(r)
    tmps = [p for p in out.iterdir() if p.name.startswith(f".{target}.") and p.name.endswith(".tmp")]
    assert len(tmps) == 1 and tmps[0].stat().st_size > 0, "the killed write should leave its full temporary file"
    if target == "last.pt":  # last.pt of epoch 1 was already moved to last.prev.pt
        assert not (out / "last.pt").exists()
        assert torch.load(out / "last.prev.pt", weights_only=True)["epoch"] == 1
    else:
        assert not (out / "final.pt").exists()
        assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    r = resume(out)
    if target == "last.pt":
        assert "last.prev.pt" in r.stderr, "the resume should say it fell back to last.prev.pt"
    assert_same_run(reference, out)


# --------------------------------------------------------------------------- (c) best.pt written, last.pt not
def test_kill_between_best_and_last_then_resume(reference, driver, tmp_path):
    out = tmp_path / "run"
    # the epoch-2 rotation last.pt -> last.prev.pt comes right after best.pt and right before last.pt
    r = driven(driver, {"kill": "replace", "src": "last.pt", "dst": "last.prev.pt", "nth": 1},
               "train", *TRAIN_FLAGS, "--out", str(out))
    assert_died_abruptly(r)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 2, ("epoch 2 no longer improves the validation score with these flags, so this "
                                "case no longer kills between best.pt and last.pt: pick another --seed")
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    assert [m["epoch"] for m in metrics(out)] == [1, 2]  # the epoch-2 line was appended before the kill
    resume(out)
    assert_same_run(reference, out)  # no duplicated epoch-2 line, best.pt rewritten identically


# --------------------------------------------------------------------------- (d) during the final evaluation
def test_kill_during_final_evaluation_then_resume(reference, driver, tmp_path):
    out = tmp_path / "run"
    r = driven(driver, {"kill": "eval_batch", "nth": 1}, "train", *TRAIN_FLAGS, "--out", str(out))
    assert_died_abruptly(r)
    assert (out / "final.pt").is_file() and not (out / EVAL_JSON).exists()
    assert (out / "eval_state" / "pgd20.pt").is_file()
    r = resume(out)
    assert "pgd20: resuming from" in r.stderr, "the final evaluation should continue from eval_state"
    assert_same_run(reference, out)


# --------------------------------------------------------------------------- arow eval killed, run again
def test_eval_killed_mid_evaluation_then_rerun_gives_same_verdicts(reference, driver, tmp_path):
    def fresh_copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(reference, d, ignore=shutil.ignore_patterns("eval_state", "eval*.json"))
        return d

    whole, killed = fresh_copy("whole"), fresh_copy("killed")
    r = arow("eval", str(whole), *EVAL_FLAGS)
    assert_clean_exit(r, "uninterrupted eval")
    ev_whole = json.loads((whole / EVAL_JSON).read_text())
    batches = -(-round(ev_whole["accuracy"]["clean"] * 100) // 8)  # pgd20 runs on the clean-correct images
    assert batches >= 2, f"pgd20 has {batches} batch(es) of 8: too few to stop in between"

    r = driven(driver, {"kill": "eval_batch", "nth": 1}, "eval", str(killed), *EVAL_FLAGS)
    assert_died_abruptly(r)
    assert not (killed / EVAL_JSON).exists()
    state = torch.load(killed / "eval_state" / "pgd20.pt", weights_only=True)
    assert state["done"] == [0]

    r = arow("eval", str(killed), *EVAL_FLAGS)
    assert_clean_exit(r, "eval run again")
    assert "pgd20: resuming from" in r.stderr and "(1 batch(es) already done)" in r.stderr, r.stderr[-2000:]
    ev = json.loads((killed / EVAL_JSON).read_text())
    assert ev["n"] == ev_whole["n"] == 100
    assert ev["accuracy"] == ev_whole["accuracy"]
    assert ev["per_class"] == ev_whole["per_class"]
    assert set(ev["accuracy"]) == {"clean", "pgd20", "worst_case"}
    assert ev["accuracy"]["pgd20"] <= ev["accuracy"]["clean"]
