"""Readers for the on-disk formats of the datasets ``arow`` knows (numpy/scipy/torch only).

Every reader returns ``(x, y)`` with ``x`` a uint8 tensor of shape (N, C, H, W) and ``y`` an
int64 tensor of shape (N,). Anything missing, unreadable, truncated or of the wrong shape raises
:class:`DataError` with a one-line message that names the file and what was expected.
"""
from __future__ import annotations

import gzip
import logging
import pickle
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FMNIST_HINT = (
    "install Debian's `dataset-fashion-mnist` (`sudo apt-get install dataset-fashion-mnist`) "
    "or pass `--data-dir` pointing at a folder with "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
)
_IDX_MAGIC = {0x0801: 1, 0x0803: 3}  # uint8 labels, uint8 images -> number of dims


class DataError(ValueError):
    """A dataset file is missing, unreadable, truncated or has an unexpected layout."""


# ----------------------------------------------------------------------------- IDX (F-MNIST)


def read_idx(path: PathLike) -> np.ndarray:
    """Read a gzip-compressed or plain IDX file of uint8 labels (0x0801) or images (0x0803).

    >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape
    (10000,)
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror or e})") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: expected an IDX header of at least 4 bytes, got {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise DataError(
            f"{path}: bad IDX magic 0x{magic:08x}, expected 0x00000801 (uint8 labels) "
            "or 0x00000803 (uint8 images)"
        )
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: expected a {header}-byte IDX header, got {len(raw)} bytes")
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        raise DataError(
            f"{path}: IDX payload for shape {dims} should be {expected} bytes, got {got} bytes "
            f"({'truncated' if got < expected else 'trailing data'})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {root / (stem + '.gz')} not found; {_FMNIST_HINT}")


def load_fashion_mnist(root: Optional[PathLike], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST from IDX files (``.gz`` or plain) as uint8 (N,1,28,28) and int64 (N,).

    ``root=None`` means Debian's location, ``/usr/share/datasets/fashion-mnist``.

    >>> x, y = load_fashion_mnist(None, train=False)
    >>> x.shape, y.shape
    (torch.Size([10000, 1, 28, 28]), torch.Size([10000]))
    """
    root = Path(root) if root is not None else FASHION_MNIST_ROOT
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} not found; {_FMNIST_HINT}")
    img_stem, lbl_stem = _FMNIST_FILES[bool(train)]
    img_path, lbl_path = _find_idx(root, img_stem), _find_idx(root, lbl_stem)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{lbl_path}: expected {len(images)} labels to match {img_path}, got {len(labels)}")
    _check_labels(labels, 10, lbl_path)
    log.debug("read %d Fashion-MNIST examples from %s", len(labels), root)
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- CIFAR


def _cifar_layout(num_classes: int, train: bool) -> tuple[str, list[str], bytes]:
    if num_classes == 10:
        files = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
        return "cifar-10-batches-py", files, b"labels"
    if num_classes == 100:
        return "cifar-100-python", ["train" if train else "test"], b"fine_labels"
    raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")


def _unpickle(path: Path) -> dict:
    # CIFAR ships as Python pickles; like every CIFAR reader this trusts the file it is given.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except OSError as e:
        raise DataError(f"{path}: cannot read CIFAR batch ({e.strerror or e})") from e
    except Exception as e:  # pickle raises many types on bad input (EOFError, UnpicklingError, ...)
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict with b'data', got {type(obj).__name__}")
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def load_cifar(
    root: Optional[PathLike], train: bool, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10/100 from the python-pickle release as uint8 (N,3,32,32) and int64 (N,).

    ``root`` is the folder holding ``cifar-10-batches-py/`` (``cifar-100-python/``) or that folder
    itself. There is no default location.

    >>> x, y = load_cifar("~/data", train=True, num_classes=10)  # doctest: +SKIP
    >>> x.shape  # doctest: +SKIP
    torch.Size([50000, 3, 32, 32])
    """
    sub, files, label_key = _cifar_layout(num_classes, train)
    if root is None:
        raise DataError(
            f"CIFAR-{num_classes} has no default location; pass --data-dir pointing at the folder "
            f"that holds {sub}/ ({', '.join(files)})"
        )
    root = Path(root).expanduser()
    folder = next((d for d in (root / sub, root) if all((d / f).is_file() for f in files)), None)
    if folder is None:
        missing = [f for f in files if not (root / sub / f).is_file()]
        raise DataError(
            f"CIFAR-{num_classes} files not found: expected {root / sub}/ or {root}/ to contain "
            f"{', '.join(files)} (missing {', '.join(missing)}); download the python version "
            "from https://www.cs.toronto.edu/~kriz/cifar.html and pass its folder as --data-dir"
        )
    xs, ys = [], []
    for name in files:
        path = folder / name
        batch = _unpickle(path)
        if b"data" not in batch or label_key not in batch:
            raise DataError(
                f"{path}: expected keys b'data' and {label_key!r}, got {sorted(map(repr, batch))}"
            )
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key])
        if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
            raise DataError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],):
            raise DataError(f"{path}: expected {data.shape[0]} labels, got shape {labels.shape}")
        _check_labels(labels, num_classes, path)
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    log.debug("read %d CIFAR-%d examples from %s", sum(map(len, ys)), num_classes, folder)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# ----------------------------------------------------------------------------- SVHN


def load_svhn(root: Optional[PathLike], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Load SVHN (cropped digits, ``train_32x32.mat`` / ``test_32x32.mat``) as uint8 (N,3,32,32).

    Label 10 in the file means digit 0 and is mapped to 0. There is no default location.

    >>> x, y = load_svhn("~/data/svhn", train=False)  # doctest: +SKIP
    >>> x.shape  # doctest: +SKIP
    torch.Size([26032, 3, 32, 32])
    """
    import scipy.io  # deferred: only SVHN needs scipy

    name = "train_32x32.mat" if train else "test_32x32.mat"
    if root is None:
        raise DataError(f"SVHN has no default location; pass --data-dir pointing at a folder with {name}")
    path = Path(root).expanduser() / name
    if not path.is_file():
        raise DataError(
            f"SVHN file {path} not found; expected {name} from "
            "http://ufldl.stanford.edu/housenumbers/ in the --data-dir folder"
        )
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError, ... on bad files
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y', got {sorted(k for k in mat if not k.startswith('__'))}")
    X, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: expected X of shape (32, 32, 3, N), got {X.shape}")
    n = X.shape[3]
    if y.size != n or y.ndim not in (1, 2):
        raise DataError(f"{path}: expected y of shape ({n}, 1), got {y.shape}")
    y = y.reshape(-1).astype(np.int64)
    if np.any(y < 0) or np.any(y > 10):
        raise DataError(f"{path}: expected labels in 1..10 (10 = digit 0), got range {y.min()}..{y.max()}")
    y[y == 10] = 0
    if X.dtype != np.uint8:
        if np.any(X < 0) or np.any(X > 255):
            raise DataError(f"{path}: expected X with values in 0..255, got {X.dtype}")
        X = X.astype(np.uint8)
    x = np.ascontiguousarray(X.transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    log.debug("read %d SVHN examples from %s", n, path)
    return torch.from_numpy(x), torch.from_numpy(y)


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size == 0:
        raise DataError(f"{path}: expected at least one example, got none")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: expected integer labels, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{path}: expected labels in 0..{num_classes - 1}, got range {lo}..{hi}")
