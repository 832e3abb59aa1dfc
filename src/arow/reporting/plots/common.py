"""What every figure shares: the Agg canvas, colours, the atomic PNG write, the protocol line of a run.

Figures are drawn with matplotlib's object API on an Agg canvas: no display, and the caller's
pyplot state and backend are left alone. matplotlib is imported when a figure is drawn.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Optional

from ...data import DATASETS
from ...runs.checkpoint import atomic_write_bytes
from ...threat import format_eps
from ..labels import method_label
from ..tables import Run

log = logging.getLogger(__name__)

DPI = 130
# Colours: one meaning each across all figures (clean = blue, robust = orange/red, SWA = dashed).
C_CLEAN, C_ROBUST, C_OTHER = "#1f77b4", "#d62728", "#7f7f7f"


def class_names(dataset: Optional[str]) -> list[str]:
    """The data set's class names (none for an unknown one)."""
    return list(DATASETS.get(dataset).class_names) if dataset in DATASETS else []


def figure(w: float, h: float) -> Any:
    """A matplotlib Figure of ``w`` x ``h`` inches on its own Agg canvas (constrained layout)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def save(fig: Any, path: Path) -> Path:
    """Render ``fig`` as PNG in memory, then write it to ``path`` atomically (never through a planted link)."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    atomic_write_bytes(buf.getvalue(), path)
    log.debug("wrote %s", path)
    return path


def protocol(run: Run, eps_word: Optional[str] = None) -> str:
    """One line on what a run trained: method and hyper-parameters, model, data set, eps, seed."""
    eps_word = eps_word or ("L2 eps" if run.norm == "l2" else "L-inf eps")
    c = run.config
    args = run.resolved.get("method_args") or {}
    hp = ", ".join(f"{k}={v}" for k, v in args.items() if not isinstance(v, bool) and k != "weight")
    return (f"{c.get('method')}{f' ({hp})' if hp else ''} / {c.get('model')} on {c.get('dataset')}, "
            f"{eps_word}={format_eps(run.eps)}, seed {c.get('seed')}")


def weight_label(run: Run) -> str:
    """What the per-example weight of the run's method is (ARoW, CoW, MART, GAIR-AT)."""
    method = str(run.config.get("method"))
    if method == "mart":
        return f"{method_label(method)} weight 1 - p_y(x) (clean)"
    if method == "gair-at":
        return f"{method_label(method)} weight (normalised to mean 1)"
    if (run.resolved.get("method_args") or {}).get("weight") == "cow":
        return "CoW weight p_y(x) (clean)"
    return f"{method_label('arow')} weight 1 - p_y(x_adv)"


def left_out(what: str, labels: Any) -> str:
    """The line a figure's title gets for the runs left out of it."""
    return f"\nleft out ({what}): {', '.join(labels)}" if labels else ""
