"""AutoAttack adapter (pyautoattack), cascade bookkeeping in evaluate(), resumable evaluation.

Fast non-standard budgets (few iterations/queries) are used on tiny models; the tests also
check that the default is AutoAttack's standard version and that the fast ones say otherwise.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from arow.attacks import ATTACKS, Attack, get_attack
from arow.attacks.autoattack import (
    STANDARD_ATTACKS,
    AutoAttackSettings,
    build_autoattack,
    get_autoattack,
    run_autoattack,
)
from arow.evaluation.cascade import evaluate

FAST = dict(n_iter=4, square_queries=15)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, num_classes)).eval()


def data(model: nn.Module, n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[: n // 6] = (y[: n // 6] + 1) % model[-1].out_features  # a few misclassified ones
    return x, y


# --------------------------------------------------------------------------- the adapter
def test_default_is_autoattack_standard():
    aa = build_autoattack(tiny(), 8 / 255)
    assert aa.version == "standard"
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"] == list(STANDARD_ATTACKS)
    assert aa.apgd_targeted.n_target_classes == 9 and aa.fab.n_target_classes == 9
    assert aa.square.n_queries == 5000
    assert aa.apgd.n_iter == aa.apgd_targeted.n_iter == aa.fab.n_iter == 100
    assert aa.apgd.n_restarts == aa.apgd_targeted.n_restarts == aa.fab.n_restarts == 1
    assert aa.norm == "Linf" and aa.seed == 0
    atk = get_attack("autoattack", 8 / 255)
    assert atk.cascade and atk.resumable
    assert atk.meta["standard"] and atk.meta["version"] == "standard" and atk.meta["seed"] == 0
    assert atk.meta["pyautoattack_version"] == "0.2.0" and atk.meta["square_n_queries"] == 5000
    assert atk.description.startswith("AutoAttack standard [pyautoattack 0.2.0, seed 0]")
    assert "autoattack" in ATTACKS and "apgd-monitor" in ATTACKS


def test_monitor_and_fast_budgets_are_labelled():
    mon = get_attack("apgd-monitor", 0.1)
    assert mon.cascade and mon.meta["version"] == "custom" and not mon.meta["standard"]
    assert mon.meta["attacks"] == ["apgd-ce", "apgd-t"]
    assert "NOT AutoAttack" in mon.description and not mon.description.startswith("AutoAttack")
    aa = build_autoattack(tiny(), 0.1, settings=AutoAttackSettings(attacks=("apgd-ce", "apgd-t")))
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t"] and aa.apgd.n_restarts == 1
    fast = get_attack("autoattack", 0.1, **FAST)
    assert not fast.meta["standard"] and fast.meta["apgd_n_iter"] == 4 and fast.meta["square_n_queries"] == 15
    assert fast.description.startswith("NON-STANDARD")
    with pytest.raises(ValueError, match="sub-attacks"):
        AutoAttackSettings(attacks=("apgd-dlr",))


def test_fewer_classes_use_all_other_classes_as_targets():
    model = tiny(num_classes=5)
    assert build_autoattack(model, 0.1, num_classes=5).apgd_targeted.n_target_classes == 4
    x, y = data(model, n=8)
    atk = get_autoattack(0.1, **FAST)
    atk(model, x, y)
    assert atk.meta["n_target_classes"] == 4 and not atk.meta["standard"]
    assert "4 targets = all other classes" in atk.description
    with pytest.raises(ValueError, match="at least 4 classes"):
        get_autoattack(0.1, **FAST)(tiny(num_classes=3), x, y % 3)


def test_adapter_is_an_honest_attack():
    model = tiny().train()
    for p in model.parameters():
        p.grad = None
    x, y = data(model)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    x_adv, info = run_autoattack(model, x, y, 0.1, settings=AutoAttackSettings(**FAST))
    assert torch.equal(torch.rand(3), expected_next), "pyautoattack's reseeding leaked into the caller's RNG"
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        fooled = model.eval()(x_adv).argmax(1) != y
    assert int(fooled.sum()) >= sum(info["broken_by"].values()) > 0
    x_adv2, _ = run_autoattack(model, x, y, 0.1, settings=AutoAttackSettings(**FAST))
    assert torch.equal(x_adv, x_adv2), "fixed seed: the same adversarial examples"


def test_adapter_agrees_with_pyautoattack_called_directly():
    """One sub-attack at a time on the still-robust examples is exactly AutoAttack's own loop."""
    model = tiny()
    x, y = data(model, n=32)
    settings = AutoAttackSettings(**FAST)
    x_ours, _ = run_autoattack(model, x, y, 0.15, settings=settings)
    with torch.no_grad():
        ours = model(x_ours).argmax(1) == y
    aa = build_autoattack(model, 0.15, settings=settings)
    x_ref, _ = aa.run_standard_evaluation(x, y, batch_size=settings.batch_size)
    with torch.no_grad():
        ref = model(x_ref).argmax(1) == y
    assert 0 < int(ours.sum()) < int((model(x).argmax(1) == y).sum())  # the attack did something
    assert torch.equal(ours, ref)


