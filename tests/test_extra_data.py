"""Extra training data: the readers, the mixing loader, kept labels, pseudo-labels, resume."""
import json
import pickle
import tracemalloc

import numpy as np
import pytest
import torch

from arow.config.schema import ConfigError, TrainConfig
from arow.data import DataError, from_tensors
from arow.data.extra import (ExtraData, MixedLoader, kept_indices, load_extra, read_extra, read_npz,
                             read_rst_pickle)
from arow.pipelines import build_trainer

from conftest import tiny_cnn
from test_training import Crash

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (8, 8, 3)  # H, W, C of the synthetic images


def _images(n, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def _npz(path, n=20, compressed=False, **arrays):
    arrays = {"image": _images(n), "label": np.arange(n) % 10, **arrays}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _rst(path, n=20, protocol=4, **entries):
    obj = {"data": _images(n), "extrapolated_targets": (np.arange(n) % 10).astype(np.int64), "ti_index": np.arange(n),
           "prediction_model": "wrn-28-10", "prediction_model_epoch": 200, **entries}
    obj = {k: v for k, v in obj.items() if v is not None}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


# --------------------------------------------------------------------------- readers
def test_uncompressed_npz_is_memory_mapped_without_a_copy(tmp_path):
    path = _npz(tmp_path / "gen.npz")
    x, y = read_npz(path, 10, SHAPE)
    assert isinstance(x, np.memmap) and str(x.filename) == str(path.resolve()) and not x.flags.writeable
    with np.load(path) as ref:
        assert np.array_equal(x, ref["image"]) and np.array_equal(y, ref["label"])
    assert y.dtype == np.int64


def test_compressed_npz_is_inflated_into_one_array_in_chunks(tmp_path, monkeypatch):
    import arow.data.extra as extra_mod

    path = _npz(tmp_path / "gen.npz", n=20000, compressed=True)  # 3.8 MB: zlib's fixed buffers are small next to it
    monkeypatch.setattr(extra_mod, "_CHUNK", 1 << 16)
    tracemalloc.start()
    x, y = read_npz(path, 10, SHAPE)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert not isinstance(x, np.memmap) and x.flags.c_contiguous
    with np.load(path) as ref:
        assert np.array_equal(x, ref["image"]) and np.array_equal(y, ref["label"])
    assert peak < 1.25 * x.nbytes, (peak, x.nbytes)  # one array of the images, not two


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_rst_pickle_is_read_with_about_one_copy(tmp_path, protocol):
    path = _rst(tmp_path / "ti.pickle", n=2000, protocol=protocol)
    tracemalloc.start()
    x, y = read_rst_pickle(path, 10, SHAPE)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.array_equal(x, _images(2000)) and np.array_equal(y, np.arange(2000) % 10)
    if protocol >= 3:  # protocol 2 wraps bytes in str: about 4.5x while loading
        assert peak < 1.25 * x.nbytes, (peak, x.nbytes)


def test_both_layouts_load_together_and_take_the_first_n(tmp_path):
    a = _npz(tmp_path / "a.npz", n=12)
    b = _rst(tmp_path / "b.pickle", n=20)
    extra = load_extra([a, b], 10, SHAPE)
    assert len(extra) == 32 and extra.image_shape == SHAPE
    want = np.stack([_images(20)[1], _images(12)[0], _images(20)[19]])
    assert np.array_equal(extra.images(np.array([13, 0, 31])), want)
    assert len(load_extra([a, b], 10, SHAPE, take=15)) == 15
    x, y = extra.batch(np.array([0, 12]))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and float(x.max()) <= 1.0
    assert torch.equal(x[0], torch.from_numpy(_images(12)[0]).permute(2, 0, 1).float() / 255)


class _Payload:
    """A pickle that would create a file if it were ever called."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _bad_npz(tmp_path, case):
    p = tmp_path / f"{case}.npz"
    n = 20
    if case == "float-images":
        return _npz(p, image=_images(n).astype(np.float32) / 255)
    if case == "no-channels":
        return _npz(p, image=_images(n)[..., 0])
    if case == "image-size":
        return _npz(p, image=_images(n, (6, 6, 3)))
    if case == "label-range":
        return _npz(p, label=np.arange(n))
    if case == "negative-label":
        return _npz(p, label=np.arange(n) - 1)
    if case == "float-labels":
        return _npz(p, label=np.zeros(n, np.float32))
    if case == "label-count":
        return _npz(p, label=np.zeros(n - 1, np.int64))
    if case == "no-label":
        return _npz(p, label=None)
    if case == "no-image":
        return _npz(p, image=None, data=_images(n))
    if case == "object-array":
        np.savez(p, image=np.array([object()] * n, dtype=object), label=np.zeros(n, np.int64))
        return p
    if case == "empty":
        return _npz(p, image=_images(0), label=np.zeros(0, np.int64))
    if case == "truncated":
        _npz(p, n=200)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p
    if case == "damaged-zip":
        _npz(p, n=200)
        data = p.read_bytes()
        p.write_bytes(data[:2000] + data[2500:])  # the central directory points past the data
        return p
    if case == "not-a-data-file":
        p.write_text("image,label\n")
        return p
    raise AssertionError(case)


NPZ_CASES = {"float-images": "uint8 images of shape (N, 8, 8, 3)", "no-channels": "uint8 images of shape",
             "image-size": "(N, 8, 8, 3)", "label-range": "in 0..9", "negative-label": "in 0..9",
             "float-labels": "integer labels", "label-count": "one per image", "no-label": "missing 'label'",
             "no-image": "missing 'image'", "object-array": "Python objects", "empty": "uint8 images of shape",
             "truncated": "", "damaged-zip": "", "not-a-data-file": "expected an .npz"}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_malformed_npz_is_refused_with_one_line(tmp_path, case):
    path = _bad_npz(tmp_path, case)
    with pytest.raises(DataError) as e:
        read_extra(path, 10, SHAPE)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and NPZ_CASES[case] in msg, msg


RST_CASES = {"no-targets": (dict(extrapolated_targets=None), "missing 'extrapolated_targets'"),
             "no-data": (dict(data=None), "missing 'data'"),
             "float-data": (dict(data=_images(20).astype(np.float64)), "uint8 images"),
             "image-size": (dict(data=_images(20, (32, 32, 3))), "(N, 8, 8, 3)"),
             "label-range": (dict(extrapolated_targets=np.full(20, 10)), "in 0..9"),
             "label-count": (dict(extrapolated_targets=np.zeros(3, np.int64)), "one label per image"),
             "list-data": (dict(data=[1, 2, 3]), "numpy array")}


@pytest.mark.parametrize("case", list(RST_CASES))
def test_malformed_rst_pickle_is_refused_with_one_line(tmp_path, case):
    entries, needle = RST_CASES[case]
    path = _rst(tmp_path / "ti.pickle", **entries)
    with pytest.raises(DataError) as e:
        read_extra(path, 10, SHAPE)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and needle in str(e.value), str(e.value)


def test_a_pickle_with_a_forbidden_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = _rst(tmp_path / "evil.pickle", prediction_model=_Payload(marker))
    with pytest.raises(DataError, match="refused to unpickle global (posix|os).system"):
        read_extra(path, 10, SHAPE)
    assert not marker.exists()
    with open(tmp_path / "list.pickle", "wb") as f:
        pickle.dump([1, 2], f, protocol=2)
    with pytest.raises(DataError, match="expected a pickled dict"):
        read_extra(tmp_path / "list.pickle", 10, SHAPE)


class _Call:
    """Unpickles as ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _peak(fn) -> int:
    """Peak traced memory (bytes) while ``fn()`` runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_compressed_npz_declaring_far_more_than_it_holds_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, image=np.zeros((6000, 32, 32, 3), np.uint8), label=np.zeros(6000, np.int64))
    assert path.stat().st_size < 100_000  # 18.4 MB of zeros

    def read():
        with pytest.raises(DataError, match=r"bomb\.npz: refused: 'image' declares 18432128 bytes from \d+ "
                                            r"compressed \(\d+:1, above 100:1\)") as e:
            read_extra(path, 10, (32, 32, 3))
        assert "\n" not in str(e.value)

    assert _peak(read) < 2 * 2**20, "nothing is inflated"
    _npz(tmp_path / "ok.npz", n=30000, compressed=True)  # random images compress about 1:1: still read
    assert len(read_extra(tmp_path / "ok.npz", 10, SHAPE)[0]) == 30000


def test_an_rst_pickle_cannot_conjure_arrays_whose_bytes_are_not_in_the_file(tmp_path):
    empty = [_Call(np.ndarray, (20_000, 8, 8, 3), np.dtype("u1")), _Call(np.ndarray, (20_000,), np.dtype("i8"))]
    path = _rst(tmp_path / "ti.pickle", data=empty[0], extrapolated_targets=empty[1], ti_index=None)
    assert path.stat().st_size < 500
    with pytest.raises(DataError, match=r"ti\.pickle: refused: numpy\.ndarray\(\.\.\.\) called directly"):
        read_extra(path, 10, SHAPE)


def test_rst_labels_built_from_one_list_many_times_are_refused_before_they_expand(tmp_path):
    row = [0] * 5000
    path = _rst(tmp_path / "ti.pickle", extrapolated_targets=[row] * 2000)
    assert path.stat().st_size < 30_000

    def read():
        with pytest.raises(DataError, match="expected 'extrapolated_targets' to be a list of ints, got a list "
                                            "holding list"):
            read_extra(path, 10, SHAPE)

    assert _peak(read) < 8 * 2**20, "the 10M-element label array (80 MB) was built"
    ok = _rst(tmp_path / "list.pickle", extrapolated_targets=[i % 10 for i in range(20)])
    assert read_extra(ok, 10, SHAPE)[1].tolist() == [i % 10 for i in range(20)]


# --------------------------------------------------------------------------- the mixing loader
def _real(n=50, c=3, hw=8):
    """Real images whose pixels say which example they are (i / 255) and labels 0..4."""
    x = (torch.arange(n, dtype=torch.float32) / 255).view(n, 1, 1, 1).expand(n, c, hw, hw).contiguous()
    return from_tensors(x, torch.arange(n) % 5, num_classes=10)


def _extra(n=40):
    """Extra images with labels 5..9 (so a batch's labels say which rows are extra)."""
    return ExtraData([_images(n)], 5 + np.arange(n) % 5)


@pytest.mark.parametrize("batch,fraction", [(16, 0.7), (10, 0.5), (7, 0.3), (12, 0.0), (32, 0.9)])
def test_every_batch_holds_exactly_the_fraction_of_extra_examples(batch, fraction):
    loader = MixedLoader(_real(), _extra(), batch, fraction=fraction, augment="crop+flip", seed=1)
    n_extra = int(np.floor(fraction * batch + 0.5))
    assert len(loader) == -(-50 // batch) and loader.extra_per_batch == n_extra
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        for x, y in batches:
            assert x.shape == (batch, 3, 8, 8) and int((y >= 5).sum()) == n_extra
    assert loader.epoch_counts() == {"train_real": len(loader) * (batch - n_extra),
                                     "train_extra": len(loader) * n_extra}


def test_real_examples_are_used_equally_often_and_a_new_loader_repeats_an_epoch():
    real = _real()
    loader = MixedLoader(real, _extra(), 10, fraction=0.6, augment="none", seed=3, epoch_batches=7)
    seen = []
    for epoch in range(5):  # 5 epochs x 7 batches x 4 real = 140 = 2.8 passes over 50
        loader.set_epoch(epoch)
        for x, y in loader:
            seen += (x[y < 5, 0, 0, 0] * 255).round().long().tolist()
    counts = np.bincount(seen, minlength=50)
    assert len(seen) == 140 and counts.min() >= 2 and counts.max() <= 3
    again = MixedLoader(real, _extra(), 10, fraction=0.6, augment="none", seed=3, epoch_batches=7)
    again.set_epoch(3)
    loader.set_epoch(3)
    for (a, ya), (b, yb) in zip(loader, again):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_each_ddp_rank_keeps_the_fraction_and_the_ranks_make_the_one_process_batch():
    real, extra = _real(), _extra()
    one = MixedLoader(real, extra, 16, fraction=0.5, augment="crop+flip", seed=5)
    ranks = [MixedLoader(real, extra, 16, fraction=0.5, augment="crop+flip", seed=5, rank=r, world_size=2)
             for r in range(2)]
    for ld in [one] + ranks:
        ld.set_epoch(2)
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert int((y0 >= 5).sum()) == int((y1 >= 5).sum()) == 4
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_the_loader_refuses_a_fraction_that_leaves_no_real_example():
    with pytest.raises(ValueError, match="leaves no real example"):
        MixedLoader(_real(), _extra(), 2, fraction=0.8, augment="none", seed=0)
    with pytest.raises(ValueError, match="do not match the real images"):
        MixedLoader(_real(hw=6), _extra(), 8, fraction=0.5, augment="none", seed=0)


# --------------------------------------------------------------------------- kept labels
def test_labels_kept_keeps_exactly_n_balanced_and_reads_index_files(tmp_path):
    labels = torch.arange(1000) % 10
    kept = kept_indices("45", labels, 10, seed=0)
    assert len(kept) == 45 and len(set(kept.tolist())) == 45 and torch.equal(kept, kept.sort().values)
    counts = torch.bincount(labels[kept], minlength=10)
    assert int(counts.max()) - int(counts.min()) <= 1
    assert torch.equal(kept, kept_indices("45", labels, 10, seed=0))
    assert not torch.equal(kept, kept_indices("45", labels, 10, seed=1))
    np.save(tmp_path / "idx.npy", np.array([7, 3, 999]))
    (tmp_path / "idx.txt").write_text("7 3\n999\n")
    for f in ("idx.npy", "idx.txt"):
        assert kept_indices(str(tmp_path / f), labels, 10, seed=0).tolist() == [3, 7, 999]
    (tmp_path / "bad.txt").write_text("1 1000\n")
    with pytest.raises(DataError, match="positions must be in 0..999"):
        kept_indices(str(tmp_path / "bad.txt"), labels, 10, seed=0)
    with pytest.raises(DataError, match="must be in 1..1000"):
        kept_indices("1001", labels, 10, seed=0)


def test_labels_kept_file_with_a_number_beyond_64_bits_is_one_line(tmp_path, capsys):
    from arow.cli.commands import main

    labels = torch.arange(1000) % 10
    (tmp_path / "big.txt").write_text("3 7 99999999999999999999999\n")
    with pytest.raises(DataError, match=r"big\.txt: position 99999999999999999999999 is beyond 64-bit integers"):
        kept_indices(str(tmp_path / "big.txt"), labels, 10, seed=0)
    assert main(["train", "--labels-kept", str(tmp_path / "big.txt"), "--limit-train", "64", "--epochs", "1",
                 "--eval-attacks", "", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "beyond 64-bit integers" in err[0]


def test_config_fields_flags_and_round_trip(tmp_path, capsys):
    from arow.cli.commands import main

    assert main(["train", "--extra-data", "a.npz", "--extra-data", "b.pickle", "--labels-kept", "40",
                 "--extra-fraction", "0.5", "--epoch-batches", "9", "--out", str(tmp_path / "r"),
                 "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["extra_data"] == ["a.npz", "b.pickle"] and printed["labels_kept"] == "40"
    (tmp_path / "config.json").write_text(json.dumps(printed))
    # a replayed config.json gives the same config; the output folder is always the one given now
    assert main(["train", "--preset", str(tmp_path / "config.json"), "--out", str(tmp_path / "r"),
                 "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == printed
    for bad, needle in [(dict(extra_fraction=1.0), "--extra-fraction must be in [0, 1)"),
                        (dict(extra_take=5), "apply to training with --extra-data only"),
                        (dict(labels_kept="some"), "--labels-kept must be")]:
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            TrainConfig(**bad).validate()
    with pytest.raises(ConfigError, match="expected a list of strings"):
        TrainConfig.from_dict({"extra_data": "a.npz"})


# --------------------------------------------------------------------------- training
def _cfg(out, **kw):
    base = dict(method="arow", epochs=3, batch_size=32, lr=0.05, eps=0.1, attack_steps=2, schedule="step",
                milestones=[2], augment="flip", seed=3, out=str(out), val_attack="pgd3", extra_data=["extra.npz"],
                extra_fraction=0.5, ema=0.9, ema_warmup=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def small(fmnist_small):
    xtr, ytr, _, _ = fmnist_small
    extra_x = (xtr[1200:1296] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return (from_tensors(xtr[:96], ytr[:96]), from_tensors(xtr[1000:1032], ytr[1000:1032]),
            ExtraData([extra_x], ytr[1200:1296].numpy()))


def _run(cfg, data, val, extra, callbacks=None, resume=False):
    torch.manual_seed(cfg.seed)
    return build_trainer(cfg, tiny_cnn(), data, val, callbacks=callbacks, resume=resume, extra=extra).fit()


def test_resume_after_a_crash_with_extra_data_and_ema_equals_an_uninterrupted_run(tmp_path, small):
    data, val, extra = small
    ref = _run(_cfg(tmp_path / "ref"), data, val, extra)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path / "crash"), data, val, extra, callbacks=Crash(epoch=1, step=1))
    resumed = _run(_cfg(tmp_path / "crash"), data, val, extra, resume=True)
    for (k, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    lines = [json.loads(s) for s in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(s) for s in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in lines] == [r["train_loss"] for r in ref_lines]
    assert all(r["train_real"] == 3 * 16 and r["train_extra"] == 3 * 16 for r in lines)


def test_train_run_keeps_the_labels_and_mixes_the_extra_file(tmp_path, monkeypatch, fmnist_small):
    import arow.pipelines as pipelines
    from arow.training.callbacks import Callbacks

    xtr, ytr, _, _ = fmnist_small
    monkeypatch.setattr(pipelines, "load_dataset", lambda *a, **k: from_tensors(xtr[:300], ytr[:300], 10,
                                                                                 name="fashion-mnist"))
    x = (xtr[400:500] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "extra.npz", image=x, label=ytr[400:500].numpy())
    seen = {}

    class Look(Callbacks):
        def on_fit_start(self, trainer):
            seen["n_train"], seen["n_val"] = len(trainer.train_data), len(trainer.val_data)
            seen["memmap"] = trainer.loader.extra.memory_mapped

    cfg = TrainConfig(epochs=1, batch_size=20, eps=0.1, attack_steps=1, val_size=10, val_attack="pgd1",
                      labels_kept="50", extra_data=[str(tmp_path / "extra.npz")], extra_fraction=0.75,
                      out=str(tmp_path / "run"))
    pipelines.train_run(cfg, callbacks=[Look()], plots=False)
    assert seen == {"n_train": 40, "n_val": 10, "memmap": True}
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (rec["train_real"], rec["train_extra"]) == (2 * 5, 2 * 15)  # ceil(40 / 20) batches of 5 + 15


# --------------------------------------------------------------------------- pseudo-labels
@pytest.fixture()
def run_folder(tmp_path, fmnist_small):
    from arow.models import build_model

    xtr, ytr, _, _ = fmnist_small
    torch.manual_seed(0)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28)
    spec = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "image_size": 28, "mean": None,
            "std": None, "dataset": "fashion-mnist"}
    cfg = TrainConfig(epochs=1, batch_size=32, eps=0.1, attack_steps=1, val_attack="pgd1", labels_kept="30",
                      limit_train=1000, out=str(tmp_path / "run"), eval_attacks="")
    build_trainer(cfg, model, from_tensors(xtr[:32], ytr[:32], name="fashion-mnist"),
                  from_tensors(xtr[32:48], ytr[32:48], name="fashion-mnist"), model_spec=spec, plots=False).fit()
    return tmp_path / "run"


def test_pseudo_labels_are_the_models_argmax_and_the_cli_writes_them(tmp_path, run_folder, capsys, fmnist_small):
    import arow
    from arow.cli.commands import main
    from arow.pseudo import predict

    xtr, _, _, _ = fmnist_small
    images = (xtr[500:560] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez_compressed(tmp_path / "unlabelled.npz", image=images)  # no labels: none are needed
    model = arow.load_model(run_folder)
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    labels, conf = predict(model, images, batch_size=7)
    assert np.array_equal(labels, logits.argmax(1).numpy())
    assert np.allclose(conf, torch.softmax(logits, 1).max(1).values.numpy(), atol=1e-6)
    out = tmp_path / "pseudo.npz"
    assert main(["pseudo-label", str(run_folder), "--data", str(tmp_path / "unlabelled.npz"), "--out", str(out),
                 "--batch-size", "16", "--device", "cpu"]) == 0
    assert "labelled 60 images" in capsys.readouterr().out
    with np.load(out) as f:
        assert np.array_equal(f["image"], images) and np.array_equal(f["label"], labels)
        assert np.allclose(f["confidence"], conf)
    x, y = read_extra(out, 10, (28, 28, 1))
    assert isinstance(x, np.memmap) and np.array_equal(y, labels)  # what --extra-data reads
    assert main(["pseudo-label", str(run_folder), "--data", str(tmp_path / "unlabelled.npz"), "--out",
                 str(tmp_path / "x.npy")]) == 2


def test_pseudo_label_checks_out_before_labelling(tmp_path, run_folder, monkeypatch, capsys):
    import arow.pseudo as pseudo
    from arow.cli.commands import main

    calls = []
    monkeypatch.setattr(pseudo, "predict", lambda *a, **kw: calls.append(1))
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "pseudo.npz"  # its folder would be a file: it cannot be written
    assert main(["pseudo-label", str(run_folder), "--data", "fashion-mnist", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "pseudo.npz" in err[0]
    assert calls == [], "nothing was labelled before the output was found unwritable"


def test_exclude_kept_leaves_out_what_the_run_used_as_labels(run_folder):
    from arow.config.schema import TrainConfig as TC
    from arow.data import load_dataset
    from arow.data.extra import labelled_positions
    from arow.pseudo import unlabelled_images

    images, source = unlabelled_images("fashion-mnist", num_classes=10, image_shape=(28, 28, 1),
                                       exclude_kept=run_folder)
    ds = load_dataset("fashion-mnist")
    kept = labelled_positions(TC(labels_kept="30", limit_train=1000, seed=0), ds.y, 10)
    assert len(kept) == 30 and source["excluded"] == 30 and len(images) == len(ds) - 30
    first_free = int(np.setdiff1d(np.arange(len(ds)), kept.numpy())[0])
    assert np.array_equal(images[0, ..., 0], (ds.x[first_free, 0] * 255).round().to(torch.uint8).numpy())
    with pytest.raises(ValueError, match="training split only"):
        unlabelled_images("fashion-mnist:test", num_classes=10, image_shape=(28, 28, 1), exclude_kept=run_folder)


def test_the_extra_data_presets_are_valid_configs():
    from arow.config import load_preset, resolve

    for name, file in [("cifar10-wrn28-10-ddpm", "cifar10_ddpm.npz"),
                       ("cifar10-wrn28-10-rst", "ti_500K_pseudo_labeled.pickle")]:
        cfg = resolve(TrainConfig.from_dict(load_preset(name)))
        assert cfg.extra_data == [file] and cfg.extra_fraction == 0.7 and cfg.ema == 0.995 and cfg.ema_bn == "copy"
        assert (cfg.model, cfg.activation, cfg.schedule, cfg.epochs, cfg.nesterov) == (
            "wrn-28-10", "silu", "cosine", 500, True)
        assert cfg.batch_size // cfg.grad_accum == 128 and cfg.no_bn_decay
