"""What a new user meets in the first hour: the Python path (data loaders, callbacks, model outputs,
image layout, the optimiser) and the command line's small rough edges."""
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from arow.cli.commands import build_parser, main
from arow.cli.flags import dataclass_flags
from arow.config import ConfigError, TrainConfig, preset_description, preset_names, resolve_config
from arow.data import DataError, TensorData, as_data, from_tensors
from arow.training.callbacks import HOOKS, Callbacks
from arow.training.errors import ModelOutputError
from arow.training.trainer import Trainer

from conftest import fmnist_available, tiny_cnn, write_aa_study_cell

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(epochs=1, batch_size=16, eps=0.1, attack_steps=1, val_size=0, device="cpu", val_attack="pgd2",
                seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _images(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10


@pytest.fixture()
def arow_logger_level():
    """``main`` sets the level of the ``arow`` logger (-v); put it back afterwards."""
    logger = logging.getLogger("arow")
    level = logger.level
    yield logger
    logger.setLevel(level)


# --------------------------------------------------------------------------- a DataLoader as training data
def test_a_trainer_takes_a_dataloader_read_once_and_batched_by_the_config():
    x, y = _images(48)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False)
    val = DataLoader(TensorDataset(*_images(16, seed=1)), batch_size=7)
    torch.manual_seed(0)
    trainer = Trainer(_cfg(), tiny_cnn(), loader, val)
    assert isinstance(trainer.train_data, TensorData) and torch.equal(trainer.train_data.x, x)
    assert len(trainer.val_data) == 16
    assert len(trainer.loader) == math.ceil(48 / 16)  # the config's batch, not the DataLoader's
    result = trainer.fit()
    assert len(result.history) == 1 and "val_pgd_acc" in result.history[0]
    # the same as training on the tensors themselves
    torch.manual_seed(0)
    ref = Trainer(_cfg(), tiny_cnn(), from_tensors(x, y), from_tensors(*_images(16, seed=1))).fit()
    for p, q in zip(result.model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(p, q)


def test_a_run_folder_trainer_takes_a_dataloader_too(tmp_path):
    from arow.pipelines import build_trainer

    loader = DataLoader(TensorDataset(*_images(32)), batch_size=10)
    result = build_trainer(_cfg(out=str(tmp_path / "run")), tiny_cnn(), loader).fit()
    assert len(result.history) == 1 and (tmp_path / "run" / "config.json").is_file()


# --------------------------------------------------------------------------- callbacks without subclassing
class EpochsOnly:
    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, record):
        self.epochs.append(record["epoch"])


class StepsAndEnd:
    def __init__(self):
        self.steps, self.ended, self.closed = 0, None, "not yet"

    def on_step(self, step):
        self.steps += 1

    def on_fit_end(self, result):
        self.ended = len(result.history)

    def close(self, error=None):
        self.closed = error


def test_any_object_with_some_hooks_is_a_callback():
    a, b = EpochsOnly(), StepsAndEnd()
    Trainer(_cfg(epochs=2), tiny_cnn(), from_tensors(*_images(32)), callbacks=[a, b]).fit()
    assert a.epochs == [1, 2]
    assert b.steps == 4 and b.ended == 2 and b.closed is None
    one = EpochsOnly()
    Trainer(_cfg(), tiny_cnn(), from_tensors(*_images(32)), callbacks=one).fit()  # a single one, not in a list
    assert one.epochs == [1]


def test_a_callback_without_hooks_or_a_class_is_refused_in_one_line():
    data = from_tensors(*_images(32))
    with pytest.raises(ValueError, match="has none of the hooks") as e:
        Trainer(_cfg(), tiny_cnn(), data, callbacks=[object()])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"EpochsOnly is a class; pass an instance, e.g. callbacks=\[EpochsOnly\(\)\]"):
        Trainer(_cfg(), tiny_cnn(), data, callbacks=[EpochsOnly])


def test_the_hooks_are_documented_where_users_look():
    doc = Callbacks.__doc__
    usage = (ROOT / "docs" / "usage.md").read_text()
    for hook in HOOKS:
        assert f"``{hook}(" in doc, hook
        assert f"`{hook}" in usage, hook


