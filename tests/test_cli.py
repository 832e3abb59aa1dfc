"""The command line: a short train + eval, and bad input ending in one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fmnist_available

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed "
                                  "(apt-get install dataset-fashion-mnist)")


def arow(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "arow", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@needs_fmnist
def test_train_then_eval(tmp_path):
    out = tmp_path / "run"
    r = arow("train", "--epochs", "1", "--limit-train", "400", "--val-size", "100", "--attack-steps", "2",
             "--batch-size", "50", "--out", str(out), "--eval-n", "100", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "pgd20" in r.stdout and "SUBSET" in r.stdout
    r = arow("eval", str(out), "--attacks", "clean,pgd20,cw", "--n", "100")
    assert r.returncode == 0, r.stderr
    assert not (out / "eval.json").exists(), "eval.json is for full-test-set results only"
    ev = json.loads((out / "eval_n100.json").read_text())
    assert ev["n"] == 100 and ev["eps"] == pytest.approx(0.1) and ev["subset"] is True
    assert set(ev["accuracy"]) >= {"clean", "pgd20", "cw", "worst_case"}
    assert all(0.0 <= v <= 1.0 for v in ev["accuracy"].values())
    assert ev["accuracy"]["pgd20"] <= ev["accuracy"]["clean"]
    assert len(ev["per_class"]["pgd20"]) == 10
    # the trained model loads through the public API, in eval mode, taking [0, 1] inputs
    import torch

    import arow as arow_pkg
    model = arow_pkg.load_model(out)
    assert not model.training and model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("args,needle", [
    (["train", "--method", "nope"], "invalid choice"),
    (["train", "--eps", "-0.1", "--epochs", "1"], "--eps must be in [0, 1]"),
    (["train", "--dataset", "cifar10", "--epochs", "1"], "--data-dir"),
    (["train", "--data-dir", "/nonexistent/fmnist", "--epochs", "1"], "/nonexistent/fmnist"),
    (["train", "--method", "arow", "--beta", "3", "--epochs", "1"], "--beta does not apply"),
    (["train", "--preset", "no-such-preset"], "unknown preset"),
    (["train", "--val-attack", "pgdx", "--limit-train", "100", "--val-size", "20"], "unknown attack 'pgdx'"),
    (["train", "--batch-size", "-4"], "--batch-size must be in [1, 65536]"),
    (["eval", "/nonexistent/run"], "/nonexistent/run"),
    (["eval", "/nonexistent/run", "--attacks", "pgd20,bogus"], "/nonexistent/run"),
    (["eval", "/nonexistent/run", "--n", "0"], "--n must be a whole number >= 1"),
    (["eval", "/nonexistent/run", "--guards-n", "0"], "--guards-n must be a whole number >= 1"),
    (["eval", "/nonexistent/run", "--batch-size", "-1"], "--batch-size must be a whole number >= 1"),
    (["eval", "/nonexistent/run", "--attacks", ","], "--attacks is empty"),
    (["eval", "/nonexistent/run", "--eps", "nan"], "--eps must be a finite number"),
    (["eval", "/nonexistent/run", "--robustbench", "rb.json", "--attacks", "clean"], "needs both clean and autoattack"),
    (["eval", "/nonexistent/run", "--device", "gpu!"], "--device must be"),
    (["eval", "--weights", "w.pt"], "--weights goes with --model-factory"),
    (["eval"], "give a run folder"),
])
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, args, needle):
    r = arow(*args, "--out", str(tmp_path / "o")) if args[0] == "train" else arow(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert needle in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("arow")]) >= 1


def test_list_shows_registries():
    r = arow("list")
    assert r.returncode == 0
    for name in ["arow", "trades", "mart", "pgd-at", "natural", "small-cnn", "resnet18", "preact-resnet18",
                 "wrn-34-10", "fashion-mnist", "cifar10", "cifar100", "svhn", "pgd<K>[r<R>]"]:
        assert name in r.stdout, name


def test_every_preset_is_a_valid_config():
    from arow.config import TrainConfig, load_preset, preset_names

    names = preset_names()
    assert {"fmnist-arow", "cifar10-resnet18", "cifar100-resnet18", "svhn-resnet18", "cifar10-wrn34-10"} <= set(names)
    for name in names:
        cfg = TrainConfig.from_dict(load_preset(name)).validate()
        # the paper's lambda everywhere but the embedded Fashion-MNIST recipe, whose 2.5 is the data set's own
        assert cfg.method_args.get("lam") == (None if name == "fmnist-arow" else 3.5), name
        assert cfg.method_args.get("smoothing") == 0.2, name
    paper = TrainConfig.from_dict(load_preset("cifar10-resnet18"))
    assert (paper.epochs, paper.lr, paper.milestone_epochs(), paper.swa_start, paper.batch_size) == (
        120, 0.1, [60, 100], 51, 128)
    assert paper.eps == pytest.approx(8 / 255) and paper.weight_decay == 5e-4
    # the embedded default IS the fmnist preset: `arow train` with no flags resolves to the same config
    from arow.config import resolve_config

    demo = resolve_config({}, preset="fmnist-arow").to_dict()
    default = resolve_config({}).to_dict()
    # the preset names ARoW's values; with no flags they are Fashion-MNIST's lambda and the method's smoothing
    assert demo.pop("method_args") == {"lam": 2.5, "smoothing": 0.2} and default.pop("method_args") == {"lam": 2.5}
    # on another data set the preset leaves ARoW at its own (the paper's) lambda
    assert resolve_config({"dataset": "cifar10"}, preset="fmnist-arow").method_args == {"smoothing": 0.2}
    from arow.methods import METHODS

    assert demo == default and METHODS.get("arow").hparams["smoothing"].default == 0.2
    assert (default["epochs"], default["lr"], default["batch_size"], default["attack_steps"], default["step_size"]) == (
        11, 0.1, 128, 5, 0.05)



@pytest.mark.parametrize("given, steps, step", [
    ({}, 5, 0.05),                                  # Fashion-MNIST's training attack: 5 steps of eps/2
    ({"eps": 0.2}, 5, 0.1),                         # eps/2 of the eps given
    ({"norm": "l2"}, 10, 0.375),                    # L2 keeps 10 steps of eps/4
    ({"eps": 0.0}, 10, 0.0),                        # no ball, nothing to derive a step from
    ({"attack_steps": 10}, 10, 0.025),              # steps given: the step stays eps/4
    ({"attack_steps": 7}, 7, 0.025),
    ({"step_size": 0.02}, 10, 0.02),                # step given: the method's 10 steps
    ({"dataset": "cifar10"}, 10, 2 / 255),          # elsewhere the papers' 10 steps of eps/4
    ({"method": "natural"}, 0, 0.025),              # no training attack
    ({"method": "trades"}, 5, 0.05),                # a data-set default, not ARoW's
])
def test_the_training_attack_defaults_to_the_data_sets(given, steps, step):
    from arow.config import resolve
    from arow.config.schema import TrainConfig
    from arow.training.trainer import threat_for

    threat = threat_for(resolve(TrainConfig(**given)))
    assert (threat.steps, threat.step_size) == (steps, pytest.approx(step))


@pytest.mark.parametrize("preset, flags, steps, step", [
    ("fmnist-arow", {}, 5, 0.05),
    ("fmnist-arow", {"eps": 0.2}, 5, 0.1),          # flags on the preset move the attack as on the default
    ("fmnist-arow", {"attack_steps": 10}, 10, 0.025),
    ("fmnist-arow", {"norm": "l2"}, 10, 0.375),
    ("fmnist-arow-7ep", {}, 10, 0.025),             # the previous recipe, as its studies ran it
    ("fmnist-arow-2ep", {}, 10, 0.025),
])
def test_the_presets_training_attack(preset, flags, steps, step):
    from arow.config import resolve_config
    from arow.training.trainer import threat_for

    threat = threat_for(resolve_config(flags, preset=preset))
    assert (threat.steps, threat.step_size) == (steps, pytest.approx(step))

@pytest.mark.parametrize("given, lam", [
    ({}, 2.5),                                        # Fashion-MNIST's own lambda for ARoW
    ({"method_args": {"lam": 3.5}}, 3.5),             # a lambda given is kept
    ({"dataset": "cifar10"}, None),                   # elsewhere the method's (the paper's 3.5)
    ({"method": "trades"}, None),                     # only ARoW has it
])
def test_arows_lambda_defaults_to_the_data_sets(given, lam):
    from arow.config import resolve
    from arow.config.schema import TrainConfig

    cfg = resolve(TrainConfig(**given))
    assert cfg.method_args.get("lam") == lam


def test_a_run_saved_without_the_data_sets_lambda_resumes_with_the_one_it_ran():
    """Configs saved by arow 0.8 and earlier left ARoW's lambda unset on Fashion-MNIST: they ran 3.5."""
    from arow.config import resolve, saved_config
    from arow.config.schema import TrainConfig

    new = resolve(TrainConfig()).to_dict()
    assert saved_config(new)["method_args"] == {"lam": 2.5}
    old = dict(new, method_args={})
    assert saved_config(old)["method_args"] == {"lam": 3.5}
    assert saved_config(dict(new, method="trades", method_args={}))["method_args"] == {}


