"""The ``arow`` command: ``arow train``, ``arow eval``, ``arow list`` (and ``python -m arow``).

Only this module configures logging and draws progress bars. Bad input ends with one line on
stderr and exit status 2; an interrupted run says how to resume it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("arow")

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


# --------------------------------------------------------------------------- helpers
def _method_hparams() -> dict[str, Any]:
    from .methods import METHODS

    out: dict[str, Any] = {}
    for name in METHODS.names():
        for k, h in METHODS.get(name).hparams.items():
            out.setdefault(k, h)
    return out


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


class _Bars:
    """tqdm progress bars for training epochs and evaluation (stderr; quiet when not a terminal)."""

    def __init__(self, enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.tqdm, self.enabled, self.bar = tqdm, enabled, None

    # training callbacks
    def on_epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.close()
        self.bar = self.tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                             disable=not self.enabled, dynamic_ncols=True)

    def on_step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_validation_start(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("validating")

    def on_epoch_end(self, r: dict[str, Any]) -> None:
        self.close()
        parts = [f"epoch {r['epoch']}", f"loss {r.get('train_loss', float('nan')):.4f}", f"lr {r['lr']:.4g}"]
        if "train_weight_mean" in r:
            parts.append(f"weight {r['train_weight_mean']:.3f}")
        if "val_clean_acc" in r:
            parts.append(f"val clean {100 * r['val_clean_acc']:.2f}% pgd {100 * r['val_pgd_acc']:.2f}%")
        if "swa_val_pgd_acc" in r:
            parts.append(f"swa val clean {100 * r['swa_val_clean_acc']:.2f}% pgd {100 * r['swa_val_pgd_acc']:.2f}%")
        parts.append(f"{r['seconds']:.0f}s")
        log.info(" | ".join(parts))

    # evaluation progress
    def eval_progress(self, name: str, done: int, total: int) -> None:
        if self.bar is None or getattr(self.bar, "_arow_name", None) != name:
            self.close()
            self.bar = self.tqdm(total=total, desc=f"eval {name}", unit="img", leave=False,
                                 disable=not self.enabled, dynamic_ncols=True)
            self.bar._arow_name = name
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------- train
def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    p.add_argument("--preset", help="recipe name (see `arow list`) or YAML file; flags override it")
    p.add_argument("--method", choices=METHODS.names(), help="training method (default arow)")
    p.add_argument("--dataset", choices=DATASETS.names(), help="default fashion-mnist")
    p.add_argument("--model", choices=MODELS.names(), help="default small-cnn")
    p.add_argument("--data-dir", help="folder with the dataset files")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (split across torchrun processes)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["step", "cosine", "onecycle", "constant"])
    p.add_argument("--milestones", type=lambda s: [float(v) for v in s.split(",")],
                   help="step schedule: comma-separated epochs (or fractions <= 1 of --epochs)")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--swa-start", type=int, help="average weights from this epoch (1-based) on")
    p.add_argument("--eps", type=float, help="L-inf radius (default: F-MNIST 0.1, others 8/255)")
    p.add_argument("--attack-steps", type=int, help="training attack steps (default 10)")
    p.add_argument("--step-size", type=float, help="training attack step (default eps/4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], help="bf16 autocast (auto: on CUDA only)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--limit-train", type=int, help="train on the first N training examples only")
    p.add_argument("--val-size", type=int, help="held-out training examples for model selection (1000)")
    p.add_argument("--augment", choices=["none", "flip", "crop+flip"])
    p.add_argument("--normalize", action="store_true", default=None, help="normalisation layer in the model")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also log to TensorBoard")
    p.add_argument("--out", help="run folder (default runs/<dataset>-<method>-<model>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--eval-attacks", default="clean,pgd20", help="final test-set evaluation ('' to skip)")
    p.add_argument("--eval-n", type=int, help="evaluate on the first N test examples only")
    for k, h in _method_hparams().items():
        flag = "--" + k.replace("_", "-")
        if h.type is bool:
            p.add_argument(flag, dest=f"hp_{k}", action="store_true", default=None, help=h.help)
        else:
            p.add_argument(flag, dest=f"hp_{k}", type=h.type, help=h.help)


def _config_from_args(a: argparse.Namespace):
    from .config import TrainConfig, load_preset
    from .methods import METHODS

    base: dict[str, Any] = load_preset(a.preset) if a.preset else {}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in vars(a).items():
        if k in fields and v is not None and k != "method_args":
            base[k] = v
    method = base.get("method", "arow")
    allowed = METHODS.get(method).hparams
    margs = dict(base.get("method_args") or {})
    for k, v in vars(a).items():
        if k.startswith("hp_") and v is not None:
            name = k[3:]
            if name not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} does not apply to method {method!r} "
                                 f"(it takes: {', '.join('--' + n.replace('_', '-') for n in allowed) or 'none'})")
            margs[name] = v
    base["method_args"] = margs
    cfg = TrainConfig.from_dict(base)
    if cfg.out is None:
        cfg.out = f"runs/{cfg.dataset}-{cfg.method}-{cfg.model}-s{cfg.seed}"
    return cfg.validate()


def cmd_train(a: argparse.Namespace) -> int:
    from . import distributed
    from .training import train

    cfg = _config_from_args(a)
    bars = _Bars(enabled=sys.stderr.isatty())
    t0 = time.perf_counter()
    log.info("training %s / %s on %s -> %s", cfg.method, cfg.model, cfg.dataset, cfg.out)
    result = train(cfg, callbacks=bars, resume=a.resume)
    train_seconds = time.perf_counter() - t0
    attacks = [s for s in a.eval_attacks.split(",") if s]
    if attacks:
        ev = argparse.Namespace(run=cfg.out, attacks=a.eval_attacks, n=a.eval_n, eps=None, which="final",
                                batch_size=500, device=cfg.device, data_dir=cfg.data_dir, dataset=None,
                                json=None, model=result.model, train_seconds=train_seconds)
        cmd_eval(ev)
    else:
        log.info("trained in %.0fs; run folder %s", train_seconds, cfg.out)
    distributed.teardown()
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(a: argparse.Namespace) -> int:
    from . import distributed, load_model
    from .checkpoint import atomic_write_text, load_checkpoint
    from .data import DATASETS, load_dataset
    from .evaluation import evaluate

    d = distributed.setup(a.device)
    device = distributed.resolve_device(a.device, d.local_rank)
    ckpt = load_checkpoint(a.run)
    cfg = ckpt.get("config", {})
    model = getattr(a, "model", None)
    model = load_model(a.run, which=a.which, device=device) if model is None else model.to(device).eval()
    dataset = a.dataset or ckpt["model_spec"].get("dataset") or cfg.get("dataset")
    eps = a.eps if a.eps is not None else ckpt.get("threat", {}).get("eps", DATASETS.get(dataset).eps)
    data = load_dataset(dataset, root=a.data_dir or cfg.get("data_dir"), split="test")
    full = len(data)
    if a.n is not None:
        if a.n < 1:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        data = data.subset(a.n)
    attacks = [s.strip() for s in a.attacks.split(",") if s.strip()]
    if not attacks:
        raise ValueError("--attacks is empty")
    bars = _Bars(enabled=sys.stderr.isatty())
    data = data.to(device)
    res = evaluate(model, data.x, data.y, attacks, eps=eps, num_classes=data.num_classes,
                   batch_size=a.batch_size, progress=bars.eval_progress)
    bars.close()
    subset = len(data) < full
    out = res.to_json()
    out.update({"dataset": dataset, "test_set_size": full, "subset": subset, "checkpoint": ckpt["path"],
                "method": cfg.get("method"), "model": ckpt["model_spec"].get("name"), "seed": cfg.get("seed")})
    if getattr(a, "train_seconds", None) is not None:
        out["train_seconds"] = a.train_seconds
    if d.is_main:
        run = Path(a.run)
        path = Path(a.json) if a.json else (run if run.is_dir() else run.parent) / "eval.json"
        atomic_write_text(json.dumps(out, indent=2) + "\n", path)
        rows = [[k, f"{100 * v:.2f}%", res.descriptions.get(k, "worst case over all attacks above")]
                for k, v in res.accuracy.items()]
        title = f"{dataset} test set, {len(data)} of {full} images{' (SUBSET)' if subset else ''}, eps={eps:.4g}"
        print(f"\n{title}\n" + _table(rows, ["attack", "accuracy", "what"]))
        if subset:
            print(f"WARNING: evaluated on a subset ({len(data)} of {full} test images); not a full-test-set number.")
        print(f"written {path}")
    return 0


# --------------------------------------------------------------------------- list
def cmd_list(a: argparse.Namespace) -> int:
    from .attacks import ATTACKS
    from .config import preset_names
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    for title, reg in (("methods", METHODS), ("models", MODELS), ("datasets", DATASETS), ("attacks", ATTACKS)):
        print(f"{title}:")
        for n in reg.names():
            print(f"  {n:22s} {reg.help(n)}")
    print("presets:")
    for n in preset_names():
        print(f"  {n}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="arow", description="Adversarial training with ARoW and its baselines.")
    p.add_argument("--version", action="version", version=f"arow {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (then evaluate it on the test set)")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a run folder or checkpoint on the test set")
    e.add_argument("run", help="run folder or checkpoint file")
    e.add_argument("--attacks", default="clean,pgd20,cw", help="comma-separated: clean, pgd20, cw, fgsm, ...")
    e.add_argument("--n", type=int, help="first N test examples only (default: the full test set)")
    e.add_argument("--eps", type=float, help="default: the eps the model was trained with")
    e.add_argument("--which", choices=["final", "best", "last"], default="final")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--device", default="auto")
    e.add_argument("--data-dir")
    e.add_argument("--dataset", help="default: the dataset the model was trained on")
    e.add_argument("--json", help="where to write the results (default DIR/eval.json)")
    e.set_defaults(func=cmd_eval)
    ls = sub.add_parser("list", help="list methods, models, datasets, attacks and presets")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        out = getattr(a, "out", None)
        print(f"arow: interrupted{'; continue with --resume --out ' + str(out) if out else ''}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"arow: error: {msg}", file=sys.stderr)
        return 2
