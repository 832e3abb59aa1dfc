"""Shared fixtures: small real data and a small model trained on it in a few seconds."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: with two, tiny ops on a shared 2-core machine are ~100x
    slower (OpenMP threads waiting for each other). Use with ``pytest.mark.usefixtures``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fmnist_available() -> bool:
    return (FMNIST / "t10k-labels-idx1-ubyte.gz").is_file()


@pytest.fixture(scope="session")
def fmnist_small():
    """(x_train, y_train, x_test, y_test): 2000 / 500 real Fashion-MNIST images, or a synthetic stand-in."""
    if fmnist_available():
        from arow.data import load_dataset

        tr = load_dataset("fashion-mnist", split="train").subset(2000)
        te = load_dataset("fashion-mnist", split="test").subset(500)
        return tr.x, tr.y, te.x, te.y
    g = torch.Generator().manual_seed(0)  # separable synthetic data: class = brightest quadrant-ish
    protos = torch.rand(10, 1, 28, 28, generator=g)
    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return (0.7 * protos[y] + 0.3 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1), y
    xtr, ytr = make(2000)
    xte, yte = make(500)
    return xtr, ytr, xte, yte


def tiny_cnn(in_ch: int = 1, n_cls: int = 10, bn: bool = True) -> nn.Module:
    layers = [nn.Conv2d(in_ch, 8, 3, stride=2), *( [nn.BatchNorm2d(8)] if bn else []), nn.ReLU(),
              nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, n_cls)]
    return nn.Sequential(*layers)


@pytest.fixture(scope="session")
def trained_model(fmnist_small):
    """A tiny BatchNorm CNN trained naturally for a few epochs (clean accuracy well above chance)."""
    torch.manual_seed(0)
    xtr, ytr, _, _ = fmnist_small
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 100):
            idx = perm[i : i + 100]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, tmp: Path, world: int, timeout_s: float, what: str = "distributed workers") -> None:
    """Run ``fn(rank, world, port, tmp)`` in ``world`` spawned processes; fail (not hang) after ``timeout_s``."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, _free_port(), str(tmp)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} did not finish within {timeout_s}s (a rank hangs?)")


def write_aa_study_cell(d: Path, method: str, seed: int, clean: torch.Tensor, pgd: torch.Tensor,
                        aa: torch.Tensor, verdicts: bool = True) -> None:
    """A finished study cell in ``d`` on a test set of ``len(clean)`` images with AutoAttack on its first
    ``len(aa)``: config, one epoch record, the main evaluation (clean, PGD-20; worst case = PGD-20) and
    the AutoAttack subset file, each with its packed per-example verdicts unless ``verdicts`` is False."""
    import json

    from arow.evaluation.cascade import pack_verdicts

    n, k = len(clean), len(aa)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"method": method, "seed": seed}))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": 5.0}) + "\n")
    main = {"accuracy": {"clean": float(clean.float().mean()), "pgd20": float(pgd.float().mean()),
                         "worst_case": float(pgd.float().mean())},
            "n": n, "test_set_size": n, "subset": False, "guards_ran": True}
    sub = {"accuracy": {"clean": float(clean[:k].float().mean()), "autoattack": float(aa.float().mean()),
                        "worst_case": float(aa.float().mean())},
           "n": k, "test_set_size": n, "subset": True}
    if verdicts:
        main["verdicts"] = pack_verdicts({"clean": clean, "pgd20": pgd, "worst_case": pgd})
        sub["verdicts"] = pack_verdicts({"clean": clean[:k], "autoattack": aa, "worst_case": aa})
    (d / "eval.json").write_text(json.dumps(main))
    (d / f"eval_n{k}.json").write_text(json.dumps(sub))
