"""The evaluation on a GPU, checked where a CPU can check it: the float32 precision (TF32) and cuDNN's
autotuner pinned for the evaluation and restored after it, the device-dependent default batch and
the verdicts' independence of it, the random starts' copy to the device, and errors of one rank of a
torchrun evaluation raised on every rank instead of leaving the others waiting."""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import threading
from collections import OrderedDict, namedtuple
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import spawn_ranks
from arow.attacks import Attack, pgd
from arow.attacks.pgd import PinnedNoise, device_noise
from arow.config.schema import TrainConfig
from arow.data import TensorData
from arow.data import loader as data_loader
from arow.data.extra import ExtraData, MixedLoader
from arow.data.loader import ExtraFeed, Loader, extra_placement
from arow.evaluation import cascade, protocol
from arow.evaluation.curve import eps_curve
from arow.evaluation.guards import run_guards
from arow.evaluation.protocol import evaluate
from arow.evaluation.settings import EvalSettings, GuardSettings
from arow.pipelines import evaluate_model
from arow.pseudo import pseudo_label
from arow.models.spec import ModelSpec
from arow.rng import ExampleRNG
from arow.runs.rundir import RunDir
from arow.threat import ThreatModel
from arow.training import runtime
from arow.training import trainer as trainer_module
from arow.training.callbacks import EpochSaves, RunWriter, host_copy
from arow.training.errors import TrainingDiverged
from arow.training.trainer import Trainer, gradient_norm

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 0.1
WORLD, SPAWN_TIMEOUT_S = 2, 180


def _flags() -> tuple[bool, bool, bool]:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


@pytest.fixture
def process_flags():
    """The process's TF32 and autotuner flags put back after the test, through the legacy API (a test
    that used the newer fp32_precision API would otherwise leave the legacy flags unreadable)."""
    matmul, conv, bench = _flags()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
    torch.backends.cudnn.benchmark = bench


