"""Where a model to evaluate comes from, and loading it: :func:`load_source`.

A source is a run folder, an arow checkpoint (``.pt``), a safetensors export, your own model built
by a Python factory (``pkg.module:function``) with weights, a TorchScript file or an exported
program (``torch.export``, ``.pt2``), or a model of the RobustBench zoo by name (:func:`open_robustbench`,
:mod:`arow.evaluation.zoo`). :func:`open_source` says what is known about it before
anything is loaded (:class:`ModelSource`: the data set, norm and eps it was trained at, the run
folder, the name its results are filed under); :meth:`ModelSource.load` then loads the model
(:class:`LoadedModel`), an ``nn.Module`` in eval mode taking inputs in [0, 1] and returning logits.

Nothing runs code from a file unless asked. Checkpoints and weights are read without unpickling
objects (``.safetensors``, or ``torch.load(weights_only=True)``). TorchScript files and exported
programs ARE code (their graph runs with your permissions, and can read and write files), so
loading one needs ``trust_code=True`` (``--trust-code``). The kind of a file is what it declares:
``.pt2`` (or ``model_format="exported-program"``) is an exported program, a TorchScript archive
(or ``model_format="torchscript"``) TorchScript; a ``.pt`` file is never opened as an exported
program, whatever it holds. A factory is your own code, named explicitly. A RobustBench checkpoint is a
pickle that the robustbench package loads with ``torch.load``: it needs ``trust_code=True`` too.

>>> loaded = load_source("runs/fmnist-arow")                                     # doctest: +SKIP
>>> loaded = load_source(None, model_factory="mypkg.nets:wrn", weights="wrn.safetensors",
...                      dataset="cifar10")                                        # doctest: +SKIP
>>> loaded = load_source("model.pt2", dataset="cifar10", trust_code=True)       # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pickletools
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.nn as nn

from ..data import DATASETS
from ..models.spec import ModelSpec
from ..runs.checkpoint import read_checkpoint
from ..runs.records import model_from_checkpoint, resolve_checkpoint
from ..runs.rundir import RunDir
from .zoo import ZooEntry, load_zoo_model, zoo_entry

PathLike = Union[str, os.PathLike]
#: the kinds of model files that are code, loaded only with ``trust_code=True``
MODEL_FORMATS = ("torchscript", "exported-program")
ModelFormat = Literal["torchscript", "exported-program"]
#: the kinds of source that arow wrote (a checkpoint holds what is known about the model)
AROW_KINDS = ("run", "checkpoint", "export")


class UserModelError(ValueError):
    """The model could not be built or loaded; the message says which and why."""


class ExportedModel(nn.Module):
    """An exported program's module, which cannot switch between train and eval mode itself.

    It computes what it was exported in (export in eval mode); ``train()``/``eval()`` only set the
    flag here, so attacks that put a model in eval mode work on it.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode  # the exported graph's mode is fixed; its children are not switched
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


