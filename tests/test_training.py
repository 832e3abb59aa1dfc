"""The training loop: it learns, writes its run folder, resumes exactly after a crash."""
import copy
import dataclasses
import json

import pytest
import torch

from arow.config import ConfigError, TrainConfig
from arow.data import from_tensors
from arow.pipelines import build_trainer
from arow.runs.rundir import RunDir
from arow.training.errors import TrainingDiverged
from arow.training.trainer import Callbacks, Trainer, loss_exploded, lr_at

from conftest import fmnist_available, tiny_cnn


class Crash(Callbacks):
    """Raises KeyboardInterrupt at a chosen point, like a kill."""

    def __init__(self, epoch: int, step: int | None = None):
        self.epoch, self.step, self.current = epoch, step, 0

    def on_epoch_start(self, epoch, epochs, steps):
        self.current = epoch

    def on_step(self, step):
        if self.step is not None and self.current == self.epoch and step == self.step:
            raise KeyboardInterrupt

    def on_epoch_end(self, record):
        if self.step is None and record["epoch"] == self.epoch + 1:
            raise KeyboardInterrupt


def _run(cfg, data, val, callbacks=None, resume=False):
    torch.manual_seed(cfg.seed)
    model = tiny_cnn()
    return build_trainer(cfg, model, data, val, callbacks=callbacks, resume=resume).fit()


@pytest.fixture()
def small(fmnist_small):
    xtr, ytr, _, _ = fmnist_small
    return from_tensors(xtr[:192], ytr[:192]), from_tensors(xtr[1000:1064], ytr[1000:1064])


def _cfg(out, **kw):
    base = dict(method="arow", epochs=3, batch_size=64, lr=0.05, eps=0.1, attack_steps=2, schedule="step",
                milestones=[2], augment="flip", seed=3, out=str(out), val_attack="pgd3")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("crash", [dict(epoch=0), dict(epoch=1, step=1)], ids=["after-epoch-1", "mid-epoch-2"])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, small, crash):
    data, val = small
    ref = _run(_cfg(tmp_path / "ref", swa_start=2), data, val)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path / "crash", swa_start=2), data, val, callbacks=Crash(**crash))
    resumed = _run(_cfg(tmp_path / "crash", swa_start=2), data, val, resume=True)
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    lines = [json.loads(l) for l in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    ref_lines = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in lines] == [r["train_loss"] for r in ref_lines]


def test_run_folder_contents(tmp_path, small):
    data, val = small
    res = _run(_cfg(tmp_path / "run", epochs=2), data, val)
    run = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "last.pt", "final.pt", "best.pt"} <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ["epoch", "lr", "train_loss", "train_natural", "train_robust", "train_weight_mean",
                "val_clean_acc", "val_pgd_acc", "seconds", "weight_hist"]:
        assert key in rec, key
    assert 0 <= rec["train_weight_mean"] <= 1 and 0 <= rec["val_pgd_acc"] <= rec["val_clean_acc"] <= 1
    assert sum(rec["weight_hist"]) == pytest.approx(len(data))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["method_args"]["lam"] == 3.5 and cfg["resolved"]["eps"] == 0.1
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert {"model", "optimizer", "rng", "epoch", "config", "version", "model_spec"} <= set(ckpt)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert len(res.history) == 2


def test_existing_run_folder_is_not_overwritten(tmp_path, small):
    data, val = small
    _run(_cfg(tmp_path / "run", epochs=1), data, val)
    with pytest.raises(ConfigError, match="--resume"):
        _run(_cfg(tmp_path / "run", epochs=1), data, val)


def test_arow_training_learns_and_improves_robustness(fmnist_small):
    xtr, ytr, xte, yte = fmnist_small
    data = from_tensors(xtr, ytr)
    cfg = TrainConfig(epochs=2, batch_size=100, lr=0.1, eps=0.1, attack_steps=3, schedule="onecycle",
                      augment="none", seed=0, out=None)
    res = _run(cfg, data, None)
    from arow.evaluation.cascade import evaluate
    r = evaluate(res.model, xte, yte, ["clean", "pgd10"], eps=0.1)
    assert r.accuracy["clean"] > 0.5
    assert r.accuracy["pgd10"] > 0.2  # an undefended model of this size is near 0 at eps 0.1


