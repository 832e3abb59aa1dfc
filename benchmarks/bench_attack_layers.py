"""Two rewrites of small-cnn's attack step, each timed against the model as it is.

One attack step is a bf16-autocast forward of the frozen model and the gradient of the
cross-entropy with respect to the input, as the training attack computes it (batch ``--batch``).

- ``conv1-matmul``: the first convolution has one input channel, and oneDNN's backward for its input
  gradient runs at about a third of the forward's speed. The rewrite computes that gradient as one
  bf16 matrix product (output gradient, pixels x 32 channels, times the 32 x 9 weights) and a
  col2im (``F.fold``) in float32. Different rounding: the gradients agree to bf16 round-off, not
  bit for bit, so the table prints the largest relative difference and the share of gradient
  signs (what an L-inf attack step uses) that differ.
- ``relu-after-pool``: ReLU and 2x2 max-pooling commute (ReLU is monotone), so the two ReLUs in
  front of a max-pool can run after it, on a quarter of the values. Same numbers bit for bit.

The first table times the first convolution's input gradient alone, the second a whole attack
step of each model; the models are timed in turn, ``--repeats`` times, and the ratio is taken
pair by pair (a shared machine's load falls on both alike).

    python benchmarks/bench_attack_layers.py --repeats 150 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from arow.models.small_cnn import SmallCNN  # noqa: E402
from bench_conv_relu import attack_step  # noqa: E402  (the same attack step, timed there too)

Tensor = torch.Tensor


def conv1_input_grad_matmul(g: Tensor, w: Tensor, size: tuple[int, int]) -> Tensor:
    """The input gradient of an unpadded stride-1 convolution with one input channel: (B, 1, H, W), float32."""
    b, co, oh, ow = g.shape
    kh, kw = w.shape[-2:]
    cols = g.permute(0, 2, 3, 1).reshape(b, oh * ow, co) @ w.reshape(co, kh * kw).to(g.dtype)
    return F.fold(cols.transpose(1, 2).float(), size, (kh, kw))


class _Conv1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        ctx.size = tuple(x.shape[-2:])
        return F.conv2d(x.to(w.dtype), w, b)  # the gradient comes back in x's dtype, float32

    @staticmethod
    def backward(ctx, g: Tensor):
        (w,) = ctx.saved_tensors
        return conv1_input_grad_matmul(g, w, ctx.size), None, None


class MatmulConv1(nn.Module):
    """The first convolution, frozen, with its input gradient from :func:`conv1_input_grad_matmul`."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        with torch.autocast("cpu", enabled=False):
            return _Conv1.apply(x, c.weight.to(dtype), c.bias.to(dtype))


def conv1_matmul(model: SmallCNN) -> SmallCNN:
    m = copy.deepcopy(model)
    m.features.conv1 = MatmulConv1(m.features.conv1)
    return m


def relu_after_pool(model: SmallCNN) -> SmallCNN:
    m = copy.deepcopy(model)
    f = m.features
    order = ("conv1", "relu1", "conv2", "pool1", "relu2", "conv3", "relu3", "conv4", "pool2", "relu4")
    m.features = nn.Sequential(OrderedDict((name, getattr(f, name)) for name in order))
    return m


def _pairs(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for f in fns.values():
        for _ in range(3):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def _ratio(base: list[float], other: list[float]) -> float:
    return statistics.median(b / o for b, o in zip(base, other))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl = torch.channels_last
    eager = SmallCNN().eval().requires_grad_(False).to(memory_format=cl)
    x = torch.rand(args.batch, 1, 28, 28).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (args.batch,))

    w = eager.features.conv1.weight.bfloat16()
    xb = x.bfloat16()
    g = torch.randn(args.batch, 32, 26, 26).bfloat16().contiguous(memory_format=cl)
    layer = _pairs({
        "forward": lambda: F.conv2d(xb, w),
        "oneDNN input gradient": lambda: torch.ops.aten.convolution_backward(
            g, xb, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0],
        "matmul + fold input gradient": lambda: conv1_input_grad_matmul(g, w, (28, 28)),
    }, args.repeats)
    base = layer["oneDNN input gradient"]
    print("| first convolution (1 -> 32 channels, 28x28, bf16) | ms (median) | oneDNN input gradient / this |")
    print("|---|---|---|")
    for name, t in layer.items():
        print(f"| {name} | {1e3 * statistics.median(t):.2f} | {_ratio(base, t):.2f}x |")

    models = {"as it is": eager, "conv1-matmul": conv1_matmul(eager), "relu-after-pool": relu_after_pool(eager)}
    ref = attack_step(eager, x, y)
    grads = {name: attack_step(m, x, y) for name, m in models.items()}
    steps = _pairs({name: (lambda m=m: attack_step(m, x, y)) for name, m in models.items()}, args.repeats)
    print("\n| small-cnn attack step | ms (median) | speed-up, pair by pair | same input gradients |")
    print("|---|---|---|---|")
    for name, t in steps.items():
        gr = grads[name]
        if torch.equal(gr, ref):
            same = "yes, bit for bit"
        else:
            rel = ((gr - ref).abs().max() / ref.abs().max()).item()
            signs = (gr.sign() != ref.sign()).float().mean().item()
            same = f"no: max relative difference {rel:.1e}, {100 * signs:.2f}% of signs differ"
        print(f"| {name} | {1e3 * statistics.median(t):.2f} | {_ratio(steps['as it is'], t):.2f}x | {same} |")
    print(f"\n(batch {args.batch}, bf16 autocast, {args.threads} thread(s), {args.repeats} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