@dataclass(frozen=True)
class ModelSource:
    """What is known about a model before it is loaded (nothing has run yet).

    ``kind``: run, checkpoint, export (arow wrote it), factory (your function; its weights from
    ``weights`` or from a run's checkpoint), torchscript, exported-program, module (in memory), or
    robustbench (a zoo model, ``path`` its checkpoint ``DIR/<dataset>/<threat model>/<NAME>.pt``).
    ``trained_norm``/``trained_eps``: what it was trained at (None: not known, your own model).
    ``run_dir`` and ``tag``: the run folder its results go to and the checkpoint it names
    (``eval_<tag>.json``); ``info``: what the results record about it (checkpoint, method, ...).
    """

    kind: str
    name: str
    path: Optional[Path] = None
    dataset: Optional[str] = None
    trained_norm: Optional[str] = None
    trained_eps: Optional[float] = None
    run_dir: Optional[Path] = None
    tag: str = "final"
    data_dir: Optional[str] = None
    info: dict[str, Any] = field(default_factory=dict)
    factory: Optional[str] = None
    weights: Optional[Path] = None
    module: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    checkpoint: Optional[dict[str, Any]] = field(default=None, repr=False, compare=False)

    @classmethod
    def in_run(cls, model: nn.Module, run_dir: PathLike, *, dataset: str, norm: str, eps: float,
               which: str = "final", info: Optional[dict[str, Any]] = None) -> "ModelSource":
        """A model in memory that belongs to the run folder ``run_dir`` (e.g. the one ``arow train``
        just trained), with what is known about it; nothing is read from the folder. ``info``: what
        the results record about it (``checkpoint``, ``method``, ``model``, ``seed``)."""
        run = Path(run_dir)
        info = {"which": which, **(info or {})}
        src = cls("run", str(info.get("model") or type(model).__name__), path=run, trained_norm=norm,
                  trained_eps=float(eps), run_dir=run, tag=which, info=info, module=model)
        return _with_dataset(src, dataset)

    @property
    def user_model(self) -> bool:
        """A model arow did not build: its training (eps, norm) is not known."""
        return self.trained_norm is None

    def results_path(self, n: int, full: int, norm: str) -> Optional[Path]:
        """Where an evaluation of ``n`` of ``full`` test images in ``norm`` is written by default: the
        run folder's ``eval*.json`` (:meth:`RunDir.eval_path`), else next to the model's file or
        weights, named after it (``eval_<file>[_<norm>][_n<N>].json``); None when there is no file
        (a factory without weights, a model in memory)."""
        if self.run_dir is not None:
            other = norm if norm != self.trained_norm else None
            return RunDir(self.run_dir).eval_path(self.tag, n, full, other)
        beside = self.weights if self.weights is not None else self.path
        if beside is None:
            return None
        stem = f"eval_{beside.stem}" + (f"_{norm}" if norm != "linf" else "") + (f"_n{n}" if n < full else "")
        return beside.parent / f"{stem}.json"

    def robustbench_path(self, n: int, full: int, norm: str) -> Optional[Path]:
        """Where the RobustBench model info goes by default (a run's folder only, see
        :meth:`RunDir.robustbench_path`); None otherwise."""
        if self.run_dir is None:
            return None
        return RunDir(self.run_dir).robustbench_path(self.tag, n, full, norm if norm != self.trained_norm else None)

    def load(self, device: Any = "cpu") -> "LoadedModel":
        """Load (or build) the model: the only step that runs a factory, TorchScript or an exported
        program. In eval mode on ``device``."""
        if self.module is not None:
            model = self.module
            if self.weights is not None:
                load_weights(model, self.weights)
        elif self.kind in AROW_KINDS:
            model = model_from_checkpoint(self.checkpoint or {}, device=device)
        elif self.kind == "factory":
            model = _from_factory(str(self.factory))
            if self.checkpoint is not None:
                _load_state(model, self.checkpoint["model"], str(self.checkpoint.get("path")))
            elif self.weights is not None:
                load_weights(model, self.weights)
        elif self.kind == "robustbench":
            model = load_zoo_model(_zoo_entry_at(self.name, Path(str(self.path))))
        else:
            model = _from_code_file(self.kind, Path(str(self.path)), device)
        return LoadedModel(model.to(device).eval(), self)


@dataclass
class LoadedModel:
    """A model ready to evaluate (eval mode) and what is known about it (:class:`ModelSource`)."""

    model: nn.Module
    source: ModelSource

    @property
    def dataset(self) -> Optional[str]:
        return self.source.dataset

    @property
    def norm(self) -> Optional[str]:
        """The norm it was trained in (None: not known)."""
        return self.source.trained_norm

    @property
    def eps(self) -> Optional[float]:
        """The eps it was trained at (None: not known)."""
        return self.source.trained_eps

    @property
    def run_dir(self) -> Optional[Path]:
        return self.source.run_dir

    @property
    def name(self) -> str:
        return self.source.name


def load_source(source: Union[PathLike, nn.Module, None] = None, *, dataset: Optional[str] = None,
                model_factory: Optional[str] = None, weights: Optional[PathLike] = None, trust_code: bool = False,
                model_format: Optional[ModelFormat] = None, which: str = "final", device: Any = "cpu") -> LoadedModel:
    """The model of ``source`` loaded, with what is known about it: :func:`open_source` (every
    argument checked, nothing loaded), then :meth:`ModelSource.load`."""
    return open_source(source, dataset=dataset, model_factory=model_factory, weights=weights, trust_code=trust_code,
                       model_format=model_format, which=which).load(device)


