"""Robust accuracy against the attack radius: :func:`eps_curve` evaluates a run's model with one
attack at several multiples of its training eps and writes ``eps_curve.json`` into the run folder
(``arow plot DIR --eps-curve`` draws it: :mod:`arow.reporting.plots`).

>>> curve = eps_curve("runs/fmnist-arow-s0", n=500)  # doctest: +SKIP
>>> [p["eps"] for p in curve["points"]][:3]           # doctest: +SKIP
[0.0, 0.025, 0.05]
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .. import distributed
from ..data import load_dataset
from ..runs.checkpoint import Which
from ..runs.rundir import RunDir
from .cascade import quiet_attack_lines
from .protocol import evaluate
from .settings import EvalSettings, GuardSettings, resolve_threat
from .sources import open_source

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

#: the multiples of the training eps an eps curve evaluates at by default
EPS_FACTORS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)


def eps_curve(
    run_dir: PathLike,
    *,
    n: Optional[int] = 1000,
    factors: Sequence[float] = EPS_FACTORS,
    attack: str = "pgd20",
    which: Which = "final",
    device: str = "auto",
    data_dir: Optional[str] = None,
    batch_size: Optional[int] = None,
) -> dict[str, Any]:
    """Robust accuracy at ``factors`` times the training eps on the first ``n`` test images (None: all).

    Each point is :func:`arow.evaluation.protocol.evaluate` with ``clean`` and ``attack`` (only
    ``clean`` at eps 0, where the attack cannot move) and without the guards, which belong to the
    evaluation at the training eps (``arow eval``). Writes ``eps_curve.json`` into the run folder
    and returns its content; one line is logged when it starts, the points only at debug level
    (``arow plot --eps-curve`` prints them as one table: :func:`arow.reporting.plots.eps_curve_table`).

    Args:
        run_dir: the run folder
        n: first N test examples
        factors: multiples of the training eps
        attack: the attack at each eps
        which: the run's checkpoint: final, best (by validation) or last
        device: auto, cpu, cuda, cuda:1, ...
        data_dir: folder with the dataset files (default: the run's)
        batch_size: examples per attack batch (default: 100 on the CPU, 500 on CUDA); the verdicts of PGD do
            not depend on it
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run}: not a run folder (the eps curve is written into one)")
    if not factors or any(not f >= 0 for f in factors):
        raise ValueError(f"eps factors must be a non-empty list of numbers >= 0, got {list(factors)}")
    base = EvalSettings(attacks=["clean", attack], n=n, which=which, device=device, data_dir=data_dir,
                        batch_size=batch_size).check()
    src = open_source(run, which=which)
    if src.trained_eps is None:
        raise ValueError(f"{src.info.get('checkpoint', run)}: does not record the eps it was trained at")
    train_eps, norm = resolve_threat(src.trained_eps, src.trained_norm, dataset=src.dataset)
    dev = distributed.resolve_device(device)
    model = src.load(dev).model
    data = load_dataset(str(src.dataset), root=data_dir or src.data_dir, split="test")
    n_eval = min(n or len(data), len(data))
    factors = sorted(set(float(f) for f in factors))
    log.info("eps curve of %s: %s at %d radii on %d test images", run, attack, len(factors), n_eval)
    points = []
    for f in factors:
        e = f * train_eps
        attacks = ["clean"] if e == 0 else ["clean", attack]  # at eps 0 the attack cannot move: clean accuracy
        with quiet_attack_lines():  # the curve is one table at the end, not two lines per point
            report = evaluate(model, data, dataclasses.replace(base, attacks=attacks, eps=e, norm=norm),
                              GuardSettings(enabled=False))
        acc = report.accuracy[attacks[-1]]
        points.append({"factor": f, "eps": e, "accuracy": acc})
        log.debug("eps %.4g (%.2g x train eps): %s %.2f%%", e, f, attacks[-1], 100 * acc)
    out = {"run": str(run), "dataset": src.dataset, "method": src.info.get("method"), "norm": norm,
           "train_eps": train_eps, "attack": attack, "checkpoint": which, "n": n_eval, "test_set_size": len(data),
           "subset": n_eval < len(data), "points": points}
    RunDir(run).write_json(RunDir.EPS_CURVE, out)
    return out