def test_schedules():
    cfg = TrainConfig(epochs=120, lr=0.1, schedule="step", warmup_epochs=0, milestones=[60, 100])
    assert lr_at(cfg, 0) == 0.1 and lr_at(cfg, 60) == pytest.approx(0.01) and lr_at(cfg, 100.5) == pytest.approx(0.001)
    frac = TrainConfig(epochs=10, lr=0.1, schedule="step", warmup_epochs=0, milestones=[0.5])
    assert lr_at(frac, 4.9) == 0.1 and lr_at(frac, 5) == pytest.approx(0.01)
    cos = TrainConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=0)
    assert lr_at(cos, 0) == pytest.approx(0.1) and lr_at(cos, 10) == pytest.approx(0.0, abs=1e-12)
    one = TrainConfig(epochs=10, lr=0.2, schedule="onecycle", warmup_epochs=2)
    assert lr_at(one, 1) < 0.2 and lr_at(one, 2) == pytest.approx(0.2) and lr_at(one, 6) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(eps=-0.1), dict(lr=0), dict(batch_size=0),
                                 dict(epochs=10**20), dict(epochs=10_001), dict(batch_size=10**20),
                                 dict(batch_size=65_537),
                                 dict(schedule="linear"), dict(swa_start=50, epochs=10), dict(device="tpu")])
def test_bad_config_values(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**bad).validate()