def open_source(source: Union[PathLike, nn.Module, None] = None, *, dataset: Optional[str] = None,
                model_factory: Optional[str] = None, weights: Optional[PathLike] = None, trust_code: bool = False,
                model_format: Optional[ModelFormat] = None, which: str = "final",
                model: Optional[nn.Module] = None) -> ModelSource:
    """What ``source`` is and what is known about its model, every argument checked; nothing is
    loaded and no code runs (a checkpoint is read without unpickling objects).

    ``source``: a run folder (its checkpoint ``which``), a checkpoint, a ``.safetensors`` export, a
    TorchScript or exported-program file (``trust_code`` required; ``model_format`` declares a
    file's kind), an ``nn.Module``, or None with ``model_factory``. ``model_factory``
    (``pkg.module:function``) builds your own model; its weights come from ``weights`` or, for a run
    of your own model class, from the run's checkpoint. ``dataset``: the test set (default: the one
    the model was trained on; required for your own model). ``model``: the model of a run folder or
    checkpoint ``source`` already in memory (e.g. the one just trained), which is then evaluated as
    it is, with what the checkpoint says about it.
    """
    if model_format is not None and model_format not in MODEL_FORMATS:
        raise UserModelError(f"--model-format must be one of {', '.join(MODEL_FORMATS)}, got {model_format!r}")
    if model_factory is not None:
        _check_factory_name(model_factory)
    if weights is not None and model_factory is None and not isinstance(source, nn.Module):
        raise UserModelError("--weights goes with --model-factory pkg.module:function")
    weights = Path(weights) if weights is not None else None
    if weights is not None and not weights.is_file():
        raise UserModelError(f"--weights {weights}: no such file")
    if isinstance(source, nn.Module):
        src = ModelSource("module", type(source).__name__, weights=weights, module=source)
    elif source is None:
        if model_factory is None:
            raise UserModelError("give a run folder, checkpoint, .safetensors export, TorchScript or .pt2 file, "
                                 "or --model-factory pkg.module:function")
        src = ModelSource("factory", model_factory.partition(":")[2], factory=model_factory, weights=weights)
    else:
        path = Path(source)
        kind = declared_kind(path, model_format)
        if kind in MODEL_FORMATS:
            if model_factory is not None:
                raise UserModelError(f"give either a model file ({path}) or --model-factory, not both")
            _check_trust(path, kind, trust_code)
            src = ModelSource(kind, path.stem, path=path)
        else:
            src = _arow_source(path, kind, which, model_factory, weights, in_memory=model is not None)
            src = dataclasses.replace(src, module=model) if model is not None else src
    return _with_dataset(src, dataset)


def open_robustbench(robustbench_model: str, model_dir: PathLike = "models", *, dataset: Optional[str] = None,
                     threat_model: Literal["Linf", "L2"] = "Linf", trust_code: bool = False) -> ModelSource:
    """A model of the RobustBench zoo (:mod:`arow.evaluation.zoo`): its name checked against robustbench's
    zoo, its weights found on disk (nothing is downloaded) and the trust checked; nothing is loaded. Its
    results go next to its checkpoint (``eval_<NAME>.json``); the radius defaults to RobustBench's.

    >>> src = open_robustbench("Addepalli2021Towards_RN18", "models", trust_code=True)  # doctest: +SKIP

    Args:
        robustbench_model: evaluate this model of the RobustBench zoo (needs pip install -e '.[robustbench]'),
            built and loaded by robustbench's own loader from ``model_dir``/<dataset>/<threat model>/NAME.pt;
            the file must be there (nothing is downloaded). Its checkpoint is a pickle that robustbench
            loads with torch.load: pass --trust-code if you trust it. --dataset defaults to cifar10
        model_dir: the folder robustbench keeps its models in (its model_dir), holding
            <dataset>/<threat model>/NAME.pt
        dataset: the zoo's data set (cifar10 or cifar100; default cifar10)
        threat_model: the zoo's threat model of ``robustbench_model``; the default --eps is RobustBench's,
            8/255 for Linf and 0.5 for L2
        trust_code: load the pickled checkpoint (robustbench's torch.load can run code from the file)
    """
    entry = zoo_entry(robustbench_model, model_dir, dataset or "cifar10", threat_model)
    if not trust_code:
        raise UserModelError(f"{entry.path}: a RobustBench checkpoint is a pickle (torch.save) that robustbench "
                             f"loads with torch.load, which can run code from the file; pass --trust-code if you "
                             f"trust where it came from")
    info = {"model": entry.name, "source": "RobustBench model zoo", "checkpoint": str(entry.path),
            "threat_model": entry.threat_model}
    return ModelSource("robustbench", entry.name, path=entry.path, dataset=entry.dataset, trained_norm=entry.norm,
                       trained_eps=entry.eps, info=info)


