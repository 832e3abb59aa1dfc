"""Guards against overstated robustness: each trips on a model built to trip it, none on honest ones.

Models: a small MLP trained for a few hundred steps on Fashion-MNIST (honest), and wrappers
around it that misbehave in one way each; plus hand-built models on synthetic data where a
linear rule on the mean brightness is robust by construction.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arow.guards import GUARD_NAMES, run_guards, tripped

EPS = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 64), nn.Linear(64, 10)

    def hidden(self, x):
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.hidden(x))


@pytest.fixture(scope="module")
def fmnist():
    from arow.data import load_dataset

    train = load_dataset("fashion-mnist", split="train").subset(4000)
    test = load_dataset("fashion-mnist", split="test").subset(200)
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), test.x, test.y


def verdicts(model, x, y, **kw) -> dict[str, bool]:
    return {r.name: r.passed for r in run_guards(model, x, y, eps=EPS, n=200, **kw)}


# --------------------------------------------------------------------------- honest models pass
def test_honest_trained_model_passes_every_guard(fmnist):
    model, x, y = fmnist
    assert (model(x).argmax(1) == y).float().mean() > 0.7  # it did learn
    results = run_guards(model, x, y, eps=EPS, n=200)
    assert [r.name for r in results] == list(GUARD_NAMES)
    assert tripped(results) == [], [r.message for r in tripped(results)]
    json.dumps([r.to_json() for r in results])


class Brightness(nn.Module):
    """Class 1 iff mean brightness > 0.5: robust by construction to eps < the data's margin."""

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        s = (x.flatten(1).mean(1) - 0.5) * self.scale
        return torch.stack([-s, s], 1)


def brightness_data(n: int = 200, margin: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centre = 0.5 + (margin + 0.1 * torch.rand(n, generator=g)) * (2 * y - 1)
    x = (centre.view(n, 1, 1, 1) + 0.05 * (2 * torch.rand(n, 1, 8, 8, generator=g) - 1)).clamp(0, 1)
    return x, y


def test_honest_robust_model_passes_every_guard():
    x, y = brightness_data()
    results = run_guards(Brightness(), x, y, eps=EPS, n=200)
    assert tripped(results) == [], [r.message for r in tripped(results)]
    by = {r.name: r for r in results}
    assert by["more-steps"].message.startswith("PGD-10x2 restarts 100.0%")  # truly robust at eps 0.1
    assert by["large-eps"].value <= 0.05  # at eps 0.5 the brightness can be pushed across


# --------------------------------------------------------------------------- each guard trips
class DropoutInForward(nn.Module):
    def __init__(self, m: MLP) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.fc2(F.dropout(self.m.hidden(x), 0.2, training=True))


class BatchNormForcedTrain(nn.Module):
    def __init__(self, m: MLP) -> None:
        super().__init__()
        self.m, self.bn = m, nn.BatchNorm1d(64)

    def forward(self, x):
        self.bn.train()  # the bug: batch statistics at test time
        return self.m.fc2(self.bn(self.m.hidden(x)))


def test_stochastic_or_batch_dependent_forward_trips_eval_mode(fmnist):
    model, x, y = fmnist
    assert not verdicts(DropoutInForward(model), x, y, only=["eval-mode"])["eval-mode"]
    bn = BatchNormForcedTrain(model).eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    r = run_guards(bn, x, y, eps=EPS, n=200, only=["eval-mode"])[0]
    assert not r.passed and "'bn'" in r.message and "buffer" in r.message
    assert not bn.training and not bn.bn.training, "the guard must restore the modes"
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items()), "buffers must be restored"


def test_model_left_in_train_mode_is_fine_because_we_evaluate_in_eval_mode():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).train()
    x, y = brightness_data()
    r = run_guards(m, x, y, eps=EPS, only=["eval-mode"])[0]
    assert r.passed and r.value == 0.0, r.message
    assert m.training, "the caller's mode comes back"


def test_model_expecting_normalised_inputs_trips_input_range():
    x, y = brightness_data()
    mean, std = x.mean(), x.std()

    class ExpectsNormalised(Brightness):
        def forward(self, x):  # threshold at 0, as on (x - mean) / std: every [0, 1] input looks bright
            s = x.flatten(1).mean(1) * self.scale
            return torch.stack([-s, s], 1)

    r = run_guards(ExpectsNormalised(), x, y, eps=EPS, only=["input-range"])[0]
    assert not r.passed and "normalisation must be inside the model" in r.message
    assert run_guards(Brightness(), (x - mean) / std, y, eps=EPS, only=["input-range"])[0].passed is False


class Quantised(nn.Module):
    """Rounds its input to 4 levels first: zero gradients everywhere (classic gradient masking)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(torch.round(x * 4) / 4)


class _Flip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class Misleading(nn.Module):
    """Honest forward, gradient pointing the wrong way (non-zero, finite): PGD walks away."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(_Flip.apply(x))


def test_zero_gradients_trip_gradients_and_large_eps(fmnist):
    model, x, y = fmnist
    v = verdicts(Quantised(model), x, y)
    assert not v["gradients"] and not v["large-eps"]
    assert v["eval-mode"] and v["input-range"]


