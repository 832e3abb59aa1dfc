"""Datasets as float tensors in memory: the ``DATASETS`` registry, loading, splitting.

Images live in [0, 1] with shape (N, C, H, W) and are never normalised here (normalisation is
the model's first layer). The validation split for model selection is cut from the TRAINING set
by :func:`train_val_split`; the test set is only ever used for the final report.

A new data set is one file in this folder: a reader ``loader(root: Optional[Path], train: bool)``
returning uint8 images (N, C, H, W) and int64 labels (raise :class:`DataError` with one clear line
for missing or bad files), and one registration at import,
``DATASETS.register(name, help=...)(DatasetInfo(name, num_classes, in_channels, image_size,
default_root, augmentation, eps, loader, eps_l2=..., class_names=(...)))``: its default radius per
norm (``eps`` L-inf, ``eps_l2``) and its class names. This package imports every module in its
folder except the support modules in :data:`SUPPORT_MODULES`, so the data set then shows up in
``arow list``, ``--dataset`` and everything built from the registry with no other edit.

>>> data = load_dataset("fashion-mnist", split="test")
>>> len(data), data.x.shape[1:], data.num_classes
(10000, torch.Size([1, 28, 28]), 10)
"""
from __future__ import annotations

import functools
import importlib
import logging
import operator
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ..registry import Registry
from ..threat import check_norm
from .loader import AUGMENTATIONS, Loader, batches, channels_first, hflip, random_crop
from .readers import (
    FASHION_MNIST_ROOT,
    DataError,
    load_cifar,
    load_fashion_mnist,
    load_svhn,
    read_idx,
)

__all__ = [
    "as_data",
    "AUGMENTATIONS",
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "Loader",
    "SUPPORT_MODULES",
    "TensorData",
    "batches",
    "from_tensors",
    "hflip",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "load_svhn",
    "random_crop",
    "read_idx",
    "train_val_split",
]

log = logging.getLogger(__name__)

