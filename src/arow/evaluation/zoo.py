"""Models of the RobustBench model zoo by name (``arow eval --robustbench-model NAME``), built and
loaded by the ``robustbench`` package's own loader (``pip install -e '.[robustbench]'``) from weights
already on disk.

RobustBench's loader (``robustbench.utils.load_model``) reads ``DIR/<dataset>/<threat model>/<NAME>.pt``
(an ensemble: ``<NAME>.pt_m0.pt``, ``<NAME>.pt_m1.pt``, ...) and downloads a missing file; arow
downloads nothing at run time, so :func:`zoo_entry` checks that every file is there before the loader
is called and names the expected path otherwise (fetch the file once, e.g. by calling
``robustbench.utils.load_model`` on a machine with network, and copy ``DIR``). Entries that RobustBench
serves through timm (weights from the Hugging Face hub) are refused for the same reason.

The checkpoints are pickles (``torch.save``) that robustbench reads with ``torch.load``, so loading one
is running the user's trusted choice: :func:`arow.evaluation.sources.open_robustbench` requires
``trust_code`` (``--trust-code``). PyTorch first reads the file as weights only (its default since
2.6); a checkpoint that holds other objects is then unpickled fully, as robustbench intends, which the
trust covers. A zoo model takes inputs in [0, 1] and returns logits, as arow's models do; it is
evaluated at RobustBench's radius of its threat model (CIFAR: L-inf 8/255, L2 0.5) unless ``--eps``.

>>> entry = zoo_entry("Addepalli2021Towards_RN18", "models", "cifar10", "Linf")  # doctest: +SKIP
>>> model = load_zoo_model(entry)                                                  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import torch.nn as nn

#: RobustBench's threat models that arow evaluates, and arow's name of each norm
THREAT_MODELS = {"Linf": "linf", "L2": "l2"}
#: RobustBench's radius of each threat model on CIFAR-10 and CIFAR-100 (its leaderboards' eps)
ZOO_EPS = {"Linf": 8 / 255, "L2": 0.5}
#: the data sets of RobustBench's zoo that arow has a test set reader for
ZOO_DATASETS = ("cifar10", "cifar100")


class ZooModelError(ValueError):
    """A RobustBench model cannot be evaluated as asked; the message says which and why."""


@dataclass(frozen=True)
class ZooEntry:
    """A RobustBench zoo model whose weights are on disk: its ``name``, the ``model_dir`` robustbench
    reads, the ``dataset`` and ``threat_model`` it was trained for, and its weight ``files``."""

    name: str
    model_dir: Path
    dataset: str
    threat_model: str
    files: tuple[Path, ...]

    @property
    def path(self) -> Path:
        """``DIR/<dataset>/<threat model>/<NAME>.pt``: the checkpoint robustbench reads (an ensemble's files
        are named after it)."""
        return self.model_dir / self.dataset / self.threat_model / f"{self.name}.pt"

    @property
    def norm(self) -> str:
        return THREAT_MODELS[self.threat_model]

    @property
    def eps(self) -> float:
        return ZOO_EPS[self.threat_model]


def _robustbench(module: str) -> Any:
    """``module`` of robustbench (or a package it uses), or one line saying what is missing."""
    _alias_autoattack()
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if missing.partition(".")[0] == "robustbench":
            raise ZooModelError("--robustbench-model needs robustbench: pip install -e '.[robustbench]'") from None
        if missing == "pkg_resources":
            raise ZooModelError("--robustbench-model: robustbench imports pkg_resources, which setuptools 81 and "
                                "newer no longer have: pip install 'setuptools<81'") from None
        raise ZooModelError(f"--robustbench-model: robustbench could not be imported ({e})") from None


def _alias_autoattack() -> None:
    """robustbench imports AutoAttack as ``autoattack`` (the module of its GitHub release), while the
    dependency it declares on PyPI, pyautoattack (arow's own), installs the same code as ``pyautoattack``:
    without an ``autoattack``, that name is given to pyautoattack."""
    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    try:
        pyautoattack = importlib.import_module("pyautoattack")
        state = importlib.import_module("pyautoattack.state")
    except ImportError:
        return  # robustbench's own import then says what is missing
    sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, state


def zoo_entry(name: str, model_dir: Union[str, os.PathLike], dataset: str = "cifar10",
              threat_model: str = "Linf") -> ZooEntry:
    """The zoo model ``name`` for ``dataset`` and ``threat_model``, checked against robustbench's zoo and
    its weights found in ``model_dir``; a one-line :class:`ZooModelError` otherwise. Nothing is loaded."""
    if dataset not in ZOO_DATASETS:
        raise ZooModelError(f"--robustbench-model: --dataset must be one of {', '.join(ZOO_DATASETS)} (RobustBench's "
                            f"data sets with an arow test set), got {dataset!r}")
    if threat_model not in THREAT_MODELS:
        raise ZooModelError(f"--threat-model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}")
    enums = _robustbench("robustbench.model_zoo.enums")
    zoo = _robustbench("robustbench.model_zoo").model_dicts
    entries = zoo[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ZooModelError(f"--robustbench-model {name}: not in RobustBench's {dataset} {threat_model} zoo{hint}")
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"
    if _robustbench("timm").is_model(timm_name) or entries[name].get("gdrive_id") is None:
        raise ZooModelError(f"--robustbench-model {name}: RobustBench has no weights file for this model (it comes "
                            f"from timm's hub over the network), and arow fetches nothing at run time")
    entry = ZooEntry(name, Path(model_dir), dataset, threat_model, ())
    ids = entries[name]["gdrive_id"]
    files = tuple(Path(f"{entry.path}_m{i}.pt") for i in range(len(ids))) if isinstance(ids, list) else (entry.path,)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ZooModelError(f"--robustbench-model {name}: no weights at {', '.join(missing)} (arow downloads nothing; "
                            f"put RobustBench's file there, or pass the --model-dir that holds "
                            f"{dataset}/{threat_model}/{name}.pt)")
    return ZooEntry(name, Path(model_dir), dataset, threat_model, files)


def load_zoo_model(entry: ZooEntry) -> nn.Module:
    """The model of ``entry`` (:func:`zoo_entry`; the caller has checked the trust), built and loaded by
    ``robustbench.utils.load_model``, in eval mode."""
    missing = [str(f) for f in entry.files if not f.is_file()]
    if missing:  # removed since it was checked: robustbench would download it
        raise ZooModelError(f"--robustbench-model {entry.name}: no weights at {', '.join(missing)}")
    load_model = _robustbench("robustbench.utils").load_model
    kw = dict(model_name=entry.name, model_dir=str(entry.model_dir), dataset=entry.dataset,
              threat_model=entry.threat_model)
    try:
        try:
            return load_model(**kw).eval()
        except pickle.UnpicklingError as e:  # not weights only (PyTorch's default): unpickled fully, as trusted
            if "weights_only" not in str(e):
                raise
            with _full_unpickling():
                return load_model(**kw).eval()
    except Exception as e:  # noqa: BLE001 - whatever robustbench or PyTorch raised: one line
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ZooModelError(f"--robustbench-model {entry.name}: robustbench could not load {entry.path} ({text})") \
            from None


@contextlib.contextmanager
def _full_unpickling() -> Iterator[None]:
    """``torch.load`` calls that do not say ``weights_only`` unpickle fully, for the duration only."""
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