def test_misleading_gradients_trip_black_box_and_large_eps(fmnist):
    model, x, y = fmnist
    v = verdicts(Misleading(model), x, y, only=["gradients", "large-eps", "black-box"])
    assert v["gradients"], "the gradients are finite and non-zero"
    assert not v["large-eps"] and not v["black-box"]


class Adaptive(nn.Module):
    """A stateful 'defence': after enough queries it switches from a fragile rule to a robust one.

    It stands for any model whose answers depend on how long it has been attacked; with PGD
    keeping the first fooling iterate, only such models (or randomness) make more steps look worse.
    """

    def __init__(self, switch_after: int) -> None:
        super().__init__()
        self.calls, self.switch_after = 0, switch_after

    def forward(self, x):
        self.calls += 1
        if self.calls <= self.switch_after:  # fragile: reads one pixel
            s = (x[:, 0, 0, 0] - 0.5) * 20
        else:
            s = (x.flatten(1).mean(1) - 0.5) * 20
        return torch.stack([-s, s], 1)


def test_stronger_attack_leaving_more_robust_examples_trips_more_steps():
    x, y = brightness_data()
    x[:, 0, 0, 0] = 0.5 + 0.03 * (2 * y - 1)  # the fragile rule's pixel: flippable within eps
    # forward passes before the switch: clean predictions (1), PGD-5 (5 steps + 1 final check),
    # its verdict (1); the stronger PGD-10 x 2 restarts then meets the robust rule
    r = run_guards(Adaptive(switch_after=8), x, y, eps=EPS, only=["more-steps"])[0]
    assert not r.passed and r.value > 0.5, r.message


# --------------------------------------------------------------------------- hygiene
def test_guards_leave_model_and_rng_alone(fmnist):
    model, x, y = fmnist
    model.train()
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a = run_guards(model, x, y, eps=EPS, n=60, only=["more-steps", "black-box"])
    assert torch.equal(torch.rand(2), expected)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    b = run_guards(model, x, y, eps=EPS, n=60, only=["more-steps", "black-box"])
    assert [r.value for r in a] == [r.value for r in b], "seeded: the same verdicts twice"
    model.eval()


def test_bad_arguments_are_value_errors(fmnist):
    model, x, y = fmnist
    with pytest.raises(ValueError, match="unknown guard"):
        run_guards(model, x, y, eps=EPS, only=["nope"])
    with pytest.raises(ValueError, match="n >= 1"):
        run_guards(model, x, y, eps=EPS, n=0)


# --------------------------------------------------------------------------- the CLI
def _checkpoint(tmp_path, zero_head: bool):
    from arow.checkpoint import atomic_save
    from arow.models import build_model

    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    if zero_head:  # constant logits: every input gradient is exactly zero
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None,
            "std": None, "dataset": "fashion-mnist"}
    run = tmp_path / "run"
    atomic_save({"model": model.state_dict(), "model_spec": spec, "config": {"method": "trades", "seed": 0},
                 "threat": {"eps": 0.1}}, run / "final.pt")
    return run


def test_cli_exits_3_when_a_guard_trips(tmp_path, capsys):
    from arow.cli import main

    run = _checkpoint(tmp_path, zero_head=True)
    args = ["eval", str(run), "--attacks", "clean,pgd2", "--n", "40", "--guards-n", "40", "--device", "cpu"]
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arow: error: robustness guard") and "'gradients'" in err[0]
    out = json.loads((run / "eval.json").read_text())
    assert any(g["name"] == "gradients" and not g["passed"] for g in out["guards"]) and "accuracy" not in out
    assert main(args + ["--allow-guard-failures"]) == 0
    out = json.loads((run / "eval.json").read_text())
    assert "clean" in out["accuracy"] and out["subset"] is True and "subset" in out["warning"]
    assert "likely overstated" in capsys.readouterr().out
    assert main(args + ["--no-guards"]) == 0
    assert json.loads((run / "eval.json").read_text())["guards"] == []


def test_cli_autoattack_writes_robustbench_json(tmp_path, capsys):
    from arow.cli import main

    run = _checkpoint(tmp_path, zero_head=False)
    rb = tmp_path / "rb.json"
    args = ["eval", str(run), "--attacks", "clean,autoattack", "--n", "30", "--guards-n", "30",
            "--device", "cpu", "--robustbench", str(rb)]
    assert main(args) == 0
    out = json.loads((run / "eval.json").read_text())
    assert out["attack_settings"]["autoattack"]["version"] == "standard"
    assert out["attack_settings"]["autoattack"]["seed"] == 0 and len(out["guards"]) == len(GUARD_NAMES)
    info = json.loads(rb.read_text())
    for key in ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "unreliable"):
        assert key in info, key
    assert info["eps"] == "0.1" and info["n_test_points"] == 30 and info["threat_model"] == "Linf"
    assert info["clean_acc"] == f"{100 * out['accuracy']['clean']:.2f}"
    assert info["autoattack_acc"] == f"{100 * out['accuracy']['autoattack']:.2f}"
    assert "SUBSET" in info["footnote"] and info["name"].startswith("Theoretically Principled")
    assert (run / "eval_state" / "autoattack.pt").is_file()
    capsys.readouterr()
    assert main(["eval", str(run), "--attacks", "clean", "--robustbench", str(rb)]) == 2  # refused up front
    assert "needs both clean and autoattack" in capsys.readouterr().err