# --------------------------------------------------------------------------- EMA of the weights
def test_ema_equals_a_hand_computed_average_over_three_steps():
    from arow.training.averaging import EMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    ema, warm = EMA(net, 0.9), EMA(net, 0.9, warmup=True, bn="copy")
    expect = [p.detach().clone() for p in net.parameters()]
    expect_w = [p.detach().clone() for p in net.parameters()]
    for t in range(3):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
        ema.update(net)
        warm.update(net)
        dw = min(0.9, (1 + t) / (10 + t))  # 0.1, 2/11, 3/12
        for e, ew, p in zip(expect, expect_w, net.parameters()):
            e.mul_(0.9).add_(0.1 * p.detach())
            ew.mul_(dw).add_((1 - dw) * p.detach())
    for e, ew, a, aw in zip(expect, expect_w, ema.model.parameters(), warm.model.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(aw, ew, rtol=1e-6, atol=1e-7)
    bn, bn_ema, bn_copy = net[1], ema.model[1], warm.model[1]
    assert torch.equal(bn_copy.running_mean, bn.running_mean)  # copied at every update
    assert not torch.equal(bn_ema.running_mean, bn.running_mean) and not ema.calibrated  # recomputed before use


@pytest.mark.parametrize("crash", [dict(epoch=0), dict(epoch=1, step=1)], ids=["after-epoch-1", "mid-epoch-2"])
def test_resume_with_ema_equals_uninterrupted_run(tmp_path, small, crash):
    data, val = small
    ref = _run(_cfg(tmp_path / "ref", ema=0.9, ema_warmup=True), data, val)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path / "crash", ema=0.9, ema_warmup=True), data, val, callbacks=Crash(**crash))
    resumed = _run(_cfg(tmp_path / "crash", ema=0.9, ema_warmup=True), data, val, resume=True)
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    final = torch.load(tmp_path / "crash" / "final.pt", weights_only=True)
    assert final["final_source"] == "ema"
    rec = json.loads((tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "ema_val_pgd_acc" in rec and "val_pgd_acc" in rec


def test_ema_and_swa_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="choose one"):
        _cfg(tmp_path, ema=0.99, swa_start=2).validate()
    with pytest.raises(ConfigError, match="--ema"):
        _cfg(tmp_path, ema=1.0).validate()


def test_user_data_needs_eps_and_runs_are_named_after_the_users_model_and_data(tmp_path):
    torch.manual_seed(0)
    data = from_tensors(torch.rand(64, 3, 16, 16), torch.arange(64) % 4, name="my-scans")
    cfg = TrainConfig(epochs=1, batch_size=32, attack_steps=1, val_size=0, out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="eps must be given for your own data"):
        Trainer(cfg, tiny_cnn(in_ch=3, n_cls=4), data)
    cfg = dataclasses.replace(cfg, eps=4 / 255)
    build_trainer(cfg, tiny_cnn(in_ch=3, n_cls=4), data).fit()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dataset"] == "my-scans" and saved["model"] == "Sequential"
    assert saved["eps"] == pytest.approx(4 / 255) and saved["augment"] is None


# --------------------------------------------------------------------------- optimiser options
def _trainer(data=None, model=None, **kw):
    torch.manual_seed(0)
    data = data or from_tensors(torch.rand(16, 1, 28, 28), torch.arange(16) % 10)
    base = dict(epochs=1, batch_size=8, eps=0.1, attack_steps=1, val_size=0, device="cpu", out=None)
    base.update(kw)
    return Trainer(TrainConfig(**base), model or tiny_cnn(), data)


def test_nesterov_and_no_bn_decay_reach_sgd():
    t = _trainer(nesterov=True, no_bn_decay=True, weight_decay=0.01)
    bn = t.model[1]
    decay, no_decay = t.opt.param_groups
    assert all(g["nesterov"] for g in t.opt.param_groups)
    assert [id(p) for p in no_decay["params"]] == [id(bn.weight), id(bn.bias)] and no_decay["weight_decay"] == 0
    assert decay["weight_decay"] == 0.01 and len(decay["params"]) == len(list(t.model.parameters())) - 2
    # a step whose gradients are all zero: only weight decay moves a weight
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    for p in t.model.parameters():
        p.grad = torch.zeros_like(p)
    t.opt.step()
    after = dict(t.model.named_parameters())
    for name in ("0.weight", "0.bias", "3.weight", "7.weight", "7.bias"):  # conv and linear: decayed
        assert not torch.equal(after[name], before[name]), name
    for name in ("1.weight", "1.bias"):  # BatchNorm scale and shift: not decayed
        assert torch.equal(after[name], before[name]), name
    default = _trainer()
    assert len(default.opt.param_groups) == 1 and not default.opt.param_groups[0]["nesterov"]


def test_no_bn_decay_follows_the_schedule_and_resumes():
    kw = dict(no_bn_decay=True, weight_decay=0.01, schedule="cosine", warmup_epochs=0, epochs=2)
    a = _trainer(**kw)
    a.train_epoch(0)
    assert [g["lr"] for g in a.opt.param_groups] == [lr_at(a.cfg, 0.5)] * 2  # the epoch's last step, every group
    state = copy.deepcopy(a.state_dict())  # the optimiser's state_dict holds live tensors
    a.train_epoch(1)
    b = _trainer(**kw)
    b.load_state_dict(state)
    assert [g["weight_decay"] for g in b.opt.param_groups] == [0.01, 0.0]
    b.train_epoch(1)
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("method", ["arow", "pgd-at"])
def test_grad_accum_gives_the_weights_of_the_full_batch(method):
    # float64 and no BatchNorm: 4 micro-batches sum to the full batch's gradient, with the same
    # random starts; 20 examples in batches of 8 end with a short batch (2 micro-batches of 2).
    from arow.data import TensorData

    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.rand(20, 1, 28, 28, generator=g, dtype=torch.float64), torch.arange(20) % 10, 10)
    kw = dict(method=method, lr=0.1, attack_steps=2, augment="flip", amp="off")

    def net():
        torch.manual_seed(1)
        return tiny_cnn(bn=False).double()

    full = _trainer(data, net(), **kw)
    accum = _trainer(data, net(), grad_accum=4, **kw)
    start = [p.detach().clone() for p in full.model.parameters()]
    rec_full, rec_accum = full.train_epoch(0), accum.train_epoch(0)
    for p, q, p0 in zip(full.model.parameters(), accum.model.parameters(), start):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    assert max((p - p0).abs().max().item() for p, p0 in zip(full.model.parameters(), start)) > 1e-3
    for key in ("train_loss", "train_adv_acc"):
        assert rec_full[key] == pytest.approx(rec_accum[key], rel=1e-6), key


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ConfigError, match="--batch-size 10 must be divisible by --grad-accum 4"):
        TrainConfig(batch_size=10, grad_accum=4).validate()
    with pytest.raises(ConfigError, match="--grad-accum must be >= 1"):
        TrainConfig(grad_accum=0).validate()


