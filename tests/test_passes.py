"""What one training step costs, counted: model passes per method, and no host reads per step.

Every registered method runs one step under forward hooks (``count_passes`` in tests/passes.py)
and must match the ``passes`` its class declares (which ``PASS_TABLE`` there gathers);
docs/performance.md shows them, and its table is parsed and compared too, so they cannot drift
apart. A method without ``passes`` or without a doc row fails here: add both.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from arow.config.schema import TrainConfig
from arow.data import TensorData
from arow.methods import METHODS, Passes, build_method
from arow.rng import BatchRNG
from arow.threat import ThreatModel
from arow.training.trainer import Trainer

from passes import PASS_TABLE, count_passes, documented_passes, reference_cost

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
K = 3
B = 6


class Net(nn.Module):
    """The counted model: a class of its own, so hooks can tell it (and AWP's copies) apart."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 6 * 6, 5))

    def forward(self, x):
        return self.body(x)


class Helper(nn.Module):
    """HAT's separately trained helper: another class, counted as helper forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

    def forward(self, x):
        return self.fc(x)


def _method(name: str):
    """The method built with its class's ``test_settings``; a hyper-parameter that takes a model
    (HAT's helper) gets a :class:`Helper`, returned too so its forwards count as helper passes."""
    cls = METHODS.get(name)
    helper = Helper()
    models = {k: helper for k, h in cls.hparams.items() if nn.Module in h.accepts}
    method = build_method(name, ThreatModel(eps=0.1, steps=K), **cls.test_settings, **models)
    method.set_epoch(0, 1)  # the trainer's first epoch (AWP / GAIR-AT: on from epoch 1 in test_settings)
    return method, helper if models else None


@pytest.mark.parametrize("name", METHODS.names())
def test_counted_passes_match_the_documented_table(name):
    declared = METHODS.get(name).passes
    if declared is None:
        pytest.fail(f"method {name!r} has no documented pass count: give its class `passes = Passes(...)` "
                    f"and add its row to the table in docs/performance.md")
    torch.manual_seed(0)
    method, helper = _method(name)
    x, y = torch.rand(B, 1, 8, 8), torch.randint(0, 5, (B,))
    c = count_passes(method, Net(), x, y, helper=helper, rng=BatchRNG(0))
    want = declared.for_steps(K)
    assert want == documented_passes(name, K) == PASS_TABLE[name].for_steps(K)
    assert (c.target, c.attack, c.train, c.helper) == (want.target, want.attack, want.train, want.helper)
    assert c.backward == 1  # the trainer's loss.backward(), exactly once
    assert c.train_no_grad == 0  # no train-mode forward is wasted
    assert c.batch_sizes == (B,)  # every pass runs the whole batch


def test_arow_and_trades_cost_what_the_issue_says():
    """1 clean forward (eval) + K attack steps (eval) + 2 training forwards (train) + 1 backward."""
    for name in ("arow", "trades"):
        method, _ = _method(name)
        c = count_passes(method, Net(), torch.rand(B, 1, 8, 8), torch.randint(0, 5, (B,)))
        assert (c.target, c.attack, c.train, c.backward) == (1, K, 2, 1)
        assert c.cost == 2 * K + 7


def test_reference_code_pays_one_clean_forward_per_attack_step():
    assert reference_cost("arow", 10) == 36 and documented_passes("arow", 10).cost == 27
    assert reference_cost("pgd-at", 10) == documented_passes("pgd-at", 10).cost == 23


def test_unknown_method_has_no_documented_count():
    with pytest.raises(ValueError, match="no documented pass count"):
        documented_passes("no-such-method", 10)


# --------------------------------------------------------------------------- the doc's table
def _doc_rows() -> dict[str, tuple[str, ...]]:
    text = DOC.read_text()
    block = text.split("<!-- pass-table:begin -->")[1].split("<!-- pass-table:end -->")[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        cells = tuple(c.strip().strip("`") for c in line.strip().strip("|").split("|"))
        rows[cells[0]] = cells[1:]
    return rows


def _linear(expr: str) -> tuple[int, int]:
    """'2K+7' -> (2, 7); 'K' -> (1, 0); '3' -> (0, 3)."""
    m = re.fullmatch(r"(?:(\d*)K)?\s*(?:\+?\s*(\d+))?", expr.replace(" ", ""))
    assert m and expr, f"not of the form aK+b: {expr!r}"
    a = (int(m.group(1)) if m.group(1) else 1) if "K" in expr else 0
    return a, int(m.group(2) or 0)


def test_pass_table_is_read_from_the_method_classes():
    assert dict(PASS_TABLE) == {name: METHODS.get(name).passes for name in METHODS.names()}


def test_doc_table_is_generated_from_the_classes():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "update_docs.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr  # run `python scripts/update_docs.py` after changing a class's passes


def test_doc_table_is_the_code_table():
    rows = _doc_rows()
    assert set(rows) == set(METHODS.names())
    for name in METHODS.names():
        p = METHODS.get(name).passes
        t, a, tr, h = p.target, p.attack, p.train, p.helper
        target, attack, train, helper, cost = rows[name][:5]
        assert _linear(target) == (0, t) and _linear(attack) == (a, 0), name
        assert _linear(train) == (0, tr) and _linear(helper) == (0, h), name
        assert _linear(cost) == (2 * a, t + 3 * tr + h), name
        assert Passes(t, a * K, tr, h).cost == 2 * a * K + t + 3 * tr + h


# --------------------------------------------------------------------------- no host reads per step
SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _host_reads_of_an_epoch(steps: int, monkeypatch) -> int:
    torch.manual_seed(0)
    data = TensorData(torch.rand(4 * steps, 1, 8, 8), torch.arange(4 * steps) % 5, 5)
    cfg = TrainConfig(method="arow", epochs=1, batch_size=4, eps=0.1, attack_steps=2, device="cpu",
                      augment="flip", swa_start=None)
    trainer = Trainer(cfg, Net(), data)
    calls = [0]
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            calls[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    try:
        trainer.train_epoch(0)
    finally:
        monkeypatch.undo()
    return calls[0]


def test_training_loop_reads_nothing_back_per_step(monkeypatch):
    """.item()/float()/bool()/.tolist()/.cpu() per step would stall a GPU: the count must not grow
    with the number of steps (the epoch's one read of the summed metrics is allowed)."""
    assert _host_reads_of_an_epoch(2, monkeypatch) == _host_reads_of_an_epoch(5, monkeypatch)


def _cuda_syncs_of_an_epoch(steps: int) -> int:
    import warnings

    data = TensorData(torch.rand(16 * steps, 1, 8, 8), torch.arange(16 * steps) % 5, 5)
    cfg = TrainConfig(method="arow", epochs=1, batch_size=16, eps=0.1, attack_steps=2, device="cuda")
    trainer = Trainer(cfg, Net(), data)
    trainer.train_epoch(0)  # warm-up: cuDNN autotuning, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_epoch(0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (counts stream synchronisations)")
def test_training_loop_never_synchronises_cuda():
    """On a GPU, CUDA's sync debug mode reports every synchronising call: their number per epoch
    must not grow with the number of steps (the Loader included: it feeds every step)."""
    assert _cuda_syncs_of_an_epoch(2) == _cuda_syncs_of_an_epoch(5)


class _OpCounts(torch.utils._python_dispatch.TorchDispatchMode):
    """Every ATen operator run below autocast (on a GPU, about one kernel launch each), and the casts
    among them (``_to_copy`` to another floating dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") is not None \
                and isinstance(args[0], torch.Tensor) and kwargs["dtype"] != args[0].dtype:
            self.casts += 1
        return func(*args, **kwargs)


def _attack_counts(model: nn.Module, steps: int) -> _OpCounts:
    from arow.methods.common import kl_attack

    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    with torch.autocast("cpu", dtype=torch.bfloat16), _OpCounts() as counts:
        kl_attack(model, x, y, ThreatModel(eps=0.1, steps=steps), BatchRNG(0))
    return counts


def test_the_training_attack_costs_the_same_operators_and_casts_at_every_step():
    """Counted per attack step under bf16 autocast (the CPU default; CUDA's too): the operators (on a
    GPU, kernel launches) and the dtype casts. Each step costs the same, and a step casts each frozen
    convolution and linear weight and bias once (autocast caches casts only of tensors that require
    grad) plus the iterate and the step's float32 losses: nothing per step grows with the number of
    steps, and the clean target's forward is not repeated inside the loop."""
    from arow.models import build_model

    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    c1, c3, c5 = (_attack_counts(model, k) for k in (1, 3, 5))
    per_step_ops, per_step_casts = (c5.ops - c1.ops) / 4, (c5.casts - c1.casts) / 4
    assert (c3.ops - c1.ops) / 2 == per_step_ops and (c3.casts - c1.casts) / 2 == per_step_casts
    weights = sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                  for p in (m.weight, m.bias) if p is not None)
    # one cast per frozen weight or bias, plus a handful for the iterate, logits and gradients
    assert weights <= per_step_casts <= weights + 8, (per_step_casts, weights)
    # outside the loop: the clean target's one forward and the random start, fewer operators than a
    # step (a forward and an input-gradient backward); a target recomputed per step would instead add
    # a forward's casts to every step and break the bound above
    assert 0 < c1.ops - per_step_ops < per_step_ops
