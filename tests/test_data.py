"""Readers on small files in the real formats, splitting, and the DDP-consistent Loader."""
from __future__ import annotations

import builtins
import gzip
import os
import pickle
import struct
import subprocess
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arow.data import (
    DATASETS,
    DataError,
    Loader,
    TensorData,
    batches,
    from_tensors,
    hflip,
    load_cifar,
    load_dataset,
    load_fashion_mnist,
    load_svhn,
    random_crop,
    read_idx,
    train_val_split,
)
from arow.data.readers import FASHION_MNIST_ROOT

# ----------------------------------------------------------------------------- writers


def write_idx(path: Path, arr: np.ndarray, compress: bool = True, cut: int = 0) -> Path:
    magic = {1: 0x0801, 3: 0x0803}[arr.ndim]
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fmnist(root: Path, n_train: int = 12, n_test: int = 5, compress: bool = True) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        sfx = ".gz" if compress else ""
        write_idx(root / f"{split}-images-idx3-ubyte{sfx}", x, compress)
        write_idx(root / f"{split}-labels-idx1-ubyte{sfx}", y, compress)
        out[split] = (x, y)
    return out


def write_cifar(folder: Path, num_classes: int, n: int = 6) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    if num_classes == 10:
        names, key = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"], b"labels"
    else:
        names, key = ["train", "test"], b"fine_labels"
    out = {}
    for name in names:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, f)
        out[name] = (data, labels)
    return out


def py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2 wrote the CIFAR files: protocol 2, str as bytes, numpy.core."""
    def emit(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(emit(k) + emit(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(map(emit, o)) + b"e"
        if isinstance(o, tuple):
            return b"(" + b"".join(map(emit, o)) + b"t"
        if isinstance(o, bytes):
            return b"T" + struct.pack("<I", len(o)) + o
        if isinstance(o, bool):
            return b"\x88" if o else b"\x89"
        if isinstance(o, int):
            return b"J" + struct.pack("<i", o)
        if o is None:
            return b"N"
        if isinstance(o, np.ndarray):
            dt = o.dtype
            dtype = (b"cnumpy\ndtype\n" + emit((dt.str[1:].encode(), 0, 1)) + b"R"
                     + emit((3, dt.byteorder.replace("=", "<").encode(), None, None, None, -1, -1, 0)) + b"b")
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + emit(((0,), b"b"))[1:-1]
                    + b"\x87R(" + emit(1) + emit(tuple(o.shape)) + dtype + emit(False)
                    + emit(o.tobytes()) + b"tb")
        raise TypeError(type(o))
    return b"\x80\x02" + emit(obj) + b"."


def gzip_zeros(header: bytes, n_zeros: int) -> bytes:
    """A gzip stream of ``header`` and ``n_zeros`` zero bytes, built without holding them all."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    out = [z.compress(header)]
    for lo in range(0, n_zeros, len(chunk)):
        out.append(z.compress(chunk[: min(len(chunk), n_zeros - lo)]))
    return b"".join(out) + z.flush()


