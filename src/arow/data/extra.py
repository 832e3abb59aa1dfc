"""Extra training data (generated or pseudo-labelled images) mixed into every training batch.

Two file layouts are read, both holding uint8 images N x H x W x C and one integer label each:

- ``.npz`` with arrays ``image`` and ``label`` (the ``cifar10_ddpm.npz`` / ``1m.npz`` layout of
  Wang et al. 2023, "Better diffusion models further improve adversarial training"; also what
  ``arow pseudo-label`` writes, with a ``confidence`` array that is ignored here);
- the RST pickle of Carmon et al. 2019 (``ti_500K_pseudo_labeled.pickle``): a dict with ``data``
  and ``extrapolated_targets``, read with a restricted unpickler that rebuilds numpy arrays and
  plain Python values only (any other global is refused before it can run).

Memory: images stay uint8 and become float per batch only. An ``.npz`` whose ``image`` member is
stored uncompressed (what ``np.savez`` writes) is memory-mapped: the pages of the file are read on
demand and shared by every process on the machine, so a 1M-image 32x32x3 file (1M x 3072 bytes =
3.07 GB) costs no resident memory up front. A compressed ``.npz`` (``np.savez_compressed``) is
inflated in chunks into ONE preallocated uint8 array: 3.07 GB for 1M images, plus a 16 MiB chunk;
a member declaring more than ``MAX_COMPRESSION_RATIO`` (100) times its compressed size (images
compress 2-5:1) is refused before anything is inflated. A pickle's arrays are built only from the
bytes in the file, and its labels only from an array or a flat list of integers.
An RST pickle is loaded whole: numpy keeps the pickle's raw bytes as the array's buffer, so 500K
images need their 1.54 GB once (about 1x for protocol 3 or later; a protocol-2 pickle needs about
4.5x while it loads).
Labels are held as int64 (8 bytes per image).

:class:`MixedLoader` builds the batches: each global batch holds ``round(fraction * batch)``
extra examples and the rest real ones (see its docstring for the epoch and DDP rules).
"""
from __future__ import annotations

import logging
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from .loader import ExtraFeed, Loader, check_loader_args, hflip, in_layout, random_crop
from .readers import DataError, _CifarUnpickler, _RefusedData, _RefusedGlobal, flat_labels

if TYPE_CHECKING:
    from ..config.schema import TrainConfig
    from . import TensorData

log = logging.getLogger(__name__)
PathLike = Union[str, Path]
ImageShape = Optional[Sequence[int]]  # (H, W, C) the images must have; None accepts any

_CHUNK = 1 << 24  # bytes inflated at a time from a compressed .npz member
#: the most a compressed .npz member may inflate, relative to its compressed size: images compress
#: 2-5:1, an array of zeros 1000:1; above this cap the file is refused before anything is inflated
MAX_COMPRESSION_RATIO = 100
_RATIO_FLOOR = 1 << 24  # members inflating to less than 16 MiB are never refused by the ratio
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = 30  # bytes of a zip local file header before the name and extra field
_RST_KEYS = ("data", "extrapolated_targets")
_NPZ_KEYS = ("image", "label")

__all__ = ["ExtraData", "MixedLoader", "kept_indices", "labelled_positions", "load_extra", "read_extra",
           "read_npz", "read_rst_pickle", "train_loader"]


# ----------------------------------------------------------------------------- readers
def _expect_images(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, image_shape: ImageShape) -> None:
    want = "(N, H, W, C)" if image_shape is None else f"(N, {', '.join(str(int(d)) for d in image_shape)})"
    ok = dtype == np.uint8 and len(shape) == 4 and shape[0] >= 1
    if ok and image_shape is not None:
        ok = tuple(shape[1:]) == tuple(int(d) for d in image_shape)
    if not ok:
        raise DataError(f"{path}: expected {key!r} uint8 images of shape {want} matching the training data, "
                        f"got {dtype} {tuple(shape)}")


