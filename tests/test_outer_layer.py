"""The layer around the training loop: run folder, config resolution, callbacks, progress, pipelines."""
import json
import logging

import pytest
import torch

from arow.training.callbacks import Callbacks
from arow.config import ConfigError, TrainConfig, method_flags, resolve_config
from arow.data import from_tensors
from arow.pipelines import build_trainer
from arow.runs.rundir import RunDir, RunFolderError
from arow.training.trainer import Trainer

from conftest import fmnist_available, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return from_tensors(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def _cfg(out, **kw):
    base = dict(epochs=2, batch_size=32, lr=0.05, eps=0.1, attack_steps=1, val_attack="pgd2", schedule="constant",
                warmup_epochs=0, out=str(out) if out else None)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- the run folder
def test_rundir_resolves_checkpoints_and_separates_subset_evaluations(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(ValueError, match="no final.pt"):
        run.checkpoint("final")
    (tmp_path / "last.pt").write_bytes(b"x")
    assert run.checkpoint("final").name == "last.pt"  # an unfinished run reports its latest epoch
    (tmp_path / "final.pt").write_bytes(b"x")
    assert run.checkpoint("final").name == "final.pt" and run.has_checkpoint()
    assert run.eval_path("final", 10000, 10000).name == "eval.json"
    assert run.eval_path("final", 100, 10000).name == "eval_n100.json"
    assert run.eval_path("best", 10000, 10000).name == "eval_best.json"


def test_rundir_reads_what_it_writes_and_refuses_malformed_files(tmp_path):
    run = RunDir(tmp_path)
    run.write_config({"method": "arow", "eps": float("nan")})
    assert run.read_config() == {"method": "arow", "eps": None}  # valid JSON: NaN is written as null
    run.write_metrics([{"epoch": 1, "loss": 0.5}])
    run.append_metrics({"epoch": 2, "loss": float("inf")})
    assert run.read_metrics() == [{"epoch": 1, "loss": 0.5}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": "two"}\n')
    with pytest.raises(RunFolderError, match="line 1"):
        run.read_metrics()
    (tmp_path / "eval.json").write_text('{"accuracy": {"clean": "high"}}')
    with pytest.raises(RunFolderError, match="not numbers"):
        run.read_eval()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="no config.json"):
        RunDir(tmp_path / "empty").read_config()


# --------------------------------------------------------------------------- config resolution
def test_resolution_precedence_defaults_preset_resumed_run_flags(tmp_path, fmnist_small):
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 7\nlr: 0.02\nmethod_args: {lam: 2.0}\n")
    cfg = resolve_config({"lr": 0.03}, {}, preset=str(preset))
    assert (cfg.epochs, cfg.lr, cfg.method_args, cfg.batch_size) == (7, 0.03, {"lam": 2.0}, 128)
    assert cfg.augment == "flip" and cfg.out == "runs/fashion-mnist-arow-small-cnn-s0"  # dataset defaults
    # a resumed run's saved config beats the preset's defaults; flags given now still override it
    out = tmp_path / "run"
    build_trainer(_cfg(out, epochs=1, seed=4), tiny_cnn(), _data()).fit()
    cfg = resolve_config({"out": str(out), "epochs": 3}, {}, resume=True)
    assert (cfg.seed, cfg.epochs, cfg.batch_size) == (4, 3, 32)
    with pytest.raises(ConfigError, match="--preset cannot be combined with --resume"):
        resolve_config({"out": str(out)}, {}, preset=str(preset), resume=True)
    # a run replays from its own config.json
    replay = resolve_config({"out": str(tmp_path / "again")}, {}, preset=str(out / "config.json"))
    assert (replay.seed, replay.batch_size, replay.epochs) == (4, 32, 1)


def test_method_flags_mean_one_thing():
    table = method_flags()
    assert table["arow_lam"] == {"arow": "lam", "arow-awp": "lam"}
    assert table["mart_lam"] == {"mart": "lam", "mart-awp": "lam"}
    assert set(table["trades_beta"]) == {"trades", "trades-awp"} and table["hat_beta"] == {"hat": "beta"}
    assert "smoothing_arow" not in table and "arow_smoothing" not in table  # unshared names keep their own
    assert resolve_config({"method": "mart"}, {"mart_lam": 3.0}).method_args == {"lam": 3.0}
    assert resolve_config({"method": "arow"}, {"lam": 2.0}).method_args == {"lam": 2.0}
    with pytest.raises(ConfigError, match="--mart-lam does not apply to method 'arow'"):
        resolve_config({"method": "arow"}, {"mart_lam": 3.0})


def test_every_config_field_is_a_flag_of_arow_train():
    from arow.cli.commands import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        if f.name != "method_args":
            assert "--" + f.name.replace("_", "-") in text, f.name
    for group in ("method", "data", "model", "optimisation", "attack", "evaluation", "runtime"):
        assert f"{group} options" in text


def test_config_types_come_from_type_hints():
    assert TrainConfig.from_dict({"swa_start": None, "eps": 1, "milestones": [1, 2]}).eps == 1.0
    with pytest.raises(ConfigError, match="expected int"):
        TrainConfig.from_dict({"epochs": 2.5})
    with pytest.raises(ConfigError, match="expected a list of numbers"):
        TrainConfig.from_dict({"milestones": "60,100"})


def test_preset_milestones_follow_a_shorter_run():
    from arow.config import load_preset

    cfg = TrainConfig.from_dict({k: v for k, v in load_preset("cifar10-resnet18").items()})
    assert cfg.milestone_epochs() == [60.0, 100.0]
    assert TrainConfig.from_dict({**load_preset("cifar10-resnet18"), "epochs": 12, "swa_start": None}
                                 ).milestone_epochs() == [6.0, 10.0]


# --------------------------------------------------------------------------- callbacks
def test_callbacks_see_the_fit_in_order_and_the_writer_comes_first(tmp_path):
    events = []

    class Record(Callbacks):
        def on_fit_start(self, trainer):
            super().on_fit_start(trainer)
            events.append("start")

        def on_epoch_start(self, epoch, epochs, steps):
            events.append(f"epoch{epoch}")

        def on_validation_start(self):
            events.append("val")

        def on_epoch_end(self, record):
            assert (tmp_path / "run" / "last.pt").is_file()  # the run folder is written before us
            events.append(f"end{record['epoch']}")

        def on_fit_end(self, result):
            events.append("fit_end")

        def close(self, error=None):
            events.append(f"close:{type(error).__name__}")

    build_trainer(_cfg(tmp_path / "run"), tiny_cnn(), _data(), _data(32, 1), callbacks=[Record()]).fit()
    assert events == ["start", "epoch0", "val", "end1", "epoch1", "val", "end2", "fit_end", "close:NoneType"]


def test_the_constructor_writes_nothing(tmp_path):
    Trainer(_cfg(tmp_path / "run"), tiny_cnn(), _data())
    build_trainer(_cfg(tmp_path / "run"), tiny_cnn(), _data())
    assert not (tmp_path / "run").exists()


def test_resume_is_load_state_dict(tmp_path):
    a = Trainer(_cfg(None, epochs=1), tiny_cnn(), _data())
    a.fit()
    b = Trainer(_cfg(None, epochs=2), tiny_cnn(), _data())
    b.load_state_dict(a.state_dict())
    assert b.start_epoch == 1 and b.history == a.history
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


# --------------------------------------------------------------------------- progress
def test_progress_without_a_terminal_prints_plain_lines(caplog, monkeypatch):
    from arow.cli import progress

    clock = iter(range(0, 1000, 40))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    p = progress.Progress(interval=30, tty=False)
    with caplog.at_level(logging.INFO, logger="arow"):
        p.on_epoch_start(0, 3, 10)
        for step in range(3):
            p.on_step(step)
        p.eval_progress("autoattack", 50, 200)
    assert "epoch 1/3: 1/10 batches (10%)" in caplog.text and "epoch 1/3: 3/10 batches (30%)" in caplog.text
    assert "eval autoattack: 50/200 images (25%)" in caplog.text


# --------------------------------------------------------------------------- pipelines
def test_evaluate_run_reports_whether_the_guards_ran(tmp_path):
    from arow.models import build_model
    from arow.pipelines import evaluate_run

    out = tmp_path / "run"
    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None, "std": None,
            "dataset": "fashion-mnist"}
    torch.manual_seed(0)
    build_trainer(_cfg(out, epochs=1), build_model("small-cnn", num_classes=10, in_channels=1, image_size=28),
                  _data(), model_spec=spec, plots=False).fit()
    test = _data(40, 3)
    rep = evaluate_run(out, ["clean", "pgd2"], data=test, guards=False)
    assert not rep.guards_ran and rep.path.name == "eval.json"
    saved = json.loads(rep.path.read_text())
    assert saved["guards_ran"] is False and saved["accuracy"] == pytest.approx(rep.accuracy)
    rep = evaluate_run(out, ["clean"], data=test, n=20, guards=True, guards_n=10, allow_guard_failures=True)
    assert rep.guards_ran and rep.path.name == "eval_n20.json" and len(rep.guards) >= 6
    assert json.loads(rep.path.read_text())["guards_subset"]["n"] == 10


# --------------------------------------------------------------------------- mixed precision decision
@pytest.mark.parametrize("avx512_bf16,amx,expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_native_bf16_is_asked_of_cpuid(monkeypatch, avx512_bf16, amx, expected):
    import torch.cpu as tcpu

    from arow.training import runtime

    monkeypatch.setattr(tcpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(tcpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert runtime.cpu_native_bf16() is expected


@pytest.mark.parametrize("flags,expected", [("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                                            ("fpu avx512f avx512bw", False)])
def test_native_bf16_falls_back_to_the_cpuinfo_flags(monkeypatch, tmp_path, flags, expected):
    import torch.cpu as tcpu

    from arow.training import runtime

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(tcpu, name, raising=False)
    real = runtime.Path
    fake = tmp_path / "cpuinfo"
    fake.write_text(f"processor : 0\nflags : {flags}\n")
    monkeypatch.setattr(runtime, "Path", lambda p: fake if p == "/proc/cpuinfo" else real(p))
    assert runtime.cpu_native_bf16() is expected


@pytest.mark.parametrize("native,switch,expected", [(True, True, True), (False, True, False), (True, False, False)])
def test_amp_auto_on_the_cpu(monkeypatch, native, switch, expected):
    from arow.training import runtime

    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: native)
    monkeypatch.setattr(runtime, "AUTO_BF16_ON_CPU", switch)
    assert runtime.use_amp("auto", torch.device("cpu")) is expected
    assert runtime.use_amp("auto", torch.device("cuda")) is True
    assert runtime.use_amp("off", torch.device("cuda")) is False and runtime.use_amp("bf16", torch.device("cpu"))


# --------------------------------------------------------------------------- what the CLI calls
def test_method_flag_help_points_shorthands_to_the_prefixed_flags():
    from arow.config import method_flag_help

    table = method_flag_help()
    assert list(table) == sorted(method_flags())
    assert table["lam"] == (float, "shorthand for the chosen method's lam (see the prefixed flags)")
    assert table["trades_beta"] == (float, "TRADES: weight of the KL boundary term (0 to 100)")
    assert table["detach_weight"][0] is bool


def test_evaluate_source_picks_the_pipeline_and_checks_its_flags(tmp_path):
    from arow.pipelines import evaluate_source
    from arow.evaluation.sources import open_source

    with pytest.raises(ValueError, match="give a run folder"):
        evaluate_source(None)
    (tmp_path / "m.pt2").write_bytes(b"")
    with pytest.raises(ValueError, match="not both"):
        evaluate_source(tmp_path / "m.pt2", model_factory="mynets:mlp")
    with pytest.raises(ValueError, match="--weights goes with --model-factory"):
        evaluate_source(tmp_path, weights=tmp_path / "w.pt")
    assert open_source(model_factory="mynets:mlp", dataset="fashion-mnist").name == "mlp"
    assert open_source(tmp_path / "m.pt2", dataset="fashion-mnist", trust_code=True).name == "m"


@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
def test_train_and_evaluate_is_arow_train(tmp_path):
    import dataclasses

    from arow.pipelines import train_and_evaluate

    out = tmp_path / "run"
    cfg = TrainConfig(epochs=1, limit_train=100, val_size=20, batch_size=50, attack_steps=1, eval_n=40,
                      eval_attacks="clean,pgd2", guards=False, out=str(out))
    with pytest.raises((ValueError, KeyError), match="pgdx"):  # a typo fails before training
        train_and_evaluate(dataclasses.replace(cfg, eval_attacks="clean,pgdx"))
    with pytest.raises(ValueError, match="set out"):
        train_and_evaluate(dataclasses.replace(cfg, out=None))
    assert not out.exists()
    seen = []
    run = train_and_evaluate(cfg, progress=lambda *a: seen.append(a))
    assert run.is_main and len(run.train.history) == 1 and run.seconds > 0 and seen
    rep = run.evaluation
    assert rep.path == out / "eval_n40.json" and set(rep.accuracy) == {"clean", "pgd2", "worst_case"}
    assert json.loads(rep.path.read_text())["train_seconds"] == pytest.approx(run.seconds)
    assert (out / "curves.png").is_file()  # drawn after the evaluation


@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
def test_train_and_evaluate_evaluates_the_model_it_holds_without_reading_it_back(tmp_path, monkeypatch):
    from arow.pipelines import train_and_evaluate

    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=1, limit_train=100, val_size=20, batch_size=50, attack_steps=1, eval_n=40, norm="l2",
                      eval_attacks="clean,pgd2", guards=False, out=str(out))
    run = train_and_evaluate(cfg)
    assert loads == []  # the data set, norm and eps come from the plan, the model from memory
    saved = json.loads(run.evaluation.path.read_text())
    assert (saved["norm"], saved["eps"], saved["dataset"]) == ("l2", 1.5, "fashion-mnist")
    assert (saved["checkpoint"], saved["which"], saved["model"], saved["method"]) == (
        str(out / "final.pt"), "final", "small-cnn", "arow")
    assert run.evaluation.path == out / "eval_n40.json"


def test_a_replayed_config_never_chooses_the_output_folder(tmp_path):
    """A config.json from elsewhere (perhaps tampered) replays its recipe, not its ``out``: the run
    writes to --out or the default folder, never into a folder the file names."""
    victim = tmp_path / "victim"
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"method": "trades", "epochs": 1, "out": str(victim)}))
    assert resolve_config({}, {}, preset=str(path)).out != str(victim)
    assert resolve_config({"out": str(tmp_path / "mine")}, {}, preset=str(path)).out == str(tmp_path / "mine")
    assert resolve_config({}, {}, preset=str(path)).method == "trades"