def write_svhn(root: Path, n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    rng = np.random.default_rng(2)
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10
    for name in ("train_32x32.mat", "test_32x32.mat"):
        scipy.io.savemat(root / name, {"X": X, "y": y})
    return X, y


# ----------------------------------------------------------------------------- IDX / F-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reader_roundtrip(tmp_path, compress):
    ref = write_fmnist(tmp_path, compress=compress)
    for train, key in ((True, "train"), (False, "t10k")):
        x, y = load_fashion_mnist(tmp_path, train=train)
        assert x.dtype == torch.uint8 and x.shape == (len(ref[key][0]), 1, 28, 28)
        assert y.dtype == torch.int64
        assert np.array_equal(x[:, 0].numpy(), ref[key][0])
        assert np.array_equal(y.numpy(), ref[key][1])


def test_read_idx_truncated_names_file_and_sizes(tmp_path):
    p = write_idx(tmp_path / "t.gz", np.zeros((3, 28, 28), np.uint8), cut=10)
    with pytest.raises(DataError, match=r"t\.gz.*2352 bytes, got 2342 bytes"):
        read_idx(p)


def test_read_idx_bad_magic_and_broken_gzip(tmp_path):
    p = tmp_path / "bad.gz"
    p.write_bytes(gzip.compress(struct.pack(">II", 0x0802, 3) + b"abc"))
    with pytest.raises(DataError, match="bad.gz.*magic"):
        read_idx(p)
    q = tmp_path / "cut.gz"
    q.write_bytes(gzip.compress(b"\x00" * 1000)[:20])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(q)


def idx_header(magic: int, *dims: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("dims,expect,match", [
    ((0xFFFFFFFF,) * 3, None, r"shape \(4294967295, 4294967295, 4294967295\) = \d+ bytes, more than"),
    ((3_000_000, 28, 28), (None, 28, 28), r"shape \(3000000, 28, 28\) = 2352000000 bytes, more than the 2147483648 bytes"),
    ((0, 28, 28), None, r"shape \(0, 28, 28\); every dimension must be >= 1"),
    ((2, 29, 29), (None, 28, 28), r"shape \(2, 29, 29\), expected \(N, 28, 28\)"),
    ((5,), (None, 28, 28), r"shape \(5,\), expected \(N, 28, 28\)"),
])
def test_read_idx_refuses_absurd_headers(tmp_path, dims, expect, match):
    p = tmp_path / "h.gz"
    p.write_bytes(gzip.compress(idx_header(0x0800 + len(dims), *dims)))
    with pytest.raises(DataError, match=r"h\.gz: IDX header declares " + match) as e:
        read_idx(p, shape=expect)
    assert "\n" not in str(e.value)


def test_gzip_bomb_refused_from_header_without_decompressing(tmp_path):
    # 64 MB of zeros behind a header that promises 2.35 GB: refused from the header alone.
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip_zeros(idx_header(0x0803, 3_000_000, 28, 28), 64 << 20))
    assert p.stat().st_size < 1 << 20
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: IDX header declares.*more than"):
            read_idx(p, shape=(None, 28, 28))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("kind", ["gzip-zeros", "gzip-second-member", "plain"])
def test_idx_stream_longer_than_header_is_refused_while_streaming(tmp_path, kind):
    header, payload = idx_header(0x0803, 2, 28, 28), bytes(2 * 28 * 28)
    p = tmp_path / ("x.gz" if kind != "plain" else "x")
    if kind == "gzip-zeros":  # 64 MB more than declared: never decompressed past one byte
        p.write_bytes(gzip_zeros(header, len(payload) + (64 << 20)))
    elif kind == "gzip-second-member":
        p.write_bytes(gzip.compress(header + payload) + gzip.compress(b"\x01"))
    else:
        p.write_bytes(header + payload + b"\x00")
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"x(\.gz)?: IDX payload for shape \(2, 28, 28\) should be "
                                            r"1568 bytes, got more \(trailing data\)"):
            read_idx(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    p.write_bytes(gzip.compress(header + payload) if kind != "plain" else header + payload)
    assert read_idx(p, shape=(None, 28, 28)).shape == (2, 28, 28)


def test_fashion_mnist_label_header_must_match_image_count(tmp_path):
    write_fmnist(tmp_path)
    # Declares 10**9 labels for 12 images: refused from the header, before 1 GB is read.
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip_zeros(idx_header(0x0801, 10**9), 1 << 20))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: .*\(1000000000,\), expected \(12,\)"):
        load_fashion_mnist(tmp_path, train=True)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        load_fashion_mnist(tmp_path / "nowhere", train=True)
    write_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, train=False)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    write_fmnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="train-labels"):
        load_fashion_mnist(tmp_path, train=True)


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.x.shape[1:] == (1, 28, 28) and train.x.dtype == torch.float32
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert sorted(train.y.unique().tolist()) == list(range(10))
    assert torch.bincount(test.y).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- CIFAR / SVHN