class FlagRecorder(nn.Module):
    """A small classifier whose forward records the precision flags it runs under, and the batch
    size, when an attack calls it (input gradients on)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        self.seen: list[tuple[bool, bool, bool]] = []
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            self.seen.append(_flags())
            self.batches.append(len(x))
        return self.net(x)


def toy(n: int = 60, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(7), dtype=dtype)
    y = torch.arange(n) % 3
    x = (0.6 * protos[y] + 0.4 * torch.rand(n, 1, 4, 4, generator=g, dtype=dtype)).clamp(0, 1)
    return TensorData(x, y, 3, "toy")


# --------------------------------------------------------------------------- TF32 and cuDNN's autotuner
@pytest.mark.parametrize("tf32", [False, True])
def test_attacks_run_with_the_evaluations_tf32_setting_and_the_process_flags_come_back(tf32, process_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32  # the process's own
    torch.backends.cudnn.benchmark = True  # as training leaves it on CUDA
    model = FlagRecorder()
    report = evaluate(model, toy(), EvalSettings(attacks=["clean", "pgd3"], eps=EPS, device="cpu", tf32=tf32),
                      GuardSettings(enabled=False))
    assert model.seen and set(model.seen) == {(tf32, tf32, False)}  # every attack forward, autotuner off
    assert _flags() == (not tf32, not tf32, True)  # restored
    record = report.to_json()  # what eval.json holds
    assert record["float32_matmul"] == ("tf32" if tf32 else "ieee") and record["device"] == "cpu"
    assert json.loads(json.dumps(record))["float32_matmul"] == record["float32_matmul"]


def test_guarded_evaluation_restores_the_flags_and_records_them(process_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    model = FlagRecorder()
    report = evaluate(model, toy(), EvalSettings(attacks=["clean", "pgd3"], eps=EPS, device="cpu"),
                      GuardSettings(n=20))
    assert report.guards_ran and model.seen
    assert all(not matmul and not conv and not bench for matmul, conv, bench in model.seen)  # guards and attacks
    assert _flags() == (True, True, True)
    assert report.to_json()["float32_matmul"] == "ieee"


def test_flags_set_with_the_fp32_precision_api_come_back(process_flags):
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no fp32_precision API")
    matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
    model = FlagRecorder()
    evaluate(model, toy(), EvalSettings(attacks=["clean", "pgd2"], eps=EPS, device="cpu"), GuardSettings(n=10))
    assert model.seen and set(model.seen) == {(False, False, False)}
    assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")


def test_tf32_setting_is_a_checked_flag():
    assert EvalSettings().tf32 is False
    assert EvalSettings.from_flags({"tf32": True}).tf32 is True
    with pytest.raises(ValueError, match="--tf32"):
        EvalSettings(tf32="yes").check()  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the default evaluation batch
def test_default_batch_depends_on_the_device():
    assert cascade.default_eval_batch("cpu") == 100
    assert cascade.default_eval_batch(torch.device("cuda")) == cascade.default_eval_batch("cuda:1") == 500
    assert EvalSettings().batch_size is None  # decided once the device is known
    for fn in (cascade.evaluate, run_guards, eps_curve, evaluate_model, pseudo_label):
        assert inspect.signature(fn).parameters["batch_size"].default is None, fn.__qualname__


def test_evaluation_takes_its_default_batch_from_the_device(monkeypatch):
    data = toy()
    report = evaluate(FlagRecorder(), data, EvalSettings(attacks=["clean", "pgd2"], eps=EPS, device="cpu"),
                      GuardSettings(enabled=False))
    assert report.info["batch_size"] == 100
    asked = []
    monkeypatch.setattr(protocol, "default_eval_batch", lambda dev: asked.append(dev) or 7)
    model = FlagRecorder()
    report = evaluate(model, data, EvalSettings(attacks=["clean", "pgd2"], eps=EPS, device="cpu"),
                      GuardSettings(n=20))
    assert asked == [torch.device("cpu")] and report.info["batch_size"] == 7
    assert max(model.batches) == 7  # the guards' and the attacks' batches


def test_pgd_and_cw_verdicts_are_the_same_at_batch_100_and_500():
    """Each example's random start is its own: the CPU and the CUDA default batch give the same
    verdicts (float64, so that no rounding difference between batch shapes can flip a step)."""
    g = torch.Generator().manual_seed(3)
    protos = torch.rand(3, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = torch.arange(520) % 3
    x = (0.5 * protos[y] + 0.5 * torch.rand(520, 16, generator=g, dtype=torch.float64)).view(-1, 1, 4, 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    runs = {b: cascade.evaluate(model, x, y, ["clean", "pgd3r2", "cw3"], eps=EPS, batch_size=b) for b in (100, 500)}
    for name in ("pgd3r2", "cw3", "worst_case"):
        assert torch.equal(runs[100].correct[name], runs[500].correct[name]), name
    acc = runs[100].accuracy
    assert 0.5 < acc["worst_case"] < acc["pgd3r2"] < acc["clean"]  # the attacks decide something


# --------------------------------------------------------------------------- the random starts' copy
def test_per_example_noise_is_pinned_and_copied_without_blocking_only_on_cuda(monkeypatch):
    pinned: list[tuple[int, ...]] = []

    def pin(self: torch.Tensor) -> torch.Tensor:
        pinned.append(tuple(self.shape))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    idx = torch.tensor([4, 9, 2])
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    rng = ExampleRNG(5, idx)
    assert device_noise(rng, torch.device("cpu")) is rng and device_noise(None, torch.device("cuda")) is None
    on_cuda = device_noise(ExampleRNG(5, idx), torch.device("cuda"))
    assert isinstance(on_cuda, PinnedNoise)
    u, n = on_cuda.rand_like(x), on_cuda.randn_like(x)  # x on the CPU here: the copy is a no-op
    assert pinned == [(3, 1, 4, 4), (3, 1, 4, 4)]
    assert torch.equal(u, rng.rand_like(x)) and torch.equal(n, rng.randn_like(x)) and u.dtype == torch.float64
    pinned.clear()
    tm = ThreatModel(eps=EPS, steps=2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    a = pgd(model, x, torch.zeros(3, dtype=torch.long), tm, rng=ExampleRNG(5, idx))
    b = pgd(model, x, torch.zeros(3, dtype=torch.long), tm, rng=ExampleRNG(5, idx))
    assert pinned == [] and torch.equal(a, b)  # the CPU path: nothing pinned, the same numbers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_per_example_noise_on_cuda_is_the_cpus():
    idx = torch.arange(6)
    x = torch.zeros(6, 3, 8, 8, device="cuda")
    on_cuda = device_noise(ExampleRNG(2, idx), x.device)
    u = on_cuda.rand_like(x)
    assert u.is_cuda and torch.equal(u.cpu(), ExampleRNG(2, idx).rand_like(x.cpu()))


# --------------------------------------------------------------------------- errors reach every rank
def _outcome(fn, *args) -> list:
    """``[exception class name, message]`` of what ``fn(*args)`` raised, or ``["ok", result]``."""
    try:
        return ["ok", fn(*args)]
    except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
        return [type(e).__name__, str(e)]


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the model failed on rank 0")


def _fail_on_rank0() -> int:
    from arow import distributed

    if distributed.info().rank == 0:
        raise ValueError("ball check failed: max L-inf |delta| 0.5 (eps 0.1)")
    return 1


def _fail_on_rank1() -> int:
    from arow import distributed

    if distributed.info().rank == 1:
        raise KeyError("rank 1 only")
    return distributed.info().rank


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from arow import distributed

    distributed.setup("cpu")
    out = {"on_main_error": _outcome(distributed.on_main, _fail_on_rank0),
           "on_main_result": _outcome(distributed.on_main, lambda: distributed.info().rank + 41),
           "agree": _outcome(distributed.agree_on_errors, _fail_on_rank1)}
    data = toy(40)
    out["guards"] = _outcome(lambda: run_guards(Boom(), data.x, data.y, eps=EPS, n=10, only=["gradients"]))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    y = model(data.x).argmax(1)  # every example correct: both ranks get batches to attack
    leaves = Attack("leaves-ball", lambda m, x, y: (x + 0.5).clamp(0, 1) if distributed.info().rank == 1 else x)
    out["ball"] = _outcome(lambda: cascade.evaluate(model, data.x, y, ["clean", leaves], eps=EPS, batch_size=10)
                           and "no error")
    distributed.barrier()  # nothing desynchronised: every rank still meets the others here
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    distributed.teardown()
    os._exit(0)  # see tests/test_distributed.py: gloo's threads and interpreter shutdown


def test_an_error_on_one_rank_is_raised_on_every_rank_and_nothing_hangs(tmp_path):
    spawn_ranks(_worker, tmp_path, WORLD, SPAWN_TIMEOUT_S, "the ranks (one waiting for a rank that failed?)")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]  # the same outcome, error class and message on both ranks
    out = ranks[0]
    assert out["on_main_error"] == ["ValueError", "ball check failed: max L-inf |delta| 0.5 (eps 0.1)"]
    assert out["on_main_result"] == ["ok", 41]  # rank 0's result everywhere
    assert out["agree"] == ["KeyError", "'rank 1 only'"]
    assert out["guards"] == ["RuntimeError", "the model failed on rank 0"]
    assert out["ball"][0] == "RuntimeError" and "attack leaves-ball left the threat model" in out["ball"][1]


# --------------------------------------------------------------------------- the GPU check's rows for these questions
@pytest.fixture(scope="module")
def gpu_check():
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(bench)


def test_gpu_check_plans_the_evaluation_and_attack_rows_before_compiled_training(gpu_check):
    rows = gpu_check.plan(list(gpu_check.MODELS), ["bf16"], [False, True], set(gpu_check.KINDS))
    kinds = [k for k, _ in rows]
    first_compiled = kinds.index("compiled")
    for kind in ("eval-batch", "bf16-stem", "syncbn", "attack-compile"):
        assert kind in kinds[:first_compiled], kind
    assert [a for k, a in rows if k == "attack-compile"] == [(16,), (128,)]
    assert gpu_check.main(["--dry-run", "--only", "nope"]) == 2  # the new kinds are checked like the others


def test_gpu_check_bf16_stem_rounds_the_input_and_the_first_convolution_only(gpu_check):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten())
    x = torch.rand(2, 3, 6, 6)
    ref = net(x)
    stem = gpu_check.BF16Stem(net)
    convs = [m for m in stem.modules() if isinstance(m, (nn.Conv2d, gpu_check.BF16Conv))]
    assert isinstance(net[0], gpu_check.BF16Conv) and isinstance(net[2], nn.Conv2d)
    assert len(convs) == 3  # the wrapper and its float32 weights, and the second convolution untouched
    out = stem(x)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_gpu_check_syncbn_row_counts_global_batchnorm_host_syncs_on_the_cpu(gpu_check):
    row = gpu_check.run_row("syncbn", (), gpu_check.DRY, torch.device("cpu"), gpu_check.Budget(1e9))
    assert not row.failed and row.sync == "Global 0 per step" and row.check.startswith("pass"), row.notes
    assert "world size 1" in row.notes and row.decides


# =========================================================================== the training loop on a GPU
# What the review of the CUDA path found in the training loop, checked where a CPU can check it.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _cfg(**kw) -> TrainConfig:
    base = dict(method="arow", epochs=1, batch_size=8, eps=EPS, attack_steps=1, device="cpu", augment="flip",
                val_attack="pgd2", amp="off")
    return TrainConfig(**{**base, **kw})


def _count_calls(monkeypatch, owner, names) -> list[int]:
    """A counter of the calls of ``owner``'s methods ``names`` (patched through ``monkeypatch``)."""
    calls = [0]
    for name in names:
        original = getattr(owner, name)

        def counting(*args, _original=original, **kwargs):
            calls[0] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    return calls