# --------------------------------------------------------------------------- a model that returns more than logits
class WithAux(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.net, self.kind = tiny_cnn(), kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, logits.detach()
        if self.kind == "dict":
            return {"logits": logits, "aux": logits.detach()}
        return logits


@pytest.mark.parametrize("kind, needle", [("tuple", "a tuple of 2 items"), ("dict", "a dict (keys 'logits', 'aux')")])
def test_a_model_returning_more_than_logits_gets_one_line_naming_the_fix(kind, needle):
    trainer = Trainer(_cfg(), WithAux(kind), from_tensors(*_images(32)))
    with pytest.raises(ModelOutputError) as e:
        trainer.fit()
    msg = str(e.value)
    assert needle in msg and "return the logits only, or wrap it" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)
    assert not trainer.model._forward_hooks  # nothing is left on the model


def test_the_output_check_runs_on_the_first_step_only(monkeypatch):
    from arow.training import runtime

    model = WithAux("logits")
    trainer = Trainer(_cfg(epochs=2), model, from_tensors(*_images(32)), from_tensors(*_images(16, seed=1)))
    checked_at = []
    real = runtime.check_logits
    monkeypatch.setattr(runtime, "check_logits", lambda out: checked_at.append(trainer.global_step) or real(out))
    trainer.fit()
    assert checked_at and set(checked_at) == {0}  # the forwards of the first step, none later
    assert not model._forward_hooks  # unhooked: later steps and validation pay nothing


# --------------------------------------------------------------------------- channels-last images
def test_channels_last_images_are_refused_unless_the_data_set_says_so(caplog):
    x, y = _images(8)
    nhwc = x.permute(0, 2, 3, 1).contiguous()  # (8, 28, 28, 1)
    with pytest.raises(DataError, match=r"looks channels-last \(N, H, W, C\).*permute\(0, 3, 1, 2\)") as e:
        from_tensors(nhwc, y)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="channels-last"):
        from_tensors(np.zeros((4, 32, 32, 3), np.uint8), [0, 1, 2, 3])
    with pytest.raises(DataError, match="channels-last"):  # a loader's batches too
        as_data(DataLoader(TensorDataset(nhwc, y), batch_size=4))
    with caplog.at_level(logging.INFO):
        d = from_tensors(nhwc, y, name="fashion-mnist")  # the data set's shape (1 x 28 x 28) decides
    assert torch.equal(d.x, x) and "transposed" in caplog.text
    with pytest.raises(DataError, match="channels-last"):  # does not fit the named data set's shape
        from_tensors(torch.rand(2, 32, 32, 3), [0, 1], name="fashion-mnist")
    assert torch.equal(from_tensors(x, y).x, x)  # (N, C, H, W) as it is
    grey = torch.rand(2, 3, 8, 3)  # 3 channels of 8 x 3: not mistaken for channels-last
    assert from_tensors(grey, [0, 1]).x.shape == (2, 3, 8, 3)


# --------------------------------------------------------------------------- the optimiser
def test_sgd_stays_the_default_and_adamw_takes_lr_and_weight_decay():
    data = from_tensors(*_images(32))
    sgd = Trainer(_cfg(lr=0.05, weight_decay=0.01, momentum=0.8), tiny_cnn(), data)
    assert type(sgd.opt) is torch.optim.SGD and sgd.cfg.optimizer == "sgd"
    g = sgd.opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.05, 0.8, 0.01, False)
    adamw = Trainer(_cfg(optimizer="adamw", lr=1e-3, weight_decay=0.05, no_bn_decay=True), tiny_cnn(), data)
    assert type(adamw.opt) is torch.optim.AdamW
    decay, no_decay = adamw.opt.param_groups
    assert decay["lr"] == 1e-3 and decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.999)
    before = [p.detach().clone() for p in adamw.model.parameters()]
    result = adamw.fit()
    assert math.isfinite(result.history[0]["train_loss"])
    assert any(not torch.equal(p, q) for p, q in zip(before, adamw.model.parameters()))


def test_an_unknown_optimizer_is_one_line_listing_the_choices():
    with pytest.raises(ValueError, match=r"--optimizer must be one of sgd, adamw, got 'adam'") as e:
        Trainer(_cfg(optimizer="adam"), tiny_cnn(), from_tensors(*_images(32)))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--nesterov applies to --optimizer sgd only"):
        _cfg(optimizer="adamw", nesterov=True).validate()


