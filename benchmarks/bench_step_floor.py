"""What bounds small-cnn's bf16 training step on a CPU: its kernels one at a time, the operators
between them, and the batch split across the cores.

Three tables, from one process (batch ``--batch``, bf16, channels-last, ``--threads`` threads):

1. Kernels. Every convolution and linear layer of small-cnn: its forward, its input gradient, its
   weight gradient, and both gradients from one call as the training backward asks for them (a
   convolution's ``convolution_backward`` with both outputs; a linear layer's two matrix products),
   each timed alone on inputs of the real shapes, in ms and in % of the bf16 matmul peak (the
   better of two measurements, before and after the kernels, as ``bench_train.py`` takes it). Then
   the ceiling: one ARoW step with K attack steps (``--attack-steps``) runs 1 + K + 2 forwards, K
   input gradients of every layer (the attack) and 2 training backwards (both gradients of every
   layer, the weight gradient alone of the first); if the step did nothing but these kernels, at
   the speeds just measured, it would reach the nominal FLOPs of ``bench_train.py`` (27 or 17
   forward-equivalents) divided by that time: the best "% of peak" the step can show without
   faster kernels.
2. The operators between the kernels: ReLU and its backward, 2x2 max-pooling (with the indices
   its backward needs) and its backward, on small-cnn's shapes in bf16 and in float32.
3. The batch in parts: the KL training attack on the whole batch with all threads, against the
   same attack on one part of the batch per thread, each part on its own worker thread with one
   intra-op thread (PyTorch's operators release the GIL). ``x_adv`` is compared bit for bit;
   the two are timed in alternating blocks of ``--block`` attacks, which of the two goes first
   alternating too, and the ratio is taken block by block (a shared machine's load falls on both
   alike).

    python benchmarks/bench_step_floor.py --threads 2 --blocks 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from arow.methods.common import kl_attack  # noqa: E402
from arow.models.small_cnn import SmallCNN  # noqa: E402
from arow.rng import ExampleRNG  # noqa: E402
from arow.threat import ThreatModel  # noqa: E402
from train_step import matmul_peak  # noqa: E402

Tensor = torch.Tensor
CL = torch.channels_last
BF16 = torch.bfloat16


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls, after two untimed ones."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _conv_grads(g: Tensor, x: Tensor, w: Tensor, mask: list[bool]) -> tuple[Tensor, ...]:
    return torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)


def layer_inputs(model: SmallCNN, batch: int) -> list[tuple[str, nn.Module, Tensor]]:
    """``(name, layer, bf16 input)`` of every convolution and linear layer, from a forward of random images."""
    out = []
    h = torch.rand(batch, 1, 28, 28)
    with torch.no_grad():
        for part in (model.features, model.classifier):  # the classifier flattens first
            for name, mod in part.named_children():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    x = h.to(BF16)
                    out.append((name, mod, x.contiguous(memory_format=CL) if x.dim() == 4 else x))
                h = mod(h)
    return out


def kernel_rows(model: SmallCNN, batch: int, repeats: int) -> list[dict[str, float]]:
    """Table 1's rows: forward FLOPs and the three kernels' median ms of every layer."""
    rows = []
    for name, mod, x in layer_inputs(model, batch):
        w, b = mod.weight.detach().to(BF16), mod.bias.detach().to(BF16)
        if isinstance(mod, nn.Conv2d):
            w = w.contiguous(memory_format=CL)
            out = F.conv2d(x, w, b)
            g = torch.randn_like(out)
            fwd = lambda x=x, w=w, b=b: F.conv2d(x, w, b)  # noqa: E731
            grad_in = lambda g=g, x=x, w=w: _conv_grads(g, x, w, [True, False, False])  # noqa: E731
            grad_w = lambda g=g, x=x, w=w: _conv_grads(g, x, w, [False, True, True])  # noqa: E731
            grad_both = lambda g=g, x=x, w=w: _conv_grads(g, x, w, [True, True, True])  # noqa: E731
            flops = 2 * out.numel() * w[0].numel()
        else:
            out = F.linear(x, w, b)
            g = torch.randn_like(out)
            fwd = lambda x=x, w=w, b=b: F.linear(x, w, b)  # noqa: E731
            grad_in = lambda g=g, w=w: g @ w  # noqa: E731
            grad_w = lambda g=g, x=x: (g.t() @ x, g.sum(0))  # noqa: E731
            grad_both = lambda g=g, x=x, w=w: (g @ w, g.t() @ x, g.sum(0))  # noqa: E731
            flops = 2 * batch * w.numel()
        rows.append({"layer": name, "flops": flops, "fwd": median_ms(fwd, repeats),
                     "grad_in": median_ms(grad_in, repeats), "grad_w": median_ms(grad_w, repeats),
                     "grad_both": median_ms(grad_both, repeats)})
    return rows


def step_ceiling(rows: list[dict[str, float]], attack_steps: int) -> tuple[float, float]:
    """(ms, nominal FLOPs) of one ARoW step made of the kernels of ``rows`` only.

    >>> rows = [{"layer": "conv1", "flops": 10, "fwd": 1.0, "grad_in": 2.0, "grad_w": 3.0, "grad_both": 4.0},
    ...         {"layer": "fc1", "flops": 10, "fwd": 1.0, "grad_in": 1.0, "grad_w": 1.0, "grad_both": 1.5}]
    >>> step_ceiling(rows, 1)   # 4 forwards, 1 attack input gradient, 2 training backwards (conv1: weights only)
    (20.0, 180)
    """
    fwd = sum(r["fwd"] for r in rows)
    grad_in = sum(r["grad_in"] for r in rows)
    # the training backward: both gradients of every layer but the first, whose images need none
    train_bwd = rows[0]["grad_w"] + sum(r["grad_both"] for r in rows[1:])
    ms = (1 + attack_steps + 2) * fwd + attack_steps * grad_in + 2 * train_bwd
    forward_equivalents = 1 + 2 * attack_steps + 3 * 2  # as bench_train.py counts them (Passes.cost)
    return ms, forward_equivalents * sum(r["flops"] for r in rows)


def pointwise_rows(batch: int, repeats: int) -> list[tuple[str, str, float, float]]:
    """Table 2's rows: (operator, shape, bf16 ms, float32 ms) on small-cnn's activations."""
    pool_bwd = torch.ops.aten.max_pool2d_with_indices_backward
    rows = []
    for c, s, pooled in ((32, 26, False), (32, 24, True), (64, 10, False), (64, 8, True)):
        times: dict[str, list[float]] = {}
        for dtype in (BF16, torch.float32):
            a = torch.randn(batch, c, s, s).to(dtype).contiguous(memory_format=CL)
            r = torch.relu(a)
            ops = {"ReLU": lambda a=a: torch.relu(a),
                   "ReLU backward": lambda a=a, r=r: torch.ops.aten.threshold_backward(a, r, 0)}
            if pooled:
                out, idx = F.max_pool2d(r, 2, return_indices=True)
                go = torch.randn_like(out)
                ops["max-pool 2x2 (with indices)"] = lambda r=r: F.max_pool2d(r, 2, return_indices=True)
                ops["max-pool backward"] = lambda go=go, r=r, idx=idx: pool_bwd(go, r, [2, 2], [2, 2], [0, 0], [1, 1],
                                                                               False, idx)
            for op, fn in ops.items():
                times.setdefault(op, []).append(median_ms(fn, repeats))
        rows += [(op, f"{batch}x{c}x{s}x{s}", t[0], t[1]) for op, t in times.items()]
    return rows


class Parts:
    """Worker threads, one per part of a batch, each with one intra-op thread."""

    def __init__(self, parts: int) -> None:
        self.parts = parts
        self.pool = ThreadPoolExecutor(parts)
        caller = torch.get_num_threads()
        ready = threading.Barrier(parts)

        def init() -> None:
            torch.get_num_threads()  # the worker's lazy initialisation first, or it would undo the next line
            torch.set_num_threads(1)
            ready.wait(timeout=60)  # one task per worker

        try:
            for f in [self.pool.submit(init) for _ in range(parts)]:
                f.result()
        except BaseException:
            self.pool.shutdown(wait=False)
            raise
        finally:
            torch.set_num_threads(caller)  # the process default, which set_num_threads also changed

    def map(self, fn: Callable[[slice], Tensor], n: int) -> Tensor:
        step = -(-n // self.parts)
        slices = [slice(i, min(i + step, n)) for i in range(0, n, step)]
        return torch.cat([f.result() for f in [self.pool.submit(fn, s) for s in slices]])


def parts_table(model: nn.Module, batch: int, attack_steps: int, blocks: int, block: int) -> tuple[bool, list[float],
                                                                                                  float, float]:
    """Table 3: (x_adv the same, per-block ratios whole/parts, median ms whole, median ms parts)."""
    threads = torch.get_num_threads()
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    threat = ThreatModel(eps=0.1, steps=attack_steps, step=0.2 / max(attack_steps, 1))
    index = torch.arange(batch)

    def attack(s: slice) -> Tensor:
        with torch.autocast("cpu", dtype=BF16):
            return kl_attack(model, x[s], y[s], threat, ExampleRNG(0, index[s]))

    parts = Parts(threads)
    try:
        whole = lambda: attack(slice(0, batch))  # noqa: E731
        split = lambda: parts.map(attack, batch)  # noqa: E731
        same = torch.equal(whole(), split())
        ratios, t_whole, t_split = [], [], []
        for i in range(blocks):
            a, b = [], []
            pairs = ((whole, a), (split, b))
            for fn, out in pairs if i % 2 == 0 else pairs[::-1]:  # which goes first alternates too
                for _ in range(block):
                    t0 = time.perf_counter()
                    fn()
                    out.append(time.perf_counter() - t0)
            ratios.append(statistics.median(a) / statistics.median(b))
            t_whole += a
            t_split += b
    finally:
        parts.pool.shutdown()
    return same, ratios, 1e3 * statistics.median(t_whole), 1e3 * statistics.median(t_split)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's)")
    ap.add_argument("--attack-steps", type=int, default=5, help="K of the ARoW step (5, the default recipe)")
    ap.add_argument("--repeats", type=int, default=30, help="timed calls per kernel or operator (median)")
    ap.add_argument("--blocks", type=int, default=30, help="alternating blocks of table 3")
    ap.add_argument("--block", type=int, default=4, help="attacks per block of table 3")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SmallCNN().eval().requires_grad_(False).to(memory_format=CL)
    peak_before = matmul_peak(torch.device("cpu"), dtype=BF16)[0]
    rows = kernel_rows(model, args.batch, args.repeats)
    peak = max(peak_before, matmul_peak(torch.device("cpu"), dtype=BF16)[0], 1e-9)  # the better of two
    pct = lambda flops, ms: 100 * flops / (ms / 1e3) / 1e9 / peak  # noqa: E731

    print(f"bf16 matmul peak {peak:.1f} GFLOP/s (2048x2048), {torch.get_num_threads()} thread(s), batch {args.batch}\n")
    print("| layer | forward MFLOP | forward ms | % of peak | input gradient ms | % of peak | weight gradient ms "
          "| % of peak | both gradients, one call, ms | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = r["flops"]
        print(f"| {r['layer']} | {f / 1e6:.1f} | {r['fwd']:.3f} | {pct(f, r['fwd']):.0f}% | {r['grad_in']:.3f} | "
              f"{pct(f, r['grad_in']):.0f}% | {r['grad_w']:.3f} | {pct(f, r['grad_w']):.0f}% | "
              f"{r['grad_both']:.3f} | {pct(2 * f, r['grad_both']):.0f}% |")
    ms, flops = step_ceiling(rows, args.attack_steps)
    print(f"\nAn ARoW step (K = {args.attack_steps}) of these kernels alone: {ms:.1f} ms, {flops / 1e9:.2f} nominal "
          f"GFLOP: {pct(flops, ms):.0f}% of the bf16 peak at most, before ReLU, pooling, casts and losses.\n")

    print("| operator (channels-last) | shape | bf16 ms | float32 ms |")
    print("|---|---|---|---|")
    for op, shape, t_bf16, t_fp32 in pointwise_rows(args.batch, args.repeats):
        print(f"| {op} | {shape} | {t_bf16:.3f} | {t_fp32:.3f} |")

    threads = torch.get_num_threads()
    if threads < 2:
        print("\nThe batch in parts: needs 2 threads or more (--threads); not timed.")
        return 0
    same, ratios, t_whole, t_split = parts_table(model, args.batch, args.attack_steps, args.blocks, args.block)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"\n| KL attack, K = {args.attack_steps}, batch {args.batch} | ms (median) | speed-up, block by block "
          f"(median, quartiles) | blocks faster | same x_adv |")
    print("|---|---|---|---|---|")
    print(f"| whole batch, {threads} threads | {t_whole:.1f} | | | |")
    print(f"| {threads} parts, 1 thread each, on {threads} worker threads | {t_split:.1f} | {statistics.median(ratios):.2f}x "
          f"({q[0]:.2f}-{q[2]:.2f}) | {sum(r > 1 for r in ratios)}/{len(ratios)} | "
          f"{'yes, bit for bit' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
