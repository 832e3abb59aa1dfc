"""Guards against overstated robustness: each trips on a model built to trip it, none on honest ones.

Models: a small MLP trained for a few hundred steps on Fashion-MNIST (honest), and wrappers
around it that misbehave in one way each; plus hand-built models on synthetic data where a
linear rule on the mean brightness is robust by construction. Two wrappers are built to pass
the guards of a naive evaluation: one reverses the input gradient for a fixed 60% of the
examples, one masks its gradients everywhere except near the first 200 test images.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from arow.attacks import pgd
from arow.evaluation.guards import GUARD_NAMES, run_guards, subset_digest, tripped
from arow.threat import ThreatModel

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
def fmnist_1000():
    from arow.data import load_dataset

    train = load_dataset("fashion-mnist", split="train").subset(4000)
    test = load_dataset("fashion-mnist", split="test").subset(1000)
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


@pytest.fixture(scope="module")
def fmnist(fmnist_1000):
    model, x, y = fmnist_1000
    return model, x[:200], y[:200]


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
    v = verdicts(Misleading(model), x, y,
                 only=["gradients", "gradient-direction", "large-eps", "transfer", "black-box"])
    assert v["gradients"], "the gradients are finite and non-zero"
    assert not v["large-eps"] and not v["black-box"]
    assert not v["gradient-direction"] and not v["transfer"], "they point the wrong way"


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
    # (all examples in one batch: the count of forward passes above assumes it)
    r = run_guards(Adaptive(switch_after=8), x, y, eps=EPS, only=["more-steps"], batch_size=len(x))[0]
    assert not r.passed and r.value > 0.5, r.message


# --------------------------------------------------------------------------- overstated on purpose
class _FlipWhere(torch.autograd.Function):
    """Identity forward; the backward pass reverses the gradient of the examples in ``mask``."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return torch.where(mask.view(-1, *[1] * (g.dim() - 1)), -g, g), None


def hashed(x: torch.Tensor, frac: float) -> torch.Tensor:
    """A fixed ``frac`` of the examples, chosen by a hash of each input's bytes."""
    return torch.tensor([int(hashlib.sha256(v.numpy().tobytes()).hexdigest(), 16) % 1000 < 1000 * frac
                         for v in x])


class ReversedNear(nn.Module):
    """Honest forward; the input gradient is reversed near the reference inputs marked in ``flip``.

    Near: the nearest reference lies within L2 distance 4. An eps = 0.1 L-inf ball on 28x28
    images reaches 2.8, while PGD's random start at eps 0.5 lies about 6 away: the large-eps
    guard meets the honest model, and PGD at eps 0.1 walks away from adversarial examples.
    """

    def __init__(self, m: nn.Module, ref: torch.Tensor, flip: torch.Tensor, radius: float = 4.0) -> None:
        super().__init__()
        self.m, self.ref, self.flip, self.radius = m, ref.flatten(1), flip, radius

    def forward(self, x):
        with torch.no_grad():
            d, i = torch.cdist(x.flatten(1), self.ref).min(1)
        return self.m(_FlipWhere.apply(x, (d <= self.radius) & self.flip[i]))


def pgd_accuracy(model, x, y) -> float:
    x_adv = pgd(model, x, y, ThreatModel(eps=EPS, steps=10), keep_best=True)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def test_gradient_reversed_for_60_percent_trips_gradient_direction_and_transfer(fmnist):
    model, x, y = fmnist
    flip = hashed(x, 0.6)
    assert 0.5 < float(flip.float().mean()) < 0.7
    cheat = ReversedNear(model, x, flip)
    assert pgd_accuracy(cheat, x, y) > pgd_accuracy(model, x, y) + 0.2, "PGD overstates its robustness"
    by = {r.name: r for r in run_guards(cheat, x, y, eps=EPS, n=200)}
    assert not by["gradient-direction"].passed and by["gradient-direction"].value > 0.4, by["gradient-direction"]
    assert "wrong way" in by["gradient-direction"].message
    assert not by["transfer"].passed and "overstated" in by["transfer"].message
    assert not by["black-box"].passed
    # the gradients are finite and non-zero and a huge eps still works: the older checks see nothing
    for name in ("finite", "eval-mode", "input-range", "gradients", "large-eps", "more-steps"):
        assert by[name].passed, by[name].message