def test_adapter_resumes_between_sub_attacks(tmp_path, monkeypatch):
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model = tiny()
    x, y = data(model, n=32)
    settings = AutoAttackSettings(**FAST)
    x_ref, info_ref = run_autoattack(model, x, y, 0.05, settings=settings)

    calls = {"apgd-ce": 0}
    real_ce = APGDAttack.perturb

    def counting(self, *a, **k):
        calls["apgd-ce"] += 1
        return real_ce(self, *a, **k)

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(APGDAttack, "perturb", counting)
    monkeypatch.setattr(APGDAttack_targeted, "perturb", boom)
    state = tmp_path / "aa.pt"
    with pytest.raises(KeyboardInterrupt):
        run_autoattack(model, x, y, 0.05, settings=settings, state_path=state)
    assert state.is_file() and calls["apgd-ce"] == 1
    monkeypatch.undo()
    monkeypatch.setattr(APGDAttack, "perturb", counting)
    x_res, info_res = run_autoattack(model, x, y, 0.05, settings=settings, state_path=state)
    assert calls["apgd-ce"] == 1, "APGD-CE ran again after the resume"
    assert torch.equal(x_res, x_ref) and info_res == info_ref
    # a state file from another model is not trusted
    other = tiny()
    with torch.no_grad():
        other[1].bias.add_(1e-4)
    run_autoattack(other, x, y, 0.05, settings=settings, state_path=state)
    assert calls["apgd-ce"] == 2


# --------------------------------------------------------------------------- cascade bookkeeping
class MarkerModel(nn.Module):
    """Two classes read from pixel (0, 0): class 1 iff it is > 0.5. Pixel (1, 1) holds the index."""

    def forward(self, x):
        p = x[:, 0, 0, 0]
        return torch.stack([0.5 - p, p - 0.5], 1) * 10


def marker_data(n: int = 30):
    """Examples 0..9: p = 0.45/0.55 (an eps=0.1 move flips them); 10..29: p = 0.1/0.9 (cannot flip)."""
    x = torch.zeros(n, 1, 2, 2)
    y = torch.arange(n) % 2
    near = torch.arange(n) < 10
    x[:, 0, 0, 0] = torch.where(near, 0.45 + 0.1 * y, 0.1 + 0.8 * y)
    x[:, 0, 1, 1] = torch.arange(n) / 100
    y[25:] = 1 - y[25:]  # 25..29 misclassified from the start
    return x, y


def flip_attack(name: str, targets: set[int], seen: list[int], cascade: bool = False) -> Attack:
    """Moves pixel (0, 0) by eps=0.1 towards the other class for the examples listed in ``targets``."""

    def run(model, x, y):
        idx = (x[:, 0, 1, 1] * 100).round().long().tolist()
        seen.extend(idx)
        x_adv = x.clone()
        for row, i in enumerate(idx):
            if i in targets:
                x_adv[row, 0, 0, 0] += 0.1 if y[row] == 0 else -0.1
        return x_adv.clamp(0, 1)

    return Attack(name, run, f"flips {sorted(targets)}", cascade=cascade)


