"""Does bf16 in the first layer weaken the attacks? Trained models, attacked in three precisions.

Under bf16 autocast (``--amp``: on CUDA and on CPUs with native bf16) the whole training step runs
in bf16, the training attack included: the first convolution sees ``x_adv`` rounded to bf16, whose
spacing in [0.5, 1) is 1/256. At eps 8/255 the ball around a bright pixel then holds 17 values, and
TRADES' 0.001-noise start vanishes for most pixels after the cast. This benchmark measures what
that does to the attacks of trained models: for each run folder it attacks the first ``--n`` test
images with

- the run's own training attack: its method's ``attack`` call as the trainer makes it (KL-PGD with
  TRADES' start for TRADES, KL-PGD for ARoW, CE-PGD for PGD-AT and MART, ...; the method in its
  last epoch, its ``attack_steps`` and step size, the clean target computed in the same precision),
  and
- PGD-20 (cross-entropy, uniform start, step eps/4; the last iterate),

at every ``--eps``, in three precisions, from the same random starts:

- ``float32``: no autocast;
- ``bf16``: the whole model under bf16 autocast, as training runs it;
- ``bf16, float32 stem``: bf16 autocast with the input and first convolution (or linear layer)
  kept in float32.

Each ``x_adv`` is then judged in float32: the accuracy of the model on it, KL(p(x) || p(x_adv))
(what TRADES-style attacks maximise) and the cross-entropy (what CE attacks maximise), so the
three columns measure the attacks, not the precision of the judge. A bf16 attack is weaker if it
leaves more examples correct, or a smaller value of its own objective: the table prints the
accuracy differences with, in brackets, how many examples' verdicts differ, and both objectives.

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
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from arow.attacks import ce_loss, pgd  # noqa: E402
from arow.data import load_dataset  # noqa: E402
from arow.methods import Method, build_method  # noqa: E402
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
    """An attack of one run: its own training attack (``method`` set) or PGD-20 (``threat`` set)."""

    name: str
    method: Optional[Method] = None
    threat: Optional[ThreatModel] = None

    def run(self, net: nn.Module, x: Tensor, y: Tensor, rng: BatchRNG) -> Tensor:
        """``x_adv`` in the caller's precision. The training attack is the method's own call, as the
        trainer makes it: its clean target too is computed inside the autocast region."""
        if self.method is not None:
            out = self.method.attack(net, x, y, rng=rng)
            return out[0] if isinstance(out, tuple) else out  # GAIR-AT, FAT, HAT also return a count
        return pgd(net, x, y, self.threat, ce_loss, rng=rng)  # the last iterate (no keep_best)


def attacks_of(run: Path, eps: float) -> list[Attack]:
    """The run's own training attack (its method as configured, in its last epoch) and PGD-20, at ``eps``."""
    cfg = json.loads((run / "config.json").read_text())
    step = cfg.get("step_size")
    if step is not None:  # a step size given for the run's eps keeps its ratio to eps
        step = step * eps / cfg["eps"]
    threat = ThreatModel(eps=eps, steps=cfg.get("attack_steps", 10), step=step, norm=cfg.get("norm", "linf"))
    method = build_method(cfg["method"], threat, **cfg.get("method_args", {}))
    epochs = int(cfg.get("epochs", 1))
    method.set_epoch(epochs - 1, epochs)
    training = Attack(f"{cfg['method']}'s training attack ({threat.steps} steps)", method=method)
    return [training, Attack("PGD-20 (CE)", threat=ThreatModel(eps=eps, steps=20, norm=threat.norm))]


@dataclass
class Cell:
    accuracy: float
    kl: float  # mean KL(p(x) || p(x_adv)), float32
    ce: float  # mean cross-entropy at x_adv, float32
    correct: Tensor


def measure(net: nn.Module, x: Tensor, y: Tensor, attack: Attack, which: str, batch_size: int) -> Cell:
    """Attack ``x`` in ``which`` precision, in batches; judge every ``x_adv`` in float32. Batch ``i``
    takes rows ``[i, i + batch)`` of one global draw of noise, so the starts do not depend on the batch size."""
    correct, kl, ce = [], [], []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        with precision(net, which):
            x_adv = attack.run(net, xb, yb, BatchRNG(SEED, offset=i, total=len(x)))
        with torch.no_grad():  # the judge: float32
            logits_clean, logits = net(xb), net(x_adv)
        correct.append(logits.argmax(1) == yb)
        kl.append(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(logits_clean, 1), reduction="none",
                           log_target=True).sum(1))
        ce.append(F.cross_entropy(logits, yb, reduction="none"))
    c = torch.cat(correct)
    return Cell(c.float().mean().item(), torch.cat(kl).mean().item(), torch.cat(ce).mean().item(), c)


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
    ap.add_argument("--batch-size", type=int, default=500, help="images per attack call (default 500)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    eps_list = parse_eps(args.eps)
    rows: list[dict] = []
    header = ("| run | eps | attack | " + " | ".join(f"acc {p}" for p in PRECISIONS)
              + " | bf16 - bf16 with f32 stem (verdicts differ) | bf16 - float32 (verdicts differ)"
              + " | KL at x_adv: float32 / bf16 / bf16 with f32 stem | CE at x_adv: the same |")
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
                cells = {p: measure(net, x, y, attack, p, args.batch_size) for p in PRECISIONS}
                diff, differ = compare(cells["bf16"], cells["bf16, float32 stem"])
                diff32, differ32 = compare(cells["bf16"], cells["float32"])
                row = {"run": str(run), "method": cfg["method"], "eps": eps, "attack": attack.name, "n": len(x),
                       **{f"accuracy {p}": c.accuracy for p, c in cells.items()},
                       **{f"kl {p}": c.kl for p, c in cells.items()},
                       **{f"ce {p}": c.ce for p, c in cells.items()},
                       "bf16 minus float32 stem": diff, "verdicts differ from float32 stem": differ,
                       "bf16 minus float32": diff32, "verdicts differ from float32": differ32}
                rows.append(row)
                print(f"| {run.name} | {eps:.4g} | {attack.name} | "
                      + " | ".join(f"{100 * c.accuracy:.1f}%" for c in cells.values())
                      + f" | {100 * diff:+.1f} ({differ}) | {100 * diff32:+.1f} ({differ32}) | "
                      + " / ".join(f"{c.kl:.4f}" for c in cells.values()) + " | "
                      + " / ".join(f"{c.ce:.4f}" for c in cells.values()) + " |", flush=True)
    print(f"\n{args.n} test images; the same random starts (seed {SEED}) in every precision; x_adv judged in "
          f"float32. A difference > 0: the bf16 attack left more examples correct (a weaker attack).")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
