"""Losses against hand computations on fixed tensors, gradients included."""
import math

import pytest
import torch
import torch.nn.functional as F

from arow import losses

ZC = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]  # clean logits
ZA = [[0.5, 1.5, -0.5], [1.0, -1.0, 0.0]]  # adversarial logits
Y = [0, 2]


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def hand_kl(zp, zq):
    p, q = softmax(zp), softmax(zq)
    return sum(pc * (math.log(pc) - math.log(qc + 1e-12)) for pc, qc in zip(p, q))


def hand_arow(lam, alpha, weight="arow"):
    total = 0.0
    for zc, za, y in zip(ZC, ZA, Y):
        p = softmax(zc)
        c = len(zc)
        target = [(1 - alpha) * (k == y) + alpha / c for k in range(c)]
        ls = -sum(t * math.log(pk) for t, pk in zip(target, p))
        w = 1 - softmax(za)[y] if weight == "arow" else p[y]
        total += ls + 2 * lam * hand_kl(zc, za) * w
    return total / len(Y)


def t(v):
    return torch.tensor(v, dtype=torch.float64)


@pytest.mark.parametrize("lam,alpha", [(3.5, 0.2), (1.0, 0.0), (6.0, 0.5)])
def test_arow_matches_hand_computation(lam, alpha):
    got = losses.arow(t(ZC), t(ZA), torch.tensor(Y), lam=lam, smoothing=alpha)
    assert got.item() == pytest.approx(hand_arow(lam, alpha), rel=1e-6)


def test_cow_ablation_weights_by_clean_true_class_probability():
    got = losses.arow(t(ZC), t(ZA), torch.tensor(Y), lam=2.0, smoothing=0.2, weight="cow")
    assert got.item() == pytest.approx(hand_arow(2.0, 0.2, weight="cow"), rel=1e-6)


def test_trades_and_mart_match_hand_computation():
    y = torch.tensor(Y)
    ce = sum(-math.log(softmax(zc)[yy]) for zc, yy in zip(ZC, Y)) / 2
    kl = sum(hand_kl(zc, za) for zc, za in zip(ZC, ZA)) / 2
    assert losses.trades(t(ZC), t(ZA), y, beta=6.0).item() == pytest.approx(ce + 6 * kl, rel=1e-6)

    bce = 0.0
    robust = 0.0
    for zc, za, yy in zip(ZC, ZA, Y):
        pa = softmax(za)
        other = max(pk for k, pk in enumerate(pa) if k != yy)
        bce += -math.log(pa[yy]) - math.log(1.0001 - other)
        robust += hand_kl(zc, za) * (1 - softmax(zc)[yy])
    expect = bce / 2 + 6.0 * robust / 2
    assert losses.mart(t(ZC), t(ZA), y, lam=6.0).item() == pytest.approx(expect, rel=1e-6)


def test_smooth_ce_is_ce_at_zero_and_uses_all_classes():
    z, y = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 7, (5,))
    assert torch.allclose(losses.smooth_cross_entropy(z, y, 0.0), F.cross_entropy(z, y))
    a = 0.3
    target = torch.full((5, 7), a / 7, dtype=torch.float64)
    target[torch.arange(5), y] += 1 - a
    expect = -(target * F.log_softmax(z, 1)).sum(1).mean()
    assert losses.smooth_cross_entropy(z, y, a).item() == pytest.approx(expect.item(), rel=1e-6)


def test_arow_gradient_flows_through_weight_and_clean_distribution():
    """gradcheck in float64: autograd's gradient is the numerical gradient of the FULL objective,
    i.e. nothing (weight, p(x)) is silently detached."""
    zc = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    za = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    assert torch.autograd.gradcheck(lambda a, b: losses.arow(a, b, y, lam=3.5, smoothing=0.2), (zc, za))
    # and the weight really receives gradient: with it detached the gradient w.r.t. za changes
    g = torch.autograd.grad(losses.arow(zc, za, y), za)[0]
    g_det = torch.autograd.grad(losses.arow(zc, za, y, detach_weight=True), za)[0]
    assert not torch.allclose(g, g_det)


def test_trades_and_mart_gradients_match_numerical():
    zc = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    za = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (3,))
    assert torch.autograd.gradcheck(lambda a, b: losses.trades(a, b, y), (zc, za))
    assert torch.autograd.gradcheck(lambda a, b: losses.mart(a, b, y), (zc, za))


def test_detach_weight_is_a_different_objective_with_the_same_value():
    zc = torch.randn(6, 4, requires_grad=True)
    za = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    full = losses.arow(zc, za, y)
    det = losses.arow(zc, za, y, detach_weight=True)
    assert full.item() == pytest.approx(det.item())
    g_full = torch.autograd.grad(full, za)[0]
    g_det = torch.autograd.grad(det, za)[0]
    assert not torch.allclose(g_full, g_det)
    # the detached gradient w.r.t. za is the weighted-KL gradient with w held constant
    w = (1 - F.softmax(za, 1).gather(1, y[:, None]).squeeze(1)).detach()
    kl = losses.kl_per_example(zc, za)
    ref = torch.autograd.grad(7.0 * (kl * w).mean(), za)[0]
    assert torch.allclose(g_det, ref, atol=1e-6)


def test_lambda_convention_is_the_papers():
    """Paper lambda 3.5 == reference code --lamb 7: the KL term is multiplied by 2*lambda."""
    zc, za, y = torch.randn(3, 10), torch.randn(3, 10), torch.randint(0, 10, (3,))
    parts = losses.arow_parts(zc, za, y, lam=3.5, smoothing=0.0)
    kl_w = (losses.kl_per_example(zc, za) * (1 - losses.true_class_prob(za, y))).mean()
    assert parts.parts["robust"].item() == pytest.approx(7.0 * kl_w.item(), rel=1e-5)


def test_bf16_logits_are_computed_in_float32():
    zc, za, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    out = losses.arow(zc.bfloat16(), za.bfloat16(), y)
    assert out.dtype == torch.float32
    ref = losses.arow(zc.bfloat16().float(), za.bfloat16().float(), y)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)


def test_cw_margin_and_gair_weights():
    z = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert losses.cw_margin(z, torch.tensor([0, 0])).tolist() == [-1.0, 5.0]
    kappa = torch.tensor([0, 5, 10])
    w = losses.gair_weights(kappa, 10, lam=-1.0)
    raw = torch.tensor([(1 + math.tanh(-1 + 5 * (1 - 2 * k / 10))) / 2 for k in (0, 5, 10)])
    assert torch.allclose(w, raw / raw.mean(), atol=1e-6)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[0] > w[1] > w[2]  # less robust examples (few correct steps) weigh more


@pytest.mark.parametrize("bad", [{"lam": -1.0}, {"smoothing": 1.0}, {"weight": "nope"}])
def test_bad_hyperparameters_raise(bad):
    with pytest.raises(ValueError):
        losses.arow(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), **bad)
