"""In-memory batching with batched augmentation, identical across any number of DDP ranks.

Every random number of an epoch (the permutation, the flip mask, the crop offsets) is drawn on
the CPU from a generator seeded by ``(seed, epoch)``, for the whole dataset, identically on every
rank. A global batch is a contiguous run of that epoch's order, and rank ``r`` keeps rows
``[r*b, (r+1)*b)`` of it, where ``b = global_batch / world_size``. So a 2-process run sees per
step exactly the examples, flips and crops of a 1-process run, only split in two.

All ranks always receive batches of the same size ``b``, so a rank's rows of the global batch are
``[rank * len(x), (rank + 1) * len(x))`` of ``len(x) * world_size`` (what :class:`arow.rng.BatchRNG`
wants as ``offset`` and ``total``).
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .readers import DataError

if TYPE_CHECKING:
    from . import TensorData

log = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "flip", "crop", "crop+flip")
#: the largest share of a GPU's free memory that extra training data (uint8 images and labels) may
#: take to be kept on the GPU (:class:`ExtraFeed`). The free memory is measured after the first epoch,
#: when it no longer counts what the model, its activations, the attack and the validation took
#: (PyTorch's caching allocator keeps their peak reserved); the rest stays for what comes later
EXTRA_ON_DEVICE_SHARE = 0.25
_UPLOAD_BYTES = 1 << 26  # extra images copied to the GPU 64 MiB at a time


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the images of ``x`` (N, C, H, W) left-right where the boolean ``mask`` (N,) is set.

    >>> hflip(torch.arange(4.).view(2, 1, 1, 2), torch.tensor([True, False])).flatten().tolist()
    [1.0, 0.0, 2.0, 3.0]
    """
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def random_crop(x: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad ``x`` (N, C, H, W) by ``pad`` on each side and cut H x W at ``offsets`` (N, 2).

    ``offsets[i] = (top, left)`` in ``0..2*pad``; ``(pad, pad)`` returns the image unchanged.
    Equals ``F.pad(x[i], (pad,) * 4)[:, top:top + H, left:left + W]`` for every ``i``, in one gather.

    >>> x = torch.rand(2, 3, 32, 32)
    >>> torch.equal(random_crop(x, torch.full((2, 2), 4), pad=4), x)
    True
    """
    if pad == 0:
        return x
    n, c, h, w = x.shape
    wp = w + 2 * pad
    padded = F.pad(x, (pad, pad, pad, pad)).reshape(n, c, -1)
    offsets = offsets.to(device=x.device, dtype=torch.long)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
    # One gather over flattened pixels: several times faster than 4-D advanced indexing.
    flat = (rows.unsqueeze(2) * wp + cols.unsqueeze(1)).view(n, 1, h * w).expand(n, c, h * w)
    return padded.gather(2, flat).view(n, c, h, w)


def batches(data: "TensorData", batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential ``(x, y)`` batches of ``data``, no shuffling or augmentation (for evaluation).

    >>> from arow.data import from_tensors
    >>> [len(y) for _, y in batches(from_tensors(torch.rand(5, 1, 2, 2), [0, 1, 0, 1, 0]), 2)]
    [2, 2, 1]
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for lo in range(0, len(data), batch_size):
        yield data.x[lo : lo + batch_size], data.y[lo : lo + batch_size]


def channels_first(x: torch.Tensor, declared: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Images ``x`` in the (N, C, H, W) layout arow's models take, for images that may be channels-last.

    Images that look channels-last, (N, H, W, C) with C in {1, 3} and H, W > C (as numpy arrays
    and image files usually are), are transposed with a logged note when ``declared``, the data
    set's ``(channels, image size)``, says so unambiguously, and refused with one line
    (:class:`~arow.data.readers.DataError`) otherwise, so that they never reach a convolution.
    Anything else is returned as it is.

    >>> channels_first(torch.zeros(2, 28, 28, 1), declared=(1, 28)).shape
    torch.Size([2, 1, 28, 28])
    >>> channels_first(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 3, 32, 32])
    """
    if x.dim() != 4:
        return x
    _, h, w, c = x.shape
    if not (c in (1, 3) and h > c and w > c):
        return x
    if declared is not None and declared == (c, h) and h == w:
        log.info("x: channels-last images %s (N, H, W, C) transposed to (N, C, H, W), as the data set has %d "
                 "channel(s) of %dx%d", tuple(x.shape), c, h, w)
        return x.permute(0, 3, 1, 2).contiguous()
    raise DataError(f"x: shape {tuple(x.shape)} looks channels-last (N, H, W, C); arow takes (N, C, H, W): pass "
                    f"x.permute(0, 3, 1, 2) (a tensor) or x.transpose(0, 3, 1, 2) (a numpy array)")


def in_layout(x: torch.Tensor, memory_format: Optional[torch.memory_format]) -> torch.Tensor:
    """``x`` in ``memory_format`` (a copy only if it is not already), or as it is for None.

    >>> in_layout(torch.rand(2, 3, 4, 4), torch.channels_last).is_contiguous(memory_format=torch.channels_last)
    True
    """
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 64-bit seed for ``(seed, epoch)`` (so epochs 1 and seed+1 do not collide)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0])


