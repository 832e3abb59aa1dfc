"""Experiment trackers beside TensorBoard: W&B (offline) and MLflow (a local file store) get the records
of metrics.jsonl by global step, the settings once, the final numbers, and a closed run, also after a
failure; a missing package is one line when the run is set up. No network: W&B runs offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arow.cli.commands import main
from arow.config.schema import ConfigError, TrainConfig
from arow.data import from_tensors
from arow.pipelines import build_trainer
from arow.runs.rundir import RunDir
from arow.training.callbacks import Callbacks
from arow.training.trackers import open_trackers

from conftest import fmnist_available, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = {"name": "tiny-cnn", "custom": True}
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}


def _data():
    g = torch.Generator().manual_seed(0)
    data = from_tensors(torch.rand(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g))
    val = from_tensors(torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))
    return data, val


def _cfg(out: Path, **kw) -> TrainConfig:
    """Two epochs of two steps (96 images, batch 48), a step record at every step."""
    base = dict(method="arow", epochs=2, batch_size=48, eps=0.1, attack_steps=1, val_size=0, val_attack="fgsm",
                log_every=1, device="cpu", out=str(out), wandb=True, wandb_project="arow-test", mlflow=True)
    return TrainConfig(**{**base, **kw})


def _fit(cfg: TrainConfig, callbacks=None):
    torch.manual_seed(0)
    data, val = _data()
    return build_trainer(cfg, tiny_cnn(), data, val, model_spec=SPEC, callbacks=callbacks).fit()


def _isolated(mp: pytest.MonkeyPatch, wandb_dir: Path) -> None:
    """W&B offline into ``wandb_dir``; MLflow with nothing set by the environment."""
    for k, v in {**OFFLINE, "WANDB_DIR": str(wandb_dir)}.items():
        mp.setenv(k, v)
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        mp.delenv(k, raising=False)


class Crash(Callbacks):
    """Interrupts the fit at the second step, like Ctrl-C."""

    def on_step(self, step):
        if step == 1:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A finished run and an interrupted one, both with --wandb (offline) and --mlflow (default store)."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[mlflow]')")
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        _isolated(mp, root / "wandb-done")
        _fit(_cfg(root / "done"))
        mp.delenv("WANDB_DIR")  # W&B's files then go into the run folder
        with pytest.raises(KeyboardInterrupt):
            _fit(_cfg(root / "crashed"), callbacks=[Crash()])
    return root


# --------------------------------------------------------------------------- W&B, read back with wandb's reader
def _wandb_run_dir(folder: Path) -> Path:
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {folder}, found {runs}"
    assert list(runs[0].glob("run-*.wandb")), "the offline run has no .wandb transaction log"
    return runs[0]


def _wandb_read(run_dir: Path, *flags: str) -> str:
    """``wandb leet inspect``: W&B's own reader of a .wandb log (newer wandb releases)."""
    pytest.importorskip("wandb.cli.leet", reason="this wandb has no `wandb leet inspect` to read its logs back")
    r = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_dir)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_wandb_offline_run_holds_the_history_config_and_summary(tracked):
    run_dir = _wandb_run_dir(tracked / "wandb-done")
    records = [json.loads(line) for line in _wandb_read(run_dir).splitlines() if line.strip()]
    history = [r["history"] for r in records if r["type"] == "history"]
    by_step = {}
    for h in history:
        by_step.setdefault(int(h["step"]["num"]), {}).update(h["item"])
    run = RunDir(tracked / "done")
    steps, epochs = run.read_steps(), run.read_metrics()
    assert sorted(by_step) == [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        assert by_step[s["step"]]["train_step/loss"] == pytest.approx(s["train_loss"])
        assert by_step[s["step"]]["lr"] == pytest.approx(s["lr"])
    for e, step in zip(epochs, (2, 4)):  # each epoch's record at the epoch's last global step
        assert by_step[step]["train/loss"] == pytest.approx(e["train_loss"])
        assert by_step[step]["val/pgd_acc"] == pytest.approx(e["val_pgd_acc"])
    summary = json.loads(_wandb_read(run_dir, "--summary"))
    assert summary["project"] == "arow-test" and summary["name"] == "done"
    assert summary["config"]["method"] == "arow" and summary["config"]["epochs"] == 2
    assert summary["config"]["resolved.eps"] == pytest.approx(0.1)
    assert summary["summary"]["final_val_pgd_acc"] == pytest.approx(epochs[-1]["val_pgd_acc"])
    assert summary["summary"]["final_val_clean_acc"] == pytest.approx(epochs[-1]["val_clean_acc"])
    assert summary["state"] == "finished" and summary["exit_code"] == 0


def test_wandb_run_is_closed_as_failed_when_training_fails(tracked):
    summary = json.loads(_wandb_read(_wandb_run_dir(tracked / "crashed"), "--summary"))
    assert summary["exit_code"] != 0 and summary["state"] != "running"


# --------------------------------------------------------------------------- MLflow, read back with MlflowClient
def _mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    assert (out / "mlruns").is_dir()  # the default store is in the run folder
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
        exp = client.get_experiment_by_name("arow")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1
        history = {k: client.get_metric_history(runs[0].info.run_id, k) for k in ("train/loss", "train_step/loss")}
    return runs[0], history


def test_mlflow_file_store_holds_params_metric_history_and_final_metrics(tracked):
    run, history = _mlflow_run(tracked / "done")
    steps, epochs = RunDir(tracked / "done").read_steps(), RunDir(tracked / "done").read_metrics()
    assert run.info.status == "FINISHED" and run.info.run_name == "done"
    assert run.data.params["method"] == "arow" and run.data.params["epochs"] == "2"
    assert float(run.data.params["resolved.eps"]) == pytest.approx(0.1)
    assert [m.step for m in history["train_step/loss"]] == [s["step"] for s in steps]  # one per logged step
    assert [m.value for m in history["train_step/loss"]] == pytest.approx([s["train_loss"] for s in steps])
    assert [(m.step, m.value) for m in history["train/loss"]] == [(2, pytest.approx(epochs[0]["train_loss"])),
                                                                  (4, pytest.approx(epochs[1]["train_loss"]))]
    assert run.data.metrics["final_val_pgd_acc"] == pytest.approx(epochs[-1]["val_pgd_acc"])
    assert run.data.metrics["best_epoch"] in (1.0, 2.0)


def test_mlflow_run_is_closed_when_training_is_interrupted(tracked):
    run, history = _mlflow_run(tracked / "crashed")
    assert run.info.status == "KILLED"
    logged = [s["step"] for s in RunDir(tracked / "crashed").read_steps()]
    assert [m.step for m in history["train_step/loss"]] == logged == [1, 2]  # the records before the interruption
    assert "final_val_pgd_acc" not in run.data.metrics


def test_mlflow_uri_flag_and_environment_choose_the_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[mlflow]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrainConfig(mlflow=True)
    with pytest.raises(ConfigError, match=r"--mlflow needs a run folder \(--out\).*or --mlflow-uri"):
        open_trackers(cfg, None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "env").as_uri())
    assert open_trackers(cfg, tmp_path / "run")[0].uri == (tmp_path / "env").as_uri()
    given = TrainConfig(mlflow=True, mlflow_uri=(tmp_path / "flag").as_uri())
    assert open_trackers(given, tmp_path / "run")[0].uri == (tmp_path / "flag").as_uri()