# --------------------------------------------------------------------------- compile and DDP
def test_ddp_of_the_compiled_model_splits_the_backward_at_ddps_buckets(monkeypatch):
    """DDP(torch.compile(model)), arow's order: dynamo compiles the training forward while DDP's
    forward is active and hands it to DDPOptimizer, which splits it at DDP's gradient buckets so
    that their all-reduce overlaps the rest of the backward (process group of one, gloo)."""
    import torch._dynamo
    import torch.distributed as dist
    from torch._dynamo.backends.distributed import DDPOptimizer

    from arow.distributed import DistInfo

    seen: list[int] = []
    real_compile_fn, real_compile = DDPOptimizer.compile_fn, torch.compile
    monkeypatch.setattr(DDPOptimizer, "compile_fn", lambda self, gm, inputs: seen.append(1)
                        or real_compile_fn(self, gm, inputs))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))  # no C++ compiler
    torch._dynamo.reset()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = _cfg(compile=True, sync_bn=False)
        model, train_model = runtime.prepare_model(SmallNet(), cfg, torch.device("cpu"), DistInfo(0, 2, 0))
        assert isinstance(train_model, nn.parallel.DistributedDataParallel)
        train_model(toy(8).x).sum().backward()
        assert seen, "the compiled training forward did not go through DDPOptimizer"
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()


