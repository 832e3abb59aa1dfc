"""The fastest evaluation settings on this machine: ``evaluate(clean, pgd20)`` per batch size and thread count.

Times ``arow.evaluation.cascade.evaluate(model, x, y, ["clean", "pgd20"], eps, batch_size=B)`` on the
first ``--n`` Fashion-MNIST test images for every ``--batch-sizes`` x ``--threads`` combination
(``torch.set_num_threads``), plus channels-last rows (model and inputs in
``torch.channels_last``) at ``--channels-last`` batch sizes. The settings run ``--repeats``
times interleaved (1, 2, ..., 1, 2, ...), so load on a shared machine falls on all alike; the
seconds are medians. Every row also says whether its per-example verdicts (``res.correct``,
clean and PGD-20) equal those of the first row: a faster setting is only usable if the numbers
stay the same.

    python benchmarks/bench_eval.py --ckpt runs/fmnist-arow                # 2000 images, batches 100..2000, 1 and 2 threads
    python benchmarks/bench_eval.py --n 2000 --threads 1 --repeats 3       # trains a small CNN briefly first
    python benchmarks/bench_eval.py --n 100 --batch-sizes 50,100 --threads 1 --repeats 1 --train-steps 20   # smoke
    python benchmarks/bench_eval.py --ckpt runs/fmnist-arow --n 10000 --threads 1 \
        --batch-sizes 100,500,1000,2000,5000                               # on the GPU when there is one

``--device`` (default ``auto``: CUDA when PyTorch sees a GPU, else the CPU) places the model and
the images. Every evaluation runs in the settings ``arow eval`` pins (strict float32: TF32 off,
cuDNN's autotuner off; ``bench_timing.arow_eval_kernels``). On CUDA every setting is
warmed up once on its own batch shape before the timed repeats, and the timers wait for the
device (``bench_timing.Stopwatch``); ``--threads`` then only sets the CPU threads of the host side.
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_autoattack, also when imported from elsewhere

from bench_autoattack import markdown, ready_model  # noqa: E402
from bench_timing import Stopwatch, arow_eval_kernels  # noqa: E402

from arow.distributed import resolve_device  # noqa: E402
from arow.data import load_dataset  # noqa: E402
from arow.evaluation.cascade import EvalResult, evaluate  # noqa: E402

ATTACKS = ("clean", "pgd20")


@dataclass
class Setting:
    threads: int
    batch: int
    channels_last: bool = False
    seconds: list[float] = field(default_factory=list)  # whole evaluate() call, per repeat
    pgd_seconds: list[float] = field(default_factory=list)  # res.seconds["pgd20"], per repeat
    correct: dict[str, torch.Tensor] = field(default_factory=dict)  # from the first repeat
    stable: bool = True  # the same verdicts in every repeat of this setting
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def settings_for(batch_sizes: list[int], threads: list[int], cl_batches: list[int]) -> list[Setting]:
    """Every threads x batch combination (contiguous), then the channels-last rows.

    >>> [(s.threads, s.batch, s.channels_last) for s in settings_for([1, 2], [1], [2])]
    [(1, 1, False), (1, 2, False), (1, 2, True)]
    """
    rows = [Setting(t, b) for t in threads for b in batch_sizes]
    return rows + [Setting(t, b, True) for t in threads for b in cl_batches]


def evaluate_as_arow_eval(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting,
                          eps: float) -> EvalResult:
    """``evaluate(clean, pgd20)`` at the setting's threads and batch, in the kernels ``arow eval`` pins
    (``bench_timing.arow_eval_kernels``)."""
    torch.set_num_threads(s.threads)
    with arow_eval_kernels():
        return evaluate(model, x, y, list(ATTACKS), eps=eps, batch_size=s.batch)


def run_one(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, s: Setting, eps: float) -> None:
    """One timed repeat of setting ``s`` (the clock waits for the device at both ends)."""
    with Stopwatch(x.device) as t:
        res = evaluate_as_arow_eval(model, x, y, s, eps)
    s.seconds.append(t.seconds)
    s.pgd_seconds.append(res.seconds["pgd20"])
    correct = {k: res.correct[k].cpu() for k in ATTACKS}
    if not s.correct:
        s.correct, s.accuracy = correct, {k: res.accuracy[k] for k in ATTACKS}
    elif any(not torch.equal(correct[k], s.correct[k]) for k in ATTACKS):
        s.stable = False


def compare(s: Setting, first: Setting) -> str:
    """'yes', or how many examples' verdicts differ from ``first`` (and whether repeats disagreed)."""
    diffs = {k: int((s.correct[k] != first.correct[k]).sum()) for k in ATTACKS}
    text = "yes" if not any(diffs.values()) else "NO (" + ", ".join(f"{k} {v}" for k, v in diffs.items() if v) + ")"
    return text if s.stable else text + "; repeats differ"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="arow run folder or checkpoint (default: train a small CNN briefly)")
    p.add_argument("--n", type=int, default=2000, help="first N test images (default 2000)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--batch-sizes", default="100,250,500,1000,2000", help="comma-separated batch sizes")
    p.add_argument("--threads", default="1,2", help="comma-separated torch CPU thread counts")
    p.add_argument("--channels-last", default="max",
                   help="batch sizes of the channels-last rows: comma-separated, 'max' (the largest of "
                        "--batch-sizes) or 'off'")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every setting (median reported)")
    p.add_argument("--train-steps", type=int, default=300, help="without --ckpt: brief PGD training steps")
    p.add_argument("--attack-steps", type=int, default=3, help="PGD steps in the brief adversarial training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (default: cuda if PyTorch sees a GPU, else cpu), cpu, "
                   "cuda or cuda:N")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    batch_sizes, threads = parse_ints(a.batch_sizes), parse_ints(a.threads)
    cl = {"off": [], "max": [max(batch_sizes)]}.get(a.channels_last.strip())
    cl_batches = cl if cl is not None else parse_ints(a.channels_last)
    if not batch_sizes or not threads or min(batch_sizes + threads + cl_batches) < 1 or a.repeats < 1:
        p.error("batch sizes, thread counts and --repeats must be positive")
    try:
        device = resolve_device(a.device)
    except (ValueError, RuntimeError) as e:
        p.error(str(e).splitlines()[0])

    model, source, ready_s = ready_model(a.ckpt, a.train_steps, a.eps, a.attack_steps, device, a.seed)
    test = load_dataset("fashion-mnist", split="test").subset(a.n).to(device)
    x, y = test.x, test.y
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last) if cl_batches else None
    x_cl = x.contiguous(memory_format=torch.channels_last)

    rows = settings_for(batch_sizes, threads, cl_batches)
    # untimed warm-up (oneDNN kernels, caches); on CUDA every setting's own batch shape (cuDNN's first calls)
    warm = rows if device.type == "cuda" else (rows[0], *[r for r in rows if r.channels_last][:1])
    for s in warm:
        m, xs = (model_cl, x_cl) if s.channels_last else (model, x)
        evaluate_as_arow_eval(m, xs[: min(len(x), s.batch)], y[: min(len(x), s.batch)], s, a.eps)
    for _ in range(a.repeats):
        for s in rows:
            m, xs = (model_cl, x_cl) if s.channels_last else (model, x)
            run_one(m, xs, y, s, a.eps)

    first = rows[0]
    print(f"model: {source} (ready in {ready_s:.0f}s); Fashion-MNIST test[:{len(x)}], L-inf eps={a.eps}, "
          f"device {device}; "
          f"evaluate(clean, pgd20); clean accuracy {100 * first.accuracy['clean']:.2f}%, "
          f"PGD-20 {100 * first.accuracy['pgd20']:.2f}%")
    print(f"{a.repeats} interleaved repeat(s), medians; PGD-20 runs on the {int(first.correct['clean'].sum())} "
          f"clean-correct images; images/s counts all {len(x)} images")
    header = ["threads", "batch", "memory format", "seconds", "PGD-20 s", "PGD-20 images/s", "same verdicts as row 1"]
    table = []
    for s in rows:
        sec, pgd_s = statistics.median(s.seconds), statistics.median(s.pgd_seconds)
        table.append([str(s.threads), str(s.batch), s.label, f"{sec:.2f}", f"{pgd_s:.2f}", f"{len(x) / pgd_s:.0f}",
                      compare(s, first)])
    print(markdown(table, header))
    best = min(rows, key=lambda s: statistics.median(s.seconds))
    print(f"fastest: {best.threads} thread(s), batch {best.batch}, {best.label} "
          f"({statistics.median(best.seconds):.2f}s, {statistics.median(first.seconds) / statistics.median(best.seconds):.2f}x "
          f"row 1)")
    differ = [s for s in rows if compare(s, first) != "yes"]
    if differ:
        print(f"WARNING: the per-example verdicts of {len(differ)} setting(s) differ from row 1 "
              f"({', '.join(f'{s.threads}t/b{s.batch}/{s.label}' for s in differ)}): these settings change the "
              f"reported numbers. (evaluate() seeds each batch's random start by its batch number, so another "
              f"batch size gives examples other random starts; thread counts and memory formats can change "
              f"float rounding.)")
    else:
        print("all settings gave identical per-example verdicts (clean and PGD-20)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