def _zoo_entry_at(name: str, path: Path) -> ZooEntry:
    """The zoo entry whose checkpoint is ``path`` (``DIR/<dataset>/<threat model>/<NAME>.pt``), checked again."""
    return zoo_entry(name, path.parents[2], path.parent.parent.name, path.parent.name)


def declared_kind(path: Path, model_format: Optional[str] = None) -> str:
    """What a path declares itself to be, without loading it: ``run`` (a folder), ``export``
    (``.safetensors``), ``exported-program`` (``.pt2``), ``torchscript`` (a TorchScript archive),
    else ``checkpoint``; ``model_format`` overrides it for a file."""
    if not path.exists():
        raise UserModelError(f"{path}: no such file or folder (or pass --model-factory pkg.module:function)")
    if path.is_dir():
        if model_format is not None:
            raise UserModelError(f"--model-format {model_format}: {path} is a folder, not a model file")
        return "run"
    if model_format is not None:
        return model_format
    if path.suffix == ".pt2":
        return "exported-program"
    if path.suffix == ".safetensors":
        return "export"
    if any("/code/" in n for n in _zip_names(path)):  # a TorchScript archive (torch.jit.save) says so itself
        return "torchscript"
    return "checkpoint"


def _check_trust(path: Path, kind: str, trust_code: bool) -> None:
    if trust_code:
        return
    what = "a TorchScript file" if kind == "torchscript" else "an exported program (torch.export)"
    raise UserModelError(f"{path}: {what} is code that runs with your permissions when it is loaded and evaluated "
                         f"(it can read and write files); pass --trust-code if you trust where it came from, or "
                         f"evaluate its weights with --model-factory pkg.module:function --weights FILE")


def _arow_source(path: Path, kind: str, which: str, factory: Optional[str], weights: Optional[Path],
                 in_memory: bool = False) -> ModelSource:
    """A run folder, checkpoint or export: its checkpoint read (no code run) and what it says
    (``in_memory``: its model is at hand, so a model of the user's own class needs no factory)."""
    if kind == "checkpoint":
        _refuse_foreign_pickle(path)
    ckpt = read_checkpoint(resolve_checkpoint(path, which))  # type: ignore[arg-type]
    cfg, spec = ckpt.get("config") or {}, _model_spec(ckpt)
    if spec.custom and factory is None and not in_memory:
        raise UserModelError(f"{path}: holds a model of your own class ({spec.name}), which arow cannot "
                             f"rebuild: pass --model-factory pkg.module:function (a function returning a "
                             f"{spec.name}; the weights come from {ckpt['path']})")
    if factory is not None and weights is not None:
        raise UserModelError(f"--weights {weights}: the weights come from {path}; give one of them")
    threat = ckpt.get("threat") or {}
    norm = str(threat.get("norm") or cfg.get("norm") or "linf")  # checkpoints before L2: L-inf
    eps = threat.get("eps")
    tag = which if path.is_dir() else path.stem
    info = {"checkpoint": ckpt["path"], "which": tag, "method": cfg.get("method"), "model": spec.name,
            "seed": cfg.get("seed")}
    return ModelSource("factory" if factory else kind, spec.name, path=path,
                       dataset=spec.dataset or cfg.get("dataset"), trained_norm=norm,
                       trained_eps=float(eps) if eps is not None else None,
                       run_dir=path if path.is_dir() else path.parent, tag=tag, data_dir=cfg.get("data_dir"),
                       info=info, factory=factory, checkpoint=ckpt)


def _model_spec(ckpt: dict[str, Any]) -> ModelSpec:
    """The model spec a checkpoint holds (:class:`~arow.models.spec.ModelSpec`), one line naming the file if
    it is malformed."""
    try:
        return ModelSpec.from_dict(ckpt.get("model_spec") or {})
    except ValueError as e:
        raise UserModelError(f"{ckpt.get('path')}: {e}") from None