def test_a_partial_last_batch_runs_eagerly_under_compile_and_adds_no_graph(monkeypatch):
    """40 examples in batches of 16: the last batch of 8 would compile 3 more graphs (training,
    attack, clean target) with a dynamic batch size; it runs eagerly instead."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    try:
        data = TensorData(torch.rand(40, 1, 4, 4), torch.arange(40) % 3, 3)
        trainer = Trainer(_cfg(batch_size=16, compile=True, val_size=0), SmallNet(), data)
        record = trainer.train_epoch(0)
        assert counters["stats"]["unique_graphs"] == 3
        assert math.isfinite(record["train_loss"]) and trainer.global_step == 3
    finally:
        torch._dynamo.reset()
        counters.clear()
    assert isinstance(runtime.eager_unless_full(False, 8, 16), contextlib.nullcontext)
    assert isinstance(runtime.eager_unless_full(True, 16, 16), contextlib.nullcontext)


# --------------------------------------------------------------------------- validation
def test_validation_takes_the_evaluations_device_default_batch(monkeypatch):
    asked = []
    monkeypatch.setattr(cascade, "default_eval_batch", lambda dev: asked.append(dev) or 7)
    model = FlagRecorder()
    trainer = Trainer(_cfg(), model, toy(24), toy(20, seed=1))
    scores = trainer.validate()
    assert set(scores) == {"val_clean_acc", "val_pgd_acc"}
    assert asked == [torch.device("cpu")] and model.batches and max(model.batches) == 7


# --------------------------------------------------------------------------- extra data on the GPU
def _mixed(n_extra: int = 37) -> MixedLoader:
    g = torch.Generator().manual_seed(0)
    real = TensorData(torch.rand(20, 3, 4, 4, generator=g), torch.arange(20) % 3, 3)
    images = np.random.default_rng(0).integers(0, 256, (n_extra, 4, 4, 3), dtype=np.uint8)
    extra = ExtraData([images[:20], images[20:]], np.arange(n_extra) % 3)  # two files
    return MixedLoader(real, extra, 8, fraction=0.5, augment="crop+flip", seed=2, epoch_batches=4)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(1)
    return list(loader)


def test_extra_data_stays_on_the_gpu_when_it_fits_in_a_share_of_free_memory(monkeypatch):
    free = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: free.append(dev) or (4000, 8000))
    cuda = torch.device("cuda")
    assert extra_placement(cuda, 1000) == "device" and extra_placement(cuda, 1001) == "pinned"  # 25% of 4000
    assert extra_placement(torch.device("cpu"), 10) == "host" and len(free) == 2  # the CPU asks nothing
    assert _mixed().feed.mode is None  # decided at the first batch, when the model is on the device


def test_extra_feed_modes_give_the_same_batches_pinned_and_without_blocking(monkeypatch):
    reference = _epoch(_mixed())
    assert _mixed().feed.device == torch.device("cpu")
    pinned: list[torch.Tensor] = []  # a CPU-only PyTorch cannot pin: the tensor itself stands for its pinned copy
    non_blocking: list[bool] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if any(self is p for p in pinned):
            non_blocking.append(bool(kwargs.get("non_blocking")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    host = _mixed()
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(_epoch(host), reference))
    assert host.feed.mode == "host" and pinned == []  # the CPU path: nothing pinned
    loader = _mixed()
    loader.feed.mode = "pinned"  # what a CUDA device too small for the extra data chooses
    batches = _epoch(loader)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches, reference))
    assert [tuple(t.shape) for t in pinned] == [(4, 4, 4, 3), (4,)] * 4  # images and labels of each step
    assert non_blocking == [True] * 8  # each copied to the device without blocking the host
    gathered = _count_calls(monkeypatch, ExtraData, ["images", "batch"])
    loader = _mixed()
    loader.feed.mode = "device"  # what a CUDA device with room chooses: one copy, gathers on the device
    batches = _epoch(loader)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches, reference))
    assert gathered[0] == 0 and loader.feed._images.shape == (37, 4, 4, 3)
    assert torch.equal(loader.feed._images, torch.from_numpy(np.concatenate(loader.extra.parts)))


# --------------------------------------------------------------------------- channels-last batches
def test_batches_are_channels_last_on_cuda_only_and_hold_the_same_numbers():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert runtime.batch_memory_format(_cfg(), cuda, own_model=True) == torch.channels_last
    assert runtime.batch_memory_format(_cfg(channels_last="off"), cuda, own_model=True) is None
    assert runtime.batch_memory_format(_cfg(channels_last="on"), cpu, own_model=True) is None
    assert runtime.batch_memory_format(_cfg(), cuda, own_model=False) is None  # a model of yours: see below
    data = TensorData(torch.rand(20, 3, 6, 6), torch.arange(20) % 3, 3)
    for make in (lambda: Loader(data, 8, shuffle=True, augment="crop+flip", seed=0, drop_last=False), _mixed):
        plain, last = make(), make()
        last.memory_format = torch.channels_last
        for (a, ya), (b, yb) in zip(_epoch(plain), _epoch(last)):
            assert b.is_contiguous(memory_format=torch.channels_last) and a.is_contiguous()
            assert torch.equal(a, b) and torch.equal(ya, yb)
    trainer = Trainer(_cfg(val_size=0), SmallNet(), toy(16))
    assert trainer.loader.memory_format is None  # the CPU: batches as built, the numbers as they were


# --------------------------------------------------------------------------- --log-every
def test_gradient_norm_is_one_multi_tensor_kernel_and_reads_nothing(monkeypatch):
    net = SmallNet()
    net(toy(8).x).sum().backward()
    want = torch.stack([p.grad.norm() for p in net.parameters()]).norm()
    per_tensor = _count_calls(monkeypatch, torch.Tensor, ["norm"])
    foreach = _count_calls(monkeypatch, torch, ["_foreach_norm"])
    reads = _count_calls(monkeypatch, torch.Tensor, HOST_READS)
    got = gradient_norm(net, torch.device("cpu"))
    assert (per_tensor[0], foreach[0], reads[0]) == (0, 1, 0)
    monkeypatch.undo()
    torch.testing.assert_close(got, want)


def _host_reads_with_log_every(steps: int, monkeypatch) -> int:
    data = TensorData(torch.rand(8 * steps, 1, 4, 4), torch.arange(8 * steps) % 3, 3)
    trainer = Trainer(_cfg(log_every=1, val_size=0), SmallNet(), data)
    records = []
    trainer.callbacks.append(type("Records", (), {"on_step_record": lambda self, r: records.append(r)})())
    reads = _count_calls(monkeypatch, torch.Tensor, HOST_READS)
    try:
        trainer.train_epoch(0)
    finally:
        monkeypatch.undo()
    assert len(records) == steps and all(r["grad_norm"] > 0 for r in records)
    return reads[0]


def test_log_every_reads_the_device_once_per_logged_step(monkeypatch):
    assert _host_reads_with_log_every(5, monkeypatch) - _host_reads_with_log_every(2, monkeypatch) == 3


# --------------------------------------------------------------------------- checkpoints in the background
def _fit(out: Path, background: bool, epochs: int = 2) -> Trainer:
    """A run into ``out``; its data is drawn from a generator of its own, the same whatever ran before."""
    data = TensorData(torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(5)), torch.arange(32) % 3, 3)
    cfg = _cfg(epochs=epochs, out=str(out), val_size=0)
    trainer = Trainer(cfg, SmallNet(), data, toy(12, seed=1), callbacks=[RunWriter(RunDir(out), background=background)])
    trainer.fit()
    return trainer


def _saved(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["history"] = [{k: v for k, v in r.items() if k != "seconds"} for r in state.get("history", [])]
    return state


def test_checkpoints_written_in_the_background_equal_those_written_in_the_foreground(tmp_path):
    _fit(tmp_path / "fg", background=False)
    _fit(tmp_path / "bg", background=True)
    for name in (RunDir.LAST, RunDir.PREV, RunDir.BEST, RunDir.FINAL):
        a, b = _saved(tmp_path / "fg" / name), _saved(tmp_path / "bg" / name)
        assert a.keys() == b.keys(), name
        for key in ("model", "optimizer", "epoch", "history", "rng"):
            if key in a:
                assert _same(a[key], b[key]), (name, key)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_background_write_overlaps_the_next_epoch_and_its_failure_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch):
    next_epoch, overlapped, real_save = threading.Event(), [], RunDir.save_epoch

    def save_epoch(self, ckpt, best=None):
        if ckpt["epoch"] == 1:
            overlapped.append(next_epoch.wait(timeout=60))  # returns once epoch 2 has started
            return real_save(self, ckpt, best)
        raise OSError(28, "No space left on device")  # epoch 2's write fails

    monkeypatch.setattr(RunDir, "save_epoch", save_epoch)
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch, _real=Trainer.train_epoch: (
        next_epoch.set() if epoch == 1 else None) or _real(self, epoch))
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        _fit(out, background=True)
    assert overlapped == [True]  # epoch 2 trained while epoch 1's checkpoint was being written
    assert _saved(out / RunDir.LAST)["epoch"] == 1 and not (out / RunDir.FINAL).exists()
    again = RunDir(out)
    again.lock()  # the folder was unlocked all the same
    again.unlock()


def test_the_background_snapshot_is_taken_before_training_goes_on():
    w = torch.zeros(3)
    history = [{"epoch": 1}]
    state = {"model": {"w": w}, "optimizer": {"state": {0: {"momentum_buffer": w}}}, "history": history}
    snap = host_copy(state)
    w.add_(1.0)
    history.append({"epoch": 2})
    assert snap["model"]["w"].tolist() == [0.0, 0.0, 0.0] and snap["history"] == [{"epoch": 1}]
    assert snap["model"]["w"] is snap["optimizer"]["state"][0]["momentum_buffer"]  # shared stays shared


# --------------------------------------------------------------------------- a model of your own on CUDA
class ViewNet(nn.Module):
    """A model of one's own that flattens with ``view``, which needs (N, C, H, W)-contiguous input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 4 * 4, 3)
        self.contiguous: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.contiguous.append(x.is_contiguous())
        return self.fc(x.view(len(x), -1))


