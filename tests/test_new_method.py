"""A new method is one file plus one test: this file adds one, touching nothing else.

``Mixed`` below is what a contributor's ``src/arow/methods/mixed.py`` would hold (there, with
``@METHODS.register(NAME)`` on the class). Here the fixture registers it and takes it out again,
so that the other test modules, which iterate over METHODS, never see it. Everything else
(the CLI flag, the range check, the trainer, the pass accounting) must follow from the class alone.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arow.attacks import ce_loss, pgd
from arow.config.schema import TrainConfig
from arow.data import from_tensors
from arow.methods import METHODS, Hparam, Method, MethodOutput, Passes, build_method
from arow.rng import BatchRNG
from arow.threat import ThreatModel
from arow.training.trainer import Trainer

from conftest import tiny_cnn
from passes import PASS_TABLE, count_passes, documented_passes

NAME = "test-mixed"
K = 2


class Mixed(Method):
    """Mixed AT (Goodfellow et al. 2015, with PGD): (1 - mix) CE(f(x)) + mix CE(f(x_adv)); CE-PGD."""

    hparams = {"mix": Hparam(0.5, "Mixed AT: weight of the adversarial CE term", min=0, max=1)}
    paper = "Goodfellow, Shlens, Szegedy: Explaining and Harnessing Adversarial Examples, ICLR 2015"
    url = "https://arxiv.org/abs/1412.6572"
    passes = Passes(target=0, attack=1, train=2)
    test_settings = {"mix": 0.75}

    def attack(self, model, x, y, rng=None):
        return pgd(model, x, y, self.threat, ce_loss, rng=rng)

    def objective(self, model, x, y, x_adv) -> MethodOutput:
        logits_clean, logits_adv = model(x), model(x_adv)
        natural = F.cross_entropy(logits_clean.float(), y)
        robust = F.cross_entropy(logits_adv.float(), y)
        loss = (1 - self.hp.mix) * natural + self.hp.mix * robust
        return MethodOutput(loss, logits_clean, logits_adv, {"natural": natural.detach(), "robust": robust.detach()})


@pytest.fixture()
def mixed(monkeypatch):
    """``Mixed`` registered as NAME for one test; the registry's tables are restored afterwards."""
    assert NAME not in METHODS
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    monkeypatch.setattr(METHODS, "_help", dict(METHODS._help))
    yield METHODS.register(NAME)(Mixed)  # what the decorator does in a contributor's file


def test_a_new_method_is_usable_end_to_end(mixed):
    # registered, named, described
    assert NAME in METHODS.names() and METHODS.get(NAME) is Mixed and Mixed.name == NAME
    assert METHODS.help(NAME).startswith("Mixed AT")

    # built with typed, validated hyper-parameters
    threat = ThreatModel(eps=0.1, steps=K)
    m = build_method(NAME, threat, **Mixed.test_settings)
    assert m.hp == Mixed.Params(mix=0.75) and m.hp.mix == 0.75 and m.config == {"mix": 0.75}
    assert build_method(NAME, threat).hp.mix == 0.5  # the default
    with pytest.raises(ValueError, match="--mix must be <= 1"):
        build_method(NAME, threat, mix=1.5)
    with pytest.raises(ValueError, match="--mix must be a number"):
        build_method(NAME, threat, mix="half")
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_method(NAME, threat, beta=1.0)

    # the CLI knows it and its flag
    from arow.cli.commands import _config_from_args, build_parser

    cfg = _config_from_args(build_parser().parse_args(["train", "--method", NAME, "--mix", "0.25"]))
    assert cfg.method == NAME and cfg.method_args == {"mix": 0.25}

    # one Trainer epoch on tiny tensors, built by name from the config
    torch.manual_seed(0)
    model = tiny_cnn()
    w0 = [p.detach().clone() for p in model.parameters()]
    data = from_tensors(torch.rand(16, 1, 16, 16), torch.randint(0, 10, (16,)))
    cfg = TrainConfig(method=NAME, method_args=dict(Mixed.test_settings), epochs=1, batch_size=8, eps=0.1,
                      attack_steps=K, val_size=0, device="cpu", amp="off")
    trainer = Trainer(cfg, model, data)
    assert isinstance(trainer.method, Mixed) and trainer.method.hp.mix == 0.75
    rec = trainer.fit().history[0]
    assert math.isfinite(rec["train_loss"]) and math.isfinite(rec["train_robust"])
    assert rec["train_loss"] == pytest.approx(0.25 * rec["train_natural"] + 0.75 * rec["train_robust"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), w0))

    # its declared passes are what one step costs, and the pass table reads them from the class
    c = count_passes(m, tiny_cnn(), torch.rand(6, 1, 16, 16), torch.randint(0, 10, (6,)), rng=BatchRNG(0))
    want = Mixed.passes.for_steps(K)
    assert (c.target, c.attack, c.train, c.helper, c.backward) == (want.target, want.attack, want.train, 0, 1)
    assert PASS_TABLE[NAME] == Mixed.passes and documented_passes(NAME, K) == want


def test_the_new_method_is_gone_afterwards():
    assert NAME not in METHODS and NAME not in METHODS.names() and NAME not in PASS_TABLE
    with pytest.raises(ValueError, match="unknown method"):
        build_method(NAME, ThreatModel(eps=0.1))