def _check_extra_labels(path: Path, key: str, labels: Any, n: int, num_classes: int) -> np.ndarray:
    """``labels`` as int64, checked: one integer per image, in ``0..num_classes-1``."""
    arr = flat_labels(labels, path, key)
    if arr.dtype.kind not in "iu":
        raise DataError(f"{path}: expected {key!r} to be integer labels, got {arr.dtype}")
    if arr.shape != (n,):
        raise DataError(f"{path}: expected {key!r} of shape ({n},), one label per image, got {arr.shape}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{path}: expected {key!r} in 0..{num_classes - 1} (the classes of the training data), "
                        f"got range {lo}..{hi}")
    return arr.astype(np.int64)


def _npy_header(f: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, header bytes) of the .npy stream ``f``, read without its data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise DataError(f"{where}: .npy format version {version[0]}.{version[1]} is not supported (1.0, 2.0)")
    except (ValueError, EOFError, OSError, zlib.error, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: not a valid .npy array ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype), f.tell()


def _check_sizes(path: Path, key: str, info: zipfile.ZipInfo) -> None:
    """Refuse a member whose declared sizes the file cannot back, before anything is inflated: more
    compressed bytes than the file holds, or an inflated size above ``MAX_COMPRESSION_RATIO`` times
    the compressed one (a zip bomb: 0.95 MB declaring 1.2 GB)."""
    on_disk = path.stat().st_size
    if info.compress_size > on_disk:
        raise DataError(f"{path}: {key!r} declares {info.compress_size} compressed bytes, more than the "
                        f"{on_disk}-byte file holds (truncated or damaged)")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _RATIO_FLOOR \
            and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1):
        raise DataError(f"{path}: refused: {key!r} declares {info.file_size} bytes from {info.compress_size} "
                        f"compressed ({info.file_size / max(info.compress_size, 1):.0f}:1, above "
                        f"{MAX_COMPRESSION_RATIO}:1): a decompression bomb, or not image data")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise DataError(f"{path}: {key!r} is stored uncompressed but declares {info.file_size} bytes in "
                        f"{info.compress_size} (damaged)")


