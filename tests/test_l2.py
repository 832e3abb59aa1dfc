"""The L2 threat model: ball geometry, attacks, training, evaluation, guards and AutoAttack in L2.

Everything runs on tiny models and a few hundred examples; the L-inf paths are checked to be
exactly the formulas they were before L2 existed.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from arow.attacks import Attack, cw_loss, fat_pgd, get_attack, kl_loss, pgd
from arow.attacks.autoattack import AutoAttackSettings, build_autoattack, get_autoattack, run_autoattack
from arow.config.schema import ConfigError, TrainConfig
from arow.data import from_tensors
from arow.evaluation.cascade import evaluate
from arow.evaluation.guards import GUARD_NAMES, run_guards
from arow.methods.gair_at import gair_attack
from arow.rng import BatchRNG
from arow.reporting.robustbench import model_info
from arow.threat import ThreatModel
from arow.pipelines import build_trainer

from conftest import tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


def in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> bool:
    return bool((l2(x_adv, x) <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1)


# --------------------------------------------------------------------------- geometry
def test_projection_onto_the_l2_ball():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 4, 4, generator=g)
    far = x + 3 * torch.randn(64, 3, 4, 4, generator=g)
    tm = ThreatModel(eps=0.5, norm="l2")
    p = tm.project(far, x)
    assert in_ball(p, x, 0.5)
    # away from the box faces the projection is the rescaling x + delta * eps / ||delta||
    mid = torch.full((8, 1, 3, 3), 0.5)
    delta = torch.randn(8, 1, 3, 3, generator=g)
    delta = 0.4 * delta / l2(delta, torch.zeros_like(delta)).view(-1, 1, 1, 1)  # ||delta|| 0.4: no pixel leaves [0, 1]
    big = ThreatModel(eps=0.2, norm="l2").project(mid + delta, mid)
    assert torch.allclose(big, mid + delta / 2, atol=1e-6)
    inside = ThreatModel(eps=0.5, norm="l2").project(mid + delta, mid)  # already inside: unchanged
    assert torch.allclose(inside, mid + delta, atol=1e-7)
    assert torch.equal(tm.project(x, x), x)  # delta 0: no division by zero
    assert torch.allclose(tm.distance(p, x), l2(p, x))


def test_random_start_is_uniform_in_the_l2_ball():
    n, d, eps = 4000, 4, 0.3
    x = torch.full((n, 1, 2, 2), 0.5)  # eps < 0.5: the clamp to [0, 1] never acts
    tm = ThreatModel(eps=eps, norm="l2")
    for rng in (None, BatchRNG(seed=0)):
        torch.manual_seed(0)
        start = tm.init(x, rng)
        r = l2(start, x)
        assert in_ball(start, x, eps)
        u = (r / eps) ** d  # uniform in the ball <=> (r / eps)^d ~ U(0, 1)
        assert abs(float(u.mean()) - 0.5) < 0.03
        for q in (0.1, 0.5, 0.9):
            assert abs(float((u < q).float().mean()) - q) < 0.03
        direction = (start - x).flatten(1) / r[:, None]
        assert float(direction.mean(0).abs().max()) < 0.05  # no preferred direction
    # the BatchRNG draw of a slice equals that slice of the global draw (sharding-independent)
    full = tm.init(x[:8], BatchRNG(seed=5, total=8))
    part = tm.init(x[4:8], BatchRNG(seed=5, offset=4, total=8))
    assert torch.equal(full[4:], part)
    # TRADES' start stays x + 0.001 N(0, 1)
    torch.manual_seed(1)
    normal = ThreatModel(eps=eps, norm="l2", start="normal").init(x[:10])
    torch.manual_seed(1)
    assert torch.allclose(normal, x[:10] + 0.001 * torch.randn_like(x[:10]))


def test_l2_step_follows_the_normalised_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.full((5, 1, 3, 3), 0.5)
    grad = torch.randn(5, 1, 3, 3, generator=g)
    grad[2] = 0  # a zero gradient does not move (no NaN)
    grad[3] *= 1e-30  # a tiny one still takes a full step
    tm = ThreatModel(eps=1.0, step=0.1, norm="l2")
    moved = tm.ascend(x, grad, x)
    assert torch.isfinite(moved).all()
    assert torch.allclose(l2(moved, x)[[0, 1, 3, 4]], torch.full((4,), 0.1), atol=1e-6)
    assert torch.equal(moved[2], x[2])
    unit = grad[0] / grad[0].norm()
    assert torch.allclose(moved[0] - x[0], 0.1 * unit, atol=1e-6)
    assert ThreatModel(eps=0.5, norm="l2").step_size == 0.125  # eps / 4, as in L-inf


def test_linf_is_exactly_as_before():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 4, 4, generator=g)
    grad = torch.randn(6, 1, 4, 4, generator=g)
    tm = ThreatModel(eps=0.1, steps=3)
    x_adv = x + 0.05 * torch.randn(6, 1, 4, 4, generator=g)
    ref = torch.min(torch.max(x_adv + 0.025 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    assert torch.equal(tm.ascend(x_adv, grad, x), ref)
    torch.manual_seed(4)
    start = tm.init(x)
    torch.manual_seed(4)
    assert torch.equal(start, (x + (2 * torch.rand_like(x) - 1) * 0.1).clamp(0, 1))


# --------------------------------------------------------------------------- attacks
def test_every_attack_stays_in_the_l2_ball(trained_model, fmnist_small):
    _, _, xte, yte = fmnist_small
    x, y = xte[:64], yte[:64]
    eps = 1.0
    tm = ThreatModel(eps=eps, steps=5, norm="l2")
    with torch.no_grad():
        logits = trained_model(x)
    for loss in (None, cw_loss, kl_loss(logits)):
        x_adv = pgd(trained_model, x, y, tm, loss) if loss is not None else pgd(trained_model, x, y, tm)
        assert in_ball(x_adv, x, eps)
    x_fat, steps = fat_pgd(trained_model, x, y, tm, tau=1, omega=0.01)
    assert in_ball(x_fat, x, eps) and bool((steps <= 5).all())
    x_gair, _ = gair_attack(trained_model, x, y, tm)
    assert in_ball(x_gair, x, eps)
    for name in ("fgsm", "pgd5", "cw5", "pgd3r2"):
        atk = get_attack(name, eps, norm="l2")
        assert atk.norm == "l2" and "L2" in atk.description
        assert in_ball(atk(trained_model, x, y), x, eps)
    # FGSM in L2: one step of length eps along the normalised gradient (shorter only where clamped)
    x_fgm = ThreatModel(eps=eps, steps=1, step=eps, start="none", norm="l2").ascend(
        x, torch.ones_like(x), x)
    assert in_ball(x_fgm, x, eps)
    with pytest.raises(ValueError, match="norm"):
        get_attack("pgd20", 0.5, norm="l1")


def test_pgd_l2_lowers_accuracy_and_evaluation_records_the_norm(trained_model, fmnist_small):
    _, _, xte, yte = fmnist_small
    x, y = xte[:200], yte[:200]
    r = evaluate(trained_model, x, y, ["clean", "pgd20"], eps=1.0, norm="l2")
    assert r.accuracy["pgd20"] < r.accuracy["clean"] - 0.2
    assert r.norm == "l2" and r.threat == "L2 eps 1"
    js = r.to_json()
    assert js["norm"] == "l2" and js["eps"] == 1.0 and js["threat_model"] == "L2 eps 1"
    assert "L2" in js["attacks"]["pgd20"]
    linf = evaluate(trained_model, x, y, ["clean", "pgd20"], eps=0.1)
    assert linf.norm == "linf" and linf.to_json()["threat_model"] == "L-inf eps 0.1"
    with pytest.raises(ValueError, match="another threat model"):  # an L-inf attack in an L2 evaluation
        evaluate(trained_model, x[:4], y[:4], [get_attack("pgd3", 1.0)], eps=1.0, norm="l2")


def test_an_attack_leaving_the_l2_ball_is_refused(trained_model, fmnist_small):
    _, _, xte, yte = fmnist_small
    x, y = xte[:8], yte[:8]
    # inside the L-inf ball of 0.1 but far outside the L2 ball of 0.5 (||delta||_2 = 0.1 * 28 = 2.8)
    cheat = Attack("cheat", lambda m, xb, yb: (xb + 0.1 * torch.sign(torch.randn_like(xb))).clamp(0, 1),
                   norm="l2")
    with pytest.raises(RuntimeError, match="left the threat model"):
        evaluate(trained_model, x, y, ["clean", cheat], eps=0.5, norm="l2")


# --------------------------------------------------------------------------- config, training, evaluate_run
def test_config_norm_and_default_eps():
    from arow.config import resolve

    assert resolve(TrainConfig()).norm == "linf" and resolve(TrainConfig()).eps == 0.1
    assert resolve(TrainConfig(norm="l2")).eps == 1.5
    assert resolve(TrainConfig(norm="l2", dataset="cifar10")).eps == 0.5
    assert resolve(TrainConfig(norm="l2", dataset="svhn", eps=0.25)).eps == 0.25
    assert resolve(TrainConfig(norm="l2", eps=2.0)).eps == 2.0  # L2 radii above 1 are fine
    with pytest.raises(ConfigError, match=r"--eps must be in \[0, 1\]"):
        resolve(TrainConfig(eps=2.0))
    with pytest.raises(ConfigError, match=r"--eps must be in \[0, 28\] for --norm l2"):
        resolve(TrainConfig(norm="l2", eps=100.0))
    with pytest.raises(ConfigError, match="--norm must be one of"):
        resolve(TrainConfig(norm="l1"))
    assert TrainConfig.from_dict(TrainConfig(norm="l2").to_dict()).norm == "l2"
    # a preset's eps is an L-inf radius: --norm l2 without --eps takes the data set's L2 default
    from arow.config import resolve_config

    assert resolve_config({"norm": "l2"}, preset="cifar10-resnet18").eps == 0.5
    assert resolve_config({"norm": "l2", "eps": 0.25}, preset="cifar10-resnet18").eps == 0.25
    assert resolve_config({}, preset="cifar10-resnet18").eps == pytest.approx(8 / 255)


def test_l2_training_run_records_and_evaluates_its_norm(tmp_path, fmnist_small):
    from arow.runs.records import load_checkpoint
    from arow.pipelines import evaluate_run

    xtr, ytr, xte, yte = fmnist_small
    out = tmp_path / "run"
    cfg = TrainConfig(method="trades", norm="l2", epochs=1, batch_size=64, attack_steps=2, val_size=0,
                      augment="none", out=str(out), device="cpu", amp="off")
    torch.manual_seed(0)
    train = from_tensors(xtr[:192], ytr[:192], name="fashion-mnist")  # its default L2 radius: 1.5
    res = build_trainer(cfg, tiny_cnn(), train, from_tensors(xtr[1000:1064], ytr[1000:1064], name="fashion-mnist"),
                        plots=False).fit()
    assert res.history and math.isfinite(res.history[-1]["train_loss"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["norm"] == "l2" and saved["eps"] == 1.5 and saved["resolved"]["norm"] == "l2"
    ckpt = load_checkpoint(out / "final.pt")
    assert ckpt["threat"]["norm"] == "l2" and ckpt["threat"]["eps"] == 1.5 and ckpt["threat"]["step"] == 0.375
    test = from_tensors(xte[:60], yte[:60])
    rep = evaluate_run(out, ["clean", "pgd5"], model=res.model, data=test, guards=False, device="cpu")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["norm"] == "l2" and ev["eps"] == 1.5 and ev["threat_model"] == "L2 eps 1.5"
    assert "L2 eps=1.5" in rep.text()
    # another norm without --eps: that norm's data-set default, not the training radius
    other = evaluate_run(out, ["clean", "pgd5"], norm="linf", model=res.model, data=test, guards=False,
                         device="cpu")
    assert other.result.norm == "linf" and other.result.eps == 0.1
    assert other.path.name == "eval_linf.json"  # eval.json stays the evaluation in the trained norm
    assert json.loads((out / "eval.json").read_text())["norm"] == "l2"


# --------------------------------------------------------------------------- guards and AutoAttack
def test_guards_run_in_l2(trained_model, fmnist_small):
    _, _, xte, yte = fmnist_small
    rs = run_guards(trained_model, xte[:300], yte[:300], eps=1.0, norm="l2", n=40, square_queries=50)
    assert [r.name for r in rs] == list(GUARD_NAMES)  # every guard ran: none is skipped in L2
    assert not [r.name for r in rs if not r.passed], [r.message for r in rs if not r.passed]
    large = next(r for r in rs if r.name == "large-eps")
    assert "L2 eps=14" in large.message  # 0.5 sqrt(784): the L2 ball that holds the grey image
    assert "L2-normalised" in next(r for r in rs if r.name == "gradient-direction").message


def test_autoattack_gets_norm_l2():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()  # Square L2: >= 5x5
    aa = build_autoattack(model, 0.5, settings=AutoAttackSettings(norm="l2"))
    assert aa.norm == "L2" and aa.apgd.norm == "L2" and aa.square.norm == "L2" and aa.fab.norm == "L2"
    assert build_autoattack(model, 0.1).norm == "Linf"
    atk = get_attack("autoattack", 0.5, norm="l2")
    assert atk.norm == "l2" and atk.meta["norm"] == "L2" and atk.meta["standard"]
    assert atk.description.startswith("AutoAttack standard, L2 [pyautoattack")
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv, info = run_autoattack(model, x, y, 0.5, settings=AutoAttackSettings(n_iter=3, square_queries=10, norm="l2"))
    assert in_ball(x_adv, x, 0.5) and sum(info["broken_by"].values()) > 0
    fast = get_autoattack(0.5, n_iter=3, square_queries=10, norm="l2")
    r = evaluate(model, x, y, ["clean", "pgd5", fast], eps=0.5, norm="l2")
    assert r.accuracy["autoattack"] <= r.accuracy["pgd5"] and r.settings["autoattack"]["norm"] == "L2"
    ev = {"accuracy": r.accuracy, "eps": 0.5, "norm": "l2", "n": 10, "dataset": "cifar10",
          "attack_settings": r.settings}
    assert model_info(ev)["threat_model"] == "L2"


class _Flip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class Misleading(nn.Module):
    """Honest forward, gradient pointing the wrong way: the L2 guards must catch it as the L-inf ones do."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(_Flip.apply(x))


def test_l2_guards_catch_a_reversed_gradient(trained_model, fmnist_small):
    _, _, xte, yte = fmnist_small
    rs = run_guards(Misleading(trained_model), xte[:300], yte[:300], eps=1.0, norm="l2", n=60, square_queries=50,
                    only=["gradients", "gradient-direction", "large-eps", "transfer"])
    v = {r.name: r.passed for r in rs}
    assert v["gradients"] and not v["gradient-direction"] and not v["large-eps"] and not v["transfer"], rs