def test_replaying_an_older_runs_config_gives_the_lambda_it_ran(tmp_path):
    from arow.config import resolve, resolve_config
    from arow.config.schema import TrainConfig

    saved = resolve(TrainConfig()).to_dict()
    (tmp_path / "new.json").write_text(json.dumps(saved))
    (tmp_path / "old.json").write_text(json.dumps(dict(saved, method_args={})))  # as arow 0.8 saved it
    assert resolve_config({}, preset=str(tmp_path / "new.json")).method_args == {"lam": 2.5}
    assert resolve_config({}, preset=str(tmp_path / "old.json")).method_args == {"lam": 3.5}


def test_a_trainer_given_a_method_does_not_write_the_data_sets_lambda():
    import torch

    from arow.config.schema import TrainConfig
    from arow.data import TensorData
    from arow.methods import METHODS
    from arow.models import build_model
    from arow.models.spec import ModelSpec
    from arow.threat import ThreatModel
    from arow.training.trainer import plan_training

    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    data = TensorData(torch.rand(8, 1, 28, 28), torch.arange(8) % 10, 10)
    spec = ModelSpec("small-cnn", 10, 1, 28, dataset="fashion-mnist")
    method = METHODS.get("arow")(ThreatModel(0.1), lam=4.0)
    cfg = plan_training(TrainConfig(), model, data, model_spec=spec, method=method)
    assert "lam" not in cfg.method_args  # the method runs its own 4.0 (the run folder's resolved section says so)
    assert plan_training(TrainConfig(), model, data, model_spec=spec).method_args == {"lam": 2.5}


