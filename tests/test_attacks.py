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


# --------------------------------------------------------------------------- no host synchronisation per step
class HostSyncOps:
    """Counts the aten operators that make the host wait for a GPU, as a dispatch mode on the CPU:
    a read of a value (``.item()``, ``float()``, ``bool()``), ``nonzero``, ``masked_select``, an
    index with a boolean mask (whose size the host must learn), ``unique``, ``equal``, a copy to the
    CPU. On a GPU each of them blocks until the device has caught up."""

    VALUE_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_numpy", "argwhere",
                   "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"}

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.ops: list[str] = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if counter.syncs(func, args, kwargs):
                    counter.ops.append(str(func))
                return func(*args, **kwargs)

        self.mode = Mode()

    def syncs(self, func, args, kwargs) -> bool:
        name = func._schema.name.split("::")[-1]
        if name in self.VALUE_READS:
            return True
        if name in self.INDEXING:  # a boolean (or uint8) mask among the indices
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
        if name in ("_to_copy", "copy_"):  # device to host
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device")
            return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None \
                and torch.device(dst).type == "cpu"
        return False

    def __enter__(self) -> "HostSyncOps":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


def test_host_sync_counter_sees_what_a_gpu_would_wait_for():
    t, mask = torch.rand(4, 3), torch.tensor([True, False, True, False])
    with HostSyncOps() as c:
        t[mask] = t[mask] * 2  # boolean-mask read and write
        t.sum().item()
        bool((t > 0).any())
        torch.where(mask.view(-1, 1), t, -t)  # no sync: not counted
        t[torch.tensor([0, 2])]  # integer indices: not counted
    assert c.ops == ["aten.index.Tensor", "aten.index_put_.default", "aten._local_scalar_dense.default",
                     "aten._local_scalar_dense.default"]


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_never_waits_for_the_device(norm, eps, loss):
    """Evaluation PGD/CW (keep_best, restarts) and the training attacks run no host-syncing operator:
    on a GPU every step is queued without waiting (a boolean-mask assignment costs two waits per step)."""
    from arow.attacks import fat_pgd
    from arow.rng import BatchRNG

    net, x, y = _bn_net(), torch.rand(8, 1, 8, 8), torch.arange(8) % 5
    fn = {"ce": ce_loss, "cw": cw_loss, "kl": kl_loss(net(x).detach())}[loss]
    tm = ThreatModel(eps=eps, steps=4, norm=norm)
    with HostSyncOps() as c:
        pgd(net, x, y, tm, fn, restarts=2, keep_best=True)
        pgd(net, x, y, tm, fn, keep_best=True, rng=BatchRNG(0))
        pgd(net, x, y, tm.with_(start="normal"), fn, rng=BatchRNG(0))  # TRADES/ARoW's training attack
        fat_pgd(net, x, y, tm, tau=1, omega=0.01, rng=BatchRNG(0))
    assert c.ops == []
    # evaluation draws per-example starts on the CPU (ExampleRNG, one copy per restart), never per step
    from arow.rng import ExampleRNG

    counts = []
    for steps in (1, 5):
        with HostSyncOps() as c:
            pgd(net, x, y, tm.with_(steps=steps), fn, restarts=2, keep_best=True, rng=ExampleRNG(0, torch.arange(8)))
        counts.append(len(c.ops))
    assert counts[0] == counts[1] == 0


def test_linf_bounds_computed_once_give_the_same_projection():
    tm, x = ThreatModel(eps=0.1), torch.rand(6, 1, 4, 4)
    far = x + torch.randn_like(x)
    assert torch.equal(tm.project(far, x, tm.bounds(x)), tm.project(far, x))
    assert ThreatModel(eps=0.5, norm="l2").bounds(x) is None