def test_a_model_of_yours_gets_nchw_batches_on_cuda_unless_channels_last_is_on(monkeypatch):
    cuda, real = torch.device("cuda"), runtime.batch_memory_format
    # the layout the Trainer picks for CUDA, given to batches on the CPU
    monkeypatch.setattr(trainer_module, "batch_memory_format", lambda cfg, device, **kw: real(cfg, cuda, **kw))
    data = TensorData(torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3, 3)
    model = ViewNet()
    trainer = Trainer(_cfg(val_size=0), model, data)  # channels_last "auto"
    record = trainer.train_epoch(0)  # the attack's forwards and the training's: view() needs NCHW
    assert model.contiguous and all(model.contiguous) and math.isfinite(record["train_loss"])
    assert trainer.loader.memory_format is None
    assert Trainer(_cfg(val_size=0, channels_last="on"), ViewNet(), data).loader.memory_format == torch.channels_last
    spec = ModelSpec("small-cnn", num_classes=3, in_channels=3, image_size=4)  # one of arow's own: it takes any layout
    own = Trainer(_cfg(val_size=0), ViewNet(), data, model_spec=spec)
    assert own.loader.memory_format == torch.channels_last
    assert Trainer(_cfg(val_size=0, channels_last="off"), ViewNet(), data, model_spec=spec).loader.memory_format is None


