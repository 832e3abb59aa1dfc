"""Does bf16 in the first layer weaken the attacks? Trained models, attacked in three precisions.

Under bf16 autocast (``--amp``: on CUDA and on CPUs with native bf16) the whole training step runs
in bf16, the training attack included: the first convolution sees ``x_adv`` rounded to bf16, whose
spacing in [0.5, 1) is 1/256. At eps 8/255 the ball around a bright pixel then holds 17 values, and
TRADES' 0.001-noise start vanishes for most pixels after the cast. This benchmark measures what
that does to the attacks of trained models: for each run folder it attacks the first ``--n`` test
images with

- the run's own training attack (KL-PGD for TRADES-style methods, CE-PGD for PGD-AT, with the
  method's start and ``attack_steps``), and
- PGD-20 (cross-entropy, uniform start, step eps/4),

at every ``--eps``, in three precisions, from the same random starts:

- ``float32``: no autocast;
- ``bf16``: the whole model under bf16 autocast, as training runs it;
- ``bf16, float32 stem``: bf16 autocast with the input and first convolution (or linear layer)
  kept in float32.

Each ``x_adv`` is then judged in float32: the accuracy of the model on it and the attack's own
objective (KL(p(x) || p(x_adv)) or cross-entropy), so the three columns measure the attacks, not
the precision of the judge. A bf16 attack weakens the attack if its accuracy is higher than the
float32 stem's (a weaker attack leaves more examples correct): the table prints the difference
and, as the paired count, how many examples' verdicts differ.

    python benchmarks/bench_bf16_stem.py runs/fmnist-arow runs/fmnist-trades --n 1000 --eps 0.1,8/255
    python benchmarks/bench_bf16_stem.py runs/fmnist-arow --n 50 --eps 0.1          # smoke

The models must be arow run folders (the method and its attack come from the run's config.json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from arow.attacks import ce_loss, kl_loss, pgd  # noqa: E402
from arow.data import load_dataset  # noqa: E402
from arow.methods import build_method  # noqa: E402
from arow.rng import BatchRNG  # noqa: E402
from arow.runs.records import load_model  # noqa: E402
from arow.threat import ThreatModel  # noqa: E402

Tensor = torch.Tensor
PRECISIONS = ("float32", "bf16", "bf16, float32 stem")
SEED = 0  # the random starts: the same in every precision


class Float32Stem(nn.Module):
    """A layer run in float32 even inside an autocast region (input cast up, autocast off)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.layer(x.float())


def first_layer(net: nn.Module) -> tuple[nn.Module, str]:
    """The parent and attribute name of the first convolution or linear layer (in module order)."""
    for m in net.modules():
        for name, child in m.named_children():
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                return m, name
    raise SystemExit("the model has no convolution or linear layer to keep in float32")


@contextlib.contextmanager
def precision(net: nn.Module, which: str) -> Iterator[None]:
    """Run ``net`` inside the block in one of :data:`PRECISIONS` (the model is restored after)."""
    parent, name = first_layer(net)
    layer = getattr(parent, name)
    if which == "bf16, float32 stem":
        setattr(parent, name, Float32Stem(layer))
    try:
        device = next(net.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=which != "float32"):
            yield
    finally:
        setattr(parent, name, layer)


@dataclass
class Attack:
    name: str
    threat: ThreatModel
    kl: bool  # the objective: KL(p(x) || p(x_adv)) (True) or cross-entropy

    def run(self, net: nn.Module, x: Tensor, y: Tensor, logits_clean: Tensor) -> Tensor:
        loss = kl_loss(logits_clean) if self.kl else ce_loss
        return pgd(net, x, y, self.threat, loss, rng=BatchRNG(SEED))

    def objective(self, logits_adv: Tensor, logits_clean: Tensor, y: Tensor) -> Tensor:
        if self.kl:
            return F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits_clean, 1), reduction="none",
                            log_target=True).sum(1)
        return F.cross_entropy(logits_adv, y, reduction="none")