def _write_cifar(root: Path, n: int = 40) -> None:
    import pickle

    import numpy as np

    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)


def test_paper_preset_runs_end_to_end_on_cifar_format_files(tmp_path):
    """The CIFAR path (pickle reader, crop+flip, SWA + BN recalibration, step schedule) on tiny files."""
    _write_cifar(tmp_path / "data")
    out = tmp_path / "run"
    r = arow("train", "--preset", "cifar10-resnet18", "--data-dir", str(tmp_path / "data"), "--model", "small-cnn",
             "--epochs", "2", "--swa-start", "1", "--attack-steps", "1", "--batch-size", "32", "--val-size", "20",
             "--out", str(out), "--eval-attacks", "clean,pgd5", "--no-guards")
    assert r.returncode == 0, r.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 40 and ev["eps"] == pytest.approx(8 / 255) and ev["subset"] is False
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["swa_start"] == 1 and cfg["augment"] == "crop+flip"
    # a shorter --epochs scales the preset's SWA start (51 of 120 -> 4 of 10); a --swa-start given past it is refused
    r = arow("train", "--preset", "cifar10-resnet18", "--epochs", "10", "--print-config")
    assert r.returncode == 0 and json.loads(r.stdout)["swa_start"] == 4, r.stderr
    r = arow("train", "--preset", "cifar10-resnet18", "--data-dir", str(tmp_path / "data"), "--epochs", "10",
             "--swa-start", "51", "--out", str(tmp_path / "r2"))
    assert r.returncode == 2 and "--swa-start 0 turns SWA off" in r.stderr