# --------------------------------------------------------------------------- the gradient norm's precision
def test_gradient_norm_of_float16_gradients_is_computed_in_float32_and_float32_values_are_unchanged():
    half = nn.Linear(100, 1, bias=False).half()
    half.weight.grad = torch.full((1, 100), 1e4, dtype=torch.float16)  # a norm of 1e5: past float16's 65504
    got = gradient_norm(half, torch.device("cpu"))
    assert got.dtype == torch.float32 and math.isfinite(got.item())
    torch.testing.assert_close(got, torch.tensor(1e5))
    net = SmallNet()
    net(toy(8).x).sum().backward()
    grads = [p.grad for p in net.parameters()]
    before = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())  # what float32 logged so far
    assert torch.equal(gradient_norm(net, torch.device("cpu")), before)


# --------------------------------------------------------------------------- extra data that does not fit
def test_extra_data_is_placed_after_the_first_epoch_and_a_failed_copy_falls_back_to_pinned_memory_once(
        monkeypatch, caplog):
    free: list = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: free.append(dev) or (10 ** 9, 2 * 10 ** 9))
    copies: list = []
    monkeypatch.setattr(data_loader, "_device_copy", lambda extra, device: copies.append(device)
                        or (torch.zeros(1, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)))
    feed = ExtraFeed(_mixed().extra, "cuda")
    assert feed._place() == "pinned" and feed.mode is None and free == [] and copies == []  # the first epoch
    assert feed._place() == "device" and len(free) == 1 and copies == [torch.device("cuda")]  # measured now
    assert feed._place() == "device" and len(free) == 1 and len(copies) == 1  # decided once, copied once
    feed.release()
    assert feed._images is None and feed.mode is None
    reference = _epoch(_mixed())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # a CPU-only PyTorch cannot pin

    def no_room(extra, device):
        copies.append(device)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(data_loader, "_device_copy", no_room)
    copies.clear()
    loader = _mixed()
    loader.feed.mode = "device"  # what the GPU's free memory chose
    with caplog.at_level(logging.WARNING, logger="arow"):
        epochs = [_epoch(loader), _epoch(loader)]
    for batches in epochs:
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches, reference))
    assert loader.feed.mode == "pinned" and len(copies) == 1  # not tried again
    warned = [r.getMessage() for r in caplog.records if "does not fit on the GPU" in r.getMessage()]
    assert len(warned) == 1 and "pinned memory" in warned[0], warned


