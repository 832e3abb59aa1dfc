"""oneDNN's fused convolution + ReLU in the attack's forward and backward, against ATen's two ops.

The training attack spends about 20% of its CPU time in ReLU and max-pooling. oneDNN can apply the
ReLU inside the convolution (``torch.ops.mkldnn._convolution_pointwise(..., "relu", ...)``), but
that operator has no autograd kernel and the attack differentiates with respect to its input. So
each conv+ReLU pair of small-cnn is replaced here by an autograd Function: the forward is the fused
operator, the backward masks the gradient with ``out > 0`` and calls ATen's
``convolution_backward``. One attack step (bf16 autocast, frozen weights, batch ``--batch``,
gradient of the cross-entropy with respect to the input) is timed for both models in turn, five
steps per sample, ``--repeats`` samples each; the ratio is taken pair by pair (a shared machine's
load falls on both alike). The input gradients are compared first: the fused model must give the
same numbers.

    python benchmarks/bench_conv_relu.py --repeats 30 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from arow.models.small_cnn import SmallCNN  # noqa: E402

Tensor = torch.Tensor
PAIRS = (("conv1", "relu1"), ("conv2", "relu2"), ("conv3", "relu3"), ("conv4", "relu4"))


class _ConvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor, padding: list[int]) -> Tensor:
        out = torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, [1, 1], [1, 1], 1, "relu", [None], "")
        ctx.save_for_backward(x, w, out)
        ctx.padding = padding
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w, out = ctx.saved_tensors
        g = torch.where(out > 0, g, torch.zeros((), dtype=g.dtype))
        gi, gw, gb = torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], [1, 1], ctx.padding, [1, 1], False,
                                                         [0, 0], 1, list(ctx.needs_input_grad[:3]))
        return gi, gw, gb, None


class FusedConvReLU(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        c = self.conv
        with torch.autocast("cpu", enabled=False):
            return _ConvReLU.apply(x.to(dtype), c.weight.to(dtype), c.bias.to(dtype), list(c.padding))


def fused(model: SmallCNN) -> SmallCNN:
    m = copy.deepcopy(model)
    for conv, relu in PAIRS:
        setattr(m.features, conv, FusedConvReLU(getattr(m.features, conv)))
        setattr(m.features, relu, nn.Identity())
    return m


def attack_step(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    xa = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(xa).float(), y)
    (g,) = torch.autograd.grad(loss, xa)
    return g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = SmallCNN().eval().requires_grad_(False)
    fast = fused(eager)
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    same = torch.equal(attack_step(eager, x, y), attack_step(fast, x, y))
    times: dict[str, list[float]] = {"eager": [], "fused": []}
    for _ in range(args.repeats):
        for name, model in (("eager", eager), ("fused", fast)):
            t0 = time.perf_counter()
            for _ in range(5):
                attack_step(model, x, y)
            times[name].append((time.perf_counter() - t0) / 5)
    ratio = statistics.median(e / f for e, f in zip(times["eager"], times["fused"]))
    print("| model | ms per attack step (median) | same input gradients |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * statistics.median(t):.2f} | {'yes' if same else 'NO'} |")
    print(f"\nspeed-up of the fused model, median of the pairwise ratios: {ratio:.2f}x "
          f"(small-cnn, batch {args.batch}, bf16 autocast, {args.threads} thread(s), {args.repeats} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
