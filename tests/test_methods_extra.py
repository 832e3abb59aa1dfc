"""GAIR-AT, FAT, HAT and the AWP wrapper against hand computations and constructed models."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arow import losses
from arow.config.schema import TrainConfig
from arow.data import from_tensors
from arow.attacks.fat import fat_pgd
from arow.methods import AWP, METHODS, Passes, build_method
from arow.methods.awp import PROXY_LR, perturbed_weights
from arow.methods.gair_at import gair_attack
from arow.methods.hat import helper_points
from arow.threat import ThreatModel
from arow.pipelines import build_trainer
from arow.training.trainer import Trainer

from conftest import tiny_cnn

NEW = ["gair-at", "fat", "hat", "pgd-at-awp", "trades-awp", "mart-awp", "arow-awp"]


# --------------------------------------------------------------------------- a model with a known path
class Ramp(nn.Module):
    """logits = [0, s (x - 0.5)], s = 10 (a parameter), on a one-pixel input: class 0 iff x <= 0.5.

    CE-PGD on label 0 moves x up by one step per iterate, so an example starting at
    0.505 - 0.01 m is classified correctly at iterates t < m and wrongly from t = m on.
    """

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        z = x.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(z), self.scale * (z - 0.5)], dim=1)


STEP = 0.01


def ramp_inputs(first_wrong):
    x = torch.tensor([0.505 - STEP * m for m in first_wrong]).view(-1, 1, 1, 1)
    return x, torch.zeros(len(first_wrong), dtype=torch.long)


def ramp_threat(steps):
    return ThreatModel(eps=0.3, steps=steps, step=STEP, start="none")


# --------------------------------------------------------------------------- GAIR-AT
def test_gair_kappa_counts_correct_iterates_before_each_step():
    m = [0, 2, 4, 6, 9]
    x, y = ramp_inputs(m)
    x_adv, kappa = gair_attack(Ramp(), x, y, ramp_threat(6))
    assert kappa.tolist() == [min(k, 6) for k in m]  # iterates 0..K-1; the final one is not counted
    assert torch.allclose(x_adv, x + 6 * STEP)


def test_gair_weights_follow_the_formula_and_have_mean_one():
    kappa, K = torch.tensor([0, 2, 4, 6, 6]), 6
    raw = [(1 + math.tanh(-1 + 5 * (1 - 2 * k / K))) / 2 for k in kappa.tolist()]
    want = [r * len(raw) / sum(raw) for r in raw]
    w = losses.gair_weights(kappa, K, lam=-1.0)
    assert w.tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)  # float32: 1 + tanh cancels near -1
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
    assert w[0] > w[1] > w[2] > w[3]  # less robust (smaller kappa) gets more weight


def test_gair_reweights_only_from_the_start_epoch():
    x, y = ramp_inputs([0, 2, 4, 6])
    model = Ramp()
    method = build_method("gair-at", ramp_threat(6))
    assert method.start_epoch == 0  # before set_epoch: total_epochs = 1
    method.set_epoch(48, 120)  # 1-based epoch 49 < 50 = round(120 * 50/120)
    adv = method.attack(model, x, y)
    before = method.objective(model, x, y, adv)
    plain = F.cross_entropy(model(adv[0]), y)
    assert before.weight is None and torch.allclose(before.loss, plain)
    method.set_epoch(49, 120)
    after = method.objective(model, x, y, adv)
    w = losses.gair_weights(adv[1], 6)
    want = (F.cross_entropy(model(adv[0]), y, reduction="none") * w).mean()
    assert torch.allclose(after.weight, w) and torch.allclose(after.loss, want)
    assert not torch.allclose(after.loss, plain)
    fixed = build_method("gair-at", ramp_threat(6), gair_start=3)
    fixed.set_epoch(1, 120)
    assert not fixed.reweighting()
    fixed.set_epoch(2, 120)
    assert fixed.reweighting()


# --------------------------------------------------------------------------- FAT
@pytest.mark.parametrize("tau", [0, 1, 3])
def test_fat_stops_tau_steps_after_first_misclassification(tau):
    m = [0, 2, 5, 9, 30]  # the last one is never misclassified within K
    x, y = ramp_inputs(m)
    x_adv, steps = fat_pgd(Ramp(), x, y, ramp_threat(10), tau=tau)
    want = [min(k + tau, 10) for k in m]
    assert steps.tolist() == want
    assert torch.allclose(x_adv.flatten(), x.flatten() + STEP * torch.tensor(want, dtype=torch.float))
    # more steps move only the examples that have not stopped: the others stay exactly where they were
    x_long, steps_long = fat_pgd(Ramp(), x, y, ramp_threat(20), tau=tau)
    stopped = torch.tensor([k + tau <= 10 for k in m])
    assert torch.equal(x_long[stopped], x_adv[stopped]) and torch.equal(steps_long[stopped], steps[stopped])
    assert (steps_long[~stopped] > steps[~stopped]).all()


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 12, 12)])
def test_fat_stays_in_ball_and_box_and_restores_model(shape):
    torch.manual_seed(0)
    model = tiny_cnn(in_ch=shape[0]).train()
    x, y = torch.rand(8, *shape), torch.randint(0, 10, (8,))
    threat = ThreatModel(eps=0.1, steps=5)
    x_adv, steps = fat_pgd(model, x, y, threat, tau=1, omega=0.05)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert ((steps >= 0) & (steps <= 5)).all()
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_fat_dynamic_tau_schedule():
    fat = build_method("fat", ThreatModel(eps=0.1))
    taus = {}
    for e in [0, 49, 50, 89, 90, 119]:
        fat.set_epoch(e, 120)
        taus[e + 1] = fat.tau()
    assert taus == {1: 0, 50: 0, 51: 1, 90: 1, 91: 2, 120: 2}
    fixed = build_method("fat", ThreatModel(eps=0.1), fat_tau=5)
    fixed.set_epoch(0, 120)
    assert fixed.tau() == 5
    with pytest.raises(ValueError, match="fat-tau"):
        build_method("fat", ThreatModel(eps=0.1), fat_tau=-1)


# --------------------------------------------------------------------------- HAT
def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_hat_loss_equals_hand_computation():
    zc = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    za = [[0.5, 1.5, -0.5], [1.0, -1.0, 0.0]]
    zh = [[0.3, -0.2, 1.0], [-1.0, 2.0, 0.5]]
    y, yh = [0, 2], [2, 1]
    beta, gamma = 2.5, 0.25
    ce = lambda z, t: -math.log(softmax(z)[t])  # noqa: E731
    kl = lambda p, q: sum(a * (math.log(a) - math.log(b + 1e-12)) for a, b in zip(softmax(p), softmax(q)))  # noqa: E731
    want = sum(ce(c, t) + beta * kl(c, a) + gamma * ce(h, u) for c, a, h, t, u in zip(zc, za, zh, y, yh)) / 2
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    out = losses.hat_parts(t(zc), t(za), t(zh), torch.tensor(y), torch.tensor(yh), beta=beta, gamma=gamma)
    assert float(out.loss) == pytest.approx(want, rel=1e-9)
    assert float(out.parts["helper"]) == pytest.approx(gamma * (ce(zh[0], 2) + ce(zh[1], 1)) / 2, rel=1e-9)


def test_hat_helper_input_is_clamped():
    x = torch.tensor([0.95, 0.05, 0.5])
    x_adv = torch.tensor([1.0, 0.0, 0.52])
    assert helper_points(x, x_adv, 2.0).tolist() == pytest.approx([1.0, 0.0, 0.54])


def test_hat_without_helper_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="HAT needs --helper RUN_DIR"):
        build_method("hat", ThreatModel(eps=0.1))
    with pytest.raises(ValueError, match="--helper"):
        build_method("hat", ThreatModel(eps=0.1), helper=str(tmp_path / "missing"))


# --------------------------------------------------------------------------- AWP
def _awp_setup(name="trades-awp", **kw):
    torch.manual_seed(0)
    model = tiny_cnn().train()
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    method = build_method(name, ThreatModel(eps=0.1, steps=2), awp_start=1, **kw)
    method.set_epoch(0, 10)
    return model, x, y, method


def test_awp_perturbs_only_weights_and_the_update_is_restored_exactly():
    model, x, y, method = _awp_setup(awp_gamma=0.01)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    x_adv = method.attack(model, x, y)

    # the expected perturbation, computed independently: one ascent step of a copy of the model
    proxy = copy.deepcopy(model).train()
    loss = method.inner.objective(proxy, x, y, x_adv).loss
    names = [n for n, _ in perturbed_weights(proxy)]
    grads = dict(zip(names, torch.autograd.grad(loss, [p for _, p in perturbed_weights(proxy)])))
    delta = {}
    for n in names:
        d = PROXY_LR * grads[n]
        delta[n] = 0.01 * w0[n].norm() * d / d.norm()

    out = method.objective(model, x, y, x_adv)
    assert set(names) == {"0.weight", "3.weight", "7.weight"}  # convs and linear; not biases, not BN
    for n, p in model.named_parameters():
        if n in delta:
            assert torch.allclose(p - w0[n], delta[n], atol=1e-6), n
            assert float((p.detach() - w0[n]).norm() / w0[n].norm()) == pytest.approx(0.01, rel=1e-3)
        else:
            assert torch.equal(p, w0[n]), n

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    out.loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}  # taken at the perturbed weights
    opt.step()
    method.after_step(model)
    for n, p in model.named_parameters():
        want = (w0[n] + delta[n]) - 0.1 * g[n] - delta[n] if n in delta else w0[n] - 0.1 * g[n]
        assert torch.allclose(p, want, atol=1e-6), n
    method.after_step(model)  # a second call must not subtract again
    for n, p in model.named_parameters():
        want = (w0[n] + delta[n]) - 0.1 * g[n] - delta[n] if n in delta else w0[n] - 0.1 * g[n]
        assert torch.allclose(p, want, atol=1e-6), n


@pytest.mark.parametrize("name", ["pgd-at-awp", "trades-awp", "arow-awp"])
def test_awp_proxy_step_and_perturbation_increase_the_inner_loss(name):
    model, x, y, method = _awp_setup(name)
    x_adv = method.attack(model, x, y)
    base = copy.deepcopy(model)
    before = method.inner.objective(base, x, y, x_adv).loss
    out = method.objective(model, x, y, x_adv)
    stepped = method.inner.objective(method.proxy, x, y, x_adv).loss
    assert float(stepped.detach()) > float(before.detach())  # the proxy's one step ascends the inner objective
    assert float(out.loss.detach()) > float(before.detach())  # and so does the perturbation of the model
    method.after_step(model)
    for a, b in zip(model.parameters(), base.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_awp_off_before_its_start_epoch_and_proxy_allocated_once():
    model, x, y, _ = _awp_setup()
    method = build_method("trades-awp", ThreatModel(eps=0.1, steps=2))
    method.set_epoch(8, 120)  # 1-based epoch 9 < 10 = round(120 * 10/120)
    w0 = [p.detach().clone() for p in model.parameters()]
    method(model, x, y)
    assert method.proxy is None and all(torch.equal(a, b) for a, b in zip(model.parameters(), w0))
    method.set_epoch(9, 120)
    method(model, x, y)
    proxy = method.proxy
    assert proxy is not None and not all(torch.equal(a, b) for a, b in zip(model.parameters(), w0))
    method.after_step(model)
    method(model, x, y)
    assert method.proxy is proxy


def test_awp_attacks_once_per_batch_in_the_trainer():
    torch.manual_seed(0)
    data = from_tensors(torch.rand(24, 1, 16, 16), torch.randint(0, 10, (24,)))
    method = build_method("arow-awp", ThreatModel(eps=0.1, steps=2), awp_start=1)
    calls = []
    attack = method.inner.attack
    method.inner.attack = lambda *a, **k: calls.append(1) or attack(*a, **k)
    cfg = TrainConfig(epochs=1, batch_size=8, eps=0.1, attack_steps=2, val_size=0, device="cpu", amp="off")
    Trainer(cfg, tiny_cnn(), data, method=method).fit()
    assert len(calls) == 3


def test_awp_wraps_any_method_and_rejects_foreign_hparams():
    threat = ThreatModel(eps=0.1, steps=2)
    wrapped = AWP(threat, inner=build_method("gair-at", threat), awp_gamma=0.01)
    assert wrapped.config["gair_lambda"] == -1.0 and wrapped.hp.awp_gamma == 0.01
    with pytest.raises(ValueError, match="beta"):
        AWP(threat, inner=build_method("gair-at", threat), beta=1.0)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_method("trades-awp", threat, lam=1.0)
    assert build_method("pgd-at-awp", threat).hp.awp_gamma == 0.01
    assert build_method("trades-awp", threat).hp.awp_gamma == 0.005


# --------------------------------------------------------------------------- all of them train
@pytest.fixture(scope="module")
def helper_run(tmp_path_factory):
    """A normally trained helper, trained with the package itself (as `arow train --method natural`)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("helper")
    data = from_tensors(torch.rand(64, 1, 16, 16), torch.randint(0, 10, (64,)))
    from arow.models import build_model

    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 16, "mean": None, "std": None}
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=16)
    cfg = TrainConfig(method="natural", epochs=1, eps=0.1, batch_size=32, val_size=0, out=str(out), device="cpu", amp="off")
    build_trainer(cfg, model, data, model_spec=spec).fit()
    return out


