"""``python -m arow.study.cell CELL``: run one prepared study cell in this process.

This is what ``arow study`` starts for each cell (one process per cell, in its own process group),
and what the commands of ``arow study --print-commands`` / ``--prepare`` run under a scheduler.
It runs :func:`arow.study.cells.run_cell` and prints one line per epoch and per step, each
evaluation's numbers once when it ends, and a progress line every 30 s while anything runs, as
``arow train`` does without a terminal. Exit status: 0 done, 2 bad input, 3 a tripped
robustness guard, 4 a diverged run, 1 an unexpected error (each recorded in the cell's
``study_failed.json``), 130 interrupted (nothing recorded; run it again to continue).

``--parent PID`` binds the process to the ``arow study`` that started it: on Linux the kernel
sends it SIGTERM when that process dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so no cell
trains on after its study is gone; it stops like Ctrl-C, keeping its last checkpoint.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from ..cli.progress import Progress
from .cells import CellFailed, run_cell

log = logging.getLogger("arow")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def bind_to_parent(pid: int) -> None:
    """Receive SIGTERM when the process ``pid`` (this one's parent) dies; if it died already, stop now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("could not bind to the study's process (prctl: %s)", os.strerror(ctypes.get_errno()))
    if os.getppid() != pid:  # the study died before the binding took hold
        raise KeyboardInterrupt


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m arow.study.cell", description="run one prepared study cell")
    p.add_argument("cell", help="the cell's folder or its cell.json (written by arow study)")
    p.add_argument("--parent", type=int, metavar="PID", help="stop when this process (the study) dies")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # a kill (SIGTERM) ends like Ctrl-C: the run keeps its checkpoint
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    bars = Progress(tty=False)
    try:
        if a.parent is not None:
            bind_to_parent(a.parent)
        run_cell(a.cell, callbacks=[bars], progress=bars.eval_progress)
        return 0
    except KeyboardInterrupt:
        print("arow: interrupted; run the cell again to continue where it stopped", file=sys.stderr)
        return 130
    except CellFailed as e:
        print(f"arow: error: {e.error}", file=sys.stderr)
        return e.exit_status
    except ValueError as e:  # the cell file itself is missing or damaged
        print(f"arow: error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
              file=sys.stderr)
        return 2
    finally:
        bars.close()


if __name__ == "__main__":
    sys.exit(main())