def test_bf16_training_step_keeps_losses_in_float32_and_evaluation_in_float32(small):
    """--amp bf16 on the CPU: the network runs in bf16 inside the step, every loss is float32, and
    the validation attacks run without autocast."""
    data, val = small
    seen: dict[str, set] = {"train": set(), "val": set(), "loss": set()}
    phase = {"now": "train"}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            out = self.net(x)
            seen[phase["now"]].add(out.dtype)
            return out

    class Phase(Callbacks):
        def on_validation_start(self):
            phase["now"] = "val"

        def on_epoch_start(self, epoch, epochs, steps):
            phase["now"] = "train"

    torch.manual_seed(0)
    cfg = dataclasses.replace(_cfg(None, epochs=1, amp="bf16"), out=None)
    trainer = Trainer(cfg, Spy(), data, val, callbacks=[Phase()])
    objective = trainer.method.objective

    def spy_objective(*args, **kwargs):
        out = objective(*args, **kwargs)
        seen["loss"].add(out.loss.dtype)
        seen["loss"].update(v.dtype for v in out.parts.values())
        return out

    trainer.method.objective = spy_objective
    trainer.fit()
    assert trainer.amp and seen["train"] == {torch.bfloat16}
    assert seen["loss"] == {torch.float32}
    assert seen["val"] == {torch.float32}


# --------------------------------------------------------------------------- one plan per run
@pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST not installed")
def test_the_config_is_resolved_once_per_run(tmp_path, monkeypatch):
    from arow.config import plan
    from arow.pipelines import train_and_evaluate, train_run

    real, calls = plan.resolve, []
    monkeypatch.setattr(plan, "resolve", lambda cfg, **kw: calls.append(cfg) or real(cfg, **kw))
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=1, limit_train=64, val_size=16, batch_size=32, attack_steps=1, eval_attacks="",
                      out=str(out))
    train_run(cfg, plots=False)  # the Python API: resolved at its entry, trusted below
    assert len(calls) == 1
    calls.clear()
    train_run(dataclasses.replace(cfg, epochs=2), resume=True, plots=False)
    assert len(calls) == 1
    calls.clear()  # the command line: resolve_config resolves; nothing below resolves again
    train_and_evaluate(plan.resolve_config({"out": str(out), "epochs": 3}, resume=True), resume=True)
    assert len(calls) == 1 and [r["epoch"] for r in RunDir(out).read_metrics()] == [1, 2, 3]


def test_a_resolved_config_is_frozen_and_a_changed_copy_is_resolved_again():
    from arow.config import is_resolved, resolve

    cfg = resolve(TrainConfig(dataset="cifar10"))
    assert is_resolved(cfg) and round(cfg.eps * 255) == 8 and cfg.augment == "crop+flip" and cfg.attack_steps == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.eps = 0.5
    changed = dataclasses.replace(cfg, dataset="fashion-mnist", eps=None, augment=None)
    assert not is_resolved(changed) and not is_resolved(TrainConfig())
    assert (resolve(changed).eps, resolve(changed).augment) == (0.1, "flip")
    trainer = Trainer(cfg, tiny_cnn(in_ch=3), from_tensors(torch.rand(8, 3, 32, 32), torch.arange(8) % 10,
                                                            name="cifar10"))
    assert trainer.cfg is cfg  # a resolved config is trained on as it is


def test_user_data_is_named_once_where_the_plan_is_made():
    from arow.threat import ThreatModel
    from arow.methods import build_method

    data = from_tensors(torch.rand(16, 1, 28, 28), torch.arange(16) % 10, name="my-scans")
    method = build_method("trades", ThreatModel(eps=0.2, steps=1))
    cfg = TrainConfig(method="trades", epochs=1, batch_size=8, val_size=0)
    trainer = Trainer(cfg, tiny_cnn(), data, method=method)  # a method built by the caller carries its eps
    assert (trainer.cfg.eps, trainer.cfg.dataset, trainer.cfg.model) == (0.2, "my-scans", "Sequential")
    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "dataset": "fashion-mnist"}
    named = Trainer(cfg, tiny_cnn(), data, model_spec=spec)  # the spec names model and data: built-in defaults
    assert (named.cfg.model, named.cfg.dataset, named.cfg.eps) == ("small-cnn", "fashion-mnist", 0.1)


