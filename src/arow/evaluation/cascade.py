"""Robust accuracy on a test set: eval mode, full set by default, per-example verdicts kept.

Cheap white-box attacks (FGSM, PGD, CW) each run on every example the model classifies
correctly, so their numbers are the ones papers report; a ``cascade`` attack (AutoAttack)
runs only on the examples still robust after all attacks before it. The worst case per
example over all attacks is always reported too. Under torchrun the work is sharded across
ranks and the verdicts combined. PGD and CW draw each example's random start from a generator
seeded by ``(seed, attack name, example index)``, so their verdicts do not depend on the batch
size or the number of processes; other attacks (AutoAttack) draw from the global generator,
seeded per batch by ``(seed, attack name, batch number)``: reproducible for a given batch size,
and for any number of processes. With ``state_dir`` each finished batch is saved, so an
interrupted evaluation continues where it stopped when run again (same model, data, settings).
Every attack searches the same threat model, the L-inf or the L2 ball (``norm``).
"""
from __future__ import annotations

import base64
import contextlib
import logging
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .. import distributed
from ..attacks import Attack, get_attack, predict, unwrap
from ..runs.checkpoint import load_keyed, save_keyed
from ..rng import ExampleRNG, private_rng
from ..threat import ThreatModel, check_norm, format_eps, norm_label
from ..attacks.autoattack import digest

log = logging.getLogger(__name__)
Tensor = torch.Tensor
Progress = Callable[[str, int, int], None]  # (attack name, examples done, examples total)
_ATTACK_LINE = "arow_attack_line"  # marks the log record of the line per attack (see quiet_attack_lines)


@dataclass
class EvalResult:
    """Accuracies as fractions in [0, 1]; ``correct[name]`` is the per-example verdict."""

    n: int
    eps: float
    accuracy: dict[str, float]
    per_class: dict[str, list[float]]
    correct: dict[str, Tensor] = field(repr=False)
    seconds: dict[str, float]
    descriptions: dict[str, str]
    num_classes: int
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. AutoAttack version, seed
    seed: int = 0
    norm: str = "linf"

    @property
    def threat(self) -> str:
        """The threat model in words, e.g. ``'L2 eps 0.5'``."""
        return f"{norm_label(self.norm)} eps {format_eps(self.eps)}"

    def to_json(self) -> dict:
        return {"n": self.n, "norm": self.norm, "eps": self.eps, "threat_model": self.threat,
                "accuracy": self.accuracy, "per_class": self.per_class,
                "seconds": self.seconds, "attacks": self.descriptions, "attack_settings": self.settings,
                "eval_seed": self.seed, "verdicts": pack_verdicts(self.correct)}


def pack_verdicts(correct: dict[str, Tensor]) -> dict[str, Any]:
    """Per-example verdicts (True: still classified correctly) as base64 of ``numpy.packbits``, in
    example order: 10,000 test images take 1,668 characters per attack. :func:`unpack_verdicts` reverses it."""
    out: dict[str, Any] = {"encoding": "numpy.packbits, base64"}
    for name, v in correct.items():
        out[name] = base64.b64encode(np.packbits(v.detach().cpu().numpy().astype(bool)).tobytes()).decode()
    return out


def unpack_verdicts(packed: Any, n: int) -> dict[str, "np.ndarray"]:
    """The boolean per-example verdicts of :func:`pack_verdicts`, of an evaluation of ``n`` examples.
    Each must hold exactly ``n`` (``ceil(n / 8)`` bytes): unpacked unchecked, a short one would be
    padded with False and lower every accuracy read from it without a word. ValueError naming the
    first that does not, or that is not base64."""
    if not isinstance(packed, dict) or n < 1:
        raise ValueError(f"no per-example verdicts of {n} images")
    want, out = -(-n // 8), {}
    for name, text in packed.items():
        if name == "encoding":
            continue
        try:
            raw = base64.b64decode(text, validate=True)
        except (ValueError, TypeError):  # binascii.Error is a ValueError
            raise ValueError(f"the verdicts of {name!r} are not base64") from None
        if len(raw) != want:
            raise ValueError(f"the verdicts of {name!r} hold {len(raw)} bytes, {n} images take {want}")
        out[name] = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n).astype(bool)
    return out


def per_class_accuracy(correct: Tensor, y: Tensor, num_classes: int) -> list[float]:
    total = torch.bincount(y, minlength=num_classes).float()
    hit = torch.bincount(y[correct], minlength=num_classes).float()
    return [float(h / t) if t > 0 else float("nan") for h, t in zip(hit, total)]


def _combine(mask: Tensor) -> Tensor:
    """The union over ranks of boolean masks over all n examples (each rank set only its own)."""
    if not distributed.info().enabled:
        return mask
    return distributed.all_reduce_sum(mask.to(torch.int32)) > 0