def test_cascade_verdict_is_the_and_over_attacks_and_sees_only_survivors():
    model, (x, y) = MarkerModel(), marker_data()
    seen_a, seen_b, seen_c = [], [], []
    a = flip_attack("a", {0, 1, 2, 25}, seen_a)
    b = flip_attack("b", {2, 3, 4, 11}, seen_b)          # 11 cannot be flipped: stays robust
    c = flip_attack("c", {1, 5, 6}, seen_c, cascade=True)  # 1 already broken by a
    r = evaluate(model, x, y, ["clean", a, b, c], eps=0.1, batch_size=7)
    clean = torch.arange(30) < 25
    expect = {"a": clean.clone(), "b": clean.clone()}
    expect["a"][[0, 1, 2]] = False
    expect["b"][[2, 3, 4]] = False
    assert torch.equal(r.correct["clean"], clean)
    assert torch.equal(r.correct["a"], expect["a"]) and torch.equal(r.correct["b"], expect["b"])
    worst = clean & expect["a"] & expect["b"]
    worst[[5, 6]] = False
    assert torch.equal(r.correct["c"], worst)  # a cascade's verdict already includes what came before
    assert torch.equal(r.correct["worst_case"], r.correct["clean"] & r.correct["a"] & r.correct["b"] & r.correct["c"])
    assert sorted(seen_a) == sorted(seen_b) == list(range(25))  # non-cascade: every clean-correct example
    assert sorted(seen_c) == [i for i in range(25) if i not in (0, 1, 2, 3, 4)]  # cascade: survivors only
    assert r.accuracy["worst_case"] == pytest.approx(18 / 30)


def test_autoattack_in_the_cascade_never_reports_more_than_the_attacks_before_it():
    model = tiny()
    x, y = data(model, n=40)
    r = evaluate(model, x, y, ["clean", "pgd3", get_autoattack(0.1, **FAST)], eps=0.1, batch_size=16)
    assert torch.equal(r.correct["autoattack"], r.correct["autoattack"] & r.correct["pgd3"])
    assert torch.equal(r.correct["worst_case"], r.correct["autoattack"])
    assert r.accuracy["autoattack"] <= r.accuracy["pgd3"] <= r.accuracy["clean"]
    out = r.to_json()
    assert out["attack_settings"]["autoattack"]["seed"] == 0
    assert out["attack_settings"]["autoattack"]["version"] == "standard"
    json.dumps(out)


# --------------------------------------------------------------------------- resumable evaluation
def counted(name, counter: dict, eps: float = 0.1, fail_after: int = -1) -> Attack:
    """The attack ``name`` (or an Attack), counting its calls; raises on call number ``fail_after``."""
    inner = name if isinstance(name, Attack) else get_attack(name, eps)
    name = inner.name

    def run(model, x, y, **kw):
        if counter.get(name, 0) == fail_after:
            raise KeyboardInterrupt("killed")
        counter[name] = counter.get(name, 0) + 1
        return inner(model, x, y, **kw)

    return Attack(inner.name, run, inner.description, cascade=inner.cascade, resumable=inner.resumable,
                  meta=inner.meta)


def test_interrupted_evaluation_resumes_with_identical_verdicts(tmp_path):
    model = tiny()
    x, y = data(model, n=40)
    ref = evaluate(model, x, y, ["clean", "pgd5", "cw5", get_autoattack(0.1, **FAST)], eps=0.1,
                   batch_size=10, state_dir=tmp_path / "ref")
    state = tmp_path / "run" / "eval_state"
    calls: dict = {}
    # killed after pgd5 finished and during cw5's second batch
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, ["clean", counted("pgd5", calls), counted("cw5", calls, fail_after=1)], eps=0.1,
                 batch_size=10, state_dir=state)
    assert calls == {"pgd5": 4, "cw5": 1}  # 32 clean-correct examples: 4 batches
    calls.clear()
    res = evaluate(model, x, y, ["clean", counted("pgd5", calls), counted("cw5", calls),
                                 get_autoattack(0.1, **FAST)], eps=0.1, batch_size=10, state_dir=state)
    assert calls == {"cw5": 3}, "finished attacks and batches must not run again"
    for k in ref.correct:
        assert torch.equal(res.correct[k], ref.correct[k]), k
    # everything done: a third run attacks nothing and reports the same
    calls.clear()
    again = evaluate(model, x, y, ["clean", counted("pgd5", calls), counted("cw5", calls),
                                   counted(get_autoattack(0.1, **FAST), calls)], eps=0.1, batch_size=10,
                   state_dir=state)
    assert calls == {}
    assert torch.equal(again.correct["cw5"], ref.correct["cw5"])
    # another eps: the saved verdicts do not apply
    calls.clear()
    evaluate(model, x, y, ["clean", counted("pgd5", calls, eps=0.2)], eps=0.2, batch_size=10, state_dir=state)
    assert calls["pgd5"] > 0
