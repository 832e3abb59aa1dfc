"""AutoAttack (Croce & Hein, ICML 2020) through the reference implementation ``pyautoattack``.

Two registered attacks:

- ``autoattack``: the standard version (APGD-CE, APGD-T with 9 target classes, FAB-T with 9
  target classes, Square with 5000 queries; an example counts as robust only if every one of
  them fails). This is the headline robustness number. Its ``cascade`` flag makes
  :func:`arow.evaluation.cascade.evaluate` run it only on the examples still robust after the attacks
  listed before it, so the reported number is the worst case over all of them.
- ``apgd-monitor``: APGD-CE + APGD-T only, with AutoAttack's settings for those two. A cheap
  monitor, NOT AutoAttack; its description says so.

Both run in the L-inf ball or, with ``norm="l2"``, in the L2 ball (pyautoattack's ``norm="L2"``;
its standard version uses the same four attacks and budgets for both norms).

Why we do not use pyautoattack's own resume (``state_path`` of ``run_standard_evaluation``):
in version 0.2.0 it cannot resume. The state file stores the set of attacks as ``str(set)``,
so reading it back always fails the "different set of attacks" check, and the resume branch
never defines ``y_adv``. We therefore call ``run_standard_evaluation`` once per sub-attack on
the examples still robust (exactly what its own loop does, batch for batch) and keep our own
state file between sub-attacks.

>>> atk = get_autoattack(8 / 255)                         # doctest: +SKIP
>>> atk.meta["version"], atk.meta["square_n_queries"]     # doctest: +SKIP
('standard', 5000)
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..runs.checkpoint import load_keyed, save_keyed
from ..rng import private_rng
from ..threat import check_norm
from . import ATTACKS, Attack
from .base import frozen_eval, predict, unwrap

log = logging.getLogger(__name__)
Tensor = torch.Tensor

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
MONITOR_ATTACKS = ("apgd-ce", "apgd-t")
#: AutoAttack's standard budget (pyautoattack's ``_set_version('standard')`` for L-inf and L2)
STANDARD_N_ITER, STANDARD_TARGETS, STANDARD_SQUARE_QUERIES = 100, 9, 5000
_LABELS = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}
#: pyautoattack's spelling of our norms
PYAUTOATTACK_NORMS = {"linf": "Linf", "l2": "L2"}


def pyautoattack_version() -> str:
    """The installed pyautoattack version (recorded next to every AutoAttack number)."""
    import pyautoattack

    return str(getattr(pyautoattack, "__version__", "unknown"))


def digest(*items: Any) -> str:
    """A stable hex fingerprint of tensors, modules (their state) and plain values.

    >>> digest(torch.zeros(2), "a") == digest(torch.zeros(2), "a") != digest(torch.ones(2), "a")
    True
    """
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, nn.Module):
            for k, v in unwrap(item).state_dict().items():
                h.update(k.encode())
                _update(h, v)
        elif isinstance(item, Tensor):
            _update(h, item)
        else:
            h.update(repr(item).encode())
        h.update(b"|")
    return h.hexdigest()


def _update(h: "hashlib._Hash", t: Tensor) -> None:
    t = t.detach().contiguous().reshape(-1)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).cpu().numpy().tobytes())


@dataclass(frozen=True)
class AutoAttackSettings:
    """What to run. The defaults are AutoAttack's standard version; anything else is labelled.

    ``n_iter`` (APGD and FAB iterations) and ``square_queries`` exist for fast tests only:
    setting them makes the run NON-STANDARD, and every description and record says so.
    ``norm``: the threat model, ``"linf"`` or ``"l2"`` (both standard).
    """

    attacks: tuple[str, ...] = STANDARD_ATTACKS
    seed: int = 0
    n_iter: Optional[int] = None
    square_queries: Optional[int] = None
    batch_size: int = 500
    norm: str = "linf"

    def __post_init__(self) -> None:
        check_norm(self.norm)
        unknown = set(self.attacks) - set(STANDARD_ATTACKS)
        if unknown or not self.attacks:
            raise ValueError(f"AutoAttack sub-attacks must be among {STANDARD_ATTACKS}, got {self.attacks}")
        for k in ("n_iter", "square_queries"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def version(self) -> str:
        """pyautoattack's ``version`` argument: 'standard' only for the four standard attacks."""
        return "standard" if tuple(self.attacks) == STANDARD_ATTACKS else "custom"

    @property
    def standard(self) -> bool:
        """True when this is AutoAttack's standard version with its standard budget."""
        return self.version == "standard" and self.n_iter is None and self.square_queries is None