@needs_fmnist
def test_resume_continues_the_saved_experiment_and_refuses_changes(tmp_path):
    out = tmp_path / "run"
    common = ["--limit-train", "300", "--val-size", "60", "--attack-steps", "1", "--batch-size", "60",
              "--eval-attacks", "", "--out", str(out)]
    assert arow("train", "--epochs", "1", "--eps", "0.2", *common).returncode == 0
    r = arow("train", "--resume", "--method", "pgd-at", "--epochs", "2", "--out", str(out))
    assert r.returncode == 2 and "--resume would change" in r.stderr and "method" in r.stderr
    assert json.loads((out / "config.json").read_text())["method"] == "arow"  # untouched
    r = arow("train", "--resume", "--epochs", "2", "--out", str(out), "--eval-attacks", "")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["eps"] == 0.2 and cfg["limit_train"] == 300  # the saved experiment
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@needs_fmnist
def test_eval_of_another_checkpoint_gets_its_own_file(tmp_path):
    out = tmp_path / "run"
    assert arow("train", "--epochs", "1", "--limit-train", "200", "--val-size", "50", "--attack-steps", "1",
                "--eval-attacks", "", "--out", str(out)).returncode == 0
    r = arow("eval", str(out), "--which", "best", "--attacks", "clean", "--n", "50", "--no-guards")
    assert r.returncode == 0, r.stderr
    ev = json.loads((out / "eval_best_n50.json").read_text())
    assert ev["which"] == "best" and ev["checkpoint"].endswith("best.pt")
    assert not (out / "eval.json").exists()


@pytest.mark.parametrize("args,needle", [
    (["--eval-attacks", "pgd20,bogus"], "unknown attack 'bogus'"),
    (["--eval-n", "0"], "--eval-n must be >= 1"),
    (["--milestones", "1,0.5"], "--milestones must be"),
    (["--lam", "-1"], "lam must be >= 0"),
    (["--smoothing", "1.5"], "smoothing must be <= 0.99"),
])
def test_bad_train_flags_fail_before_training(tmp_path, args, needle):
    r = arow("train", "--epochs", "2", "--limit-train", "100", "--val-size", "20", "--out", str(tmp_path / "o"),
             *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "last.pt").exists()