#: default evaluation batch on the CPU: PGD-20 on a 2-core CPU ran 1.8x faster at 100 than at 500 (small
#: CNN, Fashion-MNIST; benchmarks/bench_eval.py), with the same verdicts (each example's random start is its own)
EVAL_BATCH_SIZE = 100
#: default evaluation batch on CUDA: a GPU needs large batches to be busy, and AutoAttack (a cascade
#: attack) gets at most one evaluation batch per call; not measured yet (benchmarks/gpu_check.py)
EVAL_BATCH_SIZE_CUDA = 500


def default_eval_batch(device: Union[str, torch.device]) -> int:
    """The evaluation batch used when none is given: :data:`EVAL_BATCH_SIZE` (100) on the CPU,
    :data:`EVAL_BATCH_SIZE_CUDA` (500) on CUDA. PGD's and CW's verdicts do not depend on it.

    >>> default_eval_batch("cpu"), default_eval_batch(torch.device("cuda", 1))
    (100, 500)
    """
    return EVAL_BATCH_SIZE_CUDA if torch.device(device).type == "cuda" else EVAL_BATCH_SIZE


def _get_tf32() -> list[tuple[Any, str, Any]]:
    """The TF32 switches of float32 matmuls and cuDNN convolutions as ``(owner, attribute, value)``.

    Read through the legacy ``allow_tf32`` flags where they can be read; a process that set TF32
    through PyTorch's newer ``fp32_precision`` API cannot read those (PyTorch refuses a mix of the
    two), and its ``fp32_precision`` values are kept instead."""
    saved = []
    for legacy, modern in ((torch.backends.cuda.matmul, "matmul"), (torch.backends.cudnn, "conv")):
        try:
            saved.append((legacy, "allow_tf32", bool(legacy.allow_tf32)))
        except RuntimeError:  # TF32 set with the fp32_precision API: restore through it
            owner = torch.backends.cuda.matmul if modern == "matmul" else torch.backends.cudnn.conv
            saved.append((owner, "fp32_precision", owner.fp32_precision))
    return saved


@contextlib.contextmanager
def float32_kernels(tf32: bool = False, *, benchmark: Optional[bool] = False) -> Iterator[None]:
    """TF32 for float32 matmuls and cuDNN convolutions set to ``tf32``, and cuDNN's autotuner
    (``torch.backends.cudnn.benchmark``) to ``benchmark`` (None: left as it is), while inside; the
    process's own flags are restored on exit, whichever API set them.

    On CUDA (Ampere and later) TF32 rounds the inputs of float32 matmuls and convolutions to 10
    mantissa bits: faster, but no longer what the model computes in float32; training turns the
    autotuner on, which re-tunes every new batch shape. On the CPU the flags have no effect, but
    they are set and restored all the same.

    >>> with float32_kernels(False):
    ...     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    (False, False, False)
    """
    saved = _get_tf32()
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)
    if benchmark is not None:
        torch.backends.cudnn.benchmark = bool(benchmark)
    try:
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)
        torch.backends.cudnn.benchmark = autotune


def precision_record(device: torch.device, tf32: bool) -> dict[str, str]:
    """What eval.json records about how the attacks computed: the float32 matmul/convolution
    precision (``"ieee"`` or ``"tf32"``, as PyTorch names them) and the device's name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"float32_matmul": "tf32" if tf32 else "ieee", "device": name}


#: part of the resume key: state saved by arow <= 0.3.0 (PGD's random start drawn per batch) is not reused
_RNG_SCHEME = "per-example-start-1"


def _batch_seed(seed: int, name: str, batch: int) -> int:
    return ((seed * 1_000_003 + zlib.crc32(name.encode())) * 1_000_003 + batch) & 0x7FFF_FFFF_FFFF


def example_seed(seed: int, name: str) -> int:
    """The seed of the per-example random starts of attack ``name`` in an evaluation seeded ``seed``
    (an :class:`~arow.rng.ExampleRNG` over the examples' positions draws from it)."""
    return _batch_seed(seed, name, 0)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[Union[str, Attack]] = ("clean", "pgd20"),
    *,
    eps: float,
    norm: str = "linf",
    num_classes: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: Optional[Progress] = None,
    seed: int = 0,
    state_dir: Optional[Union[str, Path]] = None,
) -> EvalResult:
    """Evaluate ``model`` on ``(x, y)`` (inputs in [0, 1]) under each attack, in order.

    Attacks named by a string are built at radius ``eps`` in the ``norm`` ball (``"linf"`` or
    ``"l2"``); an :class:`Attack` passed in must search the same norm. Every adversarial example
    is checked to lie in that ball and in [0, 1].

    Attacks run in float32 (no autocast) on batches of ``batch_size`` examples (default:
    :func:`default_eval_batch` of ``x``'s device). Their random
    starts come from ``seed``: the same call gives the same verdicts, with any number of
    torchrun processes (the batches are the same; ranks take every N-th one), and the caller's
    global RNG state is left untouched. ``state_dir`` (e.g. ``RUN/eval_state``) keeps each
    attack's finished batches; a rerun skips them, and its verdicts equal an uninterrupted run's.
    A ``state_dir`` that is a symbolic link is not followed (nothing is kept, with a warning).

    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> r = evaluate(m, torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,)), ["clean", "pgd5"], eps=0.1)
    >>> sorted(r.accuracy) == ["clean", "pgd5", "worst_case"]
    True
    """
    if not eps >= 0:  # also NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_norm(norm)
    batch_size = default_eval_batch(x.device) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if state_dir is not None and Path(state_dir).is_symlink():  # planted: state would be written (and deleted) there
        log.warning("not keeping evaluation state in %s: it is a symbolic link (to %s); delete it to resume "
                    "interrupted evaluations", state_dir, Path(state_dir).resolve())
        state_dir = None
    with torch.autocast(x.device.type, enabled=False):  # attacks in float32, whatever the caller's context
        return _evaluate(model, x, y, attacks, eps=eps, norm=norm, num_classes=num_classes, batch_size=batch_size,
                         progress=progress, seed=seed, state_dir=state_dir)


