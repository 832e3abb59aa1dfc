"""Readers for the on-disk formats of the datasets ``arow`` knows (numpy/scipy/torch only).

Every reader returns ``(x, y)`` with ``x`` a uint8 tensor of shape (N, C, H, W) and ``y`` an
int64 tensor of shape (N,). Anything missing, unreadable, truncated or of the wrong shape raises
:class:`DataError` with a one-line message that names the file and what was expected.

A file cannot make a reader allocate much more than it holds: IDX headers are checked before the
payload is streamed, a pickle builds arrays only from the bytes in it (never ``numpy.ndarray`` from a
shape alone) and labels only from flat lists, and an SVHN file's declared shapes are read from its
variable headers (:func:`mat_variables`) and checked against its size before it is loaded.
"""
from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence, Union

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
# The largest real IDX file (F-MNIST's training images) holds 47 MB; a header promising more than
# this is refused before any payload is decompressed.
_IDX_MAX_BYTES = 2**31
_IDX_CHUNK = 1 << 20


class DataError(ValueError):
    """A dataset file (or tensors given as data) is missing, unreadable, truncated or malformed."""


# ----------------------------------------------------------------------------- IDX (F-MNIST)


def read_idx(path: PathLike, shape: Optional[Sequence[Optional[int]]] = None) -> np.ndarray:
    """Read a gzip-compressed or plain IDX file of uint8 labels (0x0801) or images (0x0803).

    The header is checked before any payload is read: every dimension >= 1, at most 2 GiB in
    all, and ``shape`` if given (``None`` matches any size). Then exactly the declared number of
    bytes is streamed, so a gzip bomb costs no more memory than its header admits.

    >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz", shape=(None,)).shape
    (10000,)
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({e.strerror or e})") from e
    with f:
        try:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            return _read_idx_stream(gzip.GzipFile(fileobj=f, mode="rb") if gz else f, path, shape)
        except (OSError, EOFError, zlib.error) as e:
            if gz:
                raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from e
            raise DataError(f"{path}: cannot read IDX file ({e.strerror or e})") from e


def _read_upto(f: BinaryIO, n: int) -> bytearray:
    """``n`` bytes of ``f`` (fewer only where the stream ends), read in bounded chunks."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(_IDX_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _shape_str(shape: Sequence[Optional[int]]) -> str:
    dims = ["N" if d is None else str(d) for d in shape]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def _read_idx_stream(f: BinaryIO, path: Path, shape: Optional[Sequence[Optional[int]]]) -> np.ndarray:
    head = _read_upto(f, 4)
    if len(head) < 4:
        raise DataError(f"{path}: expected an IDX header of at least 4 bytes, got {len(head)} bytes")
    magic = int.from_bytes(head, "big")
    if magic not in _IDX_MAGIC:
        raise DataError(
            f"{path}: bad IDX magic 0x{magic:08x}, expected 0x00000801 (uint8 labels) "
            "or 0x00000803 (uint8 images)"
        )
    ndim = _IDX_MAGIC[magic]
    head += _read_upto(f, 4 * ndim)
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path}: expected a {4 + 4 * ndim}-byte IDX header, got {len(head)} bytes")
    dims = tuple(int.from_bytes(head[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    if min(dims) < 1:
        raise DataError(f"{path}: IDX header declares shape {dims}; every dimension must be >= 1")
    if shape is not None and (
        len(shape) != ndim or any(want is not None and want != d for want, d in zip(shape, dims))
    ):
        raise DataError(f"{path}: IDX header declares shape {dims}, expected {_shape_str(shape)}")
    expected = math.prod(dims)  # Python ints: absurd dims cannot overflow into a small size
    if expected > _IDX_MAX_BYTES:
        raise DataError(
            f"{path}: IDX header declares shape {dims} = {expected} bytes, more than the "
            f"{_IDX_MAX_BYTES} bytes an IDX file may hold"
        )
    payload = _read_upto(f, expected)
    if len(payload) < expected:
        raise DataError(
            f"{path}: IDX payload for shape {dims} should be {expected} bytes, got {len(payload)} "
            "bytes (truncated)"
        )
    if f.read(1):  # one byte is enough to know; a bomb's tail is never decompressed
        raise DataError(
            f"{path}: IDX payload for shape {dims} should be {expected} bytes, got more (trailing data)"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


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
    images = read_idx(img_path, shape=(None, 28, 28))
    labels = read_idx(lbl_path, shape=(len(images),))  # one label per image, checked from the header
    _check_labels(labels, 10, lbl_path)
    log.debug("read %d Fashion-MNIST examples from %s", len(labels), root)
    x = torch.from_numpy(images).unsqueeze(1)  # read_idx's array owns a writable buffer: no copy
    return x, torch.from_numpy(labels.astype(np.int64))


# ----------------------------------------------------------------------------- CIFAR


def _cifar_layout(num_classes: int, train: bool) -> tuple[str, list[str], bytes]:
    if num_classes == 10:
        files = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
        return "cifar-10-batches-py", files, b"labels"
    if num_classes == 100:
        return "cifar-100-python", ["train" if train else "test"], b"fine_labels"
    raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")


# The globals a CIFAR batch may name: numpy's array and dtype reconstructors. The real files are
# Python-2 pickles naming numpy.core; batches re-pickled by numpy 2 name numpy._core, and at
# protocol 5 numpy rebuilds arrays with _frombuffer; CIFAR-format files written by users may
# hold labels as numpy scalars (``scalar`` builds one from a dtype and raw bytes, nothing else).
_CIFAR_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})
#: dtype kinds an array in a data pickle may have: bool, integers, floats, complex, bytes, str
_PLAIN_KINDS = "biufcSU"


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`_CIFAR_GLOBALS`."""


class _RefusedData(pickle.UnpicklingError):
    """A pickle asked for an array whose data is not in the file (or of a dtype data never has)."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stands in for ``_codecs.encode``, which Python 3 pickles name for ``bytes`` at protocol 2."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"_codecs.encode with {type(text).__name__} and {encoding!r}")
    return text.encode("latin1")


class _NdarrayClass:
    """Stands in for ``numpy.ndarray`` in a data pickle: numpy names the class only to pass it to
    ``_reconstruct``; calling it would build an array of uninitialised memory from a shape alone."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _RefusedData("numpy.ndarray(...) called directly: an array with no data in the file")


_NDARRAY = _NdarrayClass()


def _plain_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind not in _PLAIN_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise _RefusedData(f"an array of dtype {dt}; data arrays hold plain numbers")
    return dt


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` for the one call numpy's own pickles make: an EMPTY array of class
    ndarray, which the pickle's state then fills (numpy checks there that the state's bytes are
    exactly shape x itemsize). Any other shape would be memory nobody wrote."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise _RefusedData(f"_reconstruct({type(subtype).__name__}, {shape!r}): an array with no data in the file")
    return np.ndarray((0,), np.uint8)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 reconstructor: the array's bytes are ``buf``, read from the file."""
    dt = _plain_dtype(dtype)
    if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)):
        raise _RefusedData(f"_frombuffer of a {type(buf).__name__}")
    arr = np.frombuffer(buf, dtype=dt)
    return arr.reshape(shape, order="F" if order == "F" else "C")


