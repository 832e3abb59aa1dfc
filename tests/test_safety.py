"""Files from strangers never run code; a run survives divergence, kills, damaged files and a second writer."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arow.runs.checkpoint import CheckpointError, append_line, atomic_save, atomic_write_text, dump_json

from arow.runs.records import convert_checkpoint, load_checkpoint
from arow.config.schema import ConfigError, TrainConfig
from arow.data import from_tensors
from arow.methods import METHODS
from arow.runs.rundir import RunDir, RunLockedError
from arow.pipelines import build_trainer
from arow.training.errors import TrainingDiverged

from conftest import fmnist_available, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed "
                                  "(apt-get install dataset-fashion-mnist)")
pytestmark = pytest.mark.usefixtures("one_thread")


def arow(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "arow", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


class Payload:
    """Unpickling this object creates ``marker``: what a malicious checkpoint would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _small(fmnist_small):
    xtr, ytr, _, _ = fmnist_small
    return (from_tensors(xtr[:128], ytr[:128], name="fashion-mnist"),
            from_tensors(xtr[1000:1040], ytr[1000:1040], name="fashion-mnist"))


def _cfg(out, **kw):
    base = dict(method="arow", epochs=2, batch_size=64, lr=0.05, eps=0.1, attack_steps=1, schedule="constant",
                warmup_epochs=0, seed=1, out=str(out), val_attack="pgd2")
    base.update(kw)
    return TrainConfig(**base)


def _spec():
    return {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None, "std": None,
            "dataset": "fashion-mnist"}


def _train(cfg, data, val, **kw):
    from arow.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    return build_trainer(cfg, model, data, val, model_spec=_spec(), **kw).fit()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, fmnist_small):
    """A finished 2-epoch run of the small CNN (run folder as `arow train` writes it)."""
    out = tmp_path_factory.mktemp("runs") / "ok"
    data, val = _small(fmnist_small)
    _train(_cfg(out), data, val)
    return out


# --------------------------------------------------------------------------- no code from files
def _payload_checkpoint(path, marker):
    torch.save({"model": {"w": torch.zeros(1)}, "model_spec": {"name": "small-cnn"}, "x": Payload(marker)}, path)