def test_the_gpu_copy_of_the_extra_data_is_freed_when_the_fit_ends():
    images = np.random.default_rng(0).integers(0, 256, (24, 4, 4, 1), dtype=np.uint8)
    data = TensorData(torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3, 3)
    trainer = Trainer(_cfg(val_size=0), SmallNet(), data, extra=ExtraData([images], np.arange(24) % 3))
    trainer.loader.feed.mode = "device"  # kept "on the device" (here the CPU) during the fit
    seen = []

    class Seen:
        def on_epoch_end(self, record) -> None:
            seen.append(trainer.loader.feed._images)

    trainer.callbacks.append(Seen())
    trainer.fit()
    assert seen and seen[0] is not None and seen[0].shape == (24, 4, 4, 1)
    assert trainer.loader.feed._images is None  # the evaluation after the fit has that memory back


# --------------------------------------------------------------------------- background writes: failures and interrupts
def test_host_copy_keeps_the_kind_of_mapping_and_copies_inside_namedtuples():
    w = torch.zeros(2)
    state = OrderedDict(w=w)
    state._metadata = {"": {"version": 1}}  # what nn.Module.state_dict() attaches
    Pair = namedtuple("Pair", "a b")
    snap = host_copy({"model": state, "pair": Pair(w, 3)})
    w.add_(1.0)
    assert type(snap["model"]) is OrderedDict and snap["model"]._metadata == {"": {"version": 1}}
    assert type(snap["pair"]) is Pair and snap["pair"].a.tolist() == [0.0, 0.0] and snap["pair"].b == 3
    assert snap["pair"].a is snap["model"]["w"]  # shared stays shared


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("arow-checkpoint")]


def test_a_write_held_back_until_the_next_epoch_has_trained_saves_the_epoch_it_was_given(tmp_path, monkeypatch):
    _fit(tmp_path / "fg", background=False)
    trained, real_save = threading.Event(), RunDir.save_epoch

    def save_epoch(self, ckpt, best=None):
        if ckpt["epoch"] == 1 and not trained.wait(timeout=60):
            raise TimeoutError("epoch 2 did not train")
        return real_save(self, ckpt, best)

    def train_epoch(self, epoch, _real=Trainer.train_epoch):
        record = _real(self, epoch)
        if epoch == 1:  # epoch 2 has changed the weights and the optimiser's momentum in place
            trained.set()
        return record

    monkeypatch.setattr(RunDir, "save_epoch", save_epoch)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    _fit(tmp_path / "bg", background=True)
    a, b = _saved(tmp_path / "fg" / RunDir.PREV), _saved(tmp_path / "bg" / RunDir.PREV)
    assert a["epoch"] == b["epoch"] == 1
    for key in ("model", "optimizer", "rng"):
        assert _same(a[key], b[key]), key


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_fit_that_stops_while_a_write_is_blocked_ends_with_that_epoch_saved_unlocked_and_no_writer_thread(
        stop, tmp_path, monkeypatch):
    started, release, finished, real_save = threading.Event(), threading.Event(), [], RunDir.save_epoch

    def save_epoch(self, ckpt, best=None):
        started.set()
        release.wait(timeout=60)
        real_save(self, ckpt, best)
        finished.append(ckpt["epoch"])

    def train_epoch(self, epoch, _real=Trainer.train_epoch):
        if epoch == 1:
            assert started.wait(timeout=60)
            threading.Timer(0.5, release.set).start()  # the write goes on only after the fit has stopped
            raise stop("stopped in epoch 2")
        return _real(self, epoch)

    monkeypatch.setattr(RunDir, "save_epoch", save_epoch)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    out = tmp_path / "run"
    with pytest.raises(stop, match="stopped in epoch 2"):
        _fit(out, background=True, epochs=3)
    assert finished == [1] and _saved(out / RunDir.LAST)["epoch"] == 1  # the fit waited for the write
    assert _writer_threads() == []
    again = RunDir(out)
    again.lock()  # unlocked
    again.unlock()