def _scalar(dtype: Any, data: Any = None) -> Any:
    """numpy's scalar reconstructor, for plain dtypes from the bytes in the file only (a Python 2
    pickle read with ``encoding="latin1"`` gives them as str)."""
    dt = _plain_dtype(dtype)
    raw = data.encode("latin1") if isinstance(data, str) else data
    if not isinstance(raw, bytes) or len(raw) != dt.itemsize:
        raise _RefusedData(f"a numpy scalar of {dt} from a {type(data).__name__} that is not its {dt.itemsize} bytes")
    return np.frombuffer(raw, dtype=dt, count=1)[0]


def _dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """numpy's dtype as a pickle builds it (``dtype('u1', False, True)``), plain kinds only."""
    return _plain_dtype(np.dtype(obj.decode("latin1") if isinstance(obj, bytes) else obj, bool(align), bool(copy)))


_SAFE = {"_reconstruct": _reconstruct, "_frombuffer": _frombuffer, "scalar": _scalar, "ndarray": _NDARRAY,
         "dtype": _dtype}


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds only what CIFAR batches hold: dict, list, bytes, str, int and numpy arrays.

    Those builtins need no global; any other global is refused when the pickle names it, before
    anything can call it, so a crafted file cannot run code. numpy's reconstructors are replaced by
    checked ones: an array is built only from bytes in the file (an empty array filled by its state,
    or a buffer), of a plain dtype; ``numpy.ndarray`` itself cannot be called.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return _SAFE[name]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise _RefusedGlobal(f"{module}.{name}")


def flat_labels(labels: Any, path: Path, key: Any) -> np.ndarray:
    """``labels`` (an array or a flat list of integers) as a numpy array, refused with one line otherwise.

    Checked before numpy sees it: a list of lists that a pickle built from references to one list
    would expand into an array of every element (a 240 KB file into 1 GB)."""
    if isinstance(labels, np.ndarray):
        return labels
    if not isinstance(labels, (list, tuple)):
        raise DataError(f"{path}: expected {key!r} to be a list of ints, got {type(labels).__name__}")
    odd = next((v for v in labels if not isinstance(v, (int, np.integer))), None)
    if odd is not None:
        raise DataError(f"{path}: expected {key!r} to be a list of ints, got a {type(labels).__name__} holding "
                        f"{type(odd).__name__}")
    try:
        return np.asarray(labels, dtype=np.int64)
    except OverflowError:
        raise DataError(f"{path}: expected {key!r} to be a list of ints, got one beyond 64 bits") from None