def test_bad_preset_values_are_one_line_errors(tmp_path):
    for text, needle in [("epochs: abc", "expected int"), ("method_args: [1, 2]", "expected a mapping"),
                         ("milestones: 60", "expected a list"), ('eps: "0.1"', "expected float")]:
        f = tmp_path / "p.yaml"
        f.write_text(text + "\n")
        r = arow("train", "--preset", str(f), "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (text, r.stderr)


def test_model_loading_subcommands_share_their_flags():
    from arow.cli.commands import build_parser
    from arow.evaluation.settings import EvalSettings

    p = build_parser()
    for argv in (["eval", "RUN"], ["plot", "RUN"], ["pseudo-label", "RUN", "--data", "D", "--out", "O"]):
        a = vars(p.parse_args(argv))
        if argv[0] == "eval":  # flags of EvalSettings: not given is None, the settings' default
            a = vars(EvalSettings.from_flags(a))
        # batch size None: the device's default (100 on the CPU, 500 on CUDA)
        assert (a["which"], a["batch_size"], a["device"], a["data_dir"]) == ("final", None, "auto", None), argv
    assert p.parse_args(["export", "RUN", "--out", "O", "--which", "best"]).which == "best"
    plot_help = p._subparsers._group_actions[0].choices["plot"].format_help()
    assert "eps curve (with --eps-curve):\n  --n N" in plot_help


def test_eval_printing_and_exit_status(capsys, monkeypatch):
    import functools
    from types import SimpleNamespace

    import arow.cli.commands
    from arow.cli.commands import main

    real = arow.cli.commands.evaluate_source

    def fake_with(error=None, robustbench=None):
        @functools.wraps(real)  # the flags come from the real signature
        def fake(source, attacks=None, *, settings, guards, progress, on_guards, **kw):
            assert (source, attacks, settings.attacks, settings.n, guards.n) == ("r", None, ["clean"], 7, 30)
            assert settings.eps is None and guards.enabled and not kw["trust_code"]
            rep = SimpleNamespace(error=error, path=Path("r/eval.json"), robustbench=robustbench,
                                  text=lambda: "TABLE", guards_text=lambda: "GUARDS")
            on_guards(rep)
            return rep
        return fake

    monkeypatch.setattr(arow.cli.commands, "evaluate_source", fake_with(robustbench=Path("r/rb.json")))
    assert main(["eval", "r", "--attacks", "clean", "--n", "7", "--guards-n", "30"]) == 0
    out = capsys.readouterr().out
    assert out.index("GUARDS") < out.index("TABLE") and "written r/eval.json" in out and "written r/rb.json" in out
    monkeypatch.setattr(arow.cli.commands, "evaluate_source", fake_with(error="a guard tripped"))
    assert main(["eval", "-q", "r", "--attacks", "clean", "--n", "7", "--guards-n", "30"]) == 3
    cap = capsys.readouterr()
    assert cap.err.strip() == "arow: error: a guard tripped" and "TABLE" not in cap.out


def test_eps_curve_table_and_study_commands(tmp_path):
    from arow.reporting.plots import eps_curve_table
    from arow.study import StudySpec, study_commands

    curve = {"attack": "pgd20", "n": 40, "test_set_size": 10000, "subset": True,
             "points": [{"eps": 0.0, "factor": 0.0, "accuracy": 0.9}, {"eps": 0.1, "factor": 1.0, "accuracy": 0.5}]}
    text = eps_curve_table(curve)
    assert text.splitlines()[0] == "pgd20 accuracy vs eps on 40 of 10000 test images (SUBSET)"
    assert "x train eps" in text and "50.00%" in text
    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0]})
    lines = study_commands(tmp_path / "s", spec).splitlines()
    assert not (tmp_path / "s").exists()  # printing the commands writes nothing
    assert [ln for ln in lines[1:] if ln.startswith("#")] == ["# arow-s0: train, autoattack, eps-curve",
                                                              "# trades-s0: train, autoattack, eps-curve"]
    assert [ln.split()[1:3] for ln in lines if not ln.startswith("#")] == [["-m", "arow.study.cell"]] * 2


def test_preset_summary_is_the_first_sentence_on_one_line():
    from arow.config import preset_description, preset_names, preset_summary

    for n in preset_names():
        s = preset_summary(n)
        assert len(s) <= 100 and " ".join(preset_description(n).split()).startswith(s.removesuffix(" ...")), n
        short = preset_summary(n, width=30)
        assert len(short) <= 30 and (short == s or short.endswith(" ...")), n