def attacks_of(run: Path, eps: float) -> list[Attack]:
    """The run's own training attack and PGD-20 at ``eps``."""
    cfg = json.loads((run / "config.json").read_text())
    threat = ThreatModel(eps=eps, steps=cfg.get("attack_steps", 10), norm=cfg.get("norm", "linf"))
    method = build_method(cfg["method"], threat, **cfg.get("method_args", {}))
    # the threat the method's own attack uses (TRADES-style methods start at x + 0.001 N(0, 1))
    train_threat = getattr(method, "attack_threat", threat)
    attack_loss = getattr(method, "_attack_loss", None) or getattr(method.hp, "attack_loss", None)
    kl = cfg["method"] not in ("pgd-at", "natural") and attack_loss != "ce"
    steps = train_threat.steps
    training = Attack(f"training ({'KL' if kl else 'CE'}-PGD-{steps}, {train_threat.start} start)", train_threat, kl)
    return [training, Attack("PGD-20 (CE)", ThreatModel(eps=eps, steps=20, norm=threat.norm), False)]


@dataclass
class Cell:
    accuracy: float
    objective: float
    correct: Tensor


def measure(net: nn.Module, x: Tensor, y: Tensor, attack: Attack, which: str) -> Cell:
    with torch.no_grad():
        logits_clean = net(x)
    with precision(net, which):
        x_adv = attack.run(net, x, y, logits_clean)
    with torch.no_grad():  # the judge: float32
        logits = net(x_adv)
    correct = logits.argmax(1) == y
    return Cell(correct.float().mean().item(), attack.objective(logits, logits_clean, y).mean().item(), correct)


def compare(a: Cell, b: Cell) -> tuple[float, int]:
    """Accuracy difference a - b and the number of examples whose verdicts differ."""
    return a.accuracy - b.accuracy, int((a.correct != b.correct).sum())


def parse_eps(text: str) -> list[float]:
    try:
        return [float(Fraction(e.strip())) for e in text.split(",") if e.strip()]
    except (ValueError, ZeroDivisionError):
        raise SystemExit(f"--eps: comma-separated numbers or fractions such as 0.1,8/255, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="arow run folders")
    ap.add_argument("--n", type=int, default=1000, help="first N test images (default 1000)")
    ap.add_argument("--eps", default="0.1,8/255", help="radii, e.g. 0.1,8/255 (default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    eps_list = parse_eps(args.eps)
    rows: list[dict] = []
    header = ("| run | eps | attack | " + " | ".join(f"acc {p}" for p in PRECISIONS)
              + " | bf16 - bf16 with f32 stem (verdicts differ) | bf16 - float32 (verdicts differ)"
              + " | objective float32 / bf16 / bf16 with f32 stem |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for run in args.runs:
        if not (run / "config.json").is_file():
            raise SystemExit(f"{run}: not an arow run folder (no config.json)")
        cfg = json.loads((run / "config.json").read_text())
        net = load_model(run).float().eval()
        data = load_dataset(cfg["dataset"], cfg.get("data_dir"), split="test")
        x, y = data.x[: args.n], data.y[: args.n]
        for eps in eps_list:
            for attack in attacks_of(run, eps):
                cells = {p: measure(net, x, y, attack, p) for p in PRECISIONS}
                diff, differ = compare(cells["bf16"], cells["bf16, float32 stem"])
                diff32, differ32 = compare(cells["bf16"], cells["float32"])
                row = {"run": str(run), "method": cfg["method"], "eps": eps, "attack": attack.name, "n": len(x),
                       **{f"accuracy {p}": c.accuracy for p, c in cells.items()},
                       **{f"objective {p}": c.objective for p, c in cells.items()},
                       "bf16 minus float32 stem": diff, "verdicts differ from float32 stem": differ,
                       "bf16 minus float32": diff32, "verdicts differ from float32": differ32}
                rows.append(row)
                print(f"| {run.name} | {eps:.4g} | {attack.name} | "
                      + " | ".join(f"{100 * c.accuracy:.1f}%" for c in cells.values())
                      + f" | {100 * diff:+.1f} ({differ}) | {100 * diff32:+.1f} ({differ32}) | "
                      + " / ".join(f"{c.objective:.4f}" for c in cells.values()) + " |", flush=True)
    print(f"\n{args.n} test images; the same random starts (seed {SEED}) in every precision; x_adv judged in "
          f"float32. A difference > 0: the bf16 attack left more examples correct (a weaker attack).")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
