"""Attack invariants: inside the ball and [0, 1], model state untouched, stronger never weaker."""
import copy

import pytest
import torch
import torch.nn as nn

from arow.attacks import ce_loss, cw_loss, frozen_eval, get_attack, kl_loss, pgd
from arow.evaluation.cascade import evaluate, predict
from arow.threat import ThreatModel

EPS = 0.1


def accuracy(model, x, y):
    return (predict(model, x) == y).float().mean().item()


def test_threat_model_geometry():
    tm = ThreatModel(eps=0.1, steps=3)
    assert tm.step_size == pytest.approx(0.025)
    x = torch.rand(64, 1, 5, 5)
    x0 = tm.init(x)
    assert (x0 - x).abs().max() <= 0.1 + 1e-7 and x0.min() >= 0 and x0.max() <= 1
    assert not torch.equal(x0, x)
    far = x + 5 * torch.randn_like(x)
    p = tm.project(far, x)
    assert (p - x).abs().max() <= 0.1 + 1e-7 and p.min() >= 0 and p.max() <= 1
    assert torch.equal(ThreatModel(eps=0.1, start="none").init(x), x)
    n = ThreatModel(eps=0.1, start="normal").init(x)
    assert (n - x).abs().max() < 0.02  # TRADES' 0.001 * N(0, 1) start


@pytest.mark.parametrize("bad", [dict(eps=-0.1), dict(eps=0.1, steps=-1), dict(eps=0.1, step=0.0),
                                 dict(eps=0.1, norm="l1"), dict(eps=0.1, start="gauss")])
def test_threat_model_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        ThreatModel(**bad)


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_stays_in_ball_and_range(trained_model, fmnist_small, loss):
    x, y = fmnist_small[2][:64], fmnist_small[3][:64]
    fn = {"ce": ce_loss, "cw": cw_loss, "kl": kl_loss(trained_model(x))}[loss]
    x_adv = pgd(trained_model, x, y, ThreatModel(eps=EPS, steps=5), fn)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_attack_restores_mode_requires_grad_and_leaves_grads_and_bn_stats(trained_model, fmnist_small):
    model = copy.deepcopy(trained_model).train()
    model[0].weight.requires_grad_(False)  # a user-frozen parameter must stay frozen
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    before = {n: (p.requires_grad, p.grad.clone()) for n, p in model.named_parameters()}
    x, y = fmnist_small[2][:32], fmnist_small[3][:32]
    pgd(model, x, y, ThreatModel(eps=EPS, steps=3))
    assert model.training and all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0], n
        assert torch.equal(p.grad, before[n][1]), n
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])  # eval mode: BN statistics frozen


def test_attack_runs_in_eval_mode():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            seen.append(self.training)
            return self.lin(x.flatten(1))

    m = Spy().train()
    pgd(m, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), ThreatModel(eps=0.1, steps=2))
    assert seen and not any(seen)
    assert m.training


def test_frozen_eval_restores_on_exception():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    with pytest.raises(RuntimeError):
        with frozen_eval(m):
            raise RuntimeError("boom")
    assert m.training and all(p.requires_grad for p in m.parameters())


def test_pgd_lowers_accuracy_and_eps_zero_changes_nothing(trained_model, fmnist_small):
    x, y = fmnist_small[2], fmnist_small[3]
    clean = accuracy(trained_model, x, y)
    assert clean > 0.6
    adv = accuracy(trained_model, pgd(trained_model, x, y, ThreatModel(eps=EPS, steps=10)), y)
    assert adv < clean - 0.2  # a naturally trained model is not robust at eps 0.1
    same = pgd(trained_model, x, y, ThreatModel(eps=0.0, steps=3))
    assert torch.equal(same, x)


def test_stronger_attack_never_reports_higher_accuracy(trained_model, fmnist_small):
    """More steps or restarts from the same random start can only find more adversarial examples."""
    x, y = fmnist_small[2][:300], fmnist_small[3][:300]
    accs = {}
    for name in ["clean", "fgsm", "pgd5", "pgd20", "pgd20r3", "cw5", "cw30"]:
        torch.manual_seed(123)
        accs[name] = evaluate(trained_model, x, y, [name], eps=0.05).accuracy[name]
    assert accs["clean"] >= accs["pgd5"] >= accs["pgd20"] >= accs["pgd20r3"]
    assert accs["clean"] >= accs["cw5"] >= accs["cw30"]
    assert accs["clean"] >= accs["fgsm"]
    assert accs["pgd20"] < accs["clean"]


def test_evaluation_is_in_eval_mode_whatever_the_callers_mode(trained_model, fmnist_small):
    x, y = fmnist_small[2][:200], fmnist_small[3][:200]
    model = copy.deepcopy(trained_model)
    torch.manual_seed(0)
    r_eval = evaluate(model.eval(), x, y, ["clean", "pgd5"], eps=EPS)
    torch.manual_seed(0)
    r_train = evaluate(model.train(), x, y, ["clean", "pgd5"], eps=EPS)
    assert r_eval.accuracy == r_train.accuracy
    assert model.training


def test_evaluate_worst_case_and_per_class(trained_model, fmnist_small):
    x, y = fmnist_small[2][:200], fmnist_small[3][:200]
    r = evaluate(trained_model, x, y, ["clean", "pgd5", "cw5"], eps=EPS, num_classes=10)
    worst = r.correct["clean"] & r.correct["pgd5"] & r.correct["cw5"]
    assert torch.equal(r.correct["worst_case"], worst)
    assert r.accuracy["worst_case"] == pytest.approx(worst.float().mean().item())
    assert len(r.per_class["pgd5"]) == 10
    # an attack never "rescues" an example the model gets wrong on clean inputs
    assert not (r.correct["pgd5"] & ~r.correct["clean"]).any()


@pytest.mark.parametrize("name", ["pgd0", "nope", "pgdx", "cw-3"])
def test_unknown_or_bad_attack_names(name):
    with pytest.raises(ValueError):
        get_attack(name, 0.1)


def test_negative_eps_rejected():
    with pytest.raises(ValueError):
        get_attack("pgd20", -0.1)


def test_pgd_and_cw_verdicts_do_not_depend_on_the_batch_size(trained_model, fmnist_small):
    """Each example's random start is its own (seed, attack, index): batching changes no verdict.
    float64, so that no rounding difference between batch shapes can flip a sign-gradient step."""
    x, y = fmnist_small[2][:120].double(), fmnist_small[3][:120]
    model = copy.deepcopy(trained_model).double()
    runs = [evaluate(model, x, y, ["clean", "pgd5r2", "cw5"], eps=EPS, batch_size=b) for b in (7, 50, 120)]
    for r in runs[1:]:
        for name in ("pgd5r2", "cw5", "worst_case"):
            assert torch.equal(r.correct[name], runs[0].correct[name]), name
    # the start really is random and seeded: another seed gives other starts, hence other examples
    from arow.rng import ExampleRNG

    idx = torch.arange(5)
    a, b = ExampleRNG(0, idx).rand_like(x[:5]), ExampleRNG(1, idx).rand_like(x[:5])
    assert a.dtype == torch.float64 and not torch.equal(a, b)
    rng = ExampleRNG(0, idx)
    assert not torch.equal(rng.rand_like(x[:5]), rng.rand_like(x[:5]))  # a restart draws new noise
    with pytest.raises(ValueError, match="rows of noise"):
        ExampleRNG(0, idx).rand_like(x[:4])