def test_a_failed_background_write_is_logged_at_once_and_the_next_epoch_is_still_saved(tmp_path, monkeypatch):
    logged, lines, real_save = threading.Event(), [], RunDir.save_epoch

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            logged.set()

    def save_epoch(self, ckpt, best=None):
        if ckpt["epoch"] == 1:
            raise OSError(28, "No space left on device")
        return real_save(self, ckpt, best)

    during_epoch_2 = []

    def train_epoch(self, epoch, _real=Trainer.train_epoch):
        if epoch == 1:
            during_epoch_2.append(logged.wait(timeout=10))
        return _real(self, epoch)

    monkeypatch.setattr(RunDir, "save_epoch", save_epoch)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    handler, arow_log = Lines(level=logging.ERROR), logging.getLogger("arow")
    arow_log.addHandler(handler)
    out = tmp_path / "run"
    try:
        with pytest.raises(OSError, match="No space left"):  # epoch 1's error, raised at epoch 2's save
            _fit(out, background=True, epochs=3)
    finally:
        arow_log.removeHandler(handler)
    assert during_epoch_2 == [True]  # logged before epoch 2 had trained
    assert len(lines) == 1 and "epoch 1" in lines[0] and "No space left" in lines[0], lines
    assert _saved(out / RunDir.LAST)["epoch"] == 2  # written before the earlier error stopped the run
    assert _writer_threads() == []


def test_a_divergence_after_a_failed_write_names_the_checkpoint_on_disk(tmp_path, monkeypatch):
    import arow.runs.rundir as rundir

    real_atomic_save = rundir.atomic_save

    def atomic_save(obj, path):  # epoch 2's last.pt fails half-way: the old one was moved to last.prev.pt
        if Path(path).name == RunDir.LAST and obj.get("epoch") == 2:
            raise OSError(28, "No space left on device")
        return real_atomic_save(obj, path)

    def train_epoch(self, epoch, _real=Trainer.train_epoch):
        if epoch == 2:
            self._diverged(epoch, 0, "non-finite loss")
        return _real(self, epoch)

    monkeypatch.setattr(rundir, "atomic_save", atomic_save)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        _fit(out, background=True, epochs=3)
    assert not (out / RunDir.LAST).exists() and _saved(out / RunDir.PREV)["epoch"] == 1
    assert f"the last good checkpoint is {out / RunDir.PREV} (epoch 1)" in str(caught.value)
    assert RunDir(out).diverged()["epoch"] == 3


def test_an_interrupt_while_waiting_for_a_write_keeps_its_error_for_the_next_wait(tmp_path):
    class InterruptedOnce(Future):
        """A write whose first wait is cut short by Ctrl-C."""

        waits = 0

        def _interrupt(self) -> None:
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt

        def result(self, timeout=None):
            self._interrupt()
            return super().result(timeout)

        def exception(self, timeout=None):
            self._interrupt()
            return super().exception(timeout)

    saves = EpochSaves(RunDir(tmp_path / "run"), background=True)
    write = InterruptedOnce()
    write.set_exception(OSError(28, "No space left on device"))
    saves._pending = write
    with pytest.raises(KeyboardInterrupt):
        saves.wait()
    with pytest.raises(OSError, match="No space left"):
        saves.wait()
    saves.wait()  # raised once: nothing is pending any more


def test_an_interrupt_while_close_waits_for_a_write_still_records_the_divergence_and_unlocks(tmp_path):
    run = RunDir(tmp_path / "run")
    run.lock()
    writer = RunWriter(run)

    class Interrupted:
        saved = None

        def close(self) -> None:
            raise KeyboardInterrupt

    writer.saves = Interrupted()
    error = TrainingDiverged("training diverged at epoch 1, step 3 (non-finite loss)",
                             {"epoch": 1, "step": 3, "reason": "non-finite loss", "lr": 0.1})
    with pytest.raises(KeyboardInterrupt):
        writer.close(error)
    assert run.diverged()["reason"] == "non-finite loss"
    again = RunDir(run.path)
    again.lock()  # unlocked
    again.unlock()
