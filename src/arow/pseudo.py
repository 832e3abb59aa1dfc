"""Pseudo-labels: a trained model labels unlabelled images, for ``--extra-data`` (``arow pseudo-label``).

As Carmon et al. (2019) label 500K Tiny Images with a standard classifier: every image gets the
model's most likely class (``label``, the argmax of the logits) and that class's softmax
probability (``confidence``). The result is an uncompressed ``.npz`` with ``image`` (uint8
N x H x W x C), ``label`` and ``confidence``, which ``--extra-data`` memory-maps.

>>> result = pseudo_label("runs/fmnist-4k", "fashion-mnist", "pseudo.npz",
...                       exclude_kept="runs/fmnist-4k")   # doctest: +SKIP
>>> len(result.labels), result.path                          # doctest: +SKIP
(55000, PosixPath('pseudo.npz'))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .attacks.base import frozen_eval
from .runs.checkpoint import Which
from .data import DATASETS, DataError, load_dataset
from .data.extra import labelled_positions, read_extra
from .evaluation.cascade import default_eval_batch
from .modules import unwrap
from .runs.checkpoint import _atomic_write
from .config.schema import TrainConfig
from .data.extra import kept_indices
from .runs.rundir import RunDir, check_writable
from . import distributed
from .runs.records import model_from_checkpoint
from .models.spec import ModelSpec
from .runs.records import load_checkpoint

PathLike = Union[str, Path]


@dataclass
class PseudoLabels:
    """Images with the model's labels and confidences (what ``arow pseudo-label`` writes)."""

    images: np.ndarray  # uint8 N x H x W x C
    labels: np.ndarray  # int64 N, argmax of the logits
    confidence: np.ndarray  # float32 N, max softmax probability
    path: Optional[Path] = None
    source: dict[str, object] = field(default_factory=dict)

    def save(self, path: PathLike) -> Path:
        """Write ``image``, ``label``, ``confidence`` as an uncompressed ``.npz`` (memory-mappable), atomically."""

        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"--out must end in .npz, got {path}")
        _atomic_write(path, lambda f: np.savez(f, image=self.images, label=self.labels, confidence=self.confidence))
        self.path = path
        return path

    def histogram(self) -> list[int]:
        """Images per predicted class."""
        return np.bincount(self.labels, minlength=int(self.source.get("num_classes", 0))).tolist()

    def summary(self) -> str:
        """One line: which images were labelled by which model, the mean confidence, images per class."""
        excluded = f" ({self.source['excluded']} labelled ones left out)" if self.source.get("excluded") else ""
        return (f"labelled {len(self.labels)} images of {self.source.get('data')}{excluded} with "
                f"{self.source.get('model')}: mean confidence {float(self.confidence.mean()):.3f}; "
                f"per class {self.histogram()}")


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, *, batch_size: int = 500,
            device: Union[str, torch.device] = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(argmax label, max softmax probability) of ``model`` on uint8 ``images`` (N x H x W x C), in eval
    mode without gradients (:func:`~arow.attacks.base.frozen_eval`), a batch at a time.

    >>> labels, conf = predict(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), np.zeros((2, 2, 2, 1), np.uint8))
    >>> labels.shape, conf.dtype
    ((2,), dtype('float32'))
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    labels, conf = np.empty(len(images), np.int64), np.empty(len(images), np.float32)
    with frozen_eval(unwrap(model)) as net:  # the images are converted a batch at a time (they may be memory-mapped)
        for lo in range(0, len(images), batch_size):
            # a copy of the batch: a memory-mapped file's pages are read-only, which torch.from_numpy warns about
            x = torch.from_numpy(np.array(images[lo : lo + batch_size], copy=True)).to(device)
            x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
            p, k = torch.softmax(net(x).float(), dim=1).max(dim=1)
            labels[lo : lo + len(x)] = k.cpu().numpy()
            conf[lo : lo + len(x)] = p.cpu().numpy()
    return labels, conf


def _excluded(exclude: PathLike, labels: torch.Tensor, num_classes: int, dataset: str) -> np.ndarray:
    """Positions a run used as labelled training data, or those listed in an index file."""

    p = Path(exclude)
    if p.is_dir():
        saved = dict(RunDir(p).read_config())
        saved.pop("resolved", None)
        cfg = TrainConfig.from_dict(saved)
        if cfg.dataset != dataset:
            raise ValueError(f"--exclude-kept {p}: that run trained on {cfg.dataset}, not {dataset}")
        return labelled_positions(cfg, labels, num_classes).numpy()
    return kept_indices(str(p), labels, num_classes, seed=0).numpy()