def test_model_honest_only_near_the_first_test_images_is_caught_by_the_random_subset(fmnist_1000):
    model, x, y = fmnist_1000
    cheat = ReversedNear(model, x, torch.arange(len(x)) >= 200)
    first = run_guards(cheat, x[:200], y[:200], eps=EPS, n=200)  # the first 200: where it is honest
    assert first.subset["indices"] == list(range(200))
    assert tripped(first) == [], [r.message for r in tripped(first)]
    drawn = run_guards(cheat, x, y, eps=EPS, n=200, seed=0,
                       only=["gradients", "gradient-direction", "transfer", "black-box"])
    assert drawn.subset["total"] == 1000 and sum(i >= 200 for i in drawn.subset["indices"]) > 120
    assert {r.name for r in tripped(drawn)} == {"gradient-direction", "transfer", "black-box"}


def test_subset_is_drawn_with_the_seed_and_recorded():
    x, y = brightness_data()

    def run(model=None, **kw):
        return run_guards(model or Brightness(), x, y, eps=EPS, only=["finite"], **kw)

    a, b, c = run(n=50, seed=0), run(n=50, seed=0), run(n=50, seed=1)
    s = a.subset
    assert s == b.subset and s["indices"] != c.subset["indices"]
    assert s["seed"] == 0 and s["seed_from"] == "given" and s["n"] == 50 and s["total"] == 200
    assert s["indices"] == sorted(set(s["indices"])) and s["indices"] != list(range(50))
    assert s["sha256"] == subset_digest(s["indices"])
    assert s["sha256"] == hashlib.sha256(",".join(map(str, s["indices"])).encode()).hexdigest()
    # half of the draw comes from the end of the set: the images an evaluation attacks last
    assert s["late"] == sum(i >= 150 for i in s["indices"]) >= 25
    assert not set(s["held_out"]) & set(s["indices"]) and len(s["held_out"]) == 25
    json.dumps(s)
    assert run(n=500).subset["indices"] == list(range(200)), "n >= the set: every example, in order"


def test_default_seed_comes_from_the_weights_and_the_data():
    x, y = brightness_data()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))

    def run(model, xx=x, **kw):
        return run_guards(model, xx, y, eps=EPS, n=50, only=["finite"], **kw).subset

    first = run(m)
    assert first["seed_from"] == "weights and data" and run(m) == first, "the same model and data: the same draw"
    with torch.no_grad():
        m[1].bias[0] += 1e-3  # one weight changed
    assert run(m)["seed"] != first["seed"] and run(m)["indices"] != first["indices"]
    with torch.no_grad():
        m[1].bias[0] -= 1e-3
    assert run(m) == first
    assert run(m, x.flip(0))["seed"] != first["seed"], "other data: another draw"
    given = run(m, seed=first["seed"])  # an explicit seed wins (here: the derived one, so the same draw)
    assert given["seed_from"] == "given" and given["indices"] == first["indices"]
    assert run(m, seed=first["seed"] + 1)["indices"] != first["indices"]


def test_confident_honest_model_passes_gradient_direction():
    x, y = brightness_data()  # logit margins 45-75: the cross-entropy rounds to 0 even in float64
    by = {r.name: r for r in run_guards(Brightness(scale=150.0), x, y, eps=EPS,
                                        only=["gradients", "gradient-direction"])}
    assert by["gradients"].passed and by["gradient-direction"].passed, by["gradient-direction"].message
    assert by["gradient-direction"].value == 0.0 and "0 of 200" in by["gradient-direction"].message