ReaderFn = Callable[[Optional[Path], bool], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the package needs to know about a dataset, and how to read it.

    ``loader(root, train)`` returns uint8 images (N, C, H, W) and int64 labels.
    ``default_root=None`` means the user must pass ``--data-dir``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    default_root: Optional[Path]
    augmentation: str
    eps: float  # the default L-inf radius
    loader: ReaderFn
    #: the default L2 radius: 0.5 on 32x32 colour images (RobustBench's L2 leaderboard for
    #: CIFAR-10), 1.5 on 28x28 grey images (the usual MNIST-like L2 radius)
    eps_l2: Optional[float] = None
    class_names: tuple[str, ...] = ()
    #: the default L-inf training attack where a run sets neither ``attack_steps`` nor ``step_size``
    #: (and the method uses the common 10 steps): (steps, step as a fraction of eps). The papers' 10
    #: steps of eps/4 everywhere but Fashion-MNIST, whose embedded CPU recipe trains more epochs with
    #: 5 steps of eps/2 (docs/recipe.md); a run that sets either keeps the method's 10 steps and
    #: eps/4 for the other, and L2 keeps 10 steps of eps/4.
    train_attack: tuple[int, float] = (10, 0.25)
    #: the data set's own defaults for methods' hyper-parameters a run leaves unset, as
    #: ``((method, hyper-parameter, value), ...)``: Fashion-MNIST's embedded recipe uses ARoW with
    #: lambda 2.5 (chosen on held-out data, docs/recipe.md); elsewhere the papers' values
    method_defaults: tuple[tuple[str, str, float], ...] = ()

    def default_eps(self, norm: str = "linf") -> Optional[float]:
        """The default radius in ``norm`` (``"linf"`` or ``"l2"``; None: no default, pass one).

        >>> DATASETS.get("cifar10").default_eps("l2"), DATASETS.get("fashion-mnist").default_eps("linf")
        (0.5, 0.1)
        """
        return float(self.eps) if check_norm(norm) == "linf" else self.eps_l2


DATASETS: Registry[DatasetInfo] = Registry("dataset")


def default_eps(dataset: str, norm: str = "linf") -> Optional[float]:
    """The data set's default radius in ``norm`` (None for an unknown data set)."""
    return DATASETS.get(dataset).default_eps(norm) if dataset in DATASETS else None


def _add(info: DatasetInfo, help: str) -> None:
    DATASETS.register(info.name, help=help)(info)


_add(
    DatasetInfo("fashion-mnist", 10, 1, 28, FASHION_MNIST_ROOT, "flip", 0.1, load_fashion_mnist, eps_l2=1.5,
                class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                             "Bag", "Ankle boot"), train_attack=(5, 0.5), method_defaults=(("arow", "lam", 2.5),)),
    "Fashion-MNIST (Debian package dataset-fashion-mnist), eps 0.1, horizontal flip, training attack 5 steps of "
    "eps/2, ARoW's lambda 2.5",
)
_add(
    DatasetInfo("cifar10", 10, 3, 32, None, "crop+flip", 8 / 255,
                functools.partial(load_cifar, num_classes=10), eps_l2=0.5,
                class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck")),
    "CIFAR-10 python pickles (needs --data-dir), eps 8/255, crop+flip",
)
_add(
    DatasetInfo("cifar100", 100, 3, 32, None, "crop+flip", 8 / 255,
                functools.partial(load_cifar, num_classes=100), eps_l2=0.5),
    "CIFAR-100 python pickles (needs --data-dir), eps 8/255, crop+flip",
)
_add(
    DatasetInfo("svhn", 10, 3, 32, None, "none", 8 / 255, load_svhn, eps_l2=0.5,
                class_names=tuple(str(i) for i in range(10))),
    "SVHN cropped digits .mat files (needs --data-dir), eps 8/255, no augmentation",
)


@dataclass
class TensorData:
    """Images ``x`` (float32 in [0, 1], N x C x H x W) and labels ``y`` (int64, N) in memory.

    Construction checks dtypes and shapes; with ``check=True`` (the default) also the values, as
    :func:`from_tensors` does. The methods below derive rows of checked data and skip that pass.

    >>> d = from_tensors(torch.rand(8, 3, 4, 4), torch.arange(8) % 2)
    >>> len(d.subset(5)), d.num_classes
    (5, 2)
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = "custom"
    check: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.num_classes = _check_layout(self.x, self.y, self.num_classes)
        if self.check:
            _check_values(self.x, self.y, self.num_classes)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def subset(self, n: int) -> "TensorData":
        """The first ``n`` examples (all of them if ``n`` is larger)."""
        return TensorData(self.x[:n], self.y[:n], self.num_classes, self.name, check=False)

    def index(self, idx: torch.Tensor) -> "TensorData":
        """The examples at positions ``idx`` (a 1-D integer tensor), in that order."""
        idx = idx.to(self.x.device)
        return TensorData(self.x[idx], self.y[idx], self.num_classes, self.name, check=False)

    def to(self, device: Union[str, torch.device]) -> "TensorData":
        """A copy on ``device`` (the same object's tensors if already there)."""
        return TensorData(self.x.to(device), self.y.to(device), self.num_classes, self.name, check=False)


def load_dataset(name: str, root: Optional[Union[str, Path]] = None, split: str = "train") -> TensorData:
    """Read a registered dataset's ``split`` ("train" or "test") as :class:`TensorData` on the CPU.

    ``root=None`` uses the dataset's default location (only Fashion-MNIST has one).

    >>> train = load_dataset("fashion-mnist")
    >>> len(train), train.x.dtype
    (60000, torch.float32)
    """
    info = DATASETS.get(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(root).expanduser() if root is not None else info.default_root
    x, y = info.loader(path, split == "train")
    # The readers checked the files (uint8 pixels, labels in range): no second pass over the values.
    data = TensorData(x.to(torch.float32).div_(255.0), y.to(torch.int64), info.num_classes, info.name,
                      check=False)
    log.info("loaded %s/%s: %d examples of shape %s", name, split, len(data), tuple(data.x.shape[1:]))
    return data


def from_tensors(
    x: Union[torch.Tensor, np.ndarray],
    y: Union[torch.Tensor, np.ndarray],
    num_classes: Optional[int] = None,
    name: str = "custom",
) -> TensorData:
    """Wrap your own images and labels after validating them.

    ``x``: 4-D (N, C, H, W) with N >= 1, either finite floats in [0, 1] or uint8 (divided by 255).
    Channels-last images (N, H, W, C) are refused with one line, or transposed when ``name`` is a
    built-in data set whose shape they match (:func:`~arow.data.loader.channels_first`).
    ``y``: 1-D integer labels in ``0..num_classes-1``; ``num_classes`` defaults to ``max(y) + 1``.
    Anything else raises :class:`DataError` (a ``ValueError``) naming the argument.

    >>> d = from_tensors(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), [0, 1, 2, 1])
    >>> d.x.dtype, d.num_classes
    (torch.float32, 3)
    """
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    info = DATASETS.get(name) if name in DATASETS else None  # a built-in data set's shape decides a channels-last x
    x = channels_first(x, (info.in_channels, info.image_size) if info is not None else None)
    if x.dim() != 4:
        raise DataError(f"x: expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if len(x) == 0:
        raise DataError("x: expected at least one example, got none")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        _check_values(x, None, None)  # before the cast: float64 values outside float32 still count
        x = x.to(torch.float32)
    else:
        raise DataError(f"x: expected float images in [0, 1] or uint8, got {x.dtype}")
    _check_label_dtype(y)
    y = y.to(torch.int64)
    if num_classes is None:
        # at least 1, so that negative labels are reported as such, not as num_classes 0
        num_classes = max(int(y.max()) + 1, 1) if y.dim() == 1 and len(y) else 1
    return TensorData(x, y, num_classes, name)


def as_data(data: Any, y: Any = None, *, num_classes: Optional[int] = None, name: str = "custom",
            batch_size: int = 500) -> TensorData:
    """Your data in any common form, as a checked :class:`TensorData`.

    ``data`` is a :class:`TensorData`; images (tensor or array, with labels ``y``); a torch
    ``Dataset`` of ``(image, label)`` pairs; or a ``DataLoader`` (or any iterable) of ``(images,
    labels)`` batches. Datasets and loaders are read once into memory (inputs must already be in
    [0, 1]: put any normalisation inside the model).

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> ds = TensorDataset(torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    >>> len(as_data(ds)), len(as_data(DataLoader(ds, batch_size=4))), as_data(ds).num_classes
    (6, 6, 3)
    """
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, TensorData):
        if y is not None:
            raise DataError("y: labels are part of the TensorData given; do not pass y too")
        return data
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if y is None:
            raise DataError("y: labels are required with image tensors (pass a Dataset or DataLoader otherwise)")
        return from_tensors(data, y, num_classes=num_classes, name=name)
    if y is not None:
        raise DataError(f"y: labels come from the {type(data).__name__} itself; do not pass y too")
    if isinstance(data, Dataset) and not isinstance(data, DataLoader):
        try:
            data = DataLoader(data, batch_size=batch_size, shuffle=False)
        except TypeError as e:
            raise DataError(f"data: cannot batch the {type(data).__name__} ({e})") from None
    xs, ys = [], []
    try:
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError(f"data: expected (images, labels) batches, got {type(batch).__name__}")
            xs.append(_as_tensor(batch[0], "x").detach().cpu())
            ys.append(_as_tensor(batch[1], "y").detach().cpu().reshape(-1))
    except TypeError as e:
        raise DataError(f"data: expected tensors, a TensorData, a Dataset or a DataLoader, got "
                        f"{type(data).__name__} ({e})") from None
    if not xs:
        raise DataError("data: the dataset or loader yielded no examples")
    try:
        x, yy = torch.cat(xs), torch.cat(ys)
    except RuntimeError as e:
        raise DataError(f"data: batches of different shapes ({str(e).splitlines()[0]})") from None
    return from_tensors(x, yy, num_classes=num_classes, name=name)


def _as_tensor(v: Any, arg: str) -> torch.Tensor:
    try:
        return torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, strings, objects
        raise DataError(f"{arg}: cannot be read as a tensor ({e})") from e


def _check_label_dtype(y: torch.Tensor) -> None:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"y: expected integer labels, got {y.dtype}")


def _check_layout(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> int:
    """Check dtypes, shapes, devices and ``num_classes`` (metadata only); return ``num_classes``."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DataError(f"x, y: expected tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4:
        raise DataError(f"x: expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"x: expected float images in [0, 1], got {x.dtype} (from_tensors takes uint8)")
    _check_label_dtype(y)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"y: expected {x.shape[0]} labels of shape (N,) to match x, got {tuple(y.shape)}")
    if y.device != x.device:
        raise DataError(f"y: expected on x's device {x.device}, got {y.device}")
    if isinstance(num_classes, bool):
        raise DataError(f"num_classes: expected a positive integer, got {num_classes!r}")
    try:
        k = operator.index(num_classes)  # ints and numpy ints; 2.5 or "10" are refused
    except TypeError:
        raise DataError(f"num_classes: expected a positive integer, got {num_classes!r}") from None
    if k < 1:
        raise DataError(f"num_classes: expected a positive integer, got {k}")
    return k


def _check_values(x: torch.Tensor, y: Optional[torch.Tensor], num_classes: Optional[int]) -> None:
    """Finite images in [0, 1] and labels in ``0..num_classes-1`` (one pass over each)."""
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))  # NaN propagates to both
        if not (0.0 <= lo and hi <= 1.0):  # also False for NaN
            if not bool(torch.isfinite(x).all()):
                raise DataError("x: values must be finite (got NaN or inf)")
            raise DataError(
                f"x: values must lie in [0, 1] (got min {lo:.4g}, max {hi:.4g}); arow's models take "
                "[0, 1] inputs and normalise inside (divide 0..255 pixels by 255, or pass uint8)"
            )
    if y is not None and y.numel():
        ylo, yhi = (int(v) for v in torch.aminmax(y))
        if ylo < 0 or yhi >= num_classes:
            raise DataError(f"y: expected labels in 0..{num_classes - 1}, got range {ylo}..{yhi}")


def train_val_split(data: TensorData, val_size: int, seed: int) -> tuple[TensorData, TensorData]:
    """Split the TRAINING set into disjoint (train, val) parts, fixed by ``seed``.

    The validation part selects checkpoints; never pass the test set here. Both parts keep the
    original order of their examples.

    >>> train, val = train_val_split(load_dataset("fashion-mnist"), val_size=1000, seed=0)
    >>> len(train), len(val)
    (59000, 1000)
    """
    n = len(data)
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for {n} examples, got {val_size}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    val_idx, _ = perm[:val_size].sort()
    train_idx, _ = perm[val_size:].sort()
    return data.index(train_idx), data.index(val_idx)


#: modules of this package that define no data set (every other module registers one when imported)
SUPPORT_MODULES = frozenset({"loader", "readers", "extra"})

# last, so that a data set's module may use anything defined above (DatasetInfo, DataError, ...)
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module}")
