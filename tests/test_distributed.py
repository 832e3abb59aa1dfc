"""N processes train like one: DDP runs on the CPU (gloo) against single-process runs.

One spawn of two processes runs every distributed scenario (training with BatchNorm and SWA,
an interrupted and resumed run, sharded evaluation, errors raised on all ranks); each test
then compares what the ranks wrote with a single-process run in this process. A separate,
slower test drives the real command line through ``torch.distributed.run``.

Exact-arithmetic note: the BatchNorm runs use float64, where a 2-process run (gradients
averaged over ranks, BatchNorm statistics all-reduced) agrees with one process to ~1e-12.
In float32 the agreement is ~1 ulp without an attack, but a sign-gradient attack turns a
rounding difference in a near-zero input gradient into a pixel that moves by a full step,
so the float32 command-line test compares weights with a looser tolerance.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import _free_port, spawn_ranks
from arow.attacks import Attack
from arow.config.schema import ConfigError, TrainConfig
from arow.data import TensorData
from arow.evaluation.cascade import evaluate
from arow.pipelines import build_trainer
from arow.training.trainer import Callbacks, Trainer

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
WORLD = 2
SPAWN_TIMEOUT_S = 240


# ----------------------------------------------------------------------------- shared set-up
def bn_net() -> nn.Module:
    """A tiny CNN with BatchNorm (the small-cnn has none), float64 for exact comparisons."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(32, 4),
    ).double()


def toy_data(n: int, seed: int) -> TensorData:
    """Learnable 4-class 1x12x12 images: a class prototype plus noise, float64 in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    y = torch.arange(n) % 4
    x = (0.6 * protos[y] + 0.4 * torch.rand(n, 1, 12, 12, generator=g, dtype=torch.float64)).clamp(0, 1)
    return TensorData(x, y, 4, "toy")


def train_cfg(out: Path, **kw) -> TrainConfig:
    # 128 training examples = 4 full global batches of 32: no padded last batch, so every
    # epoch of the 2-process run holds exactly the examples of the 1-process run.
    base = dict(method="arow", epochs=2, batch_size=32, lr=0.05, eps=0.1, attack_steps=2, swa_start=1,
                augment="crop+flip", val_attack="pgd3", seed=3, device="cpu", out=str(out))
    base.update(kw)
    return TrainConfig(**base)


def accum_training(out: Path, grad_accum: int) -> Trainer:
    """One epoch of a BatchNorm-free net with --grad-accum (micro-batches sum to the full batch)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(216, 4)).double()
    trainer = build_trainer(train_cfg(out, epochs=1, swa_start=None, grad_accum=grad_accum), net, toy_data(128, 0),
                            plots=False)
    trainer.fit()
    return trainer


def run_training(out: Path, callbacks: Callbacks | None = None, resume: bool = False) -> Trainer:
    trainer = build_trainer(train_cfg(out), bn_net(), toy_data(128, 0), toy_data(40, 1), callbacks=callbacks,
                            resume=resume)
    trainer.fit()
    return trainer


class StopAfterFirstEpoch(Callbacks):
    """Simulates a kill after epoch 1 (its checkpoint is written before on_epoch_end runs)."""

    def on_epoch_end(self, record):
        raise KeyboardInterrupt


EVAL_EPS = 0.05


def noise_attack() -> Attack:
    """A cascade attack that draws from the GLOBAL RNG, as AutoAttack's attacks do: random corners."""
    def run(m, x, y):
        return (x + EVAL_EPS * torch.sign(torch.rand_like(x) - 0.5)).clamp(0, 1)

    atk = Attack("noise", run)
    atk.cascade = True
    return atk


def eval_problem(tmp: Path):
    """A model fitted (naturally) to the toy data, and 101 fresh examples."""
    state = torch.load(tmp / "eval.pt")
    model = bn_net()
    model.load_state_dict(state["model"])
    return model.eval(), state["x"], state["y"]


def run_eval(model, x, y):
    # 101 examples in batches of 16: a partial last batch, and an odd number of batches to share
    attacks = ["clean", noise_attack(), "fgsm", "pgd3", "cw3"]
    return evaluate(model, x, y, attacks, eps=EVAL_EPS, batch_size=16, seed=7)