def build_autoattack(model: nn.Module, eps: float, *, num_classes: int = 10,
                     device: Union[str, torch.device] = "cpu",
                     settings: AutoAttackSettings = AutoAttackSettings()):
    """A configured ``pyautoattack.AutoAttack`` for a model with ``num_classes`` outputs, in the
    norm of ``settings`` (``norm="Linf"`` or ``"L2"`` to pyautoattack).

    Targeted attacks use ``min(9, num_classes - 1)`` target classes (9 is all there is for 10
    classes; pyautoattack would index past the logits with more). Fewer than 4 classes is
    refused: APGD-T's targeted DLR loss reads the 3rd and 4th largest logits.

    >>> aa = build_autoattack(nn.Linear(4, 10), 0.1)
    >>> aa.version, aa.attacks_to_run, aa.square.n_queries
    ('standard', ['apgd-ce', 'apgd-t', 'fab-t', 'square'], 5000)
    """
    from pyautoattack import AutoAttack

    if not eps > 0:
        raise ValueError(f"AutoAttack needs eps > 0, got {eps}")
    if num_classes < 4 and {"apgd-t", "fab-t"} & set(settings.attacks):
        raise ValueError(f"AutoAttack's targeted attacks need at least 4 classes, the model has {num_classes}")
    kw = {"attacks": list(settings.attacks)} if settings.version == "custom" else {}
    aa_log = logging.getLogger("auto-attack")  # its constructor announces the version at INFO, every batch
    level = aa_log.level
    aa_log.setLevel(max(level, logging.WARNING))
    try:
        aa = AutoAttack(model, device=device, eps=float(eps), norm=PYAUTOATTACK_NORMS[settings.norm],
                        seed=settings.seed, version=settings.version, **kw)
    finally:
        aa_log.setLevel(level)
    if settings.version == "custom":  # the monitor: the standard settings of its two attacks
        aa.apgd.n_restarts, aa.apgd_targeted.n_restarts = 1, 1
        aa.fab.n_restarts, aa.square.n_queries = 1, STANDARD_SQUARE_QUERIES
    else:  # pyautoattack's own standard configuration; a silent change upstream must not pass
        assert aa.attacks_to_run == list(STANDARD_ATTACKS), aa.attacks_to_run
        assert (aa.apgd.n_restarts, aa.apgd.n_iter, aa.apgd_targeted.n_iter) == (1, 100, 100)
        assert aa.apgd_targeted.n_target_classes == aa.fab.n_target_classes == STANDARD_TARGETS
        assert aa.square.n_queries == STANDARD_SQUARE_QUERIES
    targets = min(STANDARD_TARGETS, num_classes - 1)
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = targets
    if settings.n_iter is not None:
        for apgd in (aa.apgd, aa.apgd_targeted):
            _set_apgd_iters(apgd, settings.n_iter)
        aa.fab.n_iter = settings.n_iter
    if settings.square_queries is not None:
        aa.square.n_queries = settings.square_queries
    return aa


def _set_apgd_iters(apgd: Any, n_iter: int) -> None:
    # APGD derives its step-size checkpoints from n_iter in __init__: recompute them the same way
    apgd.n_iter = apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def describe(settings: AutoAttackSettings, *, n_targets: int = STANDARD_TARGETS) -> str:
    """The one-line description shown in tables and stored in eval.json."""
    it = settings.n_iter or STANDARD_N_ITER
    q = settings.square_queries or STANDARD_SQUARE_QUERIES
    parts = {"apgd-ce": f"APGD-CE ({it} it)", "apgd-t": f"APGD-T ({n_targets} targets, {it} it)",
             "fab-t": f"FAB-T ({n_targets} targets, {it} it)", "square": f"Square ({q} queries)"}
    body = ", ".join(parts[a] for a in settings.attacks)
    src = f"pyautoattack {pyautoattack_version()}, seed {settings.seed}"
    if settings.version == "custom":
        head = "APGD-CE+APGD-T monitor (NOT AutoAttack)" if tuple(settings.attacks) == MONITOR_ATTACKS \
            else "custom subset of AutoAttack's attacks (NOT AutoAttack)"
    else:
        head = "AutoAttack standard"
    if settings.norm != "linf":
        head = f"{head}, {PYAUTOATTACK_NORMS[settings.norm]}"
    if settings.n_iter is not None or settings.square_queries is not None:
        head = f"NON-STANDARD budget, not comparable with AutoAttack numbers ({head} attacks, changed budget)"
    note = "" if n_targets == STANDARD_TARGETS else f"; {n_targets} targets = all other classes (standard uses 9)"
    return f"{head} [{src}]: {body}; worst case per example{note}"


