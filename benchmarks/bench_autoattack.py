"""Time our evaluation cascade ``clean,pgd20,autoattack`` against pyautoattack called directly.

Same model, same test subset, side by side, repeated ``--repeats`` times interleaved (a, b, a, b, ...)
so that load on a shared machine falls on both alike; medians and per-pair ratios are printed:

  (a) ``arow.evaluation.evaluate(model, x, y, ["clean", "pgd20", "autoattack"])``: AutoAttack
      standard runs only on the examples PGD-20 left robust; the number is the worst case over
      PGD-20 and AutoAttack.
  (b) ``pyautoattack.AutoAttack(model, version="standard", seed=0).run_standard_evaluation``
      on the whole subset, with its defaults.

The two robust accuracies need not be identical: (a) adds PGD-20's successes and runs
AutoAttack's random restarts on other batches. The table says how many examples differ.

    python benchmarks/bench_autoattack.py --n 200                 # trains a small CNN briefly
    python benchmarks/bench_autoattack.py --ckpt runs/fmnist-arow --n 1000 --device cuda
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

from arow import load_model  # noqa: E402
from arow.attacks import ce_loss, pgd  # noqa: E402
from arow.data import load_dataset  # noqa: E402
from arow.evaluation import evaluate  # noqa: E402
from arow.guards import run_guards  # noqa: E402
from arow.models import build_model  # noqa: E402
from arow.threat import ThreatModel  # noqa: E402


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="arow run folder or checkpoint (default: train a small CNN briefly)")
    p.add_argument("--n", type=int, default=200, help="first N test images (default 200)")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--attack-steps", type=int, default=3, help="PGD steps in the brief adversarial training")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guards-n", type=int, default=200, help="also time the robustness guards (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each side (median reported)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    t0 = time.perf_counter()
    if a.ckpt:
        model = load_model(a.ckpt, device=device)
        source = a.ckpt
    else:
        model = train_small_cnn(a.train_steps, a.eps, a.attack_steps, device, a.seed)
        source = f"small-cnn, {a.train_steps} Adam steps of PGD-{a.attack_steps} training"
    train_s = time.perf_counter() - t0
    test = load_dataset("fashion-mnist", split="test").subset(a.n).to(device)
    x, y = test.x, test.y

    from pyautoattack import AutoAttack, __version__

    def run_ours():
        res = evaluate(model, x, y, ["clean", "pgd20", "autoattack"], eps=a.eps, batch_size=a.batch_size)
        return res, res.correct["worst_case"].cpu()

    def run_direct():
        aa = AutoAttack(model, device=device, eps=a.eps, norm="Linf", seed=0, version="standard")
        aa.logger.setLevel(logging.WARNING)
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=a.batch_size)
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).cpu()

    # interleaved (a, b, a, b, ...): load on a shared machine falls on both sides alike
    ours_t, direct_t = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        res, ours = run_ours()
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = run_direct()
        direct_t.append(time.perf_counter() - t0)
    ours_s, direct_s = statistics.median(ours_t), statistics.median(direct_t)
    ratios = [d / o for o, d in zip(ours_t, direct_t)]

    print(f"model: {source} (ready in {train_s:.0f}s); Fashion-MNIST test[:{a.n}], eps={a.eps}, "
          f"device {device}, {torch.get_num_threads()} CPU thread(s), pyautoattack {__version__}")
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
    if a.guards_n:  # what `arow eval` adds before evaluating
        full = load_dataset("fashion-mnist", split="test").subset(a.guards_n).to(device)
        t0 = time.perf_counter()
        results = run_guards(model, full.x, full.y, eps=a.eps, n=a.guards_n, batch_size=a.batch_size)
        print(f"guards on {a.guards_n} images: {time.perf_counter() - t0:.1f}s; "
              + ", ".join(f"{r.name} {'pass' if r.passed else 'FAIL'} ({r.seconds:.1f}s)" for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