@pytest.mark.parametrize("kind", ["torch", "plain-pickle"])
def test_a_checkpoint_with_a_payload_is_refused_without_running_it(tmp_path, kind):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pt"
    if kind == "torch":
        _payload_checkpoint(path, marker)
    else:
        path.write_bytes(pickle.dumps({"model": {}, "model_spec": {}, "x": Payload(marker)}))
    with pytest.raises(CheckpointError, match="convert --trust-pickle" if kind == "torch" else "refused: a bare pickle"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_bare_pickle_checkpoint_is_refused_in_one_line_and_converts_when_trusted(tmp_path, recwarn):
    path = tmp_path / "shared.pt"
    state = {"model": {"w": torch.ones(2)}, "model_spec": _spec(), "config": {"method": "trades"}}
    path.write_bytes(pickle.dumps(state, protocol=4))  # pickle.dump, not torch.save
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "refused" in msg and f"arow convert --trust-pickle {path}" in msg and "damaged" not in msg
    assert not [w for w in recwarn.list if "pickle" in str(w.message)], "no torch warning before the one line"
    r = arow("eval", str(path), "--n", "5")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "refused" in r.stderr
    convert_checkpoint(path, trust_pickle=True)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_every_entry_point_refuses_a_payload(tmp_path, run_folder):
    """eval FILE, eval DIR, load_model, train --resume, plot --eps-curve, HAT --helper."""
    import shutil

    import arow as arow_pkg
    from arow.methods.hat import load_helper

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    _payload_checkpoint(evil, marker)
    folder = tmp_path / "run"
    shutil.copytree(run_folder, folder)
    for name in ("final.pt", "last.pt", "best.pt"):
        shutil.copy(evil, folder / name)
    (folder / "last.prev.pt").unlink(missing_ok=True)
    for args in (["eval", str(evil)], ["eval", str(folder)], ["train", "--resume", "--out", str(folder)],
                 ["plot", str(folder), "--eps-curve", "--n", "10"]):
        r = arow(*args)
        assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    with pytest.raises(CheckpointError):
        arow_pkg.load_model(folder)
    with pytest.raises(CheckpointError, match="HAT --helper"):
        load_helper(folder)
    assert not marker.exists()


def test_checkpoints_hold_plain_values_only(run_folder):
    for name in ("last.pt", "best.pt", "final.pt"):
        ckpt = torch.load(run_folder / name, weights_only=True)  # raises on anything but plain values
        assert ckpt["epoch"] == 2 and "model" in ckpt


def test_a_checkpoint_of_arow_0_1_still_loads_and_converts(tmp_path, run_folder):
    old = torch.load(run_folder / "last.pt", weights_only=True)
    old["rng"]["numpy"] = np.random.get_state()  # as arow 0.1.0 stored it: a numpy array inside
    torch.save(old, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["epoch"] == 2  # numpy arrays allowed, nothing else
    # an explicit conversion rewrites it as plain values
    with pytest.raises(CheckpointError, match="trust-pickle"):  # the API, too, needs the explicit consent
        convert_checkpoint(tmp_path / "old.pt")
    convert_checkpoint(tmp_path / "old.pt", trust_pickle=True)
    new = torch.load(tmp_path / "old.pt", weights_only=True)
    assert isinstance(new["rng"]["numpy"], dict)
    assert torch.equal(new["rng"]["numpy"]["keys"], torch.from_numpy(old["rng"]["numpy"][1].astype(np.int64)))


def test_convert_needs_the_explicit_trust_flag(tmp_path):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pt"
    _payload_checkpoint(path, marker)
    r = arow("convert", str(path))
    assert r.returncode == 2 and "--trust-pickle" in r.stderr and not marker.exists()


def test_export_to_safetensors_loads_and_evaluates(tmp_path, run_folder):
    import arow as arow_pkg

    out = tmp_path / "model.safetensors"
    r = arow("export", str(run_folder), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert not out.read_bytes().startswith(b"PK") and b"\x80" not in out.read_bytes()[:8]  # not a zip/pickle
    m1, m2 = arow_pkg.load_model(run_folder), arow_pkg.load_model(out)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(m1(x), m2(x))
    if fmnist_available():
        r = arow("eval", str(out), "--attacks", "clean", "--n", "20", "--no-guards")
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "eval_model_n20.json").is_file()


def test_a_foreign_safetensors_file_is_refused_with_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="arow's model header"):
        load_checkpoint(tmp_path / "w.safetensors")


def _export_with(path, header=None, weights=None, raw_header=None):
    """An arow export of a small CNN whose header and weights are changed as given."""
    from safetensors.torch import save_file

    from arow.models import build_model
    from arow.runs.checkpoint import EXPORT_FORMAT

    state = dict(weights or build_model("small-cnn", num_classes=10, in_channels=1, image_size=28).state_dict())
    info = {"model_spec": _spec(), "threat": {"norm": "linf", "eps": 0.1, "steps": 10, "step": 0.025},
            "config": {"method": "arow", "dataset": "fashion-mnist"}, "version": "0.4.2"}
    info.update(header or {})
    meta = {"format": EXPORT_FORMAT, "arow": raw_header if raw_header is not None else json.dumps(info)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("header,raw,needle", [
    ({"threat": {"norm": "linf", "eps": 5}}, None, "header eps must be in (0, 1] for --norm linf, got 5"),
    ({"threat": {"norm": "linf", "eps": 0}}, None, "header eps must be in (0, 1]"),
    ({"threat": {"norm": "l2", "eps": 1e308}}, None, "header eps must be in (0, 28] for --norm l2"),
    ({"threat": {"norm": "linf", "eps": "0.1"}}, None, "header eps must be a finite number"),
    ({"threat": {"norm": "l3", "eps": 0.1}}, None, "header norm must be one of linf, l2"),
    ({"threat": [0.1]}, None, "header 'threat' must be a JSON object"),
    (None, "[1, 2]", "the arow header must be a JSON object, got list"),
    ({"model_spec": "small-cnn"}, None, "model spec: expected a mapping"),
    ({"model_spec": {**_spec(), "num_classes": "ten"}}, None, "'num_classes' must be an integer"),
])
def test_an_export_header_is_checked_like_flags(tmp_path, header, raw, needle):
    import arow as arow_pkg

    path = _export_with(tmp_path / "bad.safetensors", header, raw_header=raw)
    for load in (load_checkpoint, arow_pkg.load_model):
        with pytest.raises(CheckpointError) as e:
            load(path)
        assert str(path) in str(e.value) and needle in str(e.value), str(e.value)
    r = arow("eval", str(path), "--n", "10")
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.float64])
def test_export_weights_of_other_dtypes_are_refused(tmp_path, dtype):
    from arow.models import build_model

    state = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28).state_dict()
    key = next(iter(state))
    state[key] = state[key].to(dtype)
    path = _export_with(tmp_path / "odd.safetensors", weights=state)
    with pytest.raises(CheckpointError, match=rf"{path}: tensor '{key}' is \w+; an arow export holds float32"):
        load_checkpoint(path)
    ok = _export_with(tmp_path / "ok.safetensors", weights={k: v.to(torch.bfloat16) for k, v in state.items()
                                                               if k != key})
    with pytest.raises(CheckpointError, match="do not fit"):  # bfloat16 passes the header check
        import arow as arow_pkg
        arow_pkg.load_model(ok)


