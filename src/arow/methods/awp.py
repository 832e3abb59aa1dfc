"""AWP (Wu, Xia, Wang 2020): adversarial weight perturbation, a wrapper around any training method.

"Adversarial weight perturbation helps robust generalization" (NeurIPS 2020). Per batch:

1. ``x_adv`` from the inner method's attack, ONCE (the ARoW reference code attacks twice per
   batch, see docs/method.md#awp; the AWP reference once);
2. a proxy copy of the model (allocated once, reloaded every step) in train mode takes one SGD
   step of size 0.01 that INCREASES the inner method's own objective on (x, x_adv): the TRADES
   loss for TRADES-AWP, CE(f(x_adv)) for PGD-AT-AWP, the ARoW loss for ARoW-AWP;
3. for every weight of dimension > 1 (biases and BatchNorm parameters are skipped, as in the
   reference) ``d_l = (w_proxy_l - w_l) / ||w_proxy_l - w_l|| * ||w_l||``, and ``gamma * d_l`` is
   added to the model's weights; the inner objective is computed there, the trainer steps the
   optimiser, and :meth:`AWP.after_step` subtracts ``gamma * d_l`` again.

With plain SGD the proxy step size cancels in the normalisation (up to the 1e-20 guard), which is
why it is not a hyper-parameter; the proxy's gradient is taken for the perturbed weights only
(the reference steps all its parameters, but only those weights enter d). ``awp_start`` keeps
the references' fraction of the run: epoch 10 of 120 (ARoW reference; TRADES-AWP: 10 of 200).

Registered variants: ``pgd-at-awp``, ``trades-awp``, ``mart-awp``, ``arow-awp``; wrap anything
else with ``AWP(threat, inner=method)``. Under torchrun the proxy gradients are averaged over
ranks, so every rank adds the same perturbation.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Optional

import torch
import torch.nn as nn

from .. import distributed
from ..modules import unwrap
from ..threat import ThreatModel
from . import arow, mart, pgd_at, trades  # noqa: F401  (register the inner methods of the variants)
from .base import Hparam, Method, MethodOutput, params_class
from .common import scaled_epoch
from .registry import METHODS

Tensor = torch.Tensor

PROXY_LR = 0.01  # the AWP reference's proxy step (the ARoW/TRADES-AWP scripts use 0.1: it cancels out)
EPS = 1e-20  # the reference's guard in ||w|| / (||d|| + EPS)

AWP_HPARAMS: dict[str, Hparam] = {
    "awp_gamma": Hparam(0.005, "AWP: size of the weight perturbation relative to each layer's weight norm "
                               "(TRADES/ARoW/MART-AWP 0.005, PGD-AT-AWP 0.01; at most 1, a perturbation as large as the weights)",
                        min=0, max=1),
    "awp_start": Hparam(None, "AWP: first epoch (1-based) with AWP; default: epoch 10 of 120 scaled to --epochs "
                              "(the TRADES-AWP and ARoW references), 1 for pgd-at-awp", int, min=1, max=10_000),
}


def perturbed_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters AWP perturbs: trainable weights of dimension > 1 (not biases, not BatchNorm)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n and p.requires_grad]


class AWP(Method):
    """AWP around ``inner`` (Wu et al. 2020); the registered ``<method>-awp`` variants build ``inner``.

    ``hp`` holds AWP's own hyper-parameters (``awp_gamma``, ``awp_start``), ``inner.hp`` the inner
    method's; ``config`` both. ``passes``: the inner method's, with its train forwards doubled
    (the proxy runs the inner objective once more), for the epochs where AWP is active.

    >>> m = AWP(ThreatModel(eps=0.1), inner=trades.TRADES(ThreatModel(eps=0.1)), awp_gamma=0.005)
    >>> m.config["beta"], m.config["awp_gamma"], m.hp.awp_gamma
    (6.0, 0.005, 0.005)
    """

    name = "awp"
    hparams = AWP_HPARAMS
    #: AWP's own hyper-parameters (a variant's ``hparams`` adds its inner method's)
    own_hparams: ClassVar[dict[str, Hparam]] = AWP_HPARAMS
    inner_cls: ClassVar[Optional[type[Method]]] = None
    paper = "Wu, Xia, Wang: Adversarial Weight Perturbation Helps Robust Generalization, NeurIPS 2020"
    url = "https://arxiv.org/abs/2004.05884"
    passes = None  # depends on the inner method: see the variants
    test_settings = {"awp_start": 1}  # perturb from the first epoch

    def __init__(self, threat: ThreatModel, inner: Optional[Method] = None, **kwargs: Any) -> None:
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in self.own_hparams}
        if inner is None:
            if self.inner_cls is None:
                raise ValueError("AWP wraps a method: AWP(threat, inner=build_method('trades', threat))")
            inner = self.inner_cls(threat, **kwargs)
        elif kwargs:
            raise ValueError(f"AWP has no hyper-parameter(s) {sorted(kwargs)}; give them to the inner method")
        self.inner = inner
        self.threat = inner.threat
        self.epoch, self.total_epochs = 0, 1
        values = {k: h.check(k, own.get(k, h.default)) for k, h in self.own_hparams.items()}
        self.config = {**inner.config, **values}
        self.hp = self.Params(**values)
        self.proxy: Optional[nn.Module] = None
        self._applied: list[tuple[nn.Parameter, Tensor]] = []

    @property
    def start_epoch(self) -> int:
        start = self.hp.awp_start
        return start if start is not None else scaled_epoch(10, self.total_epochs)

    def active(self) -> bool:
        """Whether this epoch (set by :meth:`set_epoch`) perturbs the weights."""
        return self.hp.awp_gamma > 0 and self.epoch + 1 >= self.start_epoch

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        super().set_epoch(epoch, total_epochs)
        self.inner.set_epoch(epoch, total_epochs)

    def attack(self, model, x, y, rng=None) -> Any:
        return self.inner.attack(model, x, y, rng)

    def objective(self, model, x, y, adv) -> MethodOutput:
        self.restore()  # a perturbation left by a call that no optimiser step followed
        if self.active():
            net = unwrap(model, compiled=True)  # the weights under DDP and compile wrappers
            deltas = self.weight_perturbation(net, x, y, adv)
            with torch.no_grad():
                for p, d in deltas:
                    p.add_(d)
            self._applied = deltas
        return self.inner.objective(model, x, y, adv)

    def after_step(self, model: nn.Module) -> None:
        self.restore()
        self.inner.after_step(model)

    def restore(self) -> None:
        """Remove the perturbation added by the last :meth:`objective` call (no-op if none)."""
        with torch.no_grad():
            for p, d in self._applied:
                p.sub_(d)
        self._applied = []

    def weight_perturbation(self, net: nn.Module, x: Tensor, y: Tensor, adv: Any) -> list[tuple[nn.Parameter, Tensor]]:
        """``gamma * d_l`` for every perturbed weight of ``net``, from one ascent step of the proxy."""
        if self.proxy is None:
            self.proxy = copy.deepcopy(net)  # allocated once; its BatchNorm statistics are thrown away
            for q in self.proxy.parameters():
                q.grad = None
        proxy = self.proxy
        proxy.load_state_dict(net.state_dict())
        proxy.train()
        weights = perturbed_weights(net)
        proxy_weights = dict(perturbed_weights(proxy))
        qs = [proxy_weights[n] for n, _ in weights]
        loss = self.inner.objective(proxy, x, y, adv).loss
        grads = list(torch.autograd.grad(loss, qs))
        world = distributed.info().world_size
        if world > 1:  # every rank must add the same perturbation, that of the global batch
            flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / world
            grads = [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]
        out = []
        with torch.no_grad():
            for (_, p), q, g in zip(weights, qs, grads):
                q.add_(g, alpha=PROXY_LR)  # SGD on -loss: one ascent step
                d = q - p
                out.append((p, d * (self.hp.awp_gamma * p.norm() / (d.norm() + EPS))))
        return out

    def __repr__(self) -> str:
        return f"AWP({self.inner!r}, awp_gamma={self.hp.awp_gamma}, awp_start={self.hp.awp_start})"


def _variant(name: str, inner_name: str, label: str, gamma: float, start: Optional[int]) -> type[AWP]:
    inner_cls = METHODS.get(inner_name)
    clash = set(inner_cls.hparams) & set(AWP_HPARAMS)
    assert not clash, f"{inner_name} hyper-parameters clash with AWP's: {clash}"
    own = {"awp_gamma": dataclasses.replace(AWP_HPARAMS["awp_gamma"], default=gamma),
           "awp_start": dataclasses.replace(AWP_HPARAMS["awp_start"], default=start)}
    inner_passes = inner_cls.passes
    assert inner_passes is not None, f"{inner_name} declares no passes"
    doc = f"{label}-AWP: {label} with adversarial weight perturbation (Wu et al. 2020)"
    qualname = f"{inner_cls.__name__}AWP"
    cls = type(qualname, (AWP,), {
        "name": name, "inner_cls": inner_cls, "hparams": {**inner_cls.hparams, **own}, "own_hparams": own,
        "Params": params_class(qualname, own, __name__), "default_steps": inner_cls.default_steps,
        "passes": dataclasses.replace(inner_passes, train=2 * inner_passes.train),
        "test_settings": {**inner_cls.test_settings, **AWP.test_settings}, "__doc__": doc, "__module__": __name__})
    METHODS.register(name, help=f"{doc}, gamma {gamma}")(cls)
    return cls


# The AWP reference: AT-AWP gamma 0.01 from the first epoch; TRADES-AWP gamma 0.005 from epoch 10
# (the ARoW reference uses the same for TRADES-/ARoW-AWP). MART-AWP takes TRADES-AWP's setting.
PGDATAWP = _variant("pgd-at-awp", "pgd-at", "PGD-AT", 0.01, 1)
TRADESAWP = _variant("trades-awp", "trades", "TRADES", 0.005, None)
MARTAWP = _variant("mart-awp", "mart", "MART", 0.005, None)
ARoWAWP = _variant("arow-awp", "arow", "ARoW", 0.005, None)