@pytest.mark.parametrize("name", NEW)
def test_new_method_trains_one_step(name, helper_run):
    assert name in METHODS.names()
    torch.manual_seed(0)
    from arow.models import build_model

    cls = METHODS.get(name)
    # the class's own test settings; a hyper-parameter that takes a model (HAT's helper) gets the trained one
    hp = {**cls.test_settings, **{k: str(helper_run) for k, h in cls.hparams.items() if nn.Module in h.accepts}}
    method = build_method(name, ThreatModel(eps=0.1, steps=2), **hp)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=16)
    w0 = [p.detach().clone() for p in model.parameters()]
    data = from_tensors(torch.rand(32, 1, 16, 16), torch.randint(0, 10, (32,)))
    cfg = TrainConfig(method=name, epochs=1, batch_size=32, val_size=0, device="cpu", amp="off")
    result = Trainer(cfg, model, data, method=method).fit()
    rec = result.history[0]
    assert math.isfinite(rec["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), w0))
    if name == "hat":
        assert rec["train_helper"] > 0
        x = data.x[:8]
        x_adv, y_help = method.attack(model, x, data.y[:8])
        from arow.runs.records import load_model

        assert torch.equal(y_help, load_model(helper_run)(x_adv).argmax(1))


def test_cli_flags_reach_the_new_methods():
    from arow.cli.commands import _config_from_args, build_parser

    parse = lambda *a: _config_from_args(build_parser().parse_args(["train", *a]))  # noqa: E731
    cfg = parse("--method", "hat", "--helper", "runs/h", "--hat-gamma", "0.5", "--beta", "3")
    assert cfg.method_args == {"helper": "runs/h", "hat_gamma": 0.5, "beta": 3.0}
    cfg = parse("--method", "trades-awp", "--awp-gamma", "0.01", "--beta", "6")
    assert cfg.method_args == {"awp_gamma": 0.01, "beta": 6.0}
    cfg = parse("--method", "fat", "--fat-tau", "2")
    assert cfg.method_args == {"fat_tau": 2}
    with pytest.raises(ValueError, match="--fat-tau"):
        parse("--method", "trades", "--fat-tau", "2")


# --------------------------------------------------------------------------- every method's facts
@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_carries_its_facts(name):
    cls = METHODS.get(name)
    assert cls.name == name and cls.__doc__
    assert isinstance(cls.passes, Passes), f"{name}: declare passes = Passes(...) on the class"
    if cls.paper is None:  # only the non-adversarial baseline has no paper
        assert name == "natural" and cls.url is None
    else:
        assert " 20" in cls.paper and cls.url.startswith("https://"), name
    assert set(cls.test_settings) <= set(cls.hparams)
    for k, v in cls.test_settings.items():
        assert cls.hparams[k].check(k, v) == v


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n != "hat"])
def test_hyper_parameters_are_a_frozen_typed_dataclass(name):
    import dataclasses
    import typing

    method = build_method(name, ThreatModel(eps=0.1, steps=2))
    hp = method.hp
    own = method.own_hparams if isinstance(method, AWP) else method.hparams
    assert dataclasses.is_dataclass(hp) and [f.name for f in dataclasses.fields(hp)] == list(own)
    for f in dataclasses.fields(hp):
        h, value = own[f.name], getattr(hp, f.name)
        assert value == h.default and getattr(method, f.name) == value  # read-only alias
        assert f.type is h.type or h.type in typing.get_args(f.type)
        assert method.config[f.name] == value
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(hp, f.name, value)
        with pytest.raises(AttributeError, match="fixed when the method is built"):
            setattr(method, f.name, value)
    with pytest.raises(AttributeError):
        method.no_such_hyper_parameter


@pytest.mark.parametrize("name", ["arow", "trades"])
def test_attack_loss_ce_is_cross_entropy_pgd(name):
    """``attack_loss: ce`` (the ARoW authors' CIFAR-100 setting) runs CE-PGD from the method's start."""
    from arow.attacks import ce_loss, pgd
    from arow.methods import build_method
    from arow.rng import BatchRNG
    from arow.threat import ThreatModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    threat = ThreatModel(eps=0.1, steps=3)
    ce = build_method(name, threat, attack_loss="ce")
    kl = build_method(name, threat)
    start_threat = ce.attack_threat if name == "trades" else threat
    got = ce.attack(model, x, y, rng=BatchRNG(7))
    want = pgd(model, x, y, start_threat, ce_loss, rng=BatchRNG(7))
    assert torch.equal(got, want)
    assert not torch.equal(kl.attack(model, x, y, rng=BatchRNG(7)), got)
    with pytest.raises(ValueError, match="attack-loss must be one of kl, ce"):
        build_method(name, threat, attack_loss="js")