def _member(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[zipfile.ZipInfo, tuple[int, ...], bool, np.dtype, int]:
    info = zf.getinfo(f"{key}.npy")
    if info.flag_bits & 0x1:
        raise DataError(f"{path}: {key!r} is encrypted; expected a plain .npz")
    _check_sizes(path, key, info)
    with zf.open(info) as f:
        shape, fortran, dtype, header = _npy_header(f, f"{path}: {key!r}")
    if dtype.hasobject:
        raise DataError(f"{path}: {key!r} holds Python objects ({dtype}); expected plain numbers")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != header + nbytes:
        raise DataError(f"{path}: {key!r} declares {dtype} {shape} = {nbytes} bytes, but the member holds "
                        f"{info.file_size - header} (truncated or damaged)")
    if fortran and len(shape) > 1:
        raise DataError(f"{path}: {key!r} is stored in Fortran order; expected a C-ordered array")
    return info, shape, fortran, dtype, header


def _read_member_into(zf: zipfile.ZipFile, info: zipfile.ZipInfo, header: int, out: np.ndarray, path: Path) -> None:
    """Inflate the data of a member into the preallocated ``out``, ``_CHUNK`` bytes at a time."""
    flat = memoryview(out.reshape(-1).view(np.uint8))
    n, pos = len(flat), 0
    try:
        with zf.open(info) as f:
            f.read(header)
            while pos < n:
                chunk = f.read(min(_CHUNK, n - pos))
                if not chunk:
                    raise DataError(f"{path}: {info.filename} ends after {pos} of {n} bytes (truncated)")
                flat[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read {info.filename} ({str(e) or type(e).__name__})") from None


def _memmap_member(path: Path, info: zipfile.ZipInfo, header: int, shape: tuple[int, ...]) -> np.memmap:
    """The stored (uncompressed) member's array, memory-mapped read-only from the .npz file itself."""
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(_LOCAL_HEADER)
    if len(local) < _LOCAL_HEADER or local[:4] != _ZIP_MAGIC:
        raise DataError(f"{path}: damaged zip entry for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    offset = info.header_offset + _LOCAL_HEADER + name_len + extra_len + header
    try:
        return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
    except (ValueError, OSError) as e:  # the file ends before the array does
        raise DataError(f"{path}: cannot map {info.filename} ({e}; truncated?)") from None


def _read_npz_members(zf: zipfile.ZipFile, path: Path, num_classes: int, image_shape: ImageShape,
                      labels: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The checked arrays of an open .npz (see :func:`read_npz`)."""
    names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    needed = _NPZ_KEYS if labels else _NPZ_KEYS[:1]
    missing = [k for k in needed if k not in names]
    if missing:
        raise DataError(f"{path}: expected arrays {' and '.join(map(repr, needed))}, missing "
                        f"{', '.join(map(repr, missing))} (has {', '.join(map(repr, sorted(names))) or 'none'})")
    info, shape, _, dtype, header = _member(zf, "image", path)
    _expect_images(path, "image", shape, dtype, image_shape)
    y = None
    if labels:
        linfo, lshape, _, ldtype, lheader = _member(zf, "label", path)
        if ldtype.kind not in "iu" or lshape != (shape[0],):
            raise DataError(f"{path}: expected 'label' integer labels of shape ({shape[0]},), one per image, "
                            f"got {ldtype} {lshape}")
        raw = np.empty(lshape, ldtype)
        _read_member_into(zf, linfo, lheader, raw, path)
        y = _check_extra_labels(path, "label", raw, shape[0], num_classes)
    if info.compress_type == zipfile.ZIP_STORED:
        x: np.ndarray = _memmap_member(path, info, header, shape)
    else:
        x = np.empty(shape, np.uint8)
        _read_member_into(zf, info, header, x, path)
    return x, y


def read_npz(path: PathLike, num_classes: int, image_shape: ImageShape = None, *,
             labels: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Images (uint8 N x H x W x C) and labels (int64 N) of an ``.npz`` with ``image`` and ``label``.

    A stored (uncompressed) ``image`` member is returned as a read-only ``np.memmap`` of the file
    (no copy); a compressed one is inflated into one preallocated array. ``labels=False`` reads
    the images only (``label`` may then be missing; ``None`` is returned for it). Anything else
    than the layout above raises :class:`DataError` naming the file and what was expected.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise DataError(f"{path}: not an .npz (zip) file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        with zf:
            return _read_npz_members(zf, path, num_classes, image_shape, labels)
    except DataError:
        raise
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, MemoryError, struct.error, zlib.error,
            zipfile.BadZipFile) as e:  # a damaged zip raises any of these, from zipfile or numpy
        raise DataError(f"{path}: damaged .npz ({type(e).__name__}: {str(e)[:200]})") from None


def read_rst_pickle(path: PathLike, num_classes: int, image_shape: ImageShape = None, *,
                    labels: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Images and labels of an RST pickle (Carmon et al. 2019): a dict with ``data`` (uint8
    N x 32 x 32 x 3) and ``extrapolated_targets`` (N integers).

    Read with a restricted unpickler: numpy arrays, dicts, lists, str, bytes and numbers only; a
    pickle naming any other global is refused before anything in it runs.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except _RefusedGlobal as e:
        raise DataError(f"{path}: refused to unpickle global {e}; an RST pickle holds only a dict of numpy "
                        "arrays, str and numbers") from None
    except _RefusedData as e:
        raise DataError(f"{path}: refused: {e}; an RST pickle holds numpy arrays of its own bytes") from None
    except Exception as e:  # pickle raises many types on bad input
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict with 'data' and 'extrapolated_targets', "
                        f"got {type(obj).__name__}")
    obj = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    needed = _RST_KEYS if labels else _RST_KEYS[:1]
    missing = [k for k in needed if k not in obj]
    if missing:
        raise DataError(f"{path}: expected keys {' and '.join(map(repr, needed))}, missing "
                        f"{', '.join(map(repr, missing))}")
    data = obj["data"]
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: expected 'data' to be a numpy array, got {type(data).__name__}")
    _expect_images(path, "data", data.shape, data.dtype, image_shape)
    if not data.flags.c_contiguous:
        raise DataError(f"{path}: expected 'data' as a C-ordered array")
    y = _check_extra_labels(path, "extrapolated_targets", obj["extrapolated_targets"], len(data), num_classes) \
        if labels else None
    return data, y


def read_extra(path: PathLike, num_classes: int, image_shape: ImageShape = None, *,
               labels: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an extra-data file of either layout (told apart by its first bytes, not its name)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"extra data file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        return read_npz(path, num_classes, image_shape, labels=labels)
    if head[:1] == b"\x80":  # pickle protocol >= 2
        return read_rst_pickle(path, num_classes, image_shape, labels=labels)
    raise DataError(f"{path}: expected an .npz with 'image' and 'label' or an RST pickle with 'data' and "
                    f"'extrapolated_targets', got neither (first bytes {head!r})")


# ----------------------------------------------------------------------------- the data set
@dataclass
class ExtraData:
    """Extra images (uint8 N x H x W x C, one array per file, memory-mapped where the file allows)
    and their labels (int64, all files in order).

    >>> extra = ExtraData([np.zeros((3, 4, 4, 1), np.uint8)], np.array([0, 1, 1]))
    >>> len(extra), extra.batch(np.array([2, 0]))[1].tolist()
    (3, [1, 0])
    """

    parts: list[np.ndarray]
    labels: np.ndarray
    files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])
        if self._starts[-1] != len(self.labels):
            raise ValueError(f"{self._starts[-1]} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of every image."""
        return tuple(self.parts[0].shape[1:])

    @property
    def memory_mapped(self) -> bool:
        return all(isinstance(p, np.memmap) for p in self.parts)

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.parts))

    def take(self, n: int) -> "ExtraData":
        """The first ``n`` examples (views, no copy)."""
        parts, left = [], int(n)
        for p in self.parts:
            if left <= 0:
                break
            parts.append(p[:left])
            left -= len(parts[-1])
        return ExtraData(parts, self.labels[:n], list(self.files))

    def images(self, idx: np.ndarray) -> np.ndarray:
        """The images at positions ``idx``, gathered into a new uint8 array (len(idx), H, W, C)."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.parts) == 1:
            return np.ascontiguousarray(self.parts[0][idx])
        out = np.empty((len(idx),) + self.image_shape, np.uint8)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for j, part in enumerate(self.parts):
            m = which == j
            if m.any():
                out[m] = part[idx[m] - self._starts[j]]
        return out

    def batch(self, idx: np.ndarray, device: Union[str, torch.device] = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Images at ``idx`` as float32 (len(idx), C, H, W) in [0, 1] on ``device``, and their labels."""
        x = torch.from_numpy(self.images(idx)).to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        y = torch.from_numpy(self.labels[np.asarray(idx, dtype=np.int64)]).to(device, non_blocking=True)
        return x, y


def load_extra(paths: Sequence[PathLike], num_classes: int, image_shape: ImageShape = None,
               take: Optional[int] = None) -> ExtraData:
    """Read every file of ``paths`` (either layout) and keep the first ``take`` examples in all.

    ``image_shape`` (H, W, C) must match the real training images; labels must lie in
    ``0..num_classes-1``. See the module docstring for the memory each layout needs.
    """
    if not paths:
        raise ValueError("no extra data files given")
    parts, labels = [], []
    for p in paths:
        x, y = read_extra(p, num_classes, image_shape)
        if parts and x.shape[1:] != parts[0].shape[1:]:
            raise DataError(f"{p}: images of shape {x.shape[1:]} differ from {paths[0]}'s {parts[0].shape[1:]}")
        parts.append(x)
        labels.append(y)
    extra = ExtraData(parts, np.concatenate(labels), [str(p) for p in paths])
    if take is not None:
        if take < 1:
            raise ValueError(f"--extra-take must be >= 1, got {take}")
        if take > len(extra):
            log.warning("--extra-take %d: the extra data holds only %d examples; using all", take, len(extra))
        extra = extra.take(take)
    counts = np.bincount(extra.labels, minlength=num_classes)
    if len(extra) >= 10 * num_classes and (counts == 0).any():
        log.warning("extra data: no example of class(es) %s among the %d used (a file sorted by class, cut by "
                    "--extra-take?)", ", ".join(map(str, np.flatnonzero(counts == 0))), len(extra))
    log.info("extra data: %d examples of shape %s from %s, %.2f GB as uint8, %s", len(extra), extra.image_shape,
             ", ".join(map(str, paths)), extra.nbytes / 1e9,
             "memory-mapped" if extra.memory_mapped else "in memory")
    return extra


# ----------------------------------------------------------------------------- labels kept
def kept_indices(spec: Union[str, int], labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """Sorted positions of the real training examples whose labels are kept (``--labels-kept``).

    ``spec`` is a number N (N examples drawn by ``seed``, balanced over the classes: round robin
    over the classes in a seeded random order) or the path of a file of positions (``.txt``:
    whitespace-separated integers; ``.npy``: a 1-D integer array), e.g. the 4,000 indices of a
    published semi-supervised split.

    >>> kept_indices("4", torch.tensor([0, 0, 1, 1, 0, 1]), 2, seed=0).tolist()  # doctest: +SKIP
    [0, 2, 4, 5]
    """
    n = len(labels)
    text = str(spec).strip()
    if text.isdigit():
        k = int(text)
        if not 1 <= k <= n:
            raise DataError(f"--labels-kept {k}: must be in 1..{n}, the number of real training examples")
        g = torch.Generator().manual_seed(_seed(seed, 0, 4))
        perm = torch.randperm(n, generator=g)
        cls = labels.cpu()[perm]
        rank = torch.empty(n, dtype=torch.long)
        for c in range(num_classes):
            m = cls == c
            rank[m] = torch.arange(int(m.sum()))
        order = torch.argsort(rank * n + torch.arange(n))  # by rank within the class, then drawn order
        return perm[order[:k]].sort().values
    path = Path(text).expanduser()
    if path.suffix not in (".txt", ".npy"):
        raise DataError(f"--labels-kept must be a number or an index file (.txt, .npy), got {text!r}")
    try:
        idx = np.load(path, allow_pickle=False) if path.suffix == ".npy" else \
            np.array(path.read_text().split(), dtype=np.int64)
    except OverflowError:
        big = next((t for t in path.read_text().split() if t.lstrip("+-").isdigit() and abs(int(t)) >= 2 ** 63), "?")
        raise DataError(f"{path}: position {big[:30]} is beyond 64-bit integers; positions must be in "
                        f"0..{n - 1} (the real training examples)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the kept positions ({str(e).splitlines()[0] if str(e) else e})") from None
    idx = np.asarray(idx)
    if idx.ndim != 1 or idx.dtype.kind not in "iu" or len(idx) == 0:
        raise DataError(f"{path}: expected a 1-D list of integer positions, got {idx.dtype} {idx.shape}")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise DataError(f"{path}: positions must be in 0..{n - 1} (the real training examples), "
                        f"got {int(idx.min())}..{int(idx.max())}")
    if len(np.unique(idx)) != len(idx):
        raise DataError(f"{path}: a position appears twice")
    return torch.from_numpy(np.sort(idx).astype(np.int64))


def labelled_positions(cfg: "TrainConfig", labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Positions in a dataset's training split that a run with ``cfg`` used as labelled data
    (its validation split included): ``--limit-train`` first, then ``--labels-kept``."""
    n = len(labels) if cfg.limit_train is None else min(cfg.limit_train, len(labels))
    if cfg.labels_kept is None:
        return torch.arange(n)
    return kept_indices(cfg.labels_kept, labels[:n], num_classes, cfg.seed)


# ----------------------------------------------------------------------------- batches
def _seed(seed: int, index: int, stream: int) -> int:
    """A well-mixed 64-bit seed for one random stream (real order, extra draws, augmentation)."""
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, np.uint64)[0])


class MixedLoader:
    """Batches of real and extra examples in a fixed proportion, for one DDP rank.

    Every GLOBAL batch of ``batch_size`` rows holds ``E = round(fraction * batch_size)`` extra
    examples and ``R = batch_size - E`` real ones, in every batch of every epoch. Row ``k`` is an
    extra example when ``floor((k+1) E / B) > floor(k E / B)``: the two kinds are interleaved
    evenly, so rank ``r``'s rows ``[r b, (r+1) b)`` (``b = B / world_size``) hold ``E / world_size``
    extra examples (exactly when ``world_size`` divides ``E``, else within one), and a DDP run sees
    per step exactly the global batch of a 1-process run, only split.

    Real examples come from an endless stream of seeded permutations of the real set (pass ``p``
    drawn from ``(seed, p)``); epoch ``e`` takes the next ``steps * R`` of them, so every real example
    is used equally often and no batch is ever short. Extra examples are drawn uniformly with
    replacement from ``(seed, epoch)``, as the ARoW authors' sampler does. Crop offsets and flips are
    drawn from ``(seed, epoch)`` for every row and applied to both kinds alike. Nothing depends on
    earlier epochs, so a resumed run repeats an interrupted epoch bit for bit. Where the extra images are
    kept on CUDA: :class:`~arow.data.loader.ExtraFeed`; ``memory_format``: as :class:`~arow.data.Loader`'s.

    An epoch has ``epoch_batches`` batches, by default ``ceil(n_real / batch_size)``: as many as an
    epoch without extra data, as in the authors' script (``ceil(50000 / batch)``), so adding extra
    data keeps the cost and the learning-rate schedule of an epoch.

    >>> from arow.data import from_tensors
    >>> real = from_tensors(torch.rand(10, 1, 4, 4), torch.arange(10) % 2)
    >>> extra = ExtraData([np.zeros((6, 4, 4, 1), np.uint8)], np.arange(6) % 2)
    >>> loader = MixedLoader(real, extra, 5, fraction=0.6, augment="flip", seed=0)
    >>> len(loader), loader.extra_per_batch, [len(y) for _, y in loader]
    (2, 3, [5, 5])
    """

    def __init__(
        self,
        data: "TensorData",
        extra: ExtraData,
        batch_size: int,
        *,
        fraction: float,
        augment: str,
        seed: int,
        epoch_batches: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 4,
    ) -> None:
        check_loader_args(batch_size, augment=augment, rank=rank, world_size=world_size)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"--extra-fraction must be in [0, 1), got {fraction}")
        if len(data) == 0 or len(extra) == 0:
            raise ValueError("cannot mix an empty data set")
        n_extra = math.floor(fraction * batch_size + 0.5)
        if n_extra >= batch_size:
            raise ValueError(f"--extra-fraction {fraction} of a batch of {batch_size} leaves no real example; "
                             f"use a larger --batch-size or a smaller fraction")
        if tuple(data.x.shape[1:]) != (extra.image_shape[2],) + extra.image_shape[:2]:
            raise ValueError(f"extra images {extra.image_shape} (H, W, C) do not match the real images "
                             f"{tuple(data.x.shape[1:])} (C, H, W)")
        if epoch_batches is not None and epoch_batches < 1:
            raise ValueError(f"--epoch-batches must be >= 1, got {epoch_batches}")
        self.data, self.extra, self.feed = data, extra, ExtraFeed(extra, data.x.device)
        self.batch_size, self.augment, self.seed, self.pad = batch_size, augment, seed, pad
        self.rank, self.world_size = rank, world_size
        self.extra_per_batch, self.real_per_batch = n_extra, batch_size - n_extra
        self.steps = epoch_batches if epoch_batches is not None else -(-len(data) // batch_size)
        self.epoch, self.memory_format = 0, None  # memory_format: Optional[torch.memory_format]
        b = batch_size // world_size
        rows = torch.arange(rank * b, (rank + 1) * b)
        before = rows * n_extra // batch_size  # extra rows before row k of the global batch
        self._is_extra = (rows + 1) * n_extra // batch_size > before
        self._extra_slot = before[self._is_extra]  # position among the batch's extra rows
        self._real_slot = (rows - before)[~self._is_extra]  # position among its real rows
        self._rows = rows

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps

    def epoch_counts(self) -> dict[str, int]:
        """Real and extra examples of one epoch over all ranks (``train_real``, ``train_extra``)."""
        return {"train_real": self.steps * self.real_per_batch, "train_extra": self.steps * self.extra_per_batch}

    def _real_order(self) -> torch.Tensor:
        """Positions in the real set of this epoch's ``steps * R`` real examples."""
        n, need = len(self.data), self.steps * self.real_per_batch
        lo = self.epoch * need
        chunks, p = [], lo // n
        while p * n < lo + need:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.seed, p, 1)))
            chunks.append(perm[max(lo - p * n, 0) : lo + need - p * n])
            p += 1
        return torch.cat(chunks)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        real = self._real_order()
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, 2))
        extra = torch.randint(len(self.extra), (self.steps * self.extra_per_batch,), generator=g)
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, 3))
        slots = self.steps * self.batch_size
        offsets = torch.randint(0, 2 * self.pad + 1, (slots, 2), generator=g) \
            if "crop" in self.augment and self.pad > 0 else None
        flips = torch.rand(slots, generator=g) < 0.5 if "flip" in self.augment else None
        return real, extra, offsets, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        real, extra, offsets, flips = self._draw()
        dev = self.data.x.device
        real = real.to(dev)
        R, E, B = self.real_per_batch, self.extra_per_batch, self.batch_size
        is_extra = self._is_extra.to(dev)
        real_rows, extra_rows = (~is_extra).nonzero().squeeze(1), is_extra.nonzero().squeeze(1)
        real_slot, rows = self._real_slot.to(dev), self._rows.to(dev)
        offsets = offsets.to(dev) if offsets is not None else None  # the epoch's draws: one copy to the device
        flips = flips.to(dev) if flips is not None else None
        extra_batches = self.feed.batches(extra, self._extra_slot, E)  # the extra images: see ExtraFeed
        for step in range(self.steps):
            idx = real[step * R + real_slot]
            x = torch.empty((len(self._rows),) + tuple(self.data.x.shape[1:]), dtype=self.data.x.dtype, device=dev)
            y = torch.empty(len(self._rows), dtype=torch.long, device=dev)
            x[real_rows], y[real_rows] = self.data.x[idx], self.data.y[idx]
            if len(extra_rows):
                ex, ey = next(extra_batches)
                x[extra_rows], y[extra_rows] = ex.to(x.dtype), ey
            slot = step * B + rows
            if offsets is not None:
                x = random_crop(x, offsets[slot], self.pad)
            if flips is not None:
                x = hflip(x, flips[slot])
            yield in_layout(x, self.memory_format), y


def train_loader(cfg: "TrainConfig", data: "TensorData", extra: Optional[ExtraData] = None, *,
                 rank: int = 0, world_size: int = 1) -> Union["Loader", MixedLoader]:
    """The Trainer's batches: a :class:`~arow.data.Loader` of ``data``, or a :class:`MixedLoader`
    when ``cfg.extra_data`` is set (``extra`` if given, else read from those files)."""
    if extra is None and cfg.extra_data:
        c, h, w = data.x.shape[1:]
        extra = load_extra(cfg.extra_data, data.num_classes, (h, w, c), take=cfg.extra_take)
    augment = cfg.augment or "none"
    if extra is None:
        return Loader(data, cfg.batch_size, shuffle=True, augment=augment, seed=cfg.seed, drop_last=False,
                      rank=rank, world_size=world_size)
    return MixedLoader(data, extra, cfg.batch_size, fraction=cfg.extra_fraction, augment=augment, seed=cfg.seed,
                       epoch_batches=cfg.epoch_batches, rank=rank, world_size=world_size)