def _evaluate(model, x, y, attacks, *, eps, norm, num_classes, batch_size, progress, seed, state_dir) -> EvalResult:
    built = [a if isinstance(a, Attack) else get_attack(a, eps, norm=norm) for a in attacks]
    names = [a.name for a in built]
    if len(set(names)) != len(names):
        raise ValueError(f"attack listed twice: {names}")
    wrong = [a.name for a in built if getattr(a, "norm", "linf") != norm and a.name != "clean"]
    if wrong:
        raise ValueError(f"attack(s) {', '.join(wrong)} search another threat model than norm={norm!r}")
    ball = ThreatModel(eps=eps, norm=norm)
    n = len(x)
    num_classes = num_classes or int(y.max()) + 1
    lo, hi = distributed.shard_range(n)
    clean_ok = torch.zeros(n, dtype=torch.bool, device=x.device)
    clean_ok[lo:hi] = predict(model, x[lo:hi], batch_size) == y[lo:hi]
    clean_ok = _combine(clean_ok)
    robust = clean_ok.clone()  # worst case so far
    correct, seconds = {}, {}
    key = _run_key(model, x, y, eps, seed, batch_size, norm) if state_dir is not None else {}
    for atk in built:
        t0 = time.perf_counter()
        if atk.name == "clean":
            verdict = clean_ok.clone()
        else:
            # A cascade attack (AutoAttack) only sees what all attacks before it left standing.
            base = robust if getattr(atk, "cascade", False) else clean_ok
            todo = base.nonzero().squeeze(1)
            fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
            stage = _Stage(Path(state_dir), atk, {**key, "other attack settings": _digest(atk.name, atk.description)},
                           todo, fooled) if state_dir is not None else None
            # an error in one rank's share (an attack leaving the ball) is raised on every rank: the
            # others would otherwise wait for it in _combine until the process group's timeout
            distributed.agree_on_errors(_attack_share, model, x, y, atk, todo, fooled, ball, batch_size, seed,
                                        stage, progress, t0)
            if stage is not None:
                t0 -= stage.seconds_before  # report the time of the interrupted runs too
            verdict = base & ~_combine(fooled)
        robust &= verdict
        correct[atk.name] = verdict
        seconds[atk.name] = time.perf_counter() - t0
        log.info("%s: %.2f%% (%.1fs)", atk.name, 100 * verdict.float().mean(), seconds[atk.name],
                 extra={_ATTACK_LINE: True})
    correct["worst_case"] = robust
    y_all = y.to(robust.device)
    accuracy = {k: float(v.float().mean()) for k, v in correct.items()}
    per_class = {k: per_class_accuracy(v, y_all, num_classes) for k, v in correct.items()}
    descriptions = {a.name: a.description for a in built}
    settings = {a.name: dict(a.meta) for a in built if getattr(a, "meta", None)}
    return EvalResult(n, eps, accuracy, per_class, correct, seconds, descriptions, num_classes, settings, seed,
                      norm)