@pytest.mark.parametrize("num_classes,sub", [(10, "cifar-10-batches-py"), (100, "cifar-100-python")])
@pytest.mark.parametrize("point_at_batches", [False, True])
def test_cifar_reader(tmp_path, num_classes, sub, point_at_batches):
    ref = write_cifar(tmp_path / sub, num_classes)
    root = tmp_path / sub if point_at_batches else tmp_path
    x, y = load_cifar(root, train=True, num_classes=num_classes)
    train_names = [f"data_batch_{k}" for k in range(1, 6)] if num_classes == 10 else ["train"]
    assert x.shape == (6 * len(train_names), 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64
    data0, labels0 = ref[train_names[0]]
    assert np.array_equal(x[0].numpy(), data0[0].reshape(3, 32, 32))
    assert y[: len(labels0)].tolist() == labels0
    xt, _ = load_cifar(root, train=False, num_classes=num_classes)
    assert xt.shape == (6, 3, 32, 32)


def test_cifar_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_cifar(None, train=True)
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar(tmp_path, train=True)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10)
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(tmp_path, train=True)
    full = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="test_batch"):
        load_cifar(tmp_path, train=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"test_batch.*\(N, 3072\)"):
        load_cifar(tmp_path, train=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(DataError, match=r"test_batch.*0\.\.9"):
        load_cifar(tmp_path, train=False)


class Payload:
    """Unpickles by calling ``fn(arg)``: what a crafted batch would do to a trusting reader."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _payloads(marker: Path) -> list:
    return [
        (Payload(os.system, f"touch {marker}"), os.system.__module__ + r"\.system"),
        # at protocol 2 pickle writes the Python 2 names, and the refusal quotes the file
        (Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), r"(builtins|__builtin__)\.exec"),
        (Payload(subprocess.call, ["touch", str(marker)]), r"(subprocess|commands)\.call"),
    ]


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("nested", [False, True])
def test_cifar_pickle_payload_is_refused_before_it_runs(tmp_path, which, protocol, nested):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10)
    marker = tmp_path / "MARKER"
    payload, refused = _payloads(marker)[which]
    obj = {b"data": np.zeros((2, 3072), np.uint8), b"labels": payload} if nested else payload
    (folder / "test_batch").write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(DataError, match=rf"test_batch: refused to unpickle global {refused}\b") as e:
        load_cifar(tmp_path, train=False)
    assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("raw,refused", [
    (b"c__builtin__\neval\n(S'1'\ntR.", "__builtin__.eval"),  # a Python-2 pickle naming eval
    (b"cposix\nsystem\n(S'true'\ntR.", "posix.system"),
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.", "_codecs.encode"),
])
def test_cifar_python2_globals_are_refused(tmp_path, raw, refused):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10)
    (folder / "test_batch").write_bytes(raw)
    with pytest.raises(DataError, match=rf"test_batch: refused to unpickle global {refused}"):
        load_cifar(tmp_path, train=False)


@pytest.mark.parametrize("writer", ["python2", "protocol2", "protocol4", "protocol5"])
def test_cifar_batches_as_written_by_python2_and_numpy_load(tmp_path, writer):
    folder = tmp_path / "cifar-100-python"
    write_cifar(folder, 100)
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"fine_labels": [0, 99, 5, 7],
             b"coarse_labels": np.array([1, 2, 3, 4], np.int64), b"filenames": [b"a.png"] * 4,
             b"data": data}
    raw = py2_pickle(batch) if writer == "python2" else pickle.dumps(batch, protocol=int(writer[-1]))
    (folder / "test").write_bytes(raw)
    x, y = load_cifar(tmp_path, train=False, num_classes=100)
    assert np.array_equal(x.numpy(), data.reshape(4, 3, 32, 32)) and y.tolist() == [0, 99, 5, 7]


def test_cifar_data_must_be_an_array(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": [[0] * 3072], b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"test_batch: expected b'data' to be a numpy array, got list"):
        load_cifar(tmp_path, train=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1, 2]]}, f)
    with pytest.raises(DataError, match=r"test_batch: expected b'labels' to be a list of ints"):
        load_cifar(tmp_path, train=False)


class Reduce:
    """Unpickles as ``fn(*args)``: what a crafted data pickle asks the unpickler to call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _numpy_reconstruct():
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


@pytest.mark.parametrize("how", ["ndarray", "reconstruct"])
def test_cifar_pickle_cannot_conjure_arrays_whose_bytes_are_not_in_the_file(tmp_path, how):
    """A 300-byte pickle must not become 20,000 images of uninitialised memory (labels all 0)."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10)

    def empty(shape, dtype):
        if how == "ndarray":
            return Reduce(np.ndarray, shape, np.dtype(dtype))
        return Reduce(_numpy_reconstruct(), np.ndarray, shape, np.dtype(dtype))

    raw = pickle.dumps({b"data": empty((20_000, 3072), "u1"), b"labels": empty((20_000,), "i8")}, protocol=2)
    assert len(raw) < 400
    (folder / "test_batch").write_bytes(raw)
    with pytest.raises(DataError, match=r"test_batch: refused: .*no data in the file") as e:
        load_cifar(tmp_path, train=False)
    assert "\n" not in str(e.value)


def test_cifar_labels_built_from_one_list_many_times_are_refused_before_they_expand(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10)
    row = [0] * 5000
    raw = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [row] * 2000}, protocol=2)
    assert len(raw) < 30_000  # the pickle memoises the row: 2,000 references to one list
    (folder / "test_batch").write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"test_batch: expected b'labels' to be a list of ints, got a list "
                                            r"holding list"):
            load_cifar(tmp_path, train=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB: the 10M-element array was built (80 MB)"


def test_cifar_numpy_arrays_and_scalars_still_load(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, 10)
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    for protocol in (2, 4, 5):
        batch = {b"data": data, b"labels": [np.int64(3), 4], b"coarse": np.array([1.5], np.float32)}
        (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
        x, y = load_cifar(tmp_path, train=False)
        assert np.array_equal(x.numpy(), data.reshape(2, 3, 32, 32)) and y.tolist() == [3, 4]
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1],
                                                      b"odd": np.array([None, 1], dtype=object)}))
    with pytest.raises(DataError, match="test_batch: refused: an array of dtype object"):
        load_cifar(tmp_path, train=False)


def test_svhn_file_declaring_far_more_than_it_holds_is_refused_before_loading(tmp_path):
    import scipy.io

    X = np.zeros((32, 32, 3, 6000), np.uint8)  # 18 MB of zeros compress to about 20 KB
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": X, "y": np.ones((6000, 1))}, do_compression=True)
    del X
    size = (tmp_path / "test_32x32.mat").stat().st_size
    assert size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"test_32x32\.mat: refused: declares 6000 images .*above 100:1"):
            load_svhn(tmp_path, train=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB inflated to read the headers"


def test_svhn_headers_are_read_without_inflating_and_odd_variables_refused(tmp_path):
    import scipy.io

    from arow.data.readers import mat_variables

    path = tmp_path / "test_32x32.mat"
    for compress in (False, True):
        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 3), np.uint8), "y": np.ones((3, 1)),
                                "extra": np.zeros((2, 5), np.float32)}, do_compression=compress)
        assert mat_variables(path) == [("X", (32, 32, 3, 3), "uint8"), ("y", (3, 1), "float64"),
                                       ("extra", (2, 5), "float32")]
        assert load_svhn(tmp_path, train=False)[0].shape == (3, 3, 32, 32)
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 3), np.uint8), "y": np.ones((3, 1)),
                            "c": np.array([[np.zeros(3)]], dtype=object)})
    with pytest.raises(DataError, match=r"test_32x32\.mat: holds cell variable 'c'"):
        load_svhn(tmp_path, train=False)
    path.write_bytes(path.read_bytes()[:140])
    with pytest.raises(DataError, match=r"test_32x32\.mat: "):
        load_svhn(tmp_path, train=False)


def test_svhn_reader(tmp_path):
    X, y = write_svhn(tmp_path)
    x, yy = load_svhn(tmp_path, train=True)
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.uint8 and yy.dtype == torch.int64
    assert np.array_equal(x[3].numpy(), X[:, :, :, 3].transpose(2, 0, 1))
    assert yy[0] == 0 and yy.tolist() == [int(v) % 10 for v in y[:, 0]]
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_svhn(tmp_path, train=False)
    with pytest.raises(DataError, match="--data-dir"):
        load_svhn(None, train=False)


def _svhn_file(root: Path, X: np.ndarray, y: np.ndarray) -> None:
    import scipy.io

    scipy.io.savemat(root / "test_32x32.mat", {"X": X, "y": y})


@pytest.mark.parametrize("X,match", [
    (np.full((32, 32, 3, 4), 0.5), r"expected uint8 X of shape \(32, 32, 3, N\), got float64"),  # [0, 1) floats
    (np.full((32, 32, 3, 4), np.nan, np.float32), r"expected uint8 X .* got float32"),
    (np.zeros((32, 32, 3, 4), np.int16), r"expected uint8 X .* got int16"),
    (np.zeros((28, 28, 3, 4), np.uint8), r"expected uint8 X .* got uint8 \(28, 28, 3, 4\)"),
    (np.zeros((32, 32, 3, 0), np.uint8), r"expected at least one example, got none"),
])
def test_svhn_refuses_images_the_real_files_never_hold(tmp_path, X, match):
    _svhn_file(tmp_path, X, np.ones((X.shape[3], 1), np.uint8))
    with pytest.raises(DataError, match=r"test_32x32\.mat: " + match):
        load_svhn(tmp_path, train=False)


@pytest.mark.parametrize("y,match", [
    (np.array([[1], [0], [3], [4]], np.uint8), r"expected labels in 1\.\.10 \(10 = digit 0\), got range 0\.\.4"),
    (np.array([[1], [11], [3], [4]], np.int32), r"expected labels in 1\.\.10 .*got range 1\.\.11"),
    (np.array([[1], [np.nan], [3], [4]]), r"expected whole-number labels in 1\.\.10, got nan"),
    (np.array([[1], [2.5], [3], [4]]), r"expected whole-number labels in 1\.\.10, got 2\.5"),
    (np.array([[1], [0.0], [3], [4]]), r"expected whole-number labels in 1\.\.10, got 0\.0"),
])
def test_svhn_refuses_labels_outside_1_to_10(tmp_path, y, match):
    _svhn_file(tmp_path, np.zeros((32, 32, 3, 4), np.uint8), y)
    with pytest.raises(DataError, match=r"test_32x32\.mat: " + match):
        load_svhn(tmp_path, train=False)


def test_svhn_accepts_whole_number_double_labels(tmp_path):
    _svhn_file(tmp_path, np.zeros((32, 32, 3, 3), np.uint8), np.array([[10.0], [1.0], [9.0]]))
    assert load_svhn(tmp_path, train=False)[1].tolist() == [0, 1, 9]


def test_registry_entries():
    assert DATASETS.names() == ["cifar10", "cifar100", "fashion-mnist", "svhn"]
    fm, c100 = DATASETS.get("fashion-mnist"), DATASETS.get("cifar100")
    assert (fm.num_classes, fm.in_channels, fm.image_size, fm.augmentation, fm.eps) == (10, 1, 28, "flip", 0.1)
    assert (c100.num_classes, c100.augmentation, c100.eps, c100.default_root) == (100, "crop+flip", 8 / 255, None)
    assert DATASETS.get("svhn").augmentation == "none"
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        DATASETS.get("mnist")


def test_load_dataset_cifar_scales_to_unit_interval(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", 10)
    d = load_dataset("cifar10", root=tmp_path, split="test")
    raw, _ = load_cifar(tmp_path, train=False)
    assert d.x.dtype == torch.float32 and torch.allclose(d.x * 255, raw.float())
    assert d.num_classes == 10 and d.name == "cifar10"
    with pytest.raises(ValueError, match="split"):
        load_dataset("cifar10", root=tmp_path, split="val")


# ----------------------------------------------------------------------------- TensorData


def test_from_tensors_validation():
    d = from_tensors(torch.full((3, 1, 2, 2), 255, dtype=torch.uint8), torch.tensor([0, 2, 1]))
    assert d.x.dtype == torch.float32 and float(d.x.max()) == 1.0 and d.num_classes == 3
    with pytest.raises(DataError, match="N, C, H, W"):
        from_tensors(torch.rand(3, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        from_tensors(torch.rand(3, 1, 2, 2) * 2, torch.zeros(3, dtype=torch.long))
    with pytest.raises(DataError, match="integer labels"):
        from_tensors(torch.rand(3, 1, 2, 2), torch.zeros(3))
    with pytest.raises(DataError, match="0..1"):
        from_tensors(torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2]), num_classes=2)
    with pytest.raises(DataError, match="3 labels"):
        from_tensors(torch.rand(3, 1, 2, 2), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="int32|uint8|float"):
        from_tensors(torch.zeros(3, 1, 2, 2, dtype=torch.int32), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("x,y,kw,match", [
    (torch.rand(3, 1, 2, 2) - 0.5, [0, 1, 0], {}, r"x: values must lie in \[0, 1\] \(got min -0\.[0-9]+.*normalise inside"),
    (torch.full((3, 1, 2, 2), float("nan")), [0, 1, 0], {}, r"x: values must be finite"),
    (torch.tensor([0.5, float("inf")]).repeat(6).view(3, 1, 2, 2), [0, 1, 0], {}, r"x: values must be finite"),
    (torch.full((3, 1, 2, 2), 1e300, dtype=torch.float64), [0, 1, 0], {}, r"x: values must lie in \[0, 1\]"),
    (torch.rand(0, 1, 2, 2), torch.zeros(0, dtype=torch.long), {}, r"x: expected at least one example"),
    (torch.rand(3, 4, 4), [0, 1, 0], {}, r"x: expected images of shape \(N, C, H, W\)"),
    (torch.zeros(3, 1, 2, 2, dtype=torch.int32), [0, 1, 0], {}, r"x: expected float images .* got torch\.int32"),
    ([[[[0.5]]], [[[0.5, 0.5]]]], [0, 1], {}, r"x: cannot be read as a tensor"),
    (torch.rand(3, 1, 2, 2), torch.zeros(3, 1, dtype=torch.long), {}, r"y: expected 3 labels of shape \(N,\)"),
    (torch.rand(3, 1, 2, 2), [0, 1], {}, r"y: expected 3 labels"),
    (torch.rand(3, 1, 2, 2), torch.zeros(3), {}, r"y: expected integer labels, got torch\.float32"),
    (torch.rand(3, 1, 2, 2), torch.ones(3, dtype=torch.bool), {}, r"y: expected integer labels, got torch\.bool"),
    (torch.rand(3, 1, 2, 2), [0, -1, 1], {}, r"y: expected labels in 0\.\.1, got range -1\.\.1"),
    (torch.rand(3, 1, 2, 2), [-2, -1, -1], {}, r"y: expected labels in 0\.\.0, got range -2\.\.-1"),
    (torch.rand(3, 1, 2, 2), [0, 1, 2], {"num_classes": 2}, r"y: expected labels in 0\.\.1, got range 0\.\.2"),
    (torch.rand(3, 1, 2, 2), [0, 1, 0], {"num_classes": 2.5}, r"num_classes: expected a positive integer, got 2\.5"),
    (torch.rand(3, 1, 2, 2), [0, 1, 0], {"num_classes": "10"}, r"num_classes: expected a positive integer"),
    (torch.rand(3, 1, 2, 2), [0, 1, 0], {"num_classes": True}, r"num_classes: expected a positive integer"),
    (torch.rand(3, 1, 2, 2), [0, 0, 0], {"num_classes": 0}, r"num_classes: expected a positive integer, got 0"),
])
def test_from_tensors_names_the_bad_argument(x, y, kw, match):
    with pytest.raises(ValueError, match="^" + match) as e:
        from_tensors(x, y, **kw)
    assert isinstance(e.value, DataError) and "\n" not in str(e.value)


def test_from_tensors_keeps_accepting_what_it_accepted():
    d = from_tensors(np.random.default_rng(0).random((4, 1, 3, 3)), np.array([0, 1, 1, 0], np.int32),
                     num_classes=np.int64(3))
    assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
    assert d.num_classes == 3 and type(d.num_classes) is int
    assert from_tensors(torch.zeros(2, 1, 1, 1), [0, 0]).num_classes == 1
    assert float(from_tensors(torch.ones(1, 3, 2, 2, dtype=torch.float16), [4]).x.max()) == 1.0


def test_tensor_data_checks_user_tensors_but_not_derived_rows():
    with pytest.raises(DataError, match=r"^x: values must lie in \[0, 1\]"):
        TensorData(torch.rand(4, 1, 2, 2) * 255, torch.zeros(4, dtype=torch.long), 10)
    with pytest.raises(DataError, match=r"^x: expected float images"):
        TensorData(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 10)
    with pytest.raises(DataError, match=r"^y: expected labels in 0\.\.9, got range 0\.\.10"):
        TensorData(torch.rand(2, 1, 2, 2), torch.tensor([0, 10]), 10)
    with pytest.raises(DataError, match=r"^y: expected 4 labels"):
        TensorData(torch.rand(4, 1, 2, 2), torch.zeros(3, dtype=torch.long), 10)
    d = TensorData(torch.rand(4, 1, 2, 2, dtype=torch.float64), torch.arange(4), 4)
    assert len(d.subset(0)) == 0  # empty parts stay possible


def test_subset_and_batches():
    d = from_tensors(torch.rand(10, 1, 2, 2), torch.arange(10), num_classes=10)
    assert torch.equal(d.subset(4).y, torch.arange(4)) and len(d.subset(50)) == 10
    assert [y.tolist() for _, y in batches(d, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert d.to("cpu").device.type == "cpu"


def test_train_val_split_disjoint_and_deterministic():
    d = TensorData(torch.rand(50, 1, 2, 2), torch.arange(50), num_classes=50)  # labels = ids
    tr, va = train_val_split(d, 10, seed=3)
    assert len(tr) == 40 and len(va) == 10
    assert set(tr.y.tolist()).isdisjoint(va.y.tolist())
    assert sorted(tr.y.tolist() + va.y.tolist()) == list(range(50))
    assert torch.equal(train_val_split(d, 10, seed=3)[1].y, va.y)
    assert not torch.equal(train_val_split(d, 10, seed=4)[1].y, va.y)
    assert torch.equal(va.x, d.x[va.y])
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(d, 50, seed=0)


# ----------------------------------------------------------------------------- Loader


def id_data(n: int, size: int = 8) -> TensorData:
    """Images whose pixels encode their example id, so a batch reveals which examples it holds."""
    x = torch.rand(n, 3, size, size)
    return TensorData(x, torch.arange(n), num_classes=n, name="ids")


def test_loader_covers_every_example_once_per_epoch():
    d = id_data(23)
    loader = Loader(d, 5, shuffle=True, augment="none", seed=0, drop_last=False)
    assert len(loader) == 5
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = torch.cat([y for _, y in loader])
        assert sorted(seen.tolist()) == list(range(23))
        orders.append(seen)
    assert not torch.equal(orders[0], orders[1])
    again = Loader(d, 5, shuffle=True, augment="none", seed=0, drop_last=False)
    again.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in again]), orders[1])
    for x, y in again:
        assert torch.equal(x, d.x[y])  # no augmentation: batches are the stored images


def test_loader_drop_last_and_no_shuffle():
    d = id_data(23)
    loader = Loader(d, 5, shuffle=False, augment="none", seed=0, drop_last=True)
    assert len(loader) == 4
    assert torch.equal(torch.cat([y for _, y in loader]), torch.arange(20))


def test_loader_validates_arguments():
    d = id_data(10)
    with pytest.raises(ValueError, match="multiple of the number of processes 3"):
        Loader(d, 8, shuffle=True, augment="none", seed=0, drop_last=False, world_size=3)
    with pytest.raises(ValueError, match="augment"):
        Loader(d, 2, shuffle=True, augment="cutout", seed=0, drop_last=False)
    with pytest.raises(ValueError, match="rank"):
        Loader(d, 2, shuffle=True, augment="none", seed=0, drop_last=False, rank=2, world_size=2)


@pytest.mark.parametrize("n,drop_last", [(40, True), (40, False), (37, False)])
def test_rank_slices_concatenate_to_single_process_batch(n, drop_last):
    d = id_data(n)
    kw = dict(shuffle=True, augment="crop+flip", seed=7, drop_last=drop_last)
    one = Loader(d, 8, **kw)
    ranks = [Loader(d, 8, rank=r, world_size=2, **kw) for r in range(2)]
    for lo in [one, *ranks]:
        lo.set_epoch(3)
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for step, ((x1, y1), (xa, ya), (xb, yb)) in enumerate(zip(one, *ranks)):
        assert xa.shape == xb.shape  # every rank gets the same batch size
        if len(y1) % 2 == 0:
            assert torch.equal(torch.cat([xa, xb]), x1) and torch.equal(torch.cat([ya, yb]), y1)
        else:  # last partial batch of an odd size: padded with the epoch's first example
            first_x, first_y = next(iter(one))
            assert torch.equal(torch.cat([xa, xb]), torch.cat([x1, first_x[:1]]))
            assert torch.equal(torch.cat([ya, yb]), torch.cat([y1, first_y[:1]]))
            assert step == len(one) - 1


def test_batched_crop_equals_per_sample_crop():
    x = torch.rand(16, 3, 32, 32)
    offsets = torch.randint(0, 9, (16, 2), generator=torch.Generator().manual_seed(0))
    offsets[0] = torch.tensor([0, 8])  # include the extreme corners
    offsets[1] = torch.tensor([8, 0])
    ref = torch.stack([F.pad(x[i], (4, 4, 4, 4))[:, i0 : i0 + 32, j0 : j0 + 32]
                       for i, (i0, j0) in enumerate(offsets.tolist())])
    assert torch.equal(random_crop(x, offsets, pad=4), ref)
    assert torch.equal(random_crop(x, torch.full((16, 2), 4), pad=4), x)
    assert float(random_crop(torch.ones(1, 1, 32, 32), torch.tensor([[0, 0]]), 4)[0, 0, :4].sum()) == 0


def test_flip_mask_applied():
    x = torch.rand(6, 2, 5, 5)
    mask = torch.tensor([True, False, True, False, False, True])
    out = hflip(x, mask)
    for i in range(6):
        assert torch.equal(out[i], x[i].flip(-1) if mask[i] else x[i])


def test_loader_augmentation_is_crop_and_flip_of_stored_image():
    d = id_data(12)
    loader = Loader(d, 4, shuffle=True, augment="crop+flip", seed=1, drop_last=False, pad=2)
    loader.set_epoch(0)
    flipped = 0
    for x, y in loader:
        for xi, yi in zip(x, y):
            src = F.pad(d.x[yi], (2, 2, 2, 2))
            cands = [src[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
            plain = any(torch.equal(xi, c) for c in cands)
            mirrored = any(torch.equal(xi, c.flip(-1)) for c in cands)
            assert plain or mirrored
            flipped += int(mirrored and not plain)
    assert 0 < flipped < 12  # some, not all, were flipped


def test_loader_follows_data_device():
    d = id_data(8)
    loader = Loader(d, 4, shuffle=True, augment="crop+flip", seed=0, drop_last=False)
    x, y = next(iter(loader))
    assert x.device == d.x.device and y.device == d.y.device and x.dtype == torch.float32
    if torch.cuda.is_available():
        dc = d.to("cuda")
        xc, yc = next(iter(Loader(dc, 4, shuffle=True, augment="crop+flip", seed=0, drop_last=False)))
        assert xc.is_cuda and torch.equal(xc.cpu(), x) and torch.equal(yc.cpu(), y)
