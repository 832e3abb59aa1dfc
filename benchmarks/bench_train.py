"""Training throughput: our step against a reference-style step, side by side.

Runs from a checkout without installing the package (it puts ``src/`` on the path):

    python benchmarks/bench_train.py --models small-cnn --threads 1 --repeats 3
    python benchmarks/bench_train.py --device cuda --json bench-h100.json
    python benchmarks/bench_train.py --device cuda --amp off --tf32 off   # strict float32, against the float32 peak
    python benchmarks/bench_train.py --device cuda --compile   # exit status 1 if a row recompiled or ran eagerly

``--help`` lists the flags; what is timed, and the reference-style baseline, are in
benchmarks/train_step.py; docs/performance.md shows measured results.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step, also when imported from elsewhere

from arow.runs.checkpoint import atomic_write_text  # noqa: E402

import train_step  # noqa: E402

log = logging.getLogger("bench_train")


def build_parser() -> argparse.ArgumentParser:
    b = argparse.ArgumentParser(description="training images/s and GFLOP/s: our step vs a reference-style step")
    b.add_argument("--models", default="small-cnn,resnet18,wrn-34-10", help="comma-separated model names")
    b.add_argument("--methods", default="arow,trades", help="comma-separated training methods")
    b.add_argument("--batch-size", help="batch for every model (default: per model and device), or a comma-separated "
                   "list timed side by side, e.g. 64,128,256 (same number of images each unless --iters)")
    b.add_argument("--iters", type=int, help="timed training steps (default: per model and device)")
    b.add_argument("--warmup", type=int, help="untimed steps first (default: per model and device)")
    b.add_argument("--attack-steps", type=int, default=10, help="K, the training attack's steps (10)")
    b.add_argument("--pgd-n", type=int, help="images for the PGD-20 timing (0 skips; default per model)")
    b.add_argument("--repeats", type=int, default=1, help="alternate ours/reference N times, keep the best")
    b.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    b.add_argument("--no-reference", action="store_true", help="time our step only")
    b.add_argument("--compile", action="store_true", help="torch.compile the model in our step; dynamo is reset "
                   "for every row, and a row whose timed steps compile again or run eagerly fails (exit status 1)")
    b.add_argument("--amp", default="auto", help="our step's precision: auto (bf16 on CUDA and native-bf16 CPUs), "
                   "off (float32), bf16, or a list timed side by side, e.g. off,bf16")
    b.add_argument("--device", default="auto")
    b.add_argument("--tf32", default="on", choices=("on", "off"),
                   help="CUDA: TF32 for float32 matmuls and convolutions, pinned for the whole run (on: PyTorch's "
                        "default for convolutions); float32 rows are divided by the matmul peak measured with the "
                        "same setting")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="also write the results to this JSON file")
    return b


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    split = lambda v: [s.strip() for s in v.split(",") if s.strip()]  # noqa: E731
    try:
        if a.batch_size and not all(v.isdigit() for v in split(a.batch_size)):
            raise ValueError(f"--batch-size takes whole numbers, e.g. 128 or 64,128,256; got {a.batch_size!r}")
        sizes = [int(v) for v in split(a.batch_size)] if a.batch_size else None
        res = train_step.run(split(a.models), split(a.methods), device=a.device, batch_size=sizes,
                             iters=a.iters, warmup=a.warmup, steps=a.attack_steps, pgd_n=a.pgd_n,
                             reference=not a.no_reference, compile=a.compile, amp=a.amp, seed=a.seed,
                             repeats=a.repeats, threads=a.threads, tf32=a.tf32, on_row=log.info)
    except ValueError as e:  # a bad flag value, an unknown model or method: one line, not a traceback
        print(f"bench_train: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    res.meta["args"] = vars(a)
    print(res.markdown())
    if a.json:
        atomic_write_text(json.dumps(res.to_json(), indent=2) + "\n", a.json)
        print(f"written {a.json}")
    if res.failed:  # a compiled row timed eager code or a compilation: its number is not worth writing down
        print(f"bench_train: error: {len(res.failed)} compiled row(s) compiled again or ran eagerly in their timed "
              f"steps: {', '.join(f'{r.model}/{r.method}/batch {r.batch}/{r.precision}' for r in res.failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