def _attack_share(model: nn.Module, x: Tensor, y: Tensor, atk: Attack, todo: Tensor, fooled: Tensor,
                  ball: ThreatModel, batch_size: int, seed: int, stage: Optional["_Stage"],
                  progress: Optional[Progress], t0: float) -> None:
    """This rank's batches of ``atk`` on the examples ``todo``: whom it fooled goes into ``fooled``.

    The batches are cut from ``todo`` in order and dealt round robin to the ranks (equal work per
    rank); a batch ``stage`` already holds is skipped, each finished one saved there."""
    d = distributed.info()
    example_seed = _batch_seed(seed, atk.name, 0)  # one per attack: each example's start is its own
    mine = list(range(0, len(todo), batch_size))[d.rank :: d.world_size]
    total, done = sum(min(batch_size, len(todo) - s) for s in mine), 0
    for start in mine:
        idx = todo[start : start + batch_size]
        if stage is not None and start in stage.done:  # finished before an interruption
            done += len(idx)
            continue
        kw: dict[str, Any] = {}
        if stage is not None and atk.resumable:
            kw["state_path"] = stage.batch_path(start)
        if atk.per_example_rng:
            kw["rng"] = ExampleRNG(example_seed, idx)
        with private_rng(x.device, _batch_seed(seed, atk.name, start // batch_size)):
            x_adv = atk(model, x[idx], y[idx], **kw)
        _check_ball(x_adv, x[idx], ball, atk.name)
        fooled[idx] = predict(model, x_adv, batch_size) != y[idx]
        done += len(idx)
        if stage is not None:
            stage.save(start, fooled, time.perf_counter() - t0)
        if progress is not None:  # this rank's share
            progress(atk.name, done, total)


def _digest(*items: Any) -> str:

    return digest(*items)


def _run_key(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int, batch_size: int,
             norm: str = "linf") -> dict[str, str]:
    """What a saved verdict depends on besides the attack, part by part (a digest each): weights,
    data, norm and eps, seed, batching, ranks. Each part is named by how a difference in it reads,
    so that state saved under other settings is ignored with the reason."""
    d = distributed.info()
    return {"another model (other weights)": _digest(unwrap(model)),
            "other test examples (another --n or data set)": _digest(x, y),
            "another eps or norm": _digest(norm, float(eps)), "another evaluation seed": _digest(seed),
            "another --batch-size": _digest(batch_size), "another number of processes": _digest(d.rank, d.world_size),
            "an older arow (another random-start scheme)": _RNG_SCHEME}


class _Stage:
    """One attack's progress on disk: which of this rank's batches are done and whom they fooled.

    The file is keyed by everything the verdicts depend on (``parts`` of :func:`_run_key` and the
    attack's, and the examples it attacks: ``todo``); a file with another key (another model, data,
    eps, seed, attack setting or set of examples) is ignored, saying which, and replaced.
    """

    def __init__(self, folder: Path, atk: Attack, parts: dict[str, str], todo: Tensor, fooled: Tensor) -> None:
        d = distributed.info()
        self.tag = re.sub(r"[^A-Za-z0-9_.-]", "_", atk.name) + (f".rank{d.rank}" if d.enabled else "")
        self.parts, self.key = parts, _digest(*parts.values(), todo)
        self.folder, self.done, self.seconds_before = folder, set(), 0.0
        self.path = folder / f"{self.tag}.pt"
        state = load_keyed(self.path, self.key, f"{atk.name} evaluation state", parts=parts)
        if state is not None:
            self.done, self.seconds_before = set(state["done"]), float(state["seconds"])
            fooled.copy_(state["fooled"].to(fooled.device))
            log.info("%s: resuming from %s (%d batch(es) already done)", atk.name, self.path, len(self.done))

    def batch_path(self, start: int) -> Path:
        return self.folder / f"{self.tag}.batch{start}.pt"

    def save(self, start: int, fooled: Tensor, seconds: float) -> None:
        self.done.add(start)
        save_keyed({"done": sorted(self.done), "fooled": fooled.cpu(), "seconds": self.seconds_before + seconds},
                   self.key, self.path, parts=self.parts)
        self.batch_path(start).unlink(missing_ok=True)


def _check_ball(x_adv: Tensor, x: Tensor, ball: ThreatModel, name: str) -> None:
    """An attack that leaves the threat model would report a meaningless number: refuse it."""
    if len(x) == 0:
        return
    dev, lo, hi = float(ball.distance(x_adv, x).max()), float(x_adv.min()), float(x_adv.max())
    if dev > ball.eps + 1e-5 or lo < 0.0 or hi > 1.0:
        raise RuntimeError(f"attack {name} left the threat model: max {ball.label} |delta| {dev:.4g} "
                           f"(eps {ball.eps}), range [{lo:.4g}, {hi:.4g}]")


class _NoAttackLines(logging.Filter):
    """Drops the cascade's line per attack (``pgd20: 74.30% (41.2s)``), and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _ATTACK_LINE, False)


@contextlib.contextmanager
def quiet_attack_lines() -> Iterator[None]:
    """Inside, the cascade does not log its line per attack; its other lines (an evaluation resuming
    from its saved state, warnings) still show. For callers that print the result their own way: a
    validation line, an eps-curve table, the table of ``arow train`` and ``arow eval``."""
    quiet = _NoAttackLines()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)
