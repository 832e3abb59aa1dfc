"""Time our evaluation cascade ``clean,pgd20,autoattack`` against pyautoattack called directly.

Same model, same test subset, side by side, repeated ``--repeats`` times interleaved (a, b, a, b, ...)
so that load on a shared machine falls on both alike; medians and per-pair ratios are printed:

  (a) ``arow.evaluation.cascade.evaluate(model, x, y, ["clean", "pgd20", "autoattack"])``: AutoAttack
      standard runs only on the examples PGD-20 left robust; the number is the worst case over
      PGD-20 and AutoAttack.
  (b) ``pyautoattack.AutoAttack(model, version="standard", seed=0).run_standard_evaluation``
      on the whole subset, with its defaults.

The two robust accuracies need not be identical: (a) adds PGD-20's successes and runs
AutoAttack's random restarts on other batches. The table says how many examples differ.

``--breakdown`` then runs :func:`arow.attacks.autoattack.run_autoattack` once on the examples
PGD-20 left robust and prints, per sub-attack, the examples it ran on, broke, its seconds and
the cost model's passes per example (:func:`cost_model`), so one sees whether the time goes
where the cost model says. ``--breakdown-only`` skips the side-by-side timing (and the guards).
``--aa-n-iter`` / ``--aa-square-queries`` shrink the breakdown's budget for smoke runs only:
the breakdown is then labelled NON-STANDARD.

``--device`` (default ``auto``: CUDA when PyTorch sees a GPU, else the CPU) places the model and
the images. Both sides, the breakdown and the guards run in the kernels ``arow eval`` pins (strict
float32: TF32 off, cuDNN's autotuner off; ``bench_timing.arow_eval_kernels``), and the timers wait
for the device (``bench_timing.Stopwatch``).

    python benchmarks/bench_autoattack.py --n 200                 # trains a small CNN briefly
    python benchmarks/bench_autoattack.py --ckpt runs/fmnist-arow --n 1000     # on the GPU when there is one
    python benchmarks/bench_autoattack.py --ckpt runs/fmnist-arow --n 500 --breakdown-only --threads 1 --device cpu
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_timing, also when imported from elsewhere

from bench_timing import Stopwatch, arow_eval_kernels  # noqa: E402

from arow import load_model  # noqa: E402
from arow.attacks import ce_loss, pgd  # noqa: E402
from arow.attacks.autoattack import (  # noqa: E402
    AutoAttackSettings,
    describe,
    run_autoattack,
    settings_record,
)
from arow.data import load_dataset  # noqa: E402
from arow.distributed import resolve_device  # noqa: E402
from arow.evaluation.cascade import EvalResult, evaluate  # noqa: E402
from arow.evaluation.guards import run_guards  # noqa: E402
from arow.models import build_model  # noqa: E402
from arow.threat import ThreatModel  # noqa: E402


def ready_model(ckpt: str | None, train_steps: int, eps: float, attack_steps: int, device: torch.device,
                seed: int) -> tuple[torch.nn.Module, str, float]:
    """The model to evaluate on ``device`` (the run folder or checkpoint ``ckpt``, else a small CNN
    trained briefly), what it is, and the seconds it took to get ready."""
    t0 = time.perf_counter()
    if ckpt:
        model, source = load_model(ckpt, device=device).eval(), ckpt
    else:
        model = train_small_cnn(train_steps, eps, attack_steps, device, seed)
        source = f"small-cnn, {train_steps} Adam steps of PGD-{attack_steps} training"
    return model, source, time.perf_counter() - t0


def train_small_cnn(steps: int, eps: float, attack_steps: int, device: torch.device, seed: int) -> torch.nn.Module:
    """A small CNN with brief PGD adversarial training (Adam), so AutoAttack has robust examples to work on."""
    data = load_dataset("fashion-mnist", split="train").to(device)
    torch.manual_seed(seed)
    model = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    tm = ThreatModel(eps=eps, steps=attack_steps, step=2.5 * eps / attack_steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(data), (128,), generator=g).to(device)
        x, y = data.x[idx], data.y[idx]
        x_adv = pgd(model, x, y, tm, ce_loss) if step >= steps // 5 else x  # natural warm-up first
        loss = F.cross_entropy(model.train()(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


#: sub-attack -> its label in the breakdown table
LABELS = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}


def cost_model(record: dict) -> dict[str, dict[str, int]]:
    """Model passes per attacked example of each sub-attack, read from ``settings_record(...)``.

    ``fb``: forwards each followed by an input-gradient backward (weights frozen: about two
    forwards); ``f``: forwards alone. Upper bounds: later target classes (APGD-T, FAB-T) run only
    on the examples earlier ones left robust, and Square stops querying an example once broken.
    Small constants are left out (the clean forward of each call, APGD's gradient at the start
    point, FAB's two forwards per target before its loop, the final checks). What pyautoattack
    0.2.0 does per iteration:

    - APGD-CE, APGD-T: one forward + backward of the loss per iteration, per restart (1) and, for
      APGD-T, per target class;
    - FAB-T (targeted): one forward + one backward of the logit difference to the target
      (``get_diff_logits_grads_batch_targeted``), then one forward to check the new point
      (``_get_predicted_label``): 1 F+B + 1 F per iteration and target class;
    - Square: one forward per query of each example not yet broken (``margin_and_loss``).

    >>> cm = cost_model({"apgd_n_iter": 100, "fab_n_iter": 100, "n_target_classes": 9, "square_n_queries": 5000})
    >>> cm["apgd-t"], cm["fab-t"], cm["square"]
    ({'fb': 900, 'f': 0}, {'fb': 900, 'f': 900}, {'fb': 0, 'f': 5000})
    """
    it, fab, t, q = record["apgd_n_iter"], record["fab_n_iter"], record["n_target_classes"], record["square_n_queries"]
    return {"apgd-ce": {"fb": it, "f": 0}, "apgd-t": {"fb": t * it, "f": 0},
            "fab-t": {"fb": t * fab, "f": t * fab}, "square": {"fb": 0, "f": q}}


def breakdown(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
              settings: AutoAttackSettings) -> tuple[list[list[str]], dict, dict]:
    """Run AutoAttack once on ``(x, y)``; per sub-attack: attacked, broken, seconds and the cost model.

    Returns the table rows, ``run_autoattack``'s info and the settings record (with the targets
    the model's classes allow). Runs in the kernels ``arow eval`` pins.
    """
    with arow_eval_kernels():
        _, info = run_autoattack(model, x, y, eps, settings=settings, timing=True)
    record = settings_record(settings, n_targets=info["n_target_classes"])
    cost = cost_model(record)
    rows = []
    for sub in settings.attacks:
        n, s = info["attacked_by"].get(sub, 0), info["seconds_by"].get(sub, float("nan"))
        fb, f = cost[sub]["fb"], cost[sub]["f"]
        passes, fwd_eq = fb + f, 2 * fb + f
        kind = " + ".join(p for p in (f"{fb} F+B" if fb else "", f"{f} F" if f else "") if p)
        rows.append([LABELS[sub], str(n), str(info["broken_by"].get(sub, 0)), f"{s:.2f}",
                     f"{1e3 * s / n:.1f}" if n else "-", kind, str(fwd_eq),
                     _per(s, n * passes, 1e6), _per(s, n * fwd_eq, 1e6)])
    return rows, info, record


def _per(seconds: float, count: int, scale: float) -> str:
    return f"{scale * seconds / count:.1f}" if count else "-"


BREAKDOWN_HEADER = ["sub-attack", "attacked", "broken", "seconds", "ms / example", "passes / example (model)",
                    "fwd-eq / example", "us / pass", "us / fwd-eq"]


def markdown(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |" for cells in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def print_breakdown(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, robust: torch.Tensor, a) -> None:
    settings = AutoAttackSettings(batch_size=a.batch_size, n_iter=a.aa_n_iter, square_queries=a.aa_square_queries)
    xr, yr = x[robust.to(x.device)], y[robust.to(x.device)]
    print(f"\nAutoAttack breakdown: run_autoattack once on the {len(xr)} of {len(x)} images PGD-20 left robust "
          f"(batch {a.batch_size}, {torch.get_num_threads()} CPU thread(s))")
    if not len(xr):
        print("nothing to attack: PGD-20 broke every example")
        return
    rows, info, record = breakdown(model, xr, yr, a.eps, settings)
    print(describe(settings, n_targets=record["n_target_classes"]))
    if not settings.standard:
        print("NON-STANDARD budget (--aa-n-iter / --aa-square-queries): for smoke runs only")
    print(markdown(rows, BREAKDOWN_HEADER))
    total = sum(info["seconds_by"].values())
    print(f"total {total:.1f}s; robust after AutoAttack: {len(xr) - sum(info['broken_by'].values())} of {len(xr)}. "
          "passes / example: F+B = forward + input-gradient backward (weights frozen, ~2 forwards), F = forward "
          "only; upper bounds (later targets run only on examples still robust, Square stops at the first "
          "success), small constants left out. us / pass = seconds / (attacked x passes); similar values across "
          "rows mean the time goes where the cost model says.")


def evaluate_as_arow_eval(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[str], eps: float,
                          batch_size: int) -> EvalResult:
    """(a): the evaluation cascade on ``(x, y)``, in the kernels ``arow eval`` pins."""
    with arow_eval_kernels():
        return evaluate(model, x, y, attacks, eps=eps, batch_size=batch_size)


def run_direct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int) -> torch.Tensor:
    """(b): pyautoattack's standard AutoAttack on all of ``(x, y)`` with its defaults, in the same
    kernels as (a); the per-example verdicts (robust or not), on the CPU."""
    from pyautoattack import AutoAttack

    with arow_eval_kernels():
        aa = AutoAttack(model, device=x.device, eps=eps, norm="Linf", seed=0, version="standard")
        aa.logger.setLevel(logging.WARNING)
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).cpu()


def side_by_side(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int,
                 repeats: int) -> tuple[EvalResult, torch.Tensor, torch.Tensor, list[float], list[float]]:
    """(a) and (b) ``repeats`` times interleaved (a, b, a, b, ...), so that load on a shared machine
    falls on both alike, each timed between synchronisations of ``x``'s device. Returns the last
    result of (a), the last per-example verdicts of (a) (worst case) and of (b), and the seconds of
    every run of each."""
    ours_t, direct_t = [], []
    for _ in range(repeats):
        with Stopwatch(x.device) as t:
            res = evaluate_as_arow_eval(model, x, y, ["clean", "pgd20", "autoattack"], eps, batch_size)
        ours_t.append(t.seconds)
        with Stopwatch(x.device) as t:
            theirs = run_direct(model, x, y, eps, batch_size)
        direct_t.append(t.seconds)
    return res, res.correct["worst_case"].cpu(), theirs, ours_t, direct_t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="arow run folder or checkpoint (default: train a small CNN briefly)")
    p.add_argument("--n", type=int, default=200, help="first N test images (default 200)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--attack-steps", type=int, default=3, help="PGD steps in the brief adversarial training")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto", help="auto (default: cuda if PyTorch sees a GPU, else cpu), cpu, "
                   "cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guards-n", type=int, default=200, help="also time the robustness guards (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each side (median reported)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each AutoAttack sub-attack on the PGD-20-robust examples, against the cost model")
    p.add_argument("--breakdown-only", action="store_true",
                   help="only the breakdown (no side-by-side timing, no guards)")
    p.add_argument("--aa-n-iter", type=int, help="breakdown only, NON-STANDARD: APGD/FAB iterations (smoke runs)")
    p.add_argument("--aa-square-queries", type=int, help="breakdown only, NON-STANDARD: Square queries (smoke runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if a.repeats < 1:
        p.error("--repeats must be positive")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        device = resolve_device(a.device)
    except (ValueError, RuntimeError) as e:
        p.error(str(e).splitlines()[0])

    model, source, train_s = ready_model(a.ckpt, a.train_steps, a.eps, a.attack_steps, device, a.seed)
    test = load_dataset("fashion-mnist", split="test").subset(a.n).to(device)
    x, y = test.x, test.y

    if a.breakdown_only:
        res = evaluate_as_arow_eval(model, x, y, ["clean", "pgd20"], a.eps, a.batch_size)
        print(f"model: {source} (ready in {train_s:.0f}s); Fashion-MNIST test[:{a.n}], eps={a.eps}, device {device}; "
              f"clean accuracy {100 * res.accuracy['clean']:.2f}%, PGD-20 {100 * res.accuracy['pgd20']:.2f}%")
        print_breakdown(model, x, y, res.correct["pgd20"], a)
        return 0

    from pyautoattack import __version__

    res, ours, theirs, ours_t, direct_t = side_by_side(model, x, y, a.eps, a.batch_size, a.repeats)
    ours_s, direct_s = statistics.median(ours_t), statistics.median(direct_t)
    ratios = [d / o for o, d in zip(ours_t, direct_t)]

    print(f"model: {source} (ready in {train_s:.0f}s); Fashion-MNIST test[:{a.n}], eps={a.eps}, "
          f"device {device}, {torch.get_num_threads()} CPU thread(s), pyautoattack {__version__}; strict float32 "
          f"(TF32 off, cuDNN's autotuner off) as in arow eval")
    print(f"clean accuracy {100 * res.accuracy['clean']:.2f}%, PGD-20 {100 * res.accuracy['pgd20']:.2f}%")
    rows = [("(a) arow cascade clean,pgd20,autoattack", ours_s, float(ours.float().mean())),
            ("(b) pyautoattack AutoAttack standard", direct_s, float(theirs.float().mean()))]
    print(f"{a.repeats} interleaved repeats; seconds are medians (each: a {', '.join(f'{t:.1f}' for t in ours_t)}; "
          f"b {', '.join(f'{t:.1f}' for t in direct_t)})")
    print(f"| {'evaluation':42s} | {'seconds':>8s} | {'robust acc':>10s} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 12}|")
    for name, s, acc in rows:
        print(f"| {name:42s} | {s:8.1f} | {100 * acc:9.2f}% |")
    same = torch.equal(ours, theirs)
    print(f"same robust accuracy: {'yes' if rows[0][2] == rows[1][2] else 'no'}; same per-example verdicts: "
          f"{'yes' if same else 'no'} (robust only in (a): {int((ours & ~theirs).sum())}, "
          f"only in (b): {int((theirs & ~ours).sum())}); speed-up (b)/(a) per pair "
          f"{', '.join(f'{r:.2f}x' for r in ratios)}, median {statistics.median(ratios):.2f}x")
    if a.breakdown:
        print_breakdown(model, x, y, res.correct["pgd20"], a)
    if a.guards_n:  # what `arow eval` adds before evaluating
        full = load_dataset("fashion-mnist", split="test").subset(a.guards_n).to(device)
        with arow_eval_kernels(), Stopwatch(device) as t:
            results = run_guards(model, full.x, full.y, eps=a.eps, n=a.guards_n, batch_size=a.batch_size)
        print(f"guards on {a.guards_n} images: {t.seconds:.1f}s; "
              + ", ".join(f"{r.name} {'pass' if r.passed else 'FAIL'} ({r.seconds:.1f}s)" for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