def settings_record(settings: AutoAttackSettings, *, n_targets: int = STANDARD_TARGETS) -> dict[str, Any]:
    """What eval.json records about an AutoAttack run."""
    return {"implementation": "pyautoattack", "pyautoattack_version": pyautoattack_version(),
            "version": settings.version, "standard": settings.standard and n_targets == STANDARD_TARGETS,
            "seed": settings.seed, "norm": PYAUTOATTACK_NORMS[settings.norm], "attacks": list(settings.attacks),
            "n_target_classes": n_targets, "apgd_n_iter": settings.n_iter or STANDARD_N_ITER,
            "fab_n_iter": settings.n_iter or STANDARD_N_ITER,
            "square_n_queries": settings.square_queries or STANDARD_SQUARE_QUERIES}


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, *,
                   settings: AutoAttackSettings = AutoAttackSettings(),
                   state_path: Optional[Union[str, Path]] = None,
                   timing: bool = False) -> tuple[Tensor, dict[str, Any]]:
    """Adversarial examples from AutoAttack, and a record: classes, targets, examples broken per sub-attack.

    The record (``info``) holds ``num_classes``, ``n_target_classes``, ``broken_by`` (sub-attack:
    examples it broke) and ``attacked_by`` (sub-attack: examples it was run on, those still
    robust); with ``timing=True`` also ``seconds_by`` (sub-attack: wall seconds), left out by
    default so that the record stays a deterministic function of the inputs. A sub-attack
    skipped on resume reports the numbers its state file kept; a state file written before
    these were recorded has none, and the sub-attack is then absent from ``attacked_by`` and
    ``seconds_by``. Timing changes nothing else (examples, verdicts, seeding).

    The model runs in eval mode with frozen parameters (restored after), on ``x``'s device.
    pyautoattack reseeds the global RNG; ours is restored on exit. With ``state_path`` the
    run saves its progress after each sub-attack and continues from there when called again
    with the same model, data and settings (a mismatching state file is ignored).

    >>> _ = torch.manual_seed(0)  # Square-L2 of pyautoattack can divide by zero on some 4x4 images
    >>> m = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    >>> x = torch.rand(4, 1, 4, 4); y = m(x).argmax(1)
    >>> fast = AutoAttackSettings(n_iter=2, square_queries=5)
    >>> x_adv, info = run_autoattack(m, x, y, 0.1, settings=fast)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
    True
    >>> x_adv, _ = run_autoattack(m, x, y, 0.5, settings=AutoAttackSettings(n_iter=2, square_queries=5, norm="l2"))
    >>> bool((x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5)
    True
    """
    net = unwrap(model)
    x, y = x.detach(), y.detach()
    path = Path(state_path) if state_path is not None else None
    # pyautoattack reseeds the CPU and the *current* CUDA device: keep both as they were
    with frozen_eval(net), private_rng(x.device), torch.no_grad():
        num_classes = int(net(x[:1]).shape[1])
        aa = build_autoattack(net, eps, num_classes=num_classes, device=x.device, settings=settings)
        key = digest(net, x, y, float(eps), asdict(settings), pyautoattack_version()) if path is not None else ""
        state = load_keyed(path, key, "AutoAttack state") if path is not None else None
        if state:
            robust = state["robust"].to(x.device)
        else:  # misclassified examples are nobody's success
            robust = predict(net, x, settings.batch_size, frozen=False) == y
        x_adv = state["x_adv"].to(x.device, x.dtype) if state else x.clone()
        broken: dict[str, int] = dict(state["broken"]) if state else {}
        # timing record; state files written before it existed lack these keys
        attacked: dict[str, int] = dict(state.get("attacked", {})) if state else {}
        seconds: dict[str, float] = dict(state.get("seconds", {})) if state else {}
        for sub in settings.attacks:
            if sub in broken:
                log.debug("AutoAttack %s: already done (state %s)", _LABELS[sub], path)
                continue
            t0 = time.perf_counter()
            idx = robust.nonzero().squeeze(1)
            broken[sub] = 0
            attacked[sub] = len(idx)
            if len(idx):
                aa.attacks_to_run = [sub]  # one sub-attack on the still-robust examples, as AA's loop does
                adv_sub, _ = aa.run_standard_evaluation(x[idx], y[idx], batch_size=settings.batch_size)
                fooled = net(adv_sub).argmax(1) != y[idx]
                x_adv[idx[fooled]] = adv_sub[fooled]
                robust[idx[fooled]] = False
                broken[sub] = int(fooled.sum())
            seconds[sub] = time.perf_counter() - t0
            log.debug("AutoAttack %s: broke %d of %d (robust now %d of %d)", _LABELS[sub], broken[sub],
                     len(idx), int(robust.sum()), len(x))
            if path is not None:
                save_keyed({"robust": robust.cpu(), "x_adv": x_adv.cpu(), "broken": broken,
                            "attacked": attacked, "seconds": seconds}, key, path)
        _check_square(broken, len(x))
    targets = min(STANDARD_TARGETS, num_classes - 1)
    info = {"num_classes": num_classes, "n_target_classes": targets, "broken_by": broken, "attacked_by": attacked}
    if timing:
        info["seconds_by"] = seconds
    return x_adv, info