# --------------------------------------------------------------------------- the model spec
def test_model_spec_reads_every_version_and_writes_the_plain_dict():
    from arow.models import Normalize
    from arow.models.spec import ModelSpec

    old = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None, "std": None}
    spec = ModelSpec.from_dict(old)  # 0.1.0 wrote neither the activation nor the data set
    assert (spec.activation, spec.dataset, spec.custom) == ("relu", None, False)
    assert spec.to_dict() == {**old, "dataset": None, "activation": "relu"}
    assert ModelSpec.from_dict({**spec.to_dict(), "added_later": 1}) == spec
    normed = spec.replace(mean=torch.tensor([0.5]), std=[0.25])
    assert normed.to_dict()["mean"] == [0.5] and isinstance(normed.build()[0], Normalize)
    custom = ModelSpec.from_dict({"name": "Net", "custom": True})
    assert custom.to_dict() == {"name": "Net", "custom": True}
    with pytest.raises(ValueError, match="user-defined"):
        custom.build()
    with pytest.raises(ValueError, match="'num_classes' must be an integer"):
        ModelSpec.from_dict({**old, "num_classes": "10"})
    with pytest.raises(ValueError, match="lacks num_classes"):
        ModelSpec("small-cnn").build()
    trainer = _trainer()  # a Trainer without a spec records the user's class, marked custom
    assert trainer.state_dict()["model_spec"] == {"name": "Sequential", "custom": True}


# --------------------------------------------------------------------------- which model is reported
def test_one_owner_says_which_model_is_reported():
    from arow.runs.selection import reported_model, reported_prefix, selection_key

    assert [reported_model(r) for r in (["ema", "swa"], ["ema"], [])] == ["swa", "ema", "last"]
    assert reported_prefix({"val_pgd_acc": 0.1, "ema_val_pgd_acc": 0.2}) == "ema_"
    assert selection_key({"val_pgd_acc": 0.1}) == "val_pgd_acc"
    ema = _trainer(ema=0.9)
    assert ema.reported() == "last" and ema.final_model() is ema.model  # no update yet: the trained weights
    ema.train_epoch(0)
    assert ema.reported() == "ema" and ema.final_model() is ema.ema.model
    assert ema.final_state_dict(ema.final_model())["final_source"] == "ema"
    swa = _trainer(swa_start=1)
    result = swa.fit()
    assert swa.reported() == "swa" and result.model is swa.swa.model


# --------------------------------------------------------------------------- a loss that explodes
def test_a_huge_learning_rate_that_explodes_without_going_non_finite_stops_the_run(tmp_path, small):
    data, val = small
    out = tmp_path / "run"
    cfg = _cfg(out, epochs=2, lr=100, warmup_epochs=0, schedule="constant", milestones=[])
    seen = []

    class Losses(Callbacks):
        def on_step_record(self, record):
            seen.append(record["train_loss"])

    with pytest.raises(TrainingDiverged, match=r"epoch 1 \(exploded\)"):
        _run(dataclasses.replace(cfg, log_every=1), data, val, callbacks=[Losses()])
    # every step's loss stayed finite: the non-finite check alone would have let this run finish
    assert seen and all(torch.isfinite(torch.tensor(seen))) and max(seen) > 1e4
    assert json.loads((out / "diverged.json").read_text())["reason"] == "exploded"
    assert not (out / "final.pt").exists()


def test_the_explosion_limit_is_relative_to_the_first_epoch_with_a_floor():
    assert not loss_exploded(2.3, None) and not loss_exploded(9_999.0, None) and loss_exploded(10_001.0, None)
    assert not loss_exploded(9_999.0, 0.5)  # the floor, not 1000 x 0.5
    assert not loss_exploded(49_000.0, 50.0) and loss_exploded(51_000.0, 50.0)
    assert loss_exploded(float("inf"), 2.0) and not loss_exploded(float("nan"), 2.0)  # nan: the non-finite check's
    trainer = _trainer()
    trainer.history = [{"epoch": 1, "train_loss": 50.0}]
    trainer._check_loss_exploded({"epoch": 2, "train_loss": 49_000.0}, 1)
    with pytest.raises(TrainingDiverged, match=r"epoch 2 \(exploded\)") as err:
        trainer._check_loss_exploded({"epoch": 2, "train_loss": 51_000.0}, 1)
    assert err.value.info == {"epoch": 2, "step": None, "reason": "exploded", "lr": trainer.cfg.lr}