def test_the_optimizer_flag_is_generated_like_the_others():
    p = build_parser()
    a = p.parse_args(["train", "--optimizer", "adamw"])
    assert resolve_config(dataclass_flags(a, TrainConfig)).optimizer == "adamw"
    assert resolve_config(dataclass_flags(p.parse_args(["train"]), TrainConfig)).optimizer == "sgd"
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--optimizer", "adam"])


# --------------------------------------------------------------------------- flags named in the negative
def test_a_no_setting_gets_a_flag_pair_not_no_no(capsys):
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--no-no-bn-decay" not in help_text and "--bn-decay" in help_text and "--no-bn-decay" in help_text
    assert p.parse_args(["train", "--no-bn-decay"]).no_bn_decay is True
    assert p.parse_args(["train", "--bn-decay"]).no_bn_decay is False
    assert p.parse_args(["train"]).no_bn_decay is None  # not given: the preset or the default decides
    off = resolve_config(dataclass_flags(p.parse_args(["train", "--bn-decay"]), TrainConfig),
                         preset="cifar10-wrn28-10-ddpm")
    assert off.no_bn_decay is False


# --------------------------------------------------------------------------- what training prints
def test_validation_lines_say_which_model_and_split(caplog):
    data, val = from_tensors(*_images(32)), from_tensors(*_images(20, seed=1))
    with caplog.at_level(logging.INFO):
        Trainer(_cfg(ema=0.5), tiny_cnn(), data, val).fit()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("validation (held-out 20): clean ") and ", pgd2 " in m for m in lines), lines
    assert any(m.startswith("validation, EMA model (held-out 20): clean ") for m in lines), lines
    bare = [r.getMessage() for r in caplog.records if r.name == "arow.evaluation.cascade"]
    assert not bare, bare


def test_a_short_ema_run_warns_once_naming_the_warmup(caplog):
    data = from_tensors(*_images(32))
    with caplog.at_level(logging.WARNING):
        Trainer(_cfg(ema=0.999), tiny_cnn(), data).fit()
    warned = [r.getMessage() for r in caplog.records if "--ema-warmup" in r.getMessage()]
    assert len(warned) == 1 and "about 1000 optimiser steps" in warned[0] and "after this run's 2 optimiser steps" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer(_cfg(ema=0.999, ema_warmup=True), tiny_cnn(), data).fit()  # warm-up forgets the start quickly
        Trainer(_cfg(ema=0.2), tiny_cnn(), data).fit()  # a horizon shorter than the run
    assert "--ema-warmup" not in caplog.text


@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
def test_the_eps_curve_logs_no_line_per_point(tmp_path, caplog):
    from arow.evaluation.curve import eps_curve
    from arow.pipelines import train_run

    out = tmp_path / "run"
    train_run(TrainConfig(epochs=1, limit_train=64, val_size=0, batch_size=32, attack_steps=1, out=str(out),
                          eval_attacks="", device="cpu"))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        curve = eps_curve(out, n=20, factors=(0, 0.5, 1), attack="pgd2")
    assert len(curve["points"]) == 3
    info = [r.getMessage() for r in caplog.records if r.name.startswith("arow.evaluation")]
    assert len(info) == 1 and info[0].startswith("eps curve of"), info


# --------------------------------------------------------------------------- a shorter run than the preset's
def test_a_preset_swa_start_beyond_a_shorter_run_is_scaled_with_a_note(caplog):
    with caplog.at_level(logging.INFO):
        cfg = resolve_config({"epochs": 4}, preset="cifar10-resnet18")
    assert cfg.swa_start == 2 and cfg.epochs == 4  # 51 of 120 epochs -> 1.7 of 4
    assert "swa_start 51 of the preset (set for 120 epochs) is past --epochs 4: scaled to 2" in caplog.text
    assert resolve_config({"epochs": 60}, preset="cifar10-resnet18").swa_start == 51  # within the run: kept
    with pytest.raises(ConfigError, match="--swa-start must be in"):  # the user's own value stays an error
        resolve_config({"epochs": 4, "swa_start": 51}, preset="cifar10-resnet18")
    with pytest.raises(ConfigError, match="--swa-start must be in"):
        resolve_config({"epochs": 4, "swa_start": 51})