def fit_naturally() -> nn.Module:
    model = bn_net()
    data = toy_data(128, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(data.x), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@contextmanager
def one_thread():
    """The workers run single-threaded; so does the reference, so the kernels match too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the workers
def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    from arow import distributed

    report: dict = {}
    # errors must reach every rank (rank 0 alone raising would leave the other waiting forever)
    try:
        Trainer(train_cfg(tmp_path / "bad", batch_size=33), bn_net(), toy_data(128, 0))
    except ConfigError as e:
        report["odd_batch"] = str(e)

    run_training(tmp_path / "ddp")  # (a) and (d): BatchNorm + SWA, uninterrupted
    accum_training(tmp_path / "ddp_accum", grad_accum=2)  # (e) 2 micro-batches per rank, no_sync on the first

    try:  # the same folder again without --resume: refused on both ranks, nothing overwritten
        build_trainer(train_cfg(tmp_path / "ddp"), bn_net(), toy_data(128, 0))
    except ConfigError as e:
        report["existing_run"] = str(e)

    try:  # (b) a run killed after epoch 1, then resumed
        run_training(tmp_path / "resumed", callbacks=StopAfterFirstEpoch())
        report["interrupted"] = False
    except KeyboardInterrupt:
        report["interrupted"] = True
    run_training(tmp_path / "resumed", resume=True)

    model, x, y = eval_problem(tmp_path)  # (c) sharded evaluation
    res = run_eval(model, x, y)
    torch.save({k: v.cpu() for k, v in res.correct.items()}, tmp_path / f"verdicts{rank}.pt")
    (tmp_path / f"report{rank}.json").write_text(json.dumps(report))
    distributed.teardown()
    # Leave without interpreter finalisation: gloo's worker threads can still hold tensors then,
    # and destroying them after the interpreter is gone aborts the process (a known PyTorch
    # shutdown race, seen here as an occasional SIGABRT of a finished worker).
    os._exit(0)


def spawn(fn, tmp: Path) -> None:
    """Run ``fn(rank, WORLD, port, tmp)`` in WORLD processes; fail (not hang) after a timeout."""
    spawn_ranks(fn, tmp, WORLD, SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Folder with the 2-process results next to the same runs done by one process here."""
    tmp = tmp_path_factory.mktemp("ddp")
    with one_thread():
        run_training(tmp / "single")
        accum_training(tmp / "single_accum", grad_accum=1)
        data = toy_data(101, 5)
        torch.save({"model": fit_naturally().state_dict(), "x": data.x, "y": data.y}, tmp / "eval.pt")
    spawn(_worker, tmp)
    with one_thread():
        model, x, y = eval_problem(tmp)
        res = run_eval(model, x, y)
    torch.save({k: v.cpu() for k, v in res.correct.items()}, tmp / "verdicts_single.pt")
    return tmp


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def _assert_same_state(a: dict, b: dict, atol: float, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        elif a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- tests
def test_two_processes_train_like_one_with_batchnorm(runs):
    """(a) same global batch and seed: same weights AND same BatchNorm running statistics."""
    last_single, last_ddp = _state(runs / "single" / "last.pt"), _state(runs / "ddp" / "last.pt")
    assert any("running_var" in k for k in last_ddp)
    _assert_same_state(last_single, last_ddp, atol=1e-10)
    moved = max((last_single[k] - bn_net().state_dict()[k]).abs().max().item() for k in last_single
                if last_single[k].is_floating_point())
    assert moved > 1e-3  # the comparison is between two trained models, not two initial ones


def test_two_processes_log_like_one(runs):
    single = [json.loads(s) for s in (runs / "single" / "metrics.jsonl").read_text().splitlines()]
    ddp = [json.loads(s) for s in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp) == 2  # one line per epoch: only rank 0 writes
    for a, b in zip(single, ddp):
        for k in ("train_loss", "train_clean_acc", "train_adv_acc", "train_weight_mean"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k  # float32 sums in a different order
        assert a["weight_hist"] == b["weight_hist"]
        for k in ("val_clean_acc", "val_pgd_acc", "swa_val_clean_acc", "swa_val_pgd_acc"):
            assert a[k] == b[k], k  # sharded validation: the same verdicts


def test_swa_with_batchnorm_recalibration_across_ranks(runs):
    """(d) the averaged model, BatchNorm statistics recomputed on the global batches, equals 1 process."""
    single, ddp = _state(runs / "single" / "final.pt"), _state(runs / "ddp" / "final.pt")
    assert torch.load(runs / "ddp" / "final.pt", weights_only=False)["final_source"] == "swa"
    _assert_same_state(single, ddp, atol=1e-10)
    last = _state(runs / "ddp" / "last.pt")
    assert not torch.allclose(last["1.running_var"], ddp["1.running_var"])  # recalibrated, not copied


def test_resume_under_ddp_equals_the_uninterrupted_run(runs):
    """(b) killed after epoch 1 and resumed with --resume: bit-for-bit the uninterrupted run."""
    reports = [json.loads((runs / f"report{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["interrupted"] for r in reports)
    _assert_same_state(_state(runs / "ddp" / "final.pt"), _state(runs / "resumed" / "final.pt"), 0, exact=True)
    _assert_same_state(_state(runs / "ddp" / "last.pt"), _state(runs / "resumed" / "last.pt"), 0, exact=True)
    assert len((runs / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2


def test_gradient_accumulation_under_ddp_equals_one_process(runs):
    """(e) 2 ranks x 2 micro-batches, gradients all-reduced once per step: the full batch's weights."""
    single, ddp = _state(runs / "single_accum" / "last.pt"), _state(runs / "ddp_accum" / "last.pt")
    _assert_same_state(single, ddp, atol=1e-12)
    assert json.loads((runs / "ddp_accum" / "config.json").read_text())["grad_accum"] == 2


def test_sharded_evaluation_gives_the_unsharded_verdicts(runs):
    """(c) 2 ranks, random starts included (and a cascade attack on the global RNG): same verdicts."""
    single = torch.load(runs / "verdicts_single.pt")
    for r in range(WORLD):
        ddp = torch.load(runs / f"verdicts{r}.pt")
        assert ddp.keys() == single.keys()
        for k in single:
            assert torch.equal(single[k], ddp[k]), f"rank {r}, {k}"
    acc = {k: v.float().mean().item() for k, v in single.items()}
    assert 0.0 < acc["pgd3"] < acc["clean"] < 1.0  # the attacks decide something
    assert acc["noise"] < acc["clean"]  # the cascade attack, random numbers only, too
    assert acc["worst_case"] == min(acc.values())
    assert acc["worst_case"] <= min(acc[k] for k in single)


def test_errors_reach_every_rank(runs):
    """A bad global batch, or an existing run folder without --resume, raise on ALL ranks (no hang)."""
    for r in range(WORLD):
        report = json.loads((runs / f"report{r}.json").read_text())
        assert "divisible by the number of processes 2" in report["odd_batch"]
        assert "already holds a run" in report["existing_run"]


def test_evaluation_randomness_is_seeded_and_private():
    """Same seed: same verdicts; another seed: other verdicts; the caller's global RNG is untouched."""
    model, data = fit_naturally(), toy_data(101, 5)
    attacks = ["clean", noise_attack(), "pgd2"]
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    a = evaluate(model, data.x, data.y, attacks, eps=EVAL_EPS, batch_size=16, seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    b = evaluate(model, data.x, data.y, attacks, eps=EVAL_EPS, batch_size=16, seed=1)
    c = evaluate(model, data.x, data.y, attacks, eps=EVAL_EPS, batch_size=16, seed=2)
    assert all(torch.equal(a.correct[k], b.correct[k]) for k in a.correct)
    assert any(not torch.equal(a.correct[k], c.correct[k]) for k in ("noise", "pgd2"))


def test_global_batchnorm_single_process_is_batchnorm():
    from arow.distributed import GlobalBatchNorm, convert_sync_batchnorm

    net = bn_net()
    conv = convert_sync_batchnorm(bn_net(), torch.device("cpu"))
    assert isinstance(conv[1], GlobalBatchNorm) and conv.state_dict().keys() == net.state_dict().keys()
    x = toy_data(8, 0).x
    torch.testing.assert_close(conv.train()(x), net.train()(x))
    torch.testing.assert_close(conv[1].running_var, net[1].running_var)


# ----------------------------------------------------------------------------- the real command line
@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="needs Fashion-MNIST")
@pytest.mark.slow
def test_torchrun_command_line_matches_one_process(tmp_path, request):
    """`python -m torch.distributed.run --nproc-per-node=2 -m arow train` == `python -m arow train`."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow (~40 s on 2 CPU cores): run with -m slow")
    # 320 examples, 64 held out: 256 train = 4 full global batches of 64
    args = ["-q", "train", "--device", "cpu", "--limit-train", "320", "--val-size", "64", "--epochs", "2",
            "--attack-steps", "2", "--batch-size", "64", "--eval-attacks", "clean,pgd3", "--eval-n", "60",
            "--amp", "off"]  # float32: bf16 autocast (auto on CPUs with native bf16) rounds far more
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "arow", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                          f"--master-port={_free_port()}", "-m", "arow", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("written") == 1  # only rank 0 prints and writes eval.json
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
    # float32 + sign-gradient attack: see the module docstring for why 1e-4 and not 1e-7
    _assert_same_state(_state(tmp_path / "one" / "final.pt"), _state(tmp_path / "two" / "final.pt"), atol=1e-4)
    assert json.loads((tmp_path / "two" / "eval_n60.json").read_text())["n"] == 60  # a subset: not eval.json



# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compiled_model_trains_like_eager(request):
    """--compile: same weights as eager, three graphs (train / attack / clean target), no prefixes."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow (~30 s of compilation on 2 CPU cores): run with -m slow")
    import torch._dynamo

    from arow.runs.checkpoint import plain_state_dict
    from arow.models import build_model

    data = TensorData(torch.rand(64, 1, 28, 28), torch.arange(64) % 10, 10)
    states = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
        cfg = TrainConfig(method="arow", epochs=1, batch_size=32, eps=0.1, attack_steps=1, device="cpu",
                          compile=compiled, augment="flip", amp="off")  # float32: a tolerance that means something
        trainer = Trainer(cfg, model, data)
        trainer.train_epoch(0)
        states[compiled] = plain_state_dict(trainer.train_model)
    assert not any("_orig_mod" in k for k in states[True])
    _assert_same_state(states[False], states[True], atol=1e-5)
    # the attack's eval mode + frozen weights and the no-grad target are two more graphs, not more
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
