"""torchrun / DDP plumbing: PyTorch's own process groups, nothing home-made.

``torchrun --nproc-per-node=N -m arow train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we initialise
the default process group from them (NCCL on CUDA, gloo on the CPU) and everything else reads
:func:`info`. Without those variables every helper is a no-op and the run is single-process. Several
machines use torchrun's usual rendezvous flags (``--nnodes``, ``--node-rank``,
``--rdzv-endpoint``); the process group is always initialised from the environment (env://).
"""
from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

T = TypeVar("T")
#: an error as it travels between ranks: its class's module and name, its message and its arguments
#: (when they are plain values: what rebuilds it; a KeyError's message is its argument quoted)
Failure = tuple[str, str, str, tuple]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def shard_range(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that ``rank`` takes: the ``rank``-th of ``world_size`` contiguous,
    nearly equal parts (sizes differ by at most one; some may be empty). Defaults: this process.

    >>> [shard_range(10, r, 3) for r in range(3)]
    [(0, 3), (3, 7), (7, 10)]
    """
    d = info()
    rank = d.rank if rank is None else rank
    world_size = d.world_size if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    bounds = np.linspace(0, n, world_size + 1).round().astype(int)
    return int(bounds[rank]), int(bounds[rank + 1])


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any); returns this process's place in it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info()


def teardown() -> None:
    """Leave the process group. Every rank waits for the others first: a rank that destroys its
    group while a peer still finishes its last collective makes gloo abort that peer."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op single-process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank.

    >>> broadcast_object({"a": 1})  # single process: the object itself
    {'a': 1}
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks this rank's CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def raise_together(error: Optional[str], exc_type: type = ValueError) -> None:
    """Raise ``exc_type(message)`` on EVERY rank if rank 0 found an error.

    Only rank 0 checks the run folder; if it alone raised, the other ranks would wait forever
    at the next collective call. Single-process this simply raises when ``error`` is set.

    >>> raise_together(None)  # nothing to report
    """
    error = broadcast_object(error)
    if error:
        raise exc_type(error)


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run on rank 0 only, its result returned on every rank.

    The other ranks wait in a broadcast meanwhile. When ``fn`` raises on rank 0, the error is
    broadcast in place of the result and every rank raises it (rank 0 the original, the others an
    exception of the same class with the same message; :class:`RuntimeError` when that class cannot
    be rebuilt from its message), instead of leaving the others waiting until the collective's
    timeout. Single-process this simply calls ``fn``.

    >>> on_main(sum, [1, 2])
    3
    """
    d = info()
    if not d.enabled:
        return fn(*args, **kwargs)
    error: Optional[Exception] = None
    result: Any = None
    if d.is_main:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - raised again below, on every rank
            error = e
    failure, result = _broadcast_outcome((_failure(error), None) if error is not None else (None, result))
    if failure is not None:
        if error is not None:
            raise error
        raise _rebuild(failure)
    return result


def agree_on_errors(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run on every rank (its own share of some work); when it raised on
    any rank, every rank raises that error (the lowest failing rank's), so that no rank is left
    waiting at its next collective call for one that stopped. Costs one small all-gather.
    Single-process this simply calls ``fn``.

    >>> agree_on_errors(max, 2, 5)
    5
    """
    d = info()
    if not d.enabled:
        return fn(*args, **kwargs)
    error: Optional[Exception] = None
    result: Any = None
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - raised again below, on every rank
        error = e
    failures: list[Optional[Failure]] = [None] * d.world_size
    dist.all_gather_object(failures, _failure(error) if error is not None else None)
    first = next((f for f in failures if f is not None), None)
    if first is None:
        return result
    if error is not None and _failure(error) == first:
        raise error
    raise _rebuild(first) from error


def _failure(error: Exception) -> Failure:
    plain = all(isinstance(a, (str, int, float, bool, type(None))) for a in error.args)
    return type(error).__module__, type(error).__qualname__, str(error), tuple(error.args) if plain else (str(error),)


def _rebuild(failure: Failure) -> Exception:
    """The exception ``failure`` describes: its class (looked up among the modules already imported,
    nothing is imported for it) built from its arguments when that gives the same message, else a
    :class:`RuntimeError` with the message."""
    module, qualname, message, args = failure
    cls: Any = sys.modules.get(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            error = cls(*args)
            if str(error) == message:
                return error
        except Exception:  # noqa: BLE001 - a class that takes other arguments
            pass
    return RuntimeError(message)


def _broadcast_outcome(outcome: tuple[Optional[Failure], Any]) -> tuple[Optional[Failure], Any]:
    """Rank 0's ``(failure, result)`` on every rank. A result that cannot be pickled becomes a
    failure on every rank: rank 0 pickles before its first collective call, so nothing was sent yet."""
    try:
        return broadcast_object(outcome)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        if not info().is_main:
            raise
        return broadcast_object((_failure(RuntimeError(f"rank 0's result could not be sent to the other ranks: "
                                                       f"{e}")), None))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum that every rank uses is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose train-mode statistics are those of the global batch over all ranks.

    :class:`torch.nn.SyncBatchNorm` does exactly this with fused kernels, but refuses CPU
    tensors; this version (two differentiable all-reduces per call, statistics in float32)
    lets a gloo/CPU run keep the promise that N processes train like one. Eval mode, and a
    single process, are plain BatchNorm. The state dict keys are BatchNorm's.

    >>> bn = GlobalBatchNorm(3)
    >>> bn(torch.rand(4, 3, 2, 2)).shape
    torch.Size([4, 3, 2, 2])
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in >= fp32
        count = torch.full((1,), float(x.numel() // x.shape[1]), device=x.device)
        packed = all_reduce(torch.cat([xf.sum(dims), count]))
        total = packed[-1]
        mean = packed[:-1] / total
        centered = xf - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims)) / total  # two passes: no cancellation
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (total / (total - 1)), alpha=f)
        return out.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` computing global-batch statistics under DDP.

    CUDA gets PyTorch's :class:`torch.nn.SyncBatchNorm`; other devices (the CPU/gloo runs the
    tests use) get :class:`GlobalBatchNorm`, the same maths. Weights and buffers are kept.

    >>> net = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)), torch.device("cpu"))
    >>> type(net[0]).__name__
    'GlobalBatchNorm'
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, GlobalBatchNorm):
        ref = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
        new = GlobalBatchNorm(model.num_features, model.eps, model.momentum, model.affine,
                              model.track_running_stats, device=device,
                              dtype=ref.dtype if ref is not None else None)
        new.load_state_dict(model.state_dict())
        new.train(model.training)
        return new
    for name, child in model.named_children():
        model.add_module(name, convert_sync_batchnorm(child, device))
    return model