class NaNWhere(nn.Module):
    """NaN logits for the brightest third of the inputs; honest elsewhere."""

    def __init__(self, m: nn.Module, cutoff: float) -> None:
        super().__init__()
        self.m, self.cutoff = m, cutoff

    def forward(self, x):
        out = self.m(x)
        return torch.where((x.flatten(1).mean(1) > self.cutoff)[:, None], float("nan"), out)


class NaNOffTheData(nn.Module):
    """Finite on the data (multiples of 1/255), NaN as soon as an input is perturbed."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        off = ((x * 255 - (x * 255).round()).abs() > 1e-3).flatten(1).any(1)
        return torch.where(off[:, None], float("inf"), self.m(x))


def test_nan_outputs_are_reported_as_non_finite_not_as_noise_or_masking(fmnist):
    model, x, y = fmnist
    cutoff = float(x.flatten(1).mean(1).quantile(0.67))
    by = {r.name: r for r in run_guards(NaNWhere(model, cutoff), x, y, eps=EPS,
                                        only=["finite", "eval-mode", "gradients", "gradient-direction"])}
    assert not by["finite"].passed and "NaN/inf" in by["finite"].message and 0.2 < by["finite"].value < 0.5
    assert by["eval-mode"].passed and by["gradients"].passed and by["gradient-direction"].passed
    r = run_guards(NaNOffTheData(model), x, y, eps=EPS, only=["finite"])[0]
    assert not r.passed and r.value == 1.0 and "within eps" in r.message
    assert run_guards(model, x, y, eps=EPS, only=["finite"])[0].passed


class Scrambled(nn.Module):
    """Honest forward; the input gradient is replaced by noise (finite, non-zero, useless)."""

    class _Noise(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.randn_like(g) * g.abs().mean()

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(self._Noise.apply(x))


def test_transfer_from_a_given_surrogate(fmnist):
    model, x, y = fmnist
    r = run_guards(Scrambled(model), x, y, eps=EPS, only=["transfer"], surrogate=model)[0]
    assert not r.passed and "surrogate" in r.message and r.value > 0.3
    bx, by = brightness_data()
    r = run_guards(Brightness(), bx, by, eps=EPS, only=["transfer"], surrogate=Brightness(scale=5.0))[0]
    assert r.passed and r.value == 0.0 and "surrogate" in r.message


def test_honest_small_models_pass_the_direction_and_transfer_guards(fmnist_small, trained_model):
    from arow.models import build_model

    xtr, ytr, x, y = fmnist_small
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    opt = torch.optim.SGD(linear.parameters(), lr=0.5)
    for _ in range(50):
        loss = F.cross_entropy(linear(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    models = {"small-cnn, random weights": build_model("small-cnn", num_classes=10, in_channels=1, image_size=28),
              "BatchNorm CNN, trained": trained_model, "linear, trained": linear.eval()}
    for name, m in models.items():
        results = run_guards(m, x, y, eps=EPS, n=200, only=["finite", "gradients", "gradient-direction", "transfer"])
        assert tripped(results) == [], (name, [r.message for r in tripped(results)])


# --------------------------------------------------------------------------- hygiene
def test_guards_leave_model_and_rng_alone(fmnist):
    model, x, y = fmnist
    model.train()
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    a = run_guards(model, x, y, eps=EPS, n=60)
    assert torch.equal(torch.rand(2), expected)
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    b = run_guards(model, x, y, eps=EPS, n=60)
    assert [r.value for r in a] == [r.value for r in b], "seeded: the same verdicts twice"
    assert a.subset == b.subset
    model.eval()


def test_bad_arguments_are_value_errors(fmnist):
    model, x, y = fmnist
    with pytest.raises(ValueError, match="unknown guard"):
        run_guards(model, x, y, eps=EPS, only=["nope"])
    with pytest.raises(ValueError, match="n >= 1"):
        run_guards(model, x, y, eps=EPS, n=0)


# --------------------------------------------------------------------------- the CLI
def _checkpoint(tmp_path, zero_head: bool):
    from arow.runs.checkpoint import atomic_save
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
    from arow.cli.commands import main

    run = _checkpoint(tmp_path, zero_head=True)
    args = ["eval", str(run), "--attacks", "clean,pgd2", "--n", "40", "--guards-n", "40", "--device", "cpu"]
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arow: error: robustness guard") and "'gradients'" in err[0]
    assert not (run / "eval.json").exists(), "a subset never writes the full-test-set file"
    out = json.loads((run / "eval_n40.json").read_text())
    assert any(g["name"] == "gradients" and not g["passed"] for g in out["guards"]) and "accuracy" not in out
    assert main(args + ["--allow-guard-failures"]) == 0
    out = json.loads((run / "eval_n40.json").read_text())
    assert "clean" in out["accuracy"] and out["subset"] is True and "subset" in out["warning"]
    assert "likely overstated" in capsys.readouterr().out
    assert main(args + ["--no-guards"]) == 0
    assert json.loads((run / "eval_n40.json").read_text())["guards"] == []


def test_cli_autoattack_writes_robustbench_json(tmp_path, capsys):
    from arow.cli.commands import main

    run = _checkpoint(tmp_path, zero_head=False)
    rb = tmp_path / "rb.json"
    args = ["eval", str(run), "--attacks", "clean,autoattack", "--n", "30", "--guards-n", "30",
            "--device", "cpu", "--robustbench", str(rb)]
    assert main(args) == 0
    out = json.loads((run / "eval_n30.json").read_text())
    assert out["attack_settings"]["autoattack"]["version"] == "standard"
    assert out["attack_settings"]["autoattack"]["seed"] == 0
    assert [g["name"] for g in out["guards"]] == [*GUARD_NAMES, "consistency", "held-out"]
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


# --------------------------------------------------------------------------- arow.evaluate: guards by default
def test_arow_evaluate_runs_the_guards_and_refuses_a_masked_model(fmnist):
    import arow
    from arow.pipelines import RobustnessGuardError

    model, x, y = fmnist
    with pytest.raises(RobustnessGuardError, match="allow_guard_failures=True") as e:
        arow.evaluate(Quantised(model), x, y, ["clean", "pgd20"], eps=EPS)
    assert {g.name for g in e.value.report.tripped} >= {"gradients", "large-eps"}
    rep = arow.evaluate(Quantised(model), x, y, ["clean", "pgd20"], eps=EPS, allow_guard_failures=True)
    assert rep.guards_ran and rep.tripped and "overstated" in rep.text()
    honest = arow.evaluate(model, x, y, ["clean", "pgd20"], eps=EPS)
    assert honest.guards_ran and not honest.tripped and honest.accuracy["pgd20"] <= honest.accuracy["clean"]
    skipped = arow.evaluate(model, x, y, ["clean", "pgd20"], eps=EPS, guards=False)
    assert not skipped.guards_ran and "did not run" in skipped.text()
    assert skipped.accuracy == honest.accuracy  # the same seeded attacks, guards or not


def test_arow_evaluate_takes_a_dataset_or_a_dataloader(fmnist):
    import arow
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y = fmnist
    ref = arow.evaluate(model, x, y, ["clean", "pgd5"], eps=EPS, guards=False).accuracy
    ds = TensorDataset(x, y)
    assert arow.evaluate(model, ds, attacks=["clean", "pgd5"], eps=EPS, guards=False).accuracy == ref
    dl = DataLoader(ds, batch_size=64, shuffle=False)
    assert arow.evaluate(model, dl, attacks="clean,pgd5", eps=EPS, guards=False).accuracy == ref
    with pytest.raises(ValueError, match="labels come from the DataLoader"):
        arow.evaluate(model, dl, y, eps=EPS)
    with pytest.raises(ValueError, match="expected tensors, a TensorData, a Dataset or a DataLoader"):
        arow.evaluate(model, 42, eps=EPS)


# --------------------------------------------------------------------------- after the evaluation
def on_grid(x: torch.Tensor) -> torch.Tensor:
    """Which inputs are test images (multiples of 1/255), not points an attack made."""
    flat = x.detach().flatten(1)
    return ((flat * 255 - (flat * 255).round()).abs() < 1e-4).all(1)


class Remembers(nn.Module):
    """Keeps a Python set of the test images it has seen; after ``k`` distinct ones it reverses its
    input gradient everywhere. The guards (which see fewer images) meet the honest model, the
    evaluation (which sees them all first, in its clean pass) the lying one."""

    def __init__(self, m: nn.Module, k: int) -> None:
        super().__init__()
        self.m, self.k, self.seen = m, k, set()

    def forward(self, x):
        self.seen.update(v.numpy().tobytes() for v in x.detach()[on_grid(x)])
        return self.m(_Flip.apply(x) if len(self.seen) > self.k else x)


class HonestOnWhatItSawFirst(nn.Module):
    """Honest near the first ``n`` test images it is shown (the guard subset: the guards run first),
    its input gradient reversed near every later one: the guard run and the evaluation then agree on
    the guard subset, so the cross-check alone cannot see it."""

    def __init__(self, m: nn.Module, n: int, radius: float = 4.0) -> None:
        super().__init__()
        self.m, self.n, self.radius = m, n, radius
        self.keys: set[bytes] = set()
        self.honest: list[torch.Tensor] = []
        self.lying: list[torch.Tensor] = []

    def _near(self, flat: torch.Tensor, refs: list) -> torch.Tensor:
        if not refs:
            return torch.zeros(len(flat), dtype=torch.bool)
        return torch.cdist(flat, torch.stack(refs)).min(1).values <= self.radius

    def forward(self, x):
        flat = x.detach().flatten(1)
        for v in flat[on_grid(x)]:
            key = v.numpy().tobytes()
            if key not in self.keys:
                self.keys.add(key)
                (self.honest if len(self.honest) < self.n else self.lying).append(v)
        flip = self._near(flat, self.lying) & ~self._near(flat, self.honest)
        return self.m(_FlipWhere.apply(x, flip))


def test_a_model_that_changes_after_300_images_is_caught_by_the_cross_check(fmnist_1000):
    import arow
    from arow.pipelines import RobustnessGuardError

    model, x, y = fmnist_1000
    honest = arow.evaluate(model, x, y, ["clean", "pgd20"], eps=EPS)
    assert honest.guards_ran and not honest.tripped, [g.message for g in honest.tripped]
    assert [g.name for g in honest.guards] == [*GUARD_NAMES, "consistency", "held-out"]
    by = {g.name: g for g in honest.guards}
    assert by["consistency"].value == 0 and "equal the guard run's" in by["consistency"].message
    with pytest.raises(RobustnessGuardError, match="'consistency'") as e:
        arow.evaluate(Remembers(model, k=300), x, y, ["clean", "pgd20"], eps=EPS)
    rep = e.value.report
    pre = [g for g in rep.guards if g.name in GUARD_NAMES]
    assert len(pre) == len(GUARD_NAMES) and all(g.passed for g in pre), "the nine guards met the honest model"
    assert rep.accuracy["pgd20"] > honest.accuracy["pgd20"] + 0.3, "the number it would have reported"
    cons = {g.name: g for g in rep.guards}["consistency"]
    assert not cons.passed and cons.details["differ"] > 50 and cons.details["changed"] > 0
    assert "state" in cons.message and "\n" not in rep.error
    assert rep.guards.reference.attack == "pgd20" and rep.info["guards_subset"]["reference"]["attack"] == "pgd20"


def test_a_model_honest_on_the_images_it_saw_first_is_caught_on_held_out_images(fmnist_1000):
    import arow

    model, x, y = fmnist_1000
    honest = arow.evaluate(model, x, y, ["clean", "pgd20"], eps=EPS, guards=False).accuracy["pgd20"]
    cheat = HonestOnWhatItSawFirst(model, n=200)
    rep = arow.evaluate(cheat, x, y, ["clean", "pgd20"], eps=EPS, allow_guard_failures=True)
    assert rep.accuracy["pgd20"] > honest + 0.3, "PGD-20 overstated"
    by = {g.name: g for g in rep.guards}
    assert [n for n, g in by.items() if not g.passed] == ["held-out"], [g.message for g in rep.tripped]
    assert by["consistency"].value == 0, "on the images it saw first it agrees with itself"
    assert by["held-out"].value > 0.3 and "had not shown the model" in by["held-out"].message
    assert "WARNING: robustness guards tripped" in rep.text()


class Saturating(nn.Module):
    """Honest, with a logit scale so large that the cross-entropy's gradient underflows to exactly
    zero for the confidently classified examples: PGD on cross-entropy cannot move them, any margin
    attack can. Neither attack is misled; one is just weaker on this model."""

    def forward(self, x):
        s = (x.flatten(1).mean(1) - 0.5) * 2000
        return torch.stack([-s, s], 1)


def test_transfer_passes_a_margin_attack_that_is_only_stronger_and_reports_it():
    x, y = brightness_data(margin=0.03)  # brightness margins 0.03-0.13: some within eps 0.1, some not
    r = run_guards(Saturating(), x, y, eps=EPS, only=["transfer"])[0]
    assert r.details["margin"] > 0.1, r.details  # CW breaks what PGD-CE could not: far above the old 3% + 1% limit
    assert r.passed and r.value == 0.0 and r.details["masked"] == 0.0, r.message
    assert "add cw or autoattack" in r.message and "overstate" in r.message
    covered = run_guards(Saturating(), x, y, eps=EPS, only=["transfer"], attacks=["clean", "pgd20", "cw"])[0]
    assert covered.passed and "reports cw" in covered.message and "nothing is overstated" in covered.message
    assert covered.details["reported_by"] == ["cw"]


def test_consistency_is_reported_even_without_a_per_example_attack(fmnist):
    import arow

    model, x, y = fmnist
    rep = arow.evaluate(model, x[:60], y[:60], ["clean"], eps=EPS, guards_n=30)
    by = {g.name: g for g in rep.guards}
    assert by["consistency"].passed and by["consistency"].details["attack"] == "clean"
    assert by["held-out"].passed and len(rep.info["guards_subset"]["held_out"]) == 15


def test_train_takes_allow_guard_failures_into_its_final_evaluation(monkeypatch, tmp_path):
    import arow.pipelines as pipelines
    from arow.cli.commands import build_parser
    from arow.config import TrainConfig
    from arow.models import build_model

    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)  # constant logits: every input gradient is exactly zero
    nn.init.zeros_(last.bias)
    monkeypatch.setattr(pipelines, "train_run", lambda cfg, **kw: type("Trained", (), {"model": model})())
    monkeypatch.setattr(pipelines, "plot_run_safely", lambda path: None)

    def train(allow: bool):
        cfg = TrainConfig(epochs=1, out=str(tmp_path / f"run{allow}"), eval_attacks="clean,pgd2", eval_n=40,
                          allow_guard_failures=allow)
        return pipelines.train_and_evaluate(cfg).evaluation

    stopped, reported = train(False), train(True)
    assert stopped.error and "'gradients'" in stopped.error and stopped.result is None
    assert reported.error is None and reported.tripped and "pgd2" in reported.accuracy
    assert build_parser().parse_args(["train", "--allow-guard-failures"]).allow_guard_failures is True


def test_a_study_passes_allow_guard_failures_to_every_run():
    from arow.study.cells import resolve_cells
    from arow.study.spec import StudySpec

    spec = StudySpec.resolve(None, {"methods": "arow,trades", "seeds": [0, 1]}, ["allow_guard_failures=true"])
    assert [p.config["allow_guard_failures"] for p in resolve_cells(spec)] == [True] * 4
    default = StudySpec.resolve(None, {"methods": "arow,trades", "seeds": [0]}, [])
    assert [p.config["allow_guard_failures"] for p in resolve_cells(default)] == [False] * 2