def test_every_epoch_counting_preset_value_follows_a_shorter_run(tmp_path):
    preset = tmp_path / "long.yaml"
    preset.write_text("dataset: cifar10\nepochs: 10\nschedule: step\nmilestones: [6, 9]\nwarmup_epochs: 5\n")
    cfg = resolve_config({"epochs": 4}, preset=str(preset))
    assert cfg.milestone_epochs() == pytest.approx([2.4, 3.6]) and cfg.warmup_epochs == pytest.approx(2.0)
    kept = resolve_config({"epochs": 8}, preset=str(preset))  # only the milestone at 9 is past 8: all scale
    assert kept.milestone_epochs() == pytest.approx([4.8, 7.2]) and kept.warmup_epochs == 5


# --------------------------------------------------------------------------- pseudo-labels of a memory-mapped file
def test_pseudo_labelling_read_only_images_raises_no_numpy_warning():
    code = ("import warnings, numpy as np, torch.nn as nn\n"
            "from arow.pseudo import predict\n"
            "warnings.filterwarnings('error', message='.*not writable')\n"
            "a = np.zeros((5, 4, 4, 1), np.uint8); a.setflags(write=False)\n"
            "labels, conf = predict(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), a, batch_size=2)\n"
            "print(len(labels))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "5", r.stderr


# --------------------------------------------------------------------------- arow list, -q and -v
def test_list_prints_every_preset_description_whole(capsys, arow_logger_level):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for name in preset_names():
        assert " ".join(preset_description(name).split()) in flat, name
    assert " ..." not in out
    assert max(len(line) for line in out.splitlines()) <= 100  # wrapped, at the default width


def test_quiet_and_verbose_work_after_the_command_too(capsys, arow_logger_level):
    p = build_parser()
    assert p.parse_args(["eval", "-q", "RUN"]).quiet and p.parse_args(["-q", "eval", "RUN"]).quiet
    assert p.parse_args(["eval", "RUN", "-v"]).verbose and p.parse_args(["-v", "eval", "RUN"]).verbose
    assert not p.parse_args(["eval", "RUN"]).verbose
    assert main(["list", "-v"]) == 0
    assert arow_logger_level.level == logging.DEBUG
    capsys.readouterr()
    assert main(["-q", "list", "-v"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_a_yaml_boolean_where_a_word_belongs_says_to_quote_it(tmp_path):
    from arow.study.spec import StudyError, StudySpec
    from arow.study.cells import resolve_cells

    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "overrides": {"amp": False}, "aa_n": 0,
                                "eps_curve_n": 0})
    with pytest.raises(StudyError, match=r"expected str, got bool False \(YAML reads off/on/yes/no as booleans"):
        resolve_cells(spec)


def test_print_config_checks_hyperparameter_ranges(capsys):
    from arow.cli.commands import main

    assert main(["train", "--print-config", "--method", "trades", "--trades-beta", "-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "arow: error: --beta must be >= 0, got -5.0"


# --------------------------------------------------------------------------- each number printed once
def _attack_lines(caplog) -> list[str]:
    """The cascade's bare line per attack (``pgd2: 12.50% (0.1s)``), as logged."""
    return [r.getMessage() for r in caplog.records
            if r.name == "arow.evaluation.cascade" and re.match(r"^[\w-]+: \d+\.\d\d% \(", r.getMessage())]


@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
def test_train_and_eval_print_progress_then_the_table_each_number_once(tmp_path, caplog, capsys):
    run = tmp_path / "run"
    flags = ["--attacks", "clean,pgd2", "--n", "20", "--no-guards", "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        assert main(["train", "--epochs", "1", "--limit-train", "64", "--val-size", "16", "--batch-size", "32",
                     "--attack-steps", "1", "--eval-attacks", "clean,pgd2", "--eval-n", "20", "--no-guards",
                     "--device", "cpu", "--out", str(run)]) == 0
        trained = capsys.readouterr().out
        assert _attack_lines(caplog) == []
        epoch = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1 |")]
        assert len(epoch) == 1 and "validation" not in epoch[0]  # the Trainer's own line says it, once
        assert sum(r.getMessage().startswith("validation (held-out") for r in caplog.records) == 1
        caplog.clear()
        assert main(["eval", str(run), *flags]) == 0
        evaluated = capsys.readouterr().out
        assert _attack_lines(caplog) == []
        caplog.clear()
        assert main(["eval", str(run), *flags]) == 0  # the same again: continues from its saved state, and says so
        assert any("resuming from" in r.getMessage() for r in caplog.records)
        assert _attack_lines(caplog) == []
    for out in (trained, evaluated):
        assert re.search(r"^\| clean +\| \d+\.\d\d% ", out, re.M) and re.search(r"^\| pgd2 +\| \d+\.\d\d% ", out, re.M)
    assert logging.getLogger("arow.evaluation.cascade").filters == []  # nothing left behind


def test_quiet_attack_lines_drops_the_line_per_attack_only(caplog):
    from arow.evaluation.cascade import evaluate, quiet_attack_lines

    x, y = _images(8)
    model = tiny_cnn().eval()
    with caplog.at_level(logging.INFO):
        evaluate(model, x, y, ["clean", "pgd2"], eps=0.1)
        assert [m.split(":")[0] for m in _attack_lines(caplog)] == ["clean", "pgd2"]  # without it: one each
        caplog.clear()
        with quiet_attack_lines(), quiet_attack_lines():  # nested, as validation inside `arow train` is
            evaluate(model, x, y, ["clean", "pgd2"], eps=0.1)
            logging.getLogger("arow.evaluation.cascade").info("another line")
        assert _attack_lines(caplog) == [] and "another line" in caplog.text
        caplog.clear()
        evaluate(model, x, y, ["clean"], eps=0.1)  # and after it, as before
        assert len(_attack_lines(caplog)) == 1


def test_the_progress_line_of_an_epoch_does_not_repeat_the_validation(caplog):
    from arow.cli.progress import Progress

    bars = Progress(tty=False)
    with caplog.at_level(logging.INFO):
        bars.on_epoch_start(0, 2, 10)
        bars.on_validation_start()
        bars.on_validation_start()  # the EMA model's validation in the same epoch
        bars.on_epoch_end({"epoch": 1, "train_loss": 1.5, "lr": 0.1, "seconds": 3.0, "val_clean_acc": 0.8,
                           "val_pgd_acc": 0.5, "ema_val_clean_acc": 0.7, "ema_val_pgd_acc": 0.4})
        bars.on_epoch_start(1, 2, 10)
        bars.on_validation_start()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["epoch 1/2: validating on the held-out training split", "epoch 1 | loss 1.5000 | lr 0.1 | 3s",
                     "epoch 2/2: validating on the held-out training split"], lines


# --------------------------------------------------------------------------- report and study labels
def test_a_report_names_a_differing_setting_once(tmp_path):
    from arow.reporting.tables import build_report
    from test_report import make_run

    runs = []
    for steps in (1, 2):
        d = make_run(tmp_path, f"s{steps}", attack_steps=steps)
        cfg = json.loads((d / "config.json").read_text())
        cfg["resolved"]["attack_steps"] = steps
        (d / "config.json").write_text(json.dumps(cfg))
        runs.append(d)
    rows = {r[-2] for r in build_report(runs).rows()}  # the setting column, before the notes
    assert rows == {"attack_steps=1", "attack_steps=2"}, rows


def test_a_study_comparison_names_metrics_as_every_other_table():
    from arow.reporting.comparison import comparison_table

    rows = {"trades": {"pgd2": {0: 0.5, 1: 0.52}, "autoattack": {0: 0.4, 1: 0.41}},
            "arow": {"pgd2": {0: 0.51, 1: 0.5}, "autoattack": {0: 0.42, 1: 0.4}}}
    text = comparison_table(rows, "trades", ["pgd2", "autoattack"])
    assert "| PGD-2 " in text and "| pgd2 " not in text and "| AutoAttack " in text
    text = comparison_table(rows, "trades", ["pgd2", "autoattack"], labels={"autoattack": "AutoAttack (first 10)"})
    assert "| AutoAttack (first 10) " in text and "| PGD-2 " in text


# --------------------------------------------------------------------------- AutoAttack on its own images
def _aa_study(path: Path, with_verdicts: dict) -> dict:
    """A study of two rows x two seeds on a 40-image test set, AutoAttack on its first 10 images: each
    cell's evaluation and AutoAttack file with real per-example verdicts (none where ``with_verdicts``
    says False). Returns the verdicts by cell name."""
    from arow.runs.studydir import StudyDir
    from arow.study.spec import StudySpec

    spec = StudySpec.from_dict({"methods": ["arow", "trades"], "seeds": [0, 1], "attacks": "clean,pgd20",
                                "aa_n": 10, "eps_curve_n": 0})
    path.mkdir()
    StudyDir(path).write_spec(spec.to_dict())
    g, made = torch.Generator().manual_seed(0), {}
    for label in ("arow", "trades"):
        for seed in (0, 1):
            d = path / "cells" / f"{label}-s{seed}"
            clean = torch.rand(40, generator=g) < 0.8
            pgd = clean & (torch.rand(40, generator=g) < 0.7)
            aa = clean[:10] & (torch.rand(10, generator=g) < 0.7)  # drawn apart from PGD's verdicts
            # some images broken by PGD only and some by AutoAttack only: the worst case is neither column
            assert (pgd[:10] & ~aa).any() and (aa & ~pgd[:10]).any(), d.name
            made[d.name] = {"clean": clean, "pgd20": pgd, "autoattack": aa}
            write_aa_study_cell(d, label, seed, clean, pgd, aa, verdicts=with_verdicts.get(d.name, True))
    return made


def _md_table(text: str) -> list[list[str]]:
    lines = [ln for ln in text.split("\n## ")[0].splitlines() if ln.startswith("|") and not ln.startswith("|-")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_a_studys_autoattack_has_its_own_table_on_its_own_images(tmp_path):
    import csv
    import io

    from arow.study.collect import collect

    made = _aa_study(tmp_path / "s", {"trades-s1": False})
    res = collect(tmp_path / "s", plots=False)
    md = (tmp_path / "s" / "results.md").read_text()
    mean = _md_table(md.split("## Mean over seeds")[1])
    assert not any("AutoAttack" in h for h in mean[0]), mean[0]  # never beside full-test-set columns
    every = _md_table(md.split("## Every run")[1])
    assert not any("AutoAttack" in h for h in every[0]), every[0]
    section = md.split("## AutoAttack on the first 10 test images")[1]
    header, *rows = _md_table(section)
    assert header == ["method", "n", "AutoAttack (first 10)", "PGD-20 (first 10)", "clean (first 10)",
                      "worst case (first 10)"]
    runs = {(r[0], r[1]): r[2:] for r in _md_table(section.split("Every run:")[1])[1:]}
    for name, v in made.items():
        label, seed = name.rsplit("-s", 1)
        expect = [v["autoattack"], v["pgd20"][:10], v["clean"][:10], v["pgd20"][:10] & v["autoattack"]]
        text = [f"{100 * float(t.float().mean()):.2f}" for t in expect]
        if name == "trades-s1":  # no stored verdicts: AutoAttack's own number, "-" for the rest
            text = text[:1] + ["-"] * 3
        else:  # the worst case is below both AutoAttack and PGD: neither column alone passes for it
            assert text[3] not in (text[0], text[1]), (name, text)
        assert runs[label, seed] == text, (name, runs[label, seed], text)
    arow_pgd = [float(made[f"arow-s{s}"]["pgd20"][:10].float().mean()) for s in (0, 1)]
    arow_row = next(r for r in res["rows"] if r["label"] == "arow")
    assert arow_row["on_aa_images"]["pgd20"]["mean"] == pytest.approx(sum(arow_pgd) / 2)
    arow_worst = [100 * float((made[f"arow-s{s}"]["pgd20"][:10] & made[f"arow-s{s}"]["autoattack"]).float().mean())
                  for s in (0, 1)]
    mean_row = dict(zip(header, rows[0]))
    assert mean_row["method"] == "arow"
    spread = abs(arow_worst[0] - arow_worst[1]) / math.sqrt(2)  # the sample std of two seeds
    assert mean_row["worst case (first 10)"] == f"{sum(arow_worst) / 2:.2f} ± {spread:.2f}", mean_row
    assert dict(zip(header, rows[1]))["worst case (first 10)"] != "-"  # trades: one seed of two has verdicts
    comparison = md.split("paired by seed")[1]
    assert "| AutoAttack (first 10) " in comparison and "| AutoAttack  " not in comparison
    lines = list(csv.DictReader(io.StringIO((tmp_path / "s" / "results.csv").read_text())))
    assert {(r["test_images"], r["autoattack_test_images"]) for r in lines} == {("40", "10")}
    by = {(r["label"], r["seed"]): r for r in lines}
    expected = float(made["arow-s0"]["pgd20"][:10].float().mean())
    assert float(by["arow", "0"]["pgd20_on_aa_images"]) == pytest.approx(expected)
    assert float(by["arow", "0"]["worst_case_on_aa_images"]) == pytest.approx(arow_worst[0] / 100)
    assert by["trades", "1"]["worst_case_on_aa_images"] == ""


# --------------------------------------------------------------------------- a study cell's log
@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
def test_a_study_cell_logs_its_progress_then_each_number_once(tmp_path, caplog):
    from arow.study.cells import run_cell
    from arow.study.runner import prepare_study
    from arow.study.spec import StudySpec

    spec = StudySpec.from_dict({"methods": ["trades"], "baseline": "trades", "seeds": [0], "attacks": "clean,pgd2",
                                "aa_n": 0, "eps_curve_n": 0, "eval_n": 20, "guards": False,
                                "overrides": {"limit_train": 64, "epochs": 1, "val_size": 16, "batch_size": 32,
                                              "attack_steps": 1, "val_attack": "pgd2", "device": "cpu"}})
    prepare_study(tmp_path / "s", spec)
    seen = []
    with caplog.at_level(logging.INFO):
        assert run_cell(tmp_path / "s" / "cells" / "trades-s0",
                        progress=lambda name, done, total: seen.append(name)) == ["train"]
    assert _attack_lines(caplog) == []  # not the cascade's line per attack, then the same numbers again
    numbers = [r.getMessage() for r in caplog.records
               if re.match(r"^clean \d+\.\d\d%, pgd2 \d+\.\d\d%", r.getMessage())]
    assert len(numbers) == 1, caplog.text
    assert "pgd2" in seen  # the attack's progress still streams
    assert any(r.getMessage().startswith("step train done") for r in caplog.records)
    assert logging.getLogger("arow.evaluation.cascade").filters == []


# --------------------------------------------------------------------------- arow pseudo-label says it once
def test_pseudo_label_says_what_it_labelled_once(tmp_path, caplog, capsys, arow_logger_level):
    from arow.models import build_model
    from arow.pipelines import build_trainer

    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None, "std": None,
            "dataset": "fashion-mnist"}
    data = from_tensors(*_images(32), name="fashion-mnist")
    build_trainer(_cfg(out=str(tmp_path / "run"), eval_attacks=""), model, data, model_spec=spec, plots=False).fit()
    images = (torch.rand(20, 28, 28, 1, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "unlabelled.npz", image=images)
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        assert main(["pseudo-label", str(tmp_path / "run"), "--data", str(tmp_path / "unlabelled.npz"),
                     "--out", str(tmp_path / "p.npz"), "--device", "cpu"]) == 0
    said = capsys.readouterr().out.splitlines() + [r.getMessage() for r in caplog.records]
    assert len([line for line in said if "labelled 20 images" in line]) == 1, said
    assert len([line for line in said if str(tmp_path / "p.npz") in line]) == 1, said


# --------------------------------------------------------------------------- arow report: data sets and unset settings
def test_a_report_names_the_data_set_a_custom_run_was_evaluated_on(tmp_path):
    import csv
    import io

    from arow.reporting.tables import build_report
    from test_report import make_run

    rep = build_report([make_run(tmp_path, "mine", dataset="custom"), make_run(tmp_path, "std", method="trades")])
    md = rep.markdown()
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    rows = {r[0]: dict(zip(header, r)) for r in ([c.strip() for c in ln.strip("|").split("|")]
                                                 for ln in md.splitlines()[4:6])}
    assert rows["arow"]["dataset"] == "custom (eval: fashion-mnist)", rows
    assert rows["trades"]["dataset"] == "fashion-mnist"  # trained and evaluated on the same: named once
    assert "custom (eval: fashion-mnist) at eps=0.1" in md
    lines = {r["method"]: r for r in csv.DictReader(io.StringIO(rep.csv()))}
    assert (lines["arow"]["dataset"], lines["arow"]["eval_dataset"]) == ("custom", "fashion-mnist")


def test_a_report_says_what_an_unset_setting_means(tmp_path):
    from arow.reporting.tables import build_report
    from test_report import make_run

    runs = [make_run(tmp_path, "all", limit_train=None, swa_start=None),
            make_run(tmp_path, "some", limit_train=64, swa_start=2)]
    settings = {r[-2] for r in build_report(runs).rows()}  # the setting column, before the notes
    assert settings == {"limit_train=all, swa_start=off", "limit_train=64, swa_start=2"}, settings
    assert not any("None" in s for s in settings)


# --------------------------------------------------------------------------- verdicts of the wrong length
def test_verdicts_of_another_number_of_images_are_refused():
    from arow.evaluation.cascade import pack_verdicts, unpack_verdicts

    v = torch.arange(20) % 3 == 0
    packed = pack_verdicts({"pgd20": v})
    assert np.array_equal(unpack_verdicts(packed, 20)["pgd20"], v.numpy())
    for n in (8, 16, 25, 40):  # 20 images take 3 bytes: fewer and more are refused
        with pytest.raises(ValueError, match="pgd20"):
            unpack_verdicts(packed, n)
    with pytest.raises(ValueError, match="not base64"):
        unpack_verdicts({"pgd20": "not base64!"}, 20)


def test_a_short_verdict_string_reads_as_no_verdicts_with_a_line_in_the_log(tmp_path, caplog):
    from arow.evaluation.cascade import pack_verdicts
    from arow.study.collect import collect

    made = _aa_study(tmp_path / "s", {})
    # arow-s0's evaluation holds PGD verdicts of 16 images where it evaluated 40; arow-s1's AutoAttack
    # file holds AutoAttack verdicts of 8 images where it ran on 10
    main_file = tmp_path / "s" / "cells" / "arow-s0" / "eval.json"
    main = json.loads(main_file.read_text())
    main["verdicts"]["pgd20"] = pack_verdicts({"pgd20": made["arow-s0"]["pgd20"][:16]})["pgd20"]
    main_file.write_text(json.dumps(main))
    sub_file = tmp_path / "s" / "cells" / "arow-s1" / "eval_n10.json"
    sub = json.loads(sub_file.read_text())
    sub["verdicts"]["autoattack"] = pack_verdicts({"autoattack": made["arow-s1"]["autoattack"][:8]})["autoattack"]
    sub_file.write_text(json.dumps(sub))
    with caplog.at_level(logging.WARNING, logger="arow.study.collect"):
        res = collect(tmp_path / "s", plots=False)
    section = (tmp_path / "s" / "results.md").read_text().split("## AutoAttack on the first 10 test images")[1]
    runs = {(r[0], r[1]): r[2:] for r in _md_table(section.split("Every run:")[1])[1:]}
    pct = lambda t: f"{100 * float(t.float().mean()):.2f}"  # noqa: E731
    s0, s1 = made["arow-s0"], made["arow-s1"]
    assert runs["arow", "0"] == [pct(s0["autoattack"]), "-", "-", "-"], runs["arow", "0"]
    assert runs["arow", "1"] == [pct(s1["autoattack"]), pct(s1["pgd20"][:10]), pct(s1["clean"][:10]), "-"]
    assert runs["trades", "0"][3] == pct(made["trades-s0"]["pgd20"][:10] & made["trades-s0"]["autoattack"])
    said = [r.getMessage() for r in caplog.records]
    assert any(str(main_file) in m and "AutoAttack table" in m and "2 bytes" in m for m in said), said
    assert any(str(sub_file) in m and "AutoAttack table" in m for m in said), said
    assert any("arow-s0" in m and "per-image tests" in m for m in said), said
    cell = next(c for c in res["cells"] if (c["label"], c["seed"]) == ("arow", 0))
    assert "pgd20" in cell["verdicts_error"]
    assert {t["seed"] for t in res["image_tests"]} == {1}  # arow-s0's verdicts are in no per-image test


# --------------------------------------------------------------------------- arow report: unset paths
def test_an_unset_path_never_reads_off():
    import dataclasses

    from arow.reporting.tables import UNSET_TEXT, unset_text

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert unset_text("data_dir") != "off" and unset_text("out") != "off"
    assert unset_text("out") == "unset" and unset_text("resolved.method_args.unknown") == "unset"
    assert [k for k in UNSET_TEXT if k not in fields or fields[k].default is not None] == []
    off = {k for k in fields if unset_text(k) == "off"}
    assert off == {"swa_start", "ema"}, off  # an averaging left unset is off; nothing else is