def _with_dataset(src: ModelSource, dataset: Optional[str]) -> ModelSource:
    """``src`` with its test set decided and checked against what the model takes."""
    chosen = dataset or src.dataset
    if chosen not in DATASETS:
        if dataset is not None:
            raise UserModelError(f"--dataset must be one of {', '.join(DATASETS.names())}, got {dataset!r}")
        if src.checkpoint is None:
            raise UserModelError(f"--dataset is required for your own model (one of: {', '.join(DATASETS.names())})")
        said = f"was trained on {chosen!r}, not a built-in data set" if chosen else "does not say which data set " \
                                                                                    "it was trained on"
        raise UserModelError(f"{src.checkpoint['path']}: {said}; pass --dataset")
    spec = _model_spec(src.checkpoint) if src.checkpoint is not None else None
    info = DATASETS.get(chosen)
    shape = (spec.in_channels, spec.image_size, spec.num_classes) if spec is not None else (None, None, None)
    if None not in shape and shape != (info.in_channels, info.image_size, info.num_classes):
        raise UserModelError(f"--dataset {chosen} ({info.in_channels}x{info.image_size}x{info.image_size}, "
                             f"{info.num_classes} classes) does not fit the model in {src.checkpoint['path']} "
                             f"({shape[0]}x{shape[1]}x{shape[1]}, {shape[2]} classes)")
    return dataclasses.replace(src, dataset=chosen)


def _zip_names(path: Path) -> list[str]:
    """The member names of a zip file (a torch.save, TorchScript or .pt2 archive); [] for others."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def _refuse_foreign_pickle(path: Path) -> None:
    """A ``.pt`` file that is not a checkpoint but an exported program, or a whole pickled object
    (``torch.save(model)``): refused with what works instead, before anything is unpickled."""
    names = _zip_names(path)
    if any(n.endswith("/archive_format") for n in names):
        raise UserModelError(f"{path}: holds an exported program (torch.export), which is code, under a name that "
                             f"is not .pt2; if you trust where it came from, rename it to .pt2 or pass "
                             f"--model-format exported-program, with --trust-code")
    cls = _pickled_class(path, names)
    if cls is not None:
        raise UserModelError(f"{path}: a whole pickled {cls} object (torch.save(model)), which arow does not "
                             f"unpickle: it could run any code. Save its weights instead (torch.save(model."
                             f"state_dict(), FILE) or safetensors) and evaluate them with --model-factory "
                             f"pkg.module:function --weights FILE")


def _pickled_class(path: Path, names: list[str]) -> Optional[str]:
    """The class of the object at the top of a ``torch.save`` file's pickle, when it is an object
    rather than a dict or list: read from the pickle's opcodes (``pickletools``), nothing executed."""
    pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
    if pkl is None:
        return None
    try:
        with zipfile.ZipFile(path) as z:
            if z.getinfo(pkl).file_size > 64 << 20:
                return None
            data = z.read(pkl)
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL":
                return ".".join(strings[-2:])
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(str(arg))
            elif op.name not in ("PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                return None  # the top object is built otherwise: a dict, list, ... (a checkpoint)
    except Exception:  # noqa: BLE001 - not a pickle pickletools can read: the checkpoint reader says why
        return None
    return None


# --------------------------------------------------------------------------- loading
def _check_factory_name(spec: str) -> None:
    mod, sep, fn = spec.partition(":")
    if not (sep and mod and fn.isidentifier()):
        raise UserModelError(f"--model-factory must be pkg.module:function, got {spec!r}")


def _from_factory(spec: str) -> nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `pkg.module` of the directory the command runs in
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserModelError(f"--model-factory {spec}: cannot import {mod_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserModelError(f"--model-factory {spec}: {mod_name} has no function {fn_name}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise UserModelError(f"--model-factory {spec}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_code_file(kind: str, path: Path, device: Any) -> nn.Module:
    """A TorchScript file or exported program, loaded by PyTorch (the caller checked the trust)."""
    try:
        if kind == "exported-program":
            return ExportedModel(torch.export.load(str(path)).module())
        return torch.jit.load(str(path), map_location=device)
    except Exception as e:  # noqa: BLE001 - whatever PyTorch raised: one line
        what = "an exported program" if kind == "exported-program" else "a TorchScript file"
        raise UserModelError(f"{path}: PyTorch could not load it as {what} "
                             f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})") \
            from None


def load_weights(model: nn.Module, path: PathLike) -> None:
    """Load a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``; a
    checkpoint dict with ``model`` or ``state_dict`` inside is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise UserModelError(f"--weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or pickled-code file: one line, whatever PyTorch raised
        raise UserModelError(f"--weights {path}: cannot be read as weights ({str(e).splitlines()[0][:200]})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserModelError(f"--weights {path}: expected a state dict, got {type(state).__name__}")
    _load_state(model, state, f"--weights {path}")


def _load_state(model: nn.Module, state: dict[str, Any], what: str) -> None:
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserModelError(f"{what}: do not fit the model ({str(e).splitlines()[0][:200]})") from None