def unlabelled_images(data: str, *, num_classes: int, image_shape: tuple[int, int, int],
                      data_dir: Optional[str] = None, exclude_kept: Optional[PathLike] = None
                      ) -> tuple[np.ndarray, dict[str, object]]:
    """The images to label, uint8 N x H x W x C, and where they came from.

    ``data`` is an extra-data file (``.npz`` or RST pickle; its labels are ignored) or a dataset
    name with an optional split (``fashion-mnist``, ``cifar10:train``; default ``train``).
    ``exclude_kept`` (dataset training split only) drops the positions a run folder used as
    labelled data (``--labels-kept``, validation split included), or those listed in a .txt/.npy.
    """
    name, _, split = data.partition(":")
    if name in DATASETS and not Path(data).is_file():
        split = split or "train"
        ds = load_dataset(name, root=data_dir, split=split)
        keep = np.arange(len(ds))
        if exclude_kept is not None:
            if split != "train":
                raise ValueError("--exclude-kept applies to a training split only")
            keep = np.setdiff1d(keep, _excluded(exclude_kept, ds.y, ds.num_classes, name))
            if len(keep) == 0:
                raise ValueError(f"--exclude-kept {exclude_kept}: every {name} training image is labelled there; "
                                 "nothing is left to pseudo-label")
        x = ds.x[torch.from_numpy(keep)]
        images = x.mul(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        if images.shape[1:] != tuple(image_shape):
            raise ValueError(f"{name} images {images.shape[1:]} do not fit the model's {tuple(image_shape)}")
        return images, {"data": f"{name}:{split}", "excluded": len(ds) - len(keep), "num_classes": num_classes}
    if exclude_kept is not None:
        raise ValueError("--exclude-kept applies to a dataset's training split, not to a file")
    if not Path(data).is_file():
        raise DataError(f"--data {data!r}: neither a file nor a dataset (choose one of: {', '.join(DATASETS.names())})")
    images, _ = read_extra(data, num_classes, image_shape, labels=False)
    return images, {"data": str(data), "excluded": 0, "num_classes": num_classes}


def pseudo_label(model_source: PathLike, data: str, out: Optional[PathLike] = None, *,
                 which: Which = "final", batch_size: Optional[int] = None,
                 device: str = "auto", data_dir: Optional[str] = None,
                 exclude_kept: Optional[PathLike] = None) -> PseudoLabels:
    """Label the images of ``data`` with the model of ``model_source`` and write them to ``out`` (an
    ``.npz`` that ``--extra-data`` reads).

    See :func:`unlabelled_images` for ``data`` and ``exclude_kept``. The output holds the images as
    uint8, so it needs their size on disk; the input, when memory-mapped, is read in batches.

    Args:
        model_source: run folder, checkpoint file or .safetensors export
        data: an .npz (image) or RST pickle (data) file, its labels ignored, or a dataset name with an
            optional split: fashion-mnist, cifar10:train (default split train)
        out: the .npz to write (image, label = argmax, confidence = max softmax)
        which: the run's checkpoint: final, best (by validation) or last
        batch_size: images per forward pass (default: 100 on the CPU, 500 on CUDA)
        device: auto, cpu, cuda, cuda:1, ...
        data_dir: folder with the dataset files
        exclude_kept: leave out the training images a run folder used as labelled data (its
            --labels-kept and validation split), or the positions in a .txt/.npy
    """

    if out is not None and Path(out).suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {out}")
    if out is not None:  # before minutes of labelling, not after
        check_writable(out, "--out")
    ckpt = load_checkpoint(model_source, which=which)
    spec = ModelSpec.from_dict(ckpt["model_spec"])
    if spec.num_classes is None or spec.in_channels is None or spec.image_size is None:
        raise ValueError(f"{ckpt.get('path')}: does not say its input shape and classes")
    shape = (spec.image_size, spec.image_size, spec.in_channels)
    images, source = unlabelled_images(data, num_classes=spec.num_classes, image_shape=shape,
                                       data_dir=data_dir, exclude_kept=exclude_kept)
    dev = distributed.resolve_device(device)
    model = model_from_checkpoint(ckpt, device=dev)
    labels, conf = predict(model, images, batch_size=default_eval_batch(dev) if batch_size is None else batch_size,
                           device=dev)
    source.update(model=str(ckpt.get("path", model_source)))
    result = PseudoLabels(images, labels, conf, source=source)
    if out is not None:  # what was labelled and where it went: the caller says it once (summary, path)
        result.save(out)
    return result