def check_loader_args(batch_size: int, *, augment: str, rank: int, world_size: int) -> None:
    """The arguments every training loader shares: a known augmentation, a valid rank, and a
    global batch that splits evenly over the processes (one-line ValueErrors)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"the global batch size {batch_size} must be a positive multiple of the number of "
                         f"processes {world_size}")


class Loader:
    """Shuffled, augmented batches of an in-memory :class:`TensorData` for one DDP rank.

    ``batch_size`` is the GLOBAL batch and must be divisible by ``world_size``; each rank yields
    ``batch_size // world_size`` examples per step on the data's device. Call ``set_epoch`` before
    every epoch (like ``DistributedSampler``), or every epoch repeats the same order.

    With ``drop_last=False`` the last, partial global batch of ``r`` examples is completed to a
    multiple of ``world_size`` with the first examples of the epoch's order (as
    ``DistributedSampler`` pads), so every rank gets ``ceil(r / world_size)`` examples and the same
    number of steps. With one process there is no padding: every example appears once per epoch.

    Augmentation ("none", "flip", "crop", "crop+flip") is a random crop with zero padding ``pad``
    followed by a horizontal flip with probability 1/2, as batched tensor ops.

    ``memory_format`` (None: the batches as built) is the layout every batch is given last, e.g.
    ``torch.channels_last`` for a channels-last model on CUDA (the Trainer sets it there, see
    :func:`arow.training.runtime.batch_memory_format`): one conversion per batch in the loader.

    >>> from arow.data import from_tensors
    >>> data = from_tensors(torch.rand(10, 3, 8, 8), torch.arange(10) % 2)
    >>> loader = Loader(data, 4, shuffle=True, augment="crop+flip", seed=0, drop_last=False)
    >>> loader.set_epoch(1)
    >>> len(loader), [len(y) for _, y in loader]
    (3, [4, 4, 2])
    """

    memory_format: Optional[torch.memory_format] = None

    def __init__(
        self,
        data: "TensorData",
        batch_size: int,
        *,
        shuffle: bool,
        augment: str,
        seed: int,
        drop_last: bool,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 4,
    ) -> None:
        check_loader_args(batch_size, augment=augment, rank=rank, world_size=world_size)
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if drop_last and len(data) < batch_size:
            raise ValueError(
                f"{len(data)} examples make no full batch of {batch_size} with drop_last=True"
            )
        if len(data) == 0:
            raise ValueError("cannot iterate over an empty dataset")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = len(self.data), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _draw(self) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        # Fixed draw order, always for the whole dataset: the numbers do not depend on the
        # batch size, the rank or the world size.
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        n = len(self.data)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        offsets = None
        if "crop" in self.augment and self.pad > 0:
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if "flip" in self.augment else None
        return order, offsets, flips

    def _positions(self, step: int) -> torch.Tensor:
        """Positions in the epoch's order that this rank takes at ``step``."""
        n = len(self.data)
        lo = step * self.batch_size
        pos = torch.arange(lo, min(lo + self.batch_size, n))
        extra = -len(pos) % self.world_size
        if extra:  # only the last, partial batch: wrap around like DistributedSampler
            pos = torch.cat([pos, torch.arange(extra) % n])
        b = len(pos) // self.world_size
        return pos[self.rank * b : (self.rank + 1) * b]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self._draw()
        device = self.data.x.device
        # One host-to-device copy per epoch: per-step copies of CPU tensors would block the GPU
        # stream once per step. Positions are gathered on the device too.
        order = order.to(device)
        offsets = offsets.to(device) if offsets is not None else None
        flips = flips.to(device) if flips is not None else None
        steps = [self._positions(step) for step in range(len(self))]
        flat = torch.cat(steps).to(device) if steps else torch.empty(0, dtype=torch.long, device=device)
        for pos in flat.split([len(p) for p in steps]):
            idx = order[pos]
            x, y = self.data.x[idx], self.data.y[idx]
            if offsets is not None:
                x = random_crop(x, offsets[pos], self.pad)
            if flips is not None:
                x = hflip(x, flips[pos])
            yield in_layout(x, self.memory_format), y


def extra_placement(device: torch.device, nbytes: int) -> str:
    """Where :class:`ExtraFeed` keeps ``nbytes`` of extra data for ``device``: ``"host"`` off CUDA;
    on CUDA ``"device"`` when they take at most :data:`EXTRA_ON_DEVICE_SHARE` of the GPU's free
    memory now, else ``"pinned"``."""
    if device.type != "cuda":
        return "host"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= EXTRA_ON_DEVICE_SHARE * free else "pinned"