def test_quiet_is_taken_before_and_after_the_command():
    from arow.cli.commands import build_parser

    p = build_parser()
    assert p.parse_args(["eval", "-q", "r"]).quiet and p.parse_args(["-q", "eval", "r"]).quiet
    assert not p.parse_args(["eval", "r"]).quiet and p.parse_args(["train", "--quiet"]).quiet


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 1-epoch run of the small CNN on random Fashion-MNIST-shaped tensors, and a test set of 40."""
    import torch

    from arow.config import TrainConfig
    from arow.data import from_tensors
    from arow.models import build_model
    from arow.pipelines import build_trainer

    out = tmp_path_factory.mktemp("runs") / "tiny"
    g = torch.Generator().manual_seed(0)
    data = from_tensors(torch.rand(64, 1, 28, 28, generator=g), torch.arange(64) % 10, name="fashion-mnist")
    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None, "std": None,
            "dataset": "fashion-mnist"}
    cfg = TrainConfig(method="pgd-at", epochs=1, batch_size=32, eps=0.1, attack_steps=1, val_size=0, out=str(out),
                      schedule="constant", warmup_epochs=0)
    torch.manual_seed(0)
    build_trainer(cfg, build_model("small-cnn", num_classes=10, in_channels=1, image_size=28), data, model_spec=spec,
                  plots=False).fit()
    test = from_tensors(torch.rand(40, 1, 28, 28, generator=g), torch.arange(40) % 10, name="fashion-mnist")
    return out, test


def test_robustbench_files_are_named_by_subset_and_norm(tiny_run):
    from arow.attacks.autoattack import get_autoattack
    from arow.evaluation.sources import open_source
    from arow.pipelines import evaluate_run

    run, test = tiny_run
    src = open_source(run)
    assert src.robustbench_path(10000, 10000, "linf") == run / "robustbench.json"
    assert src.robustbench_path(20, 10000, "linf") == run / "robustbench_n20.json"
    assert src.robustbench_path(20, 10000, "l2") == run / "robustbench_n20_l2.json"
    assert src.robustbench_path(10000, 10000, "l2") == run / "robustbench_l2.json"
    aa = get_autoattack(0.1, n_iter=2, square_queries=5, name="autoattack")
    full = evaluate_run(run, ["clean", aa], data=test, guards=False)
    assert full.robustbench == run / "robustbench.json" and full.path == run / "eval.json"
    part = evaluate_run(run, ["clean", aa], data=test, n=20, guards=False)
    assert part.robustbench == run / "robustbench_n20.json" and part.path == run / "eval_n20.json"
    assert json.loads((run / "robustbench.json").read_text())["n_test_points"] == 40  # not overwritten


def test_resuming_another_subset_says_what_changed(tiny_run, caplog):
    from arow.pipelines import evaluate_run

    run, test = tiny_run
    evaluate_run(run, ["clean", "pgd2"], data=test, n=20, guards=False)
    with caplog.at_level("WARNING"):
        evaluate_run(run, ["clean", "pgd2"], data=test, n=30, guards=False)
    assert "pgd2 evaluation state" in caplog.text and "other test examples (another --n" in caplog.text
    assert "another model" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate_run(run, ["clean", "pgd2"], data=test, n=30, eps=0.05, guards=False)
    assert "saved for another eps or norm" in caplog.text and "test examples" not in caplog.text


def test_a_model_in_memory_is_evaluated_with_what_is_known_about_it(tiny_run):
    """What `arow train` does after training: the model it holds, its run folder, no file read back."""
    from arow.evaluation.settings import EvalSettings, GuardSettings
    from arow.evaluation.sources import ModelSource
    from arow.pipelines import evaluate_loaded, evaluate_run
    from arow.runs.records import load_model

    run, test = tiny_run
    src = ModelSource.in_run(load_model(run), run, dataset="fashion-mnist", norm="linf", eps=0.1,
                             info={"method": "pgd-at", "model": "small-cnn", "seed": 0})
    rep = evaluate_loaded(src, EvalSettings(attacks=["clean", "pgd2"], n=30), GuardSettings(enabled=False),
                          data=test, extra={"train_seconds": 1.5})
    ev = json.loads((run / "eval_n30.json").read_text())
    assert rep.path == run / "eval_n30.json" and ev["method"] == "pgd-at" and ev["train_seconds"] == 1.5
    assert ev["eps"] == pytest.approx(0.1) and ev["which"] == "final"
    from_disk = evaluate_run(run, ["clean", "pgd2"], data=test, n=30, guards=False, json_out=str(run / "o.json"))
    assert from_disk.accuracy == rep.accuracy