# --------------------------------------------------------------------------- writes
def test_appends_never_follow_a_planted_symlink(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        append_line(tmp_path / "run" / "metrics.jsonl", "{}")
    assert target.read_text() == "keep\n"


def test_a_run_replaces_planted_links_instead_of_writing_through_them(tmp_path, fmnist_small):
    data, val = _small(fmnist_small)
    out = tmp_path / "run"
    out.mkdir()
    victims = {}
    for name in ("metrics.jsonl", "config.json", "last.pt", "curves.png"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("keep")
        (out / name).symlink_to(victims[name])
    (out / "last.pt").unlink()  # a planted last.pt would be a run to resume; the others must not matter
    _train(_cfg(out, epochs=1), data, val)
    assert all(v.read_text() == "keep" for v in victims.values())
    assert not (out / "metrics.jsonl").is_symlink() and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_planted_eval_state_link_is_not_followed(tmp_path, run_folder, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    shutil.rmtree(run / "eval_state", ignore_errors=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    (run / "eval_state").symlink_to(victim, target_is_directory=True)
    from arow.pipelines import evaluate_run

    rep = evaluate_run(run, ["clean", "pgd2"], n=20, guards=False, device="cpu")
    assert "pgd2" in rep.accuracy
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"], "state written through the link"
    assert "symbolic link" in caplog.text and (run / "eval_state").is_symlink()


def test_a_preset_that_is_not_utf8_is_named_in_its_one_line(tmp_path):
    from arow.config import load_preset

    for name, what in (("recipe.yaml", "preset file"), ("config.json", "config file")):
        path = tmp_path / name
        path.write_bytes(b"epochs: 1\n# caf\xe9\n" if name.endswith("yaml") else b'{"epochs": "\xff"}')
        with pytest.raises(ConfigError, match=rf"{what} .*{name} is not UTF-8 text") as e:
            load_preset(str(path))
        assert "\n" not in str(e.value)
        r = arow("train", "--preset", str(path), "--print-config")
        assert r.returncode == 2 and str(path) in r.stderr and r.stderr.strip().count("\n") == 0


def test_failed_atomic_writes_leave_no_temporary_file(tmp_path, monkeypatch):
    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text("x", tmp_path / "a.json")
    with pytest.raises(OSError):
        atomic_save({"a": 1}, tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_temporary_files_of_a_killed_write_are_removed_when_the_folder_is_taken(tmp_path):
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    run = RunDir(tmp_path)
    run.lock()
    try:
        assert not (tmp_path / ".last.pt.abc123.tmp").exists()
    finally:
        run.unlock()


def test_json_written_by_arow_is_valid_json():
    text = dump_json({"a": float("nan"), "b": [float("inf"), 1.5]})
    assert json.loads(text) == {"a": None, "b": [None, 1.5]}
    assert "NaN" not in text and "Infinity" not in text


# --------------------------------------------------------------------------- faults
class NanOnce(METHODS.get("arow")):
    """ARoW whose loss is NaN at epoch 2, step 2, the first time only (a one-off blow-up)."""

    fired = False

    def set_epoch(self, epoch, total_epochs):
        super().set_epoch(epoch, total_epochs)
        self.calls = 0

    def objective(self, model, x, y, adv):
        out = super().objective(model, x, y, adv)
        self.calls += 1
        if self.epoch == 1 and self.calls == 2 and not NanOnce.fired:
            NanOnce.fired = True
            out.loss = out.loss * float("nan")
        return out


def test_divergence_stops_at_that_step_and_keeps_earlier_checkpoints(tmp_path, fmnist_small):
    from arow.threat import ThreatModel

    data, val = _small(fmnist_small)
    out = tmp_path / "run"
    NanOnce.fired = False
    method = lambda: NanOnce(ThreatModel(eps=0.1, steps=1))  # noqa: E731
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2.*last\.pt \(epoch 1\).*smaller --lr"):
        _train(_cfg(out, epochs=3), data, val, method=method())
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert load_checkpoint(out / "best.pt")["epoch"] == 1 and not (out / "final.pt").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "diverged.json").read_text())["epoch"] == 2
    # the same lr is refused; only lr may change; a smaller lr continues from the last good checkpoint
    with pytest.raises(ConfigError, match="smaller --lr"):
        _train(_cfg(out, epochs=3), data, val, resume=True, method=method())
    with pytest.raises(ConfigError, match="seed"):
        _train(_cfg(out, epochs=3, lr=0.01, seed=5), data, val, resume=True, method=method())
    res = _train(_cfg(out, epochs=3, lr=0.01), data, val, resume=True, method=method())
    assert [r["epoch"] for r in res.history] == [1, 2, 3] and not (out / "diverged.json").exists()
    assert load_checkpoint(out / "final.pt")["epoch"] == 3


def test_divergence_with_a_huge_learning_rate_exits_4_with_one_line(tmp_path):
    if not fmnist_available():
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path / "run"
    r = arow("train", "--lr", "100", "--epochs", "2", "--limit-train", "300", "--val-size", "50",
             "--attack-steps", "1", "--batch-size", "50", "--warmup-epochs", "0", "--schedule", "constant",
             "--out", str(out))
    assert r.returncode == 4, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("arow: error: training diverged at epoch")
    assert "Traceback" not in r.stderr and not (out / "final.pt").exists()
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            assert all(torch.isfinite(v).all() for v in load_checkpoint(out / name)["model"].values())


def test_best_is_written_before_last(tmp_path, fmnist_small, monkeypatch):
    import arow.runs.rundir as runs

    data, val = _small(fmnist_small)
    order = []
    real = runs.atomic_save
    monkeypatch.setattr(runs, "atomic_save", lambda obj, path: (order.append(Path(path).name), real(obj, path)))
    _train(_cfg(tmp_path / "run", epochs=1), data, val)
    assert order[:2] == ["best.pt", "last.pt"]


def test_a_run_killed_before_its_first_checkpoint_starts_clean(tmp_path, fmnist_small, monkeypatch):
    data, val = _small(fmnist_small)
    out = tmp_path / "run"

    def killed(self, ckpt, best=None):
        raise KeyboardInterrupt  # after metrics.jsonl got its line, before any checkpoint

    with monkeypatch.context() as m:
        m.setattr(RunDir, "save_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            _train(_cfg(out, epochs=1), data, val)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    _train(_cfg(out, epochs=1), data, val)  # the same command again: no --resume needed, nothing to resume
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(v)["epoch"] for v in lines] == [1]


def test_resume_cannot_shrink_a_finished_run(tmp_path, run_folder, fmnist_small):
    import shutil

    data, val = _small(fmnist_small)
    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        _train(_cfg(out, epochs=1), data, val, resume=True)


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, fmnist_small):
    data, val = _small(fmnist_small)
    out = tmp_path / "run"
    from arow.models import build_model

    from arow.training.callbacks import Callbacks

    class SecondWriter(Callbacks):  # while the first run trains, a second one tries the same folder
        refused = None

        def on_epoch_end(self, record):
            with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()} on ") as e:
                second = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
                build_trainer(_cfg(out, epochs=1), second, data, val, model_spec=_spec(), resume=True).fit()
            SecondWriter.refused = str(e.value)

    torch.manual_seed(1)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    build_trainer(_cfg(out, epochs=1), model, data, val, model_spec=_spec(), callbacks=[SecondWriter()]).fit()
    assert SecondWriter.refused is not None
    # a lock file left by a killed process (its flock died with it) is taken over
    (out / ".lock").write_text("pid 999999 on elsewhere since yesterday\n")
    _train(_cfg(out, epochs=2), data, val, resume=True)
    assert load_checkpoint(out / "final.pt")["epoch"] == 2


def test_two_processes_on_one_folder(tmp_path):
    """A live `arow train` holds its folder: a second one exits 2 naming the first's pid."""
    if not fmnist_available():
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path / "run"
    code = ("import sys, time; sys.path.insert(0, %r); from arow.runs.rundir import RunDir; r = RunDir(%r); r.lock(); "
            "print('locked', flush=True); time.sleep(60)") % (str(ROOT / "src"), str(out))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = arow("train", "--epochs", "1", "--limit-train", "100", "--val-size", "20", "--out", str(out))
        assert r.returncode == 2 and f"in use by pid {holder.pid}" in r.stderr, r.stderr
        assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, fmnist_small, caplog):
    data, val = _small(fmnist_small)
    ref = _train(_cfg(tmp_path / "ref", epochs=3), data, val)
    out = tmp_path / "run"
    _train(_cfg(out, epochs=2), data, val)
    assert load_checkpoint(out / "last.prev.pt")["epoch"] == 1
    blob = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(blob[: len(blob) // 2])  # truncated, as by a full disk
    with caplog.at_level("WARNING"):
        res = _train(_cfg(out, epochs=3), data, val, resume=True)
    assert "previous checkpoint last.prev.pt (epoch 1)" in caplog.text
    for a, b in zip(ref.model.state_dict().values(), res.model.state_dict().values()):
        assert torch.equal(a, b)
    # with no earlier checkpoint left it says so instead of starting over
    (out / "last.prev.pt").unlink()
    (out / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no earlier checkpoint"):
        _train(_cfg(out, epochs=4), data, val, resume=True)


# --------------------------------------------------------------------------- one line for bad input
@pytest.mark.parametrize("flags,needle", [
    (["--eps", "inf"], "--eps must be a finite number"),
    (["--eps", "1e9"], "--eps must be in [0, 1]"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--step-size", "inf"], "--step-size must be a finite number"),
    (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--lam", "nan"], "lam must be a finite number"),
    (["--resume", "--preset", "fmnist-arow"], "--preset cannot be combined with --resume"),
    (["--val-attack", "pgd99999999999999999999"], "steps must be in [1, 10000]"),
    (["--eval-attacks", "clean,pgd20r5000"], "restarts must be in [1, 1000]"),
])
def test_bad_numbers_are_refused_before_training(tmp_path, flags, needle):
    r = arow("train", "--limit-train", "100", "--val-size", "20", "--out", str(tmp_path / "o"), *flags)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def _preset(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("make_args,needle", [
    (lambda t, run: ["train", "--out", str(t / "file")], "is a file"),
    (lambda t, run: ["eval", str(run), "--n", "10", "--json", str(t)], "is a folder"),
    (lambda t, run: ["eval", str(run), "--n", "10", "--json", "/proc/no/such/dir/e.json"], "--json"),
    (lambda t, run: ["eval", str(run), "--n", "10", "--dataset", "cifar10"], "does not fit the model"),
    (lambda t, run: ["report", str(run), "--out", "/proc/report.md"], "arow: error:"),
    (lambda t, run: ["train", "--preset", _preset(t, "method_args:\n  lam: abc\n"), "--limit-train", "100",
                     "--out", str(t / "o")], "lam must be a number"),
    (lambda t, run: ["train", "--preset", _preset(t, "method_args:\n  lamda: 3\n"), "--out", str(t / "o")],
     "unknown hyper-parameter(s) lamda"),
    (lambda t, run: ["train", "--preset", _preset(t, "epochs: 1\nepochs: 2\n"), "--out", str(t / "o")],
     "duplicate key 'epochs'"),
])
def test_bad_input_is_one_line_not_a_traceback(tmp_path, run_folder, make_args, needle):
    (tmp_path / "file").write_text("not a folder")
    r = arow(*make_args(tmp_path, run_folder))
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_checkpoint_that_does_not_fit_its_spec_is_one_line(tmp_path, run_folder):
    ckpt = torch.load(run_folder / "final.pt", weights_only=True)
    ckpt["model_spec"]["num_classes"] = 7
    torch.save(ckpt, tmp_path / "bad.pt")
    r = arow("eval", str(tmp_path / "bad.pt"), "--n", "10", "--dataset", "fashion-mnist")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_report_and_plot_on_malformed_files_are_one_line(tmp_path, run_folder):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    (out / "eval.json").write_text('{"accuracy": "abc", "n": "x"}')
    for cmd in ("report", "plot"):
        r = arow(cmd, str(out), *(["--out", str(tmp_path / "r.md")] if cmd == "report" else []))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (cmd, r.stderr)
    (out / "eval.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": "three", "lr": null}\n')
    for cmd in ("report", "plot"):
        r = arow(cmd, str(out), *(["--out", str(tmp_path / "r.md")] if cmd == "report" else []))
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr, (cmd, r.stderr)


@needs_fmnist
def test_damaged_test_files_are_noticed_before_training(tmp_path):
    import shutil

    from conftest import FMNIST

    data = tmp_path / "data"
    data.mkdir()
    for f in FMNIST.glob("train-*-ubyte.gz"):
        shutil.copy(f, data / f.name)
    (data / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    shutil.copy(FMNIST / "t10k-labels-idx1-ubyte.gz", data)
    r = arow("train", "--data-dir", str(data), "--limit-train", "100", "--val-size", "20", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "t10k-images" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@needs_fmnist
def test_eval_checks_its_output_before_evaluating_and_keeps_subsets_apart(tmp_path, run_folder):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_folder, out)
    r = arow("eval", str(out), "--attacks", "clean", "--n", "20", "--no-guards")
    assert r.returncode == 0, r.stderr
    assert (out / "eval_n20.json").is_file() and not (out / "eval.json").exists()


def test_validation_with_clean_accuracy_only(tmp_path, fmnist_small):
    data, val = _small(fmnist_small)
    res = _train(_cfg(tmp_path / "run", epochs=1, val_attack="clean"), data, val)
    assert res.history[0]["val_pgd_acc"] == res.history[0]["val_clean_acc"]


def test_a_run_folder_of_arow_0_1_resumes(tmp_path, run_folder, fmnist_small):
    """0.1.0 saved numpy's RNG state as an array and left derived defaults unset in the config."""
    import shutil

    out = tmp_path / "old"
    shutil.copytree(run_folder, out)
    for name in ("last.pt", "last.prev.pt"):
        old = torch.load(out / name, weights_only=True)
        old["rng"]["numpy"] = np.random.get_state()
        old["config"]["eps"] = None  # 0.1.0 kept a default eps unset (the data set's 0.1 here)
        for key in ("eval_attacks", "eval_n", "guards"):  # fields 0.1.0 did not have
            old["config"].pop(key, None)
        torch.save(old, out / name)
    data, val = _small(fmnist_small)
    res = _train(_cfg(out, epochs=3), data, val, resume=True)
    assert [r["epoch"] for r in res.history] == [1, 2, 3]