class ExtraFeed:
    """The extra images of a :class:`~arow.data.extra.MixedLoader` on their way to ``device``.

    Where they are kept (:attr:`mode`; None until decided):

    - ``"host"`` (not CUDA): each batch gathered from the (memory-mapped) arrays and converted by
      ``ExtraData.batch``, as always;
    - ``"device"`` (CUDA, enough free memory): all images copied to the GPU once, as uint8 (a
      quarter of float32), 64 MiB at a time, and each batch gathered there: per step no work on
      the host and no copy;
    - ``"pinned"`` (CUDA, too large): each batch gathered on the host into pinned memory and copied
      with ``non_blocking=True``, so the host does not wait for the copy.

    On CUDA the first pass over the data (the first epoch) is fed from pinned memory and the mode is
    decided at the second, by :func:`extra_placement`: by then the GPU's free memory excludes the
    peak of the first epoch's activations, so keeping the images on the GPU cannot take memory the
    training needs. Should the copy to the GPU fail for lack of memory all the same, the batches come
    from pinned memory (one warning), for good. :meth:`release` frees the GPU's copy. Every mode gives
    the same batches (uint8 images / 255 in float32, the same labels).
    """

    def __init__(self, extra: Any, device: Union[str, torch.device]) -> None:
        self.extra, self.device = extra, torch.device(device)
        self.mode: Optional[str] = None
        self._passes = 0  # passes begun over the data (epochs, BatchNorm recalibrations of an average)
        self._images: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None

    def batches(self, draws: torch.Tensor, slot: torch.Tensor, per_batch: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Step by step, the images (float32 N x C x H x W in [0, 1]) and labels of the extra data's
        rows ``draws[step * per_batch + slot]`` (``draws`` and ``slot``: CPU tensors)."""
        mode = self._place()
        if mode == "device":  # the epoch's draws copied once; the gathers run on the GPU
            draws, slot = draws.to(self.device), slot.to(self.device)
        for step in itertools.count():
            idx = draws[step * per_batch + slot]
            if mode == "host":
                yield self.extra.batch(idx.numpy(), self.device)
            elif mode == "device":
                yield _as_float(self._images[idx]), self._labels[idx]
            else:
                rows = idx.numpy()
                x = torch.from_numpy(self.extra.images(rows)).pin_memory().to(self.device, non_blocking=True)
                y = torch.from_numpy(self.extra.labels[rows]).pin_memory().to(self.device, non_blocking=True)
                yield _as_float(x), y

    def release(self) -> None:
        """Free the GPU's copy of the extra data (the Trainer does when a fit ends, so that the
        evaluation after it has that memory); a later pass decides again where the data is kept."""
        self._images = self._labels = None
        self.mode = None

    def _place(self) -> str:
        """This pass's mode (see the class): decided once, at the second pass on CUDA."""
        self._passes += 1
        if self.mode is None:
            if self.device.type == "cuda" and self._passes == 1:
                return "pinned"  # the first epoch: its activations are not known yet
            self.mode = extra_placement(self.device, self._nbytes())
            if self.mode != "host":
                log.info("extra data (%.2f GB as uint8) %s", self.extra.nbytes / 1e9, "kept on the GPU" if
                         self.mode == "device" else "too large for the GPU: copied per batch from pinned memory")
        if self.mode == "device" and self._images is None:
            self._upload()
        return self.mode

    def _nbytes(self) -> int:
        return self.extra.nbytes + self.extra.labels.nbytes

    def _upload(self) -> None:
        """The images and labels copied to the GPU; without room for them, pinned memory instead."""
        try:
            self._images, self._labels = _device_copy(self.extra, self.device)
        except torch.cuda.OutOfMemoryError as e:
            self.mode = "pinned"
            log.warning("extra data (%.2f GB as uint8) does not fit on the GPU after all (%s): its batches are "
                        "copied from pinned memory instead", self._nbytes() / 1e9, str(e).split("\n")[0][:200])


def _device_copy(extra: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``extra``'s images (uint8, N x H x W x C) and labels on ``device``, copied 64 MiB at a time."""
    images = torch.empty((len(extra),) + tuple(extra.image_shape), dtype=torch.uint8, device=device)
    rows, at = max(1, _UPLOAD_BYTES // max(1, math.prod(extra.image_shape))), 0
    for part in extra.parts:
        for lo in range(0, len(part), rows):
            chunk = np.array(part[lo : lo + rows])  # these rows of the memory map, as a writable copy
            images[at + lo : at + lo + len(chunk)].copy_(torch.from_numpy(chunk))
        at += len(part)
    return images, torch.from_numpy(extra.labels).to(device)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images N x H x W x C as float32 N x C x H x W in [0, 1] (what ``ExtraData.batch`` computes)."""
    return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