# --------------------------------------------------------------------------- set-up: flags and missing packages
@pytest.mark.parametrize("flag, module", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_tracker_package_is_one_line_before_training(tmp_path, monkeypatch, flag, module):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    cfg = _cfg(tmp_path / "run", wandb=flag == "wandb", mlflow=flag == "mlflow")
    with pytest.raises(ConfigError) as e:
        build_trainer(cfg, tiny_cnn(), _data()[0], model_spec=SPEC)
    assert str(e.value) == f"--{flag} needs {module}: pip install -e '.[{module}]'"
    assert not RunDir(tmp_path / "run").has_checkpoint()


@pytest.mark.skipif(not fmnist_available(), reason="needs the Fashion-MNIST files")
def test_missing_tracker_package_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    code = main(["train", "--wandb", "--epochs", "1", "--limit-train", "64", "--val-size", "0", "--eval-attacks", "",
                 "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["arow: error: --wandb needs wandb: pip install -e '.[wandb]'"]


def test_tracker_flags_reach_the_config(capsys):
    assert main(["train", "--wandb", "--wandb-project", "robust", "--mlflow", "--mlflow-uri", "http://localhost:5000",
                 "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["wandb"], cfg["wandb_project"], cfg["mlflow"], cfg["mlflow_uri"]) == (True, "robust", True,
                                                                                      "http://localhost:5000")
    assert {"wandb", "wandb_project", "mlflow", "mlflow_uri"} <= TrainConfig.runtime_keys()
