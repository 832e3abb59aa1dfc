"""Where and how a model runs: device placement, memory format, mixed precision, compile, DDP.

One function prepares a model for training (:func:`prepare_model`); one decides mixed precision
(:func:`use_amp`). Nothing here changes what is computed, only how fast. :func:`check_logits`
refuses a model whose forward returns something else than logits before any of it is used.
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .. import distributed
from .errors import ModelOutputError

if TYPE_CHECKING:
    from ..config.schema import TrainConfig

#: ``--amp auto`` on a CPU with native bf16: on only where a side-by-side of the embedded recipe
#: (3 seeds each, full test set; docs/performance.md) showed no loss beyond the seed spread.
AUTO_BF16_ON_CPU = True


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 instructions).

    Asked of CPUID through PyTorch's cpuinfo (``torch.cpu._is_avx512_bf16_supported`` and
    ``_is_amx_tile_supported``), else read from the ``flags`` of /proc/cpuinfo. oneDNN's own
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not used: it answers yes for any AVX-512
    CPU, where bf16 is emulated and slower than float32.
    """
    import torch.cpu as tcpu

    probes = [getattr(tcpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if callable(p)]
    if probes:
        try:
            return any(bool(p()) for p in probes)
        except Exception:  # noqa: BLE001 - a private probe that fails: fall back to the flags
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def use_amp(amp: str, device: torch.device) -> bool:
    """Whether training runs under bf16 autocast: ``bf16`` always, ``off`` never, ``auto`` on CUDA
    and on CPUs with native bf16 (:func:`cpu_native_bf16`), if :data:`AUTO_BF16_ON_CPU`.

    >>> use_amp("off", torch.device("cuda")), use_amp("bf16", torch.device("cpu"))
    (False, True)
    """
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and AUTO_BF16_ON_CPU and cpu_native_bf16()


def prepare_model(model: nn.Module, cfg: "TrainConfig", device: torch.device,
                  dist: distributed.DistInfo) -> tuple[nn.Module, nn.Module]:
    """``(model, train_model)``: ``model`` on ``device`` (channels-last, SyncBatchNorm under DDP)
    holds the parameters; ``train_model`` is what the loop calls (compiled, DDP-wrapped). Both share
    parameters, so loading a state into ``model`` later reaches ``train_model`` too.
    """
    model = model.to(device)
    if channels_last(cfg):  # measured: +9% on a 2-core CPU, standard on GPUs
        model = model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn:  # global-batch BN statistics: N ranks train like one
        model = distributed.convert_sync_batchnorm(model, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    train_model: nn.Module = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        # Compile first, then wrap: attacks.unwrap() peels DDP off and the attack runs the
        # compiled module with no collective call inside its loop. With SyncBatchNorm the
        # BN buffers are identical on every rank, so DDP need not broadcast them each forward.
        # The order keeps DDP's overlap of gradient all-reduce with backward: dynamo compiles the
        # training forward while DDP's forward is active and then splits it at DDP's gradient
        # buckets (DDPOptimizer), as it does for torch.compile(DDP(model)) (docs/performance.md).
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ids,
                                                          **_buffer_sync(not cfg.sync_bn))
    return model, train_model


def channels_last(cfg: "TrainConfig") -> bool:
    """Whether the model is trained channels-last (``--channels-last on`` or ``auto``)."""
    return cfg.channels_last in ("on", "auto")


def batch_memory_format(cfg: "TrainConfig", device: torch.device, *,
                        own_model: bool) -> Optional[torch.memory_format]:
    """The layout the training loaders give each batch: channels-last on CUDA when the model is
    channels-last, so that the batch is converted once in the loader instead of inside the first
    convolution of every forward (the attack's, the training's); None elsewhere: on the CPU the
    batches stay as they were built, and so do the numbers.

    ``own_model``: the model is one of arow's architectures (built from a model spec), whose layers
    take any layout. A model of your own gets channels-last batches only with ``--channels-last on``:
    under ``auto`` its batches stay (N, C, H, W)-contiguous, as its forward may ``x.view(len(x), -1)``.

    >>> from arow.config.schema import TrainConfig
    >>> cfg, cuda = TrainConfig(channels_last="auto"), torch.device("cuda")
    >>> batch_memory_format(cfg, cuda, own_model=True), batch_memory_format(cfg, torch.device("cpu"), own_model=True)
    (torch.channels_last, None)
    >>> batch_memory_format(cfg, cuda, own_model=False), batch_memory_format(TrainConfig(channels_last="on"), cuda,
    ...                                                                     own_model=False)
    (None, torch.channels_last)
    """
    if device.type != "cuda" or not channels_last(cfg):
        return None
    return torch.channels_last if own_model or cfg.channels_last == "on" else None


def eager_unless_full(compiled: bool, rows: int, full: int) -> ContextManager[Any]:
    """Run a step eagerly when the model is compiled and its batch (``rows``) is not the ``full``
    per-process batch (the last, partial batch of an epoch): compiling it would add one graph per
    mode the step uses (training, attack, clean target) for a batch seen once per epoch, graphs
    with a dynamic batch size that could then also run the full batches, and that count towards
    dynamo's recompile limit (past it, dynamo runs eagerly for good, with one warning). Elsewhere
    nothing changes.
    """
    if not compiled or rows == full:
        return contextlib.nullcontext()
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if stance is not None:
        return stance("force_eager")
    from torch._dynamo import config as dynamo_config

    return dynamo_config.patch(disable=True)


def _buffer_sync(every_forward: bool) -> dict[str, bool]:
    """DDP's switch for broadcasting buffers from rank 0 before every forward (renamed in torch 2.13)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": every_forward}


def check_logits(output: Any) -> None:
    """Refuse, with one line naming the fix, a model output that is not one tensor of logits
    (batch, classes): a tuple or list such as ``(logits, features)``, a dict, or another shape.

    >>> check_logits(torch.zeros(2, 10))
    >>> try:
    ...     check_logits((torch.zeros(2, 10), torch.zeros(2, 64)))
    ... except ModelOutputError as e:
    ...     print(str(e).split(": ")[0])
    the model returns a tuple of 2 items, not a tensor of logits
    """
    if isinstance(output, torch.Tensor):
        if output.dim() != 2:
            raise ModelOutputError(f"the model returns a tensor of shape {tuple(output.shape)}; training needs "
                                   f"logits of shape (batch, classes)")
        return
    if isinstance(output, Mapping):
        keys = list(output)
        what = f"a dict (keys {', '.join(map(repr, keys[:5]))})"
        pick = f"model(x)[{next((k for k in keys if 'logit' in str(k)), keys[0] if keys else 'logits')!r}]"
    elif isinstance(output, (tuple, list)):
        what, pick = f"a {type(output).__name__} of {len(output)} items", "model(x)[0]"
    else:
        what, pick = f"a {type(output).__name__}", "the logits"
    raise ModelOutputError(f"the model returns {what}, not a tensor of logits: make its forward return the "
                           f"logits only, or wrap it in a module whose forward returns {pick}")


def check_logits_once(model: nn.Module) -> RemovableHandle:
    """A forward hook on ``model`` that checks its output with :func:`check_logits` where the logits
    are first used (the method's or the attack's first forward); the caller removes it after the
    first step, so later steps pay nothing."""
    return model.register_forward_hook(lambda module, args, output: check_logits(output))
