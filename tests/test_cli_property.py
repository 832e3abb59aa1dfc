"""Property: every combination of ``arow train`` flags either trains (exit 0) or is refused with
exit status 2 and exactly one ``arow: error:`` line; never a traceback, never another status.

Flags are drawn from values on both sides of each rule (inf, nan, negative, zero, huge, fine).
Half of the examples draw only valid values, so the runs that must succeed are exercised as much
as the refusals. A small oracle restates the documented rules (config ranges, method
hyper-parameters, cross-flag rules) and says which outcome each example must have: a valid
combination that is refused, or an invalid one that trains, fails the test too.

Runs in-process (``arow.cli.commands.main``) on a tiny slice of Fashion-MNIST: at most 120 training
images, 1 epoch, at most 1 attack step, at most 20 evaluation images, clean evaluation only.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import fmnist_available

pytestmark = [pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed "
                                 "(apt-get install dataset-fashion-mnist)"),
              pytest.mark.usefixtures("one_thread")]

# flag -> (valid values, invalid values); None as a value means "flag not given"
ALWAYS = {  # always given: they keep every run tiny
    "--epochs": (["1"], ["0", "-1"]),
    "--batch-size": (["7", "32"], ["0", "-4"]),
    "--attack-steps": (["0", "1"], ["-1"]),
    "--limit-train": (["2", "60", "120"], ["-5", "0", "1"]),
    "--val-size": (["0", "5", "20"], ["-1"]),
    "--eval-n": (["1", "20"], ["0", "-3"]),
}
OPTIONAL = {
    "--eps": (["0", "0.1"], ["inf", "nan", "-1", "1e9", "-inf"]),
    "--lr": (["0.05"], ["inf", "nan", "0", "-1", "1e9"]),
    "--step-size": (["0.025", "1"], ["nan", "0", "-0.1", "2", "inf"]),
    "--momentum": (["0", "0.9"], ["nan", "-0.5", "1", "1.5"]),
    "--schedule": (["step", "cosine", "onecycle", "constant"], ["bogus"]),
    "--milestones": (["0.5", "0.5,0.83", "1,2"], ["0", "-1", "nan", "inf", "0.5,2", "abc", ""]),
    "--warmup-epochs": (["0", "0.5"], ["nan", "-1", "1", "5", "inf"]),
    "--swa-start": (["0", "1"], ["-1", "2"]),
}
METHOD_ARGS = {  # hyper-parameter -> (the method it belongs to, valid values, invalid values)
    "--lam": ("arow", ["0", "3.5"], ["nan", "-1", "inf"]),
    "--smoothing": ("arow", ["0", "0.2", "0.99"], ["nan", "-0.1", "1", "2"]),
    "--beta": ("trades", ["0", "6"], ["nan", "-1", "inf"]),
}
INT_FLAGS = {"--epochs", "--batch-size", "--attack-steps", "--limit-train", "--val-size", "--eval-n", "--swa-start"}


@st.composite
def train_flags(draw) -> dict[str, str]:
    valid = draw(st.booleans())
    pick = lambda good, bad: draw(st.sampled_from(good if valid else good + bad))  # noqa: E731
    flags = {k: pick(*v) for k, v in ALWAYS.items()}
    for k, v in OPTIONAL.items():
        if draw(st.booleans()):
            flags[k] = pick(*v)
    method = draw(st.sampled_from([None, "arow", "trades"]))
    if method is not None:
        flags["--method"] = method
    for k, (owner, good, bad) in METHOD_ARGS.items():
        if draw(st.booleans()) and (not valid or owner == (method or "arow")):
            flags[k] = pick(good, bad)
    return flags


def expected(flags: dict[str, str]) -> str:
    """``usage`` (argparse refuses it), ``error`` (arow refuses it) or ``ok`` (it must train)."""
    if flags.get("--schedule", "step") not in ("step", "cosine", "onecycle", "constant"):
        return "usage"
    if "--milestones" in flags:
        try:  # list flags read comma-separated values and skip empty ones: "" is no milestones
            [float(v) for v in flags["--milestones"].split(",") if v.strip()]
        except ValueError:
            return "usage"
    v = {k: (int(s) if k in INT_FLAGS else float(s)) for k, s in flags.items()
         if k not in ("--method", "--schedule", "--milestones")}
    finite = lambda x: math.isfinite(x)  # noqa: E731
    epochs = v["--epochs"]
    method = flags.get("--method", "arow")
    bad = [
        epochs < 1,
        v["--batch-size"] < 1,
        not 0 <= v["--attack-steps"] <= 10_000,
        v["--limit-train"] < 2,
        v["--val-size"] < 0,
        v["--eval-n"] < 1,
        "--eps" in v and not (finite(v["--eps"]) and 0 <= v["--eps"] <= 1),
        "--lr" in v and not (finite(v["--lr"]) and 0 < v["--lr"] <= 100),
        "--step-size" in v and not (finite(v["--step-size"]) and 0 < v["--step-size"] <= 1),
        "--momentum" in v and not (finite(v["--momentum"]) and 0 <= v["--momentum"] < 1),
        not (finite(v.get("--warmup-epochs", 0.15)) and 0 <= v.get("--warmup-epochs", 0.15) < epochs),
        v.get("--swa-start", 0) != 0 and not 1 <= v["--swa-start"] <= epochs,
    ]
    if "--milestones" in flags:
        ms = [float(m) for m in flags["--milestones"].split(",") if m.strip()]
        fractions = [0 < m < 1 for m in ms]
        bad.append(any(not (finite(m) and m > 0) for m in ms) or (any(fractions) and not all(fractions)))
    for k, (owner, _, _) in METHOD_ARGS.items():
        if k in v:
            bad.append(owner != method)  # another method's hyper-parameter
            bad.append(not (finite(v[k]) and v[k] >= 0))
    bad.append(method == "arow" and not 0 <= v.get("--smoothing", 0.2) < 1)  # label smoothing alpha
    return "error" if any(bad) else "ok"


def run_cli(argv: list[str]) -> tuple[Optional[int], str, str, Optional[BaseException]]:
    """``arow.cli.commands.main(argv)`` in this process: (exit status, stdout, stderr, uncaught exception)."""
    from arow.cli.commands import main

    out, err = io.StringIO(), io.StringIO()
    status, exc = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:  # argparse: usage message and status 2
            status = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 - what the user would see as a traceback
            exc = e
    return status, out.getvalue(), err.getvalue(), exc


@settings(max_examples=25, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(flags=train_flags())
# always covered: a run that must train, each method with its hyper-parameters, and classic refusals
@example(flags={"--epochs": "1", "--batch-size": "7", "--attack-steps": "0", "--limit-train": "2",  # empty list
                "--val-size": "0", "--eval-n": "1", "--milestones": ""})
@example(flags={"--epochs": "1", "--batch-size": "32", "--attack-steps": "1", "--limit-train": "120",
                "--val-size": "20", "--eval-n": "20", "--method": "arow", "--lam": "3.5", "--smoothing": "0.2",
                "--schedule": "step", "--milestones": "0.5", "--swa-start": "1"})
@example(flags={"--epochs": "1", "--batch-size": "7", "--attack-steps": "1", "--limit-train": "60",
                "--val-size": "5", "--eval-n": "1", "--method": "trades", "--beta": "6", "--eps": "0"})
@example(flags={"--epochs": "1", "--batch-size": "32", "--attack-steps": "1", "--limit-train": "120",
                "--val-size": "20", "--eval-n": "20", "--method": "arow", "--beta": "6"})
@example(flags={"--epochs": "1", "--batch-size": "32", "--attack-steps": "1", "--limit-train": "120",
                "--val-size": "20", "--eval-n": "20", "--eps": "nan", "--lr": "inf"})
@example(flags={"--epochs": "0", "--batch-size": "0", "--attack-steps": "-1", "--limit-train": "0",
                "--val-size": "-1", "--eval-n": "0", "--schedule": "bogus"})
def test_train_flags_train_or_fail_with_one_line(flags):
    want = expected(flags)
    out_dir = tempfile.mkdtemp(prefix="arow-prop-")
    argv = ["train", *[f"{k}={v}" for k, v in flags.items()], "--eval-attacks", "clean", "--no-guards",
            "--out", str(Path(out_dir) / "run")]
    cmd = "arow " + " ".join(argv)
    try:
        status, stdout, stderr, exc = run_cli(argv)
        if exc is not None:
            tb = "".join(traceback.format_exception(exc))
            pytest.fail(f"{cmd}\nraised instead of a one-line error (a traceback for the user):\n{tb[-3000:]}")
        assert "Traceback" not in stderr and "Traceback" not in stdout, f"{cmd}\n{stderr[-3000:]}"
        assert status in (0, 2), f"{cmd}: exit status {status}\n{stderr[-3000:]}"
        errors = [l for l in stderr.splitlines() if l.startswith("arow: error:")]
        if want == "usage":
            assert status == 2 and "usage:" in stderr and "error:" in stderr, f"{cmd}: expected argparse to refuse it\n{stderr[-2000:]}"
        elif want == "error":
            assert status == 2, f"{cmd}: invalid flags accepted (exit {status}); expected one 'arow: error:' line"
            assert len(errors) == 1, f"{cmd}: {len(errors)} 'arow: error:' lines\n{stderr[-2000:]}"
            assert len(errors[0]) > len("arow: error: ") + 10, f"{cmd}: empty error message {errors[0]!r}"
        else:
            assert status == 0, f"{cmd}: a valid combination was refused (exit {status}):\n" + "\n".join(errors or [stderr[-2000:]])
            assert not errors, f"{cmd}: succeeded but printed {errors}"
            run = Path(out_dir) / "run"
            assert [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1]
            assert (run / "final.pt").is_file() and (run / "last.pt").is_file()
            n = min(int(flags["--eval-n"]), 10_000)
            ev = json.loads((run / f"eval_n{n}.json").read_text())
            assert ev["n"] == n and set(ev["accuracy"]) == {"clean", "worst_case"}
            assert 0.0 <= ev["accuracy"]["clean"] <= 1.0
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def test_oracle_knows_the_rules():
    """The oracle itself, on hand-picked cases (so a wrong oracle cannot hide a wrong CLI)."""
    base = {"--epochs": "1", "--batch-size": "7", "--attack-steps": "1", "--limit-train": "60",
            "--val-size": "5", "--eval-n": "1"}
    assert expected(base) == "ok"
    assert expected({**base, "--eps": "nan"}) == "error"
    assert expected({**base, "--eps": "1e9"}) == "error"
    assert expected({**base, "--lr": "0"}) == "error"
    assert expected({**base, "--beta": "6"}) == "error"                       # arow is the default method
    assert expected({**base, "--method": "trades", "--beta": "6"}) == "ok"
    assert expected({**base, "--method": "trades", "--lam": "1"}) == "error"
    assert expected({**base, "--smoothing": "1"}) == "error"
    assert expected({**base, "--warmup-epochs": "1"}) == "error"              # must be < epochs
    assert expected({**base, "--swa-start": "0"}) == "ok"                     # 0 turns SWA off
    assert expected({**base, "--swa-start": "2"}) == "error"
    assert expected({**base, "--milestones": "0.5,2"}) == "error"            # fractions and epochs mixed
    assert expected({**base, "--milestones": "abc"}) == "usage"
    assert expected({**base, "--schedule": "bogus", "--eps": "nan"}) == "usage"


def test_tiny_warmup_never_exceeds_the_peak_lr():
    from arow.config.schema import TrainConfig
    from arow.training.trainer import lr_at

    for w in (1e-4, 1e-320):
        cfg = TrainConfig(lr=0.05, warmup_epochs=w, epochs=1)
        peak = max(lr_at(cfg, t) for t in (0.0, w / 2, w, 0.5))
        assert peak <= cfg.lr, f"--warmup-epochs {w}: learning rate {peak} above --lr {cfg.lr}"
    out_dir = tempfile.mkdtemp(prefix="arow-prop-")
    try:  # the same through the command line: a valid flag must train (exit 0), not diverge (exit 4)
        status, _, stderr, exc = run_cli(["train", "--epochs=1", "--batch-size=7", "--attack-steps=1",
                                          "--limit-train=60", "--val-size=5", "--eval-n=1", "--lr=0.05",
                                          "--warmup-epochs=1e-320", "--eval-attacks", "clean", "--no-guards",
                                          "--out", str(Path(out_dir) / "run")])
        assert exc is None and status == 0, f"exit {status}: {stderr[-500:]}"
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
