"""Training throughput: our step against a reference-style step, side by side (``arow bench``).

A thin wrapper so the benchmark runs from a checkout without installing the package:

    python benchmarks/bench_train.py --models small-cnn --threads 1 --repeats 3
    python benchmarks/bench_train.py --device cuda --json bench-h100.json

Every flag is ``arow bench``'s (``--help`` lists them); the measurement lives in ``arow.bench``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from arow.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