def _check_square(broken: dict[str, int], n: int) -> None:
    """pyautoattack's own warning (check_square_sr), which per-sub-attack calls would skip."""
    if n and broken.get("square", 0) / n > 0.002 and len(broken) > 1:
        log.warning("Square (black-box) broke %d of %d examples that the white-box attacks could not: "
                    "possible gradient masking; the AutoAttack number may be unreliable", broken["square"], n)


def get_autoattack(eps: float, *, attacks: tuple[str, ...] = STANDARD_ATTACKS, seed: int = 0,
                   n_iter: Optional[int] = None, square_queries: Optional[int] = None,
                   batch_size: int = 500, name: Optional[str] = None, norm: str = "linf") -> Attack:
    """An :class:`Attack` running AutoAttack (standard unless told otherwise) on any batch, in ``norm``.

    Its ``meta`` holds the settings eval.json records; ``run`` accepts ``state_path=`` to resume.

    >>> atk = get_autoattack(0.1)
    >>> atk.cascade, atk.meta["version"], atk.meta["n_target_classes"], atk.meta["square_n_queries"]
    (True, 'standard', 9, 5000)
    """
    if not eps > 0:  # pyautoattack divides by eps; eps 0 would fail only when the attack runs
        raise ValueError(f"AutoAttack needs eps > 0, got {eps}")
    settings = AutoAttackSettings(tuple(attacks), seed, n_iter, square_queries, batch_size, norm)
    name = name or ("autoattack" if settings.version == "standard" else "apgd-monitor")
    atk = Attack(name, lambda m, x, y: x, describe(settings), cascade=True, resumable=True,
                 meta=settings_record(settings), norm=norm)

    def run(model: nn.Module, x: Tensor, y: Tensor, state_path: Optional[Union[str, Path]] = None) -> Tensor:
        x_adv, info = run_autoattack(model, x, y, eps, settings=settings, state_path=state_path)
        targets = info["n_target_classes"]
        if targets != atk.meta["n_target_classes"]:  # fewer classes than AutoAttack assumes: say so
            atk.description = describe(settings, n_targets=targets)
            atk.meta.update(settings_record(settings, n_targets=targets))
        return x_adv

    atk.run = run
    return atk


@ATTACKS.register("autoattack", help="AutoAttack standard via pyautoattack (APGD-CE, APGD-T, FAB-T, "
                                     "Square 5000), seed 0; runs on examples still robust (cascade)")
def _autoattack(eps: float, name: str = "autoattack", norm: str = "linf", **kwargs: Any) -> Attack:
    return get_autoattack(eps, name=name, norm=norm, **kwargs)


@ATTACKS.register("apgd-monitor", help="APGD-CE+APGD-T monitor (NOT AutoAttack): a cheap check, cascade")
def _apgd_monitor(eps: float, name: str = "apgd-monitor", norm: str = "linf", **kwargs: Any) -> Attack:
    return get_autoattack(eps, attacks=MONITOR_ATTACKS, name=name, norm=norm, **kwargs)
