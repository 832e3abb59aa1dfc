"""Readers on small files in the real formats, splitting, and the DDP-consistent Loader."""
from __future__ import annotations

import gzip
import pickle
import struct
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


def test_subset_shard_and_batches():
    d = from_tensors(torch.rand(10, 1, 2, 2), torch.arange(10), num_classes=10)
    assert torch.equal(d.subset(4).y, torch.arange(4)) and len(d.subset(50)) == 10
    assert torch.equal(torch.cat([d.shard(r, 3).y for r in range(3)]), d.y)
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
