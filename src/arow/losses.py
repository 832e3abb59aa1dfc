"""Training objectives as pure functions of logits and labels (docs/method.md: ARoW and the baselines).

No model calls, no optimiser: each function takes the logits the method computed and
returns a scalar (the batch mean), trivially checked against a hand computation.
All arithmetic is done in float32 even when the logits come from bf16 autocast.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

KL_EPS = 1e-12  # the reference code's log(q + 1e-12); keeps KL finite when q underflows


def _f32(t: Tensor) -> Tensor:
    """Upcast half-precision logits (bf16/fp16 autocast) to float32; leave float32/64 alone."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class LossParts(NamedTuple):
    """A loss and the named terms worth logging (all scalars except ``weight``)."""

    loss: Tensor
    parts: dict[str, Tensor]


def kl_per_example(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log(q_c + 1e-12))`` per example, p = softmax(logits_p).

    >>> z = torch.randn(4, 10)
    >>> torch.allclose(kl_per_example(z, z), torch.zeros(4), atol=1e-6)
    True
    """
    p_log = F.log_softmax(_f32(logits_p), dim=1)
    q = F.softmax(_f32(logits_q), dim=1)
    return (p_log.exp() * (p_log - torch.log(q + KL_EPS))).sum(dim=1)


def smooth_cross_entropy(logits: Tensor, y: Tensor, smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy against ``(1 - a) * onehot(y) + a / C`` over all C classes.

    >>> z, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    >>> torch.allclose(smooth_cross_entropy(z, y), F.cross_entropy(z, y))
    True
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    logp = F.log_softmax(_f32(logits), dim=1)
    nll = -logp.gather(1, y[:, None]).squeeze(1)
    per = (1.0 - smoothing) * nll - smoothing * logp.mean(dim=1) if smoothing > 0 else nll
    return per.mean() if reduction == "mean" else per


def true_class_prob(logits: Tensor, y: Tensor) -> Tensor:
    """p_y(x) = softmax(logits)[y] per example, in float32."""
    return F.softmax(_f32(logits), dim=1).gather(1, y[:, None]).squeeze(1)


def arow(
    logits_clean: Tensor,
    logits_adv: Tensor,
    y: Tensor,
    *,
    lam: float = 3.5,
    smoothing: float = 0.2,
    detach_weight: bool = False,
    weight: str = "arow",
) -> Tensor:
    """The ARoW objective (docs/method.md#the-arow-objective), batch mean.

    ``L = mean_i[ LS_a(f(x_i), y_i) + 2 * lam * KL(p(x_i) || p(x_adv_i)) * (1 - p_y(x_adv_i)) ]``

    ``lam`` is the PAPER's lambda (the reference code's ``--lamb`` is ``2 * lam``; the paper's
    CIFAR ResNet-18 setting is lam=3.5, i.e. ``--lamb 7``). Gradient flows through the weight
    and through p(x), as in the paper's code; ``detach_weight=True`` is an ablation.
    ``weight="cow"`` is the reference code's CoW ablation (weight p_y(x) instead).

    >>> z, za, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    >>> bool(torch.isclose(arow(z, z, y, lam=3.5, smoothing=0.0), F.cross_entropy(z, y), atol=1e-5))
    True
    """
    return arow_parts(logits_clean, logits_adv, y, lam=lam, smoothing=smoothing,
                      detach_weight=detach_weight, weight=weight).loss


def arow_parts(
    logits_clean: Tensor,
    logits_adv: Tensor,
    y: Tensor,
    *,
    lam: float = 3.5,
    smoothing: float = 0.2,
    detach_weight: bool = False,
    weight: str = "arow",
) -> LossParts:
    """:func:`arow` plus its terms: ``natural``, ``robust`` (the weighted KL), ``weight`` (per example)."""
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    natural = smooth_cross_entropy(logits_clean, y, smoothing)
    kl = kl_per_example(logits_clean, logits_adv)
    if weight == "arow":
        w = 1.0 - true_class_prob(logits_adv, y)
    elif weight == "cow":
        w = true_class_prob(logits_clean, y)
    else:
        raise ValueError(f"weight must be 'arow' or 'cow', got {weight!r}")
    if detach_weight:
        w = w.detach()
    weighted = (kl * w).mean()
    robust = 2.0 * lam * weighted
    # kl and weighted_kl are logged: their ratio over an epoch, E[w KL] / E[KL], is the regularisation
    # ARoW actually applies relative to an unweighted KL (its TRADES-equivalent beta is 2 lam times it)
    return LossParts(natural + robust, {"natural": natural.detach(), "robust": robust.detach(), "weight": w.detach(),
                                        "kl": kl.detach().mean(), "weighted_kl": weighted.detach()})


def trades(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float = 6.0, smoothing: float = 0.0) -> Tensor:
    """TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * mean KL(p(x) || p(x_adv))``.

    ``smoothing`` > 0 replaces the CE by label-smoothed CE (an ablation: ARoW's natural term with
    TRADES's unweighted KL, separating what the smoothing buys from what the weighting buys).

    >>> z, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    >>> torch.allclose(trades(z, z, y), F.cross_entropy(z, y))
    True
    """
    return trades_parts(logits_clean, logits_adv, y, beta=beta, smoothing=smoothing).loss


def trades_parts(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, beta: float = 6.0,
                 smoothing: float = 0.0) -> LossParts:
    natural = smooth_cross_entropy(logits_clean, y, smoothing)
    robust = beta * kl_per_example(logits_clean, logits_adv).mean()
    return LossParts(natural + robust, {"natural": natural.detach(), "robust": robust.detach()})


def mart(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, lam: float = 6.0) -> Tensor:
    """MART (Wang et al. 2020): ``BCE(f(x_adv), y) + lam * mean[KL(p(x) || p(x_adv)) * (1 - p_y(x))]``.

    ``BCE = CE(f(x_adv), y) - log(1.0001 - max_{k != y} p_k(x_adv))``; the weight uses the CLEAN
    true-class probability, the contrast with ARoW.
    """
    return mart_parts(logits_clean, logits_adv, y, lam=lam).loss


def mart_parts(logits_clean: Tensor, logits_adv: Tensor, y: Tensor, *, lam: float = 6.0) -> LossParts:
    probs_adv = F.softmax(_f32(logits_adv), dim=1)
    others = probs_adv.scatter(1, y[:, None], float("-inf"))
    bce = F.cross_entropy(_f32(logits_adv), y) - torch.log(1.0001 - others.max(dim=1).values).mean()
    w = 1.0 - true_class_prob(logits_clean, y)
    robust = lam * (kl_per_example(logits_clean, logits_adv) * w).mean()
    # the first term is MART's boosted CE on the ADVERSARIAL example, so it is logged as adv_bce, not natural
    return LossParts(bce + robust, {"adv_bce": bce.detach(), "robust": robust.detach(), "weight": w.detach()})


def cw_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin per example: ``max_{k != y} z_k - z_y`` (positive = misclassified)."""
    z = _f32(logits)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_other = z.scatter(1, y[:, None], float("-inf")).max(dim=1).values
    return z_other - z_y


def gair_weights(kappa: Tensor, steps: int, *, lam: float = -1.0) -> Tensor:
    """GAIR-AT weights ``(1 + tanh(lam + 5 (1 - 2 kappa / K))) / 2``, normalised to mean 1.

    ``kappa`` counts the attack steps at which each example was still classified correctly.
    """
    w = (1.0 + torch.tanh(lam + 5.0 * (1.0 - 2.0 * kappa.float() / steps))) / 2.0
    return w * (w.numel() / w.sum())


def gair_at_parts(logits_adv: Tensor, y: Tensor, kappa: Tensor, steps: int, *, lam: float = -1.0) -> LossParts:
    """GAIR-AT (Zhang et al. 2021): ``mean_i w_i CE(f(x_adv_i), y_i)`` with ``w = gair_weights(kappa)``.

    The weights are normalised to mean 1 over the batch, as in the reference code.

    >>> z, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    >>> k = torch.full((4,), 3)  # equal kappa: equal weights, plain CE
    >>> torch.allclose(gair_at_parts(z, y, k, 10).loss, F.cross_entropy(z, y))
    True
    """
    w = gair_weights(kappa, steps, lam=lam).to(logits_adv.device)
    loss = (F.cross_entropy(_f32(logits_adv), y, reduction="none") * w).mean()
    return LossParts(loss, {"robust": loss.detach(), "weight": w.detach()})


def hat(logits_clean: Tensor, logits_adv: Tensor, logits_help: Tensor, y: Tensor, y_help: Tensor, *,
        beta: float = 2.5, gamma: float = 0.25) -> Tensor:
    """HAT (Rade & Moosavi-Dezfooli 2022): ``TRADES_beta + gamma * CE(f(x_help), y_help)``.

    ``logits_help`` are the model's logits on the helper examples ``x + h (x_adv - x)``;
    ``y_help`` is the helper (normally trained) model's prediction on ``x_adv``.

    >>> z, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    >>> torch.allclose(hat(z, z, z, y, y, beta=6.0, gamma=1.0), 2 * F.cross_entropy(z, y))
    True
    """
    return hat_parts(logits_clean, logits_adv, logits_help, y, y_help, beta=beta, gamma=gamma).loss


def hat_parts(logits_clean: Tensor, logits_adv: Tensor, logits_help: Tensor, y: Tensor, y_help: Tensor, *,
              beta: float = 2.5, gamma: float = 0.25) -> LossParts:
    """:func:`hat` plus its terms: ``natural``, ``robust`` (beta * KL) and ``helper`` (gamma * CE)."""
    base = trades_parts(logits_clean, logits_adv, y, beta=beta)
    helper = gamma * F.cross_entropy(_f32(logits_help), y_help)
    return LossParts(base.loss + helper, {**base.parts, "helper": helper.detach()})