def _unpickle(path: Path) -> dict:
    # CIFAR ships as Python-2 pickles (str keys and pixel strings load as bytes).
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{path}: cannot read CIFAR batch ({e.strerror or e})") from e
    except _RefusedGlobal as e:
        raise DataError(
            f"{path}: refused to unpickle global {e}; a CIFAR batch holds only dicts, lists, "
            "bytes, str, int and numpy arrays"
        ) from e
    except _RefusedData as e:
        raise DataError(f"{path}: refused: {e}; a CIFAR batch holds numpy arrays of its own bytes") from e
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
        data = batch[b"data"]
        if not isinstance(data, np.ndarray):
            raise DataError(f"{path}: expected b'data' to be a numpy array, got {type(data).__name__}")
        labels = flat_labels(batch[label_key], path, label_key)
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
        _check_svhn_header(path, mat_variables(path))
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except DataError:
        raise
    except Exception as e:  # scipy raises ValueError, TypeError, OSError, ... on bad files
        raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables 'X' and 'y', got {sorted(k for k in mat if not k.startswith('__'))}")
    X, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    # The real files hold uint8 pixels; anything else (floats in [0, 1], NaN) is not SVHN and would
    # be silently mangled by a cast.
    if X.dtype != np.uint8 or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: expected uint8 X of shape (32, 32, 3, N), got {X.dtype} {X.shape}")
    n = X.shape[3]
    if n == 0:
        raise DataError(f"{path}: expected at least one example, got none")
    if y.size != n or y.ndim not in (1, 2):
        raise DataError(f"{path}: expected y of shape ({n}, 1), got {y.shape}")
    y = y.reshape(-1)
    if y.dtype.kind == "f":  # MATLAB may store labels as doubles: whole numbers only, never NaN
        bad = ~((y >= 1) & (y <= 10) & (y == np.round(y)))
        if bad.any():
            raise DataError(f"{path}: expected whole-number labels in 1..10, got {y[bad][0]} ({y.dtype})")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: expected integer labels y in 1..10, got {y.dtype}")
    y = y.astype(np.int64)
    lo, hi = int(y.min()), int(y.max())
    if lo < 1 or hi > 10:
        raise DataError(f"{path}: expected labels in 1..10 (10 = digit 0), got range {lo}..{hi}")
    y[y == 10] = 0
    x = np.ascontiguousarray(X.transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    log.debug("read %d SVHN examples from %s", n, path)
    return torch.from_numpy(x), torch.from_numpy(y)


#: MATLAB array classes (mxCLASS numbers) by the numpy dtype they hold, or what they are
_MAT_CLASSES = {1: "cell", 2: "struct", 3: "object", 4: "str", 5: "sparse", 6: "float64", 7: "float32", 8: "int8",
                9: "uint8", 10: "int16", 11: "uint16", 12: "int32", 13: "uint32", 14: "int64", 15: "uint64"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_MAT_HEAD = 1024  # bytes of a variable enough for its flags, dimensions and name


def mat_variables(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of every variable of a MATLAB 5 file, read from the variables'
    headers alone: at most ``_MAT_HEAD`` bytes of each compressed variable are inflated (unlike
    ``scipy.io.whosmat``, which inflates each variable whole to list it). ``dtype`` is a numpy
    dtype name (``uint8``, ``float64``) or the MATLAB class (``cell``, ``struct``, ...)."""
    with open(path, "rb") as f:
        head = f.read(128)
        if len(head) < 128 or head[126:128] not in (b"IM", b"MI"):
            raise DataError(f"{path}: not a MATLAB 5 file (no MATLAB header; v7.3/HDF5 files are not read)")
        e = "<" if head[126:128] == b"IM" else ">"
        out = []
        while tag := f.read(8):
            if len(tag) < 8:
                raise DataError(f"{path}: truncated MATLAB file (a variable's tag is cut)")
            outer, nbytes = struct.unpack(e + "II", tag)
            start, kind = f.tell(), outer
            if outer == _MI_COMPRESSED:
                body = _inflate_head(f, nbytes, path)
                kind, body = struct.unpack(e + "II", body[:8])[0], body[8:]
            else:
                body = f.read(min(nbytes, _MAT_HEAD))
            if kind != _MI_MATRIX:
                raise DataError(f"{path}: expected MATLAB arrays, got a data element of type {kind}")
            out.append(_mat_matrix_header(body, e, path))
            f.seek(start + (nbytes if outer == _MI_COMPRESSED else -(-nbytes // 8) * 8))
    return out


def _inflate_head(f: BinaryIO, nbytes: int, path: Path) -> bytes:
    """The first ``_MAT_HEAD`` bytes of the zlib stream of ``nbytes`` at ``f``'s position."""
    z, buf, left = zlib.decompressobj(), b"", nbytes
    try:
        while len(buf) < _MAT_HEAD and left > 0:
            chunk = f.read(min(4096, left))
            if not chunk:
                break
            left -= len(chunk)
            buf += z.decompress(chunk, _MAT_HEAD - len(buf))
    except zlib.error as e:
        raise DataError(f"{path}: damaged compressed MATLAB variable ({e})") from None
    if len(buf) < 16:
        raise DataError(f"{path}: damaged compressed MATLAB variable (no array header)")
    return buf


def _mat_element(buf: bytes, pos: int, e: str, path: Path) -> tuple[int, bytes, int]:
    """(type, data, next position) of the sub-element at ``pos`` (small elements: 4 bytes in the tag)."""
    if len(buf) < pos + 8:
        raise DataError(f"{path}: damaged MATLAB array header")
    first, nbytes = struct.unpack(e + "II", buf[pos : pos + 8])
    if first >> 16:  # small data element: type and size in the first 4 bytes, data in the next 4
        return first & 0xFFFF, buf[pos + 4 : pos + 4 + (first >> 16)], pos + 8
    return first, buf[pos + 8 : pos + 8 + nbytes], pos + 8 + -(-nbytes // 8) * 8


def _mat_matrix_header(body: bytes, e: str, path: Path) -> tuple[str, tuple[int, ...], str]:
    _, flags, pos = _mat_element(body, 0, e, path)
    _, dims, pos = _mat_element(body, pos, e, path)
    _, name, _ = _mat_element(body, pos, e, path)
    if len(flags) < 4 or len(dims) % 4:
        raise DataError(f"{path}: damaged MATLAB array header")
    word = struct.unpack(e + "I", flags[:4])[0]
    cls = "bool" if word & 0x200 else _MAT_CLASSES.get(word & 0xFF, f"class {word & 0xFF}")
    shape = struct.unpack(e + "i" * (len(dims) // 4), dims)
    if min(shape, default=0) < 0:
        raise DataError(f"{path}: damaged MATLAB array header (dimensions {shape})")
    return name.decode("latin1"), tuple(int(d) for d in shape), cls


#: MATLAB classes that hold no numbers
_MAT_NOT_NUMBERS = ("cell", "struct", "object", "str", "sparse")
#: the most a MATLAB file's declared arrays may exceed its size (its variables may be compressed):
#: SVHN's images compress about 1.3:1; a file declaring more is refused before anything is inflated
_MAT_MAX_RATIO = 100


def _check_svhn_header(path: Path, whos: Sequence[tuple[str, tuple[int, ...], str]]) -> None:
    """Refuse an SVHN file from its variable headers (:func:`mat_variables`), before loading: X must be uint8
    (32, 32, 3, N), y numeric with N entries, and N x 3072 bytes at most ``_MAT_MAX_RATIO`` times
    the file's size (a 0.9 MB file declaring 2 GB is refused before it is inflated)."""
    found = {name: (tuple(int(d) for d in shape), cls) for name, shape, cls in whos}
    if "X" not in found or "y" not in found:
        raise DataError(f"{path}: expected variables 'X' and 'y', got {sorted(found)}")
    (shape, cls), (yshape, ycls) = found["X"], found["y"]
    if cls != "uint8" or len(shape) != 4 or shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: expected uint8 X of shape (32, 32, 3, N), got {cls} {shape}")
    n = shape[3]
    if n == 0:
        raise DataError(f"{path}: expected at least one example, got none")
    if len(yshape) != 2 or sorted(yshape) != [1, n] or ycls in _MAT_NOT_NUMBERS:
        raise DataError(f"{path}: expected y of shape ({n}, 1), got {ycls} {yshape}")
    odd = next(((name, c) for name, (_, c) in found.items() if c in _MAT_NOT_NUMBERS or c.startswith("class")), None)
    if odd is not None:  # scipy reads past a variable by inflating it: every one must be sized
        raise DataError(f"{path}: holds {odd[1]} variable {odd[0]!r}; an SVHN file holds the arrays X and y")
    declared = sum(math.prod(s) * np.dtype(c).itemsize for s, c in found.values())
    size = path.stat().st_size
    if declared > _MAT_MAX_RATIO * size:
        raise DataError(f"{path}: refused: declares {n} images ({declared} bytes in all) in a {size}-byte file "
                        f"(above {_MAT_MAX_RATIO}:1): a decompression bomb, or not SVHN")


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size == 0:
        raise DataError(f"{path}: expected at least one example, got none")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: expected integer labels, got {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{path}: expected labels in 0..{num_classes - 1}, got range {lo}..{hi}")
