"""The ``arow`` command: ``arow train``, ``arow eval``, ``arow report``, ``arow plot``, ``arow list``
(and ``python -m arow``).

Only this module configures logging and draws progress bars. Bad input ends with one line on
stderr and exit status 2; an interrupted run says how to resume it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("arow")

#: errors whose message is the whole story for the user: one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


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
    p.add_argument("--swa-start", type=int, help="average weights from this epoch (1-based) on; 0 turns SWA off")
    p.add_argument("--eps", type=float, help="L-inf radius (default: F-MNIST 0.1, others 8/255)")
    p.add_argument("--attack-steps", type=int, help="training attack steps (default 10)")
    p.add_argument("--step-size", type=float, help="training attack step (default eps/4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], help="bf16 autocast (auto: on CUDA only)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--limit-train", type=int, help="train on the first N training examples only")
    p.add_argument("--val-size", type=int, help="held-out training examples for model selection (1000)")
    p.add_argument("--val-attack", help="attack of the per-epoch validation (pgd20; apgd-monitor is the "
                   "cheap APGD-CE+APGD-T monitor, not AutoAttack)")
    p.add_argument("--augment", choices=["none", "flip", "crop+flip"])
    p.add_argument("--normalize", action="store_true", default=None, help="normalisation layer in the model")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also log to TensorBoard")
    p.add_argument("--out", help="run folder (default runs/<dataset>-<method>-<model>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--eval-attacks", default="clean,pgd20", help="final test-set evaluation ('' to skip)")
    p.add_argument("--eval-n", type=int, help="evaluate on the first N test examples only")
    p.add_argument("--no-guards", action="store_true", help="skip the robustness guards of the final evaluation")
    for k, h in _method_hparams().items():
        flag = "--" + k.replace("_", "-")
        if h.type is bool:
            p.add_argument(flag, dest=f"hp_{k}", action="store_true", default=None, help=h.help)
        else:
            p.add_argument(flag, dest=f"hp_{k}", type=h.type, help=h.help)


def _config_from_args(a: argparse.Namespace):
    from .config import TrainConfig, load_preset
    from .methods import METHODS

    if a.resume and a.preset:
        raise ValueError("--preset cannot be combined with --resume: a resumed run continues with the config "
                         "saved in its folder (flags given with --resume may only change how it runs)")
    base: dict[str, Any] = load_preset(a.preset) if a.preset else {}
    if a.resume and a.out:
        from .runs import RunDir

        run = RunDir(a.out)
        if run.has_checkpoint():
            # A resumed run continues ITS experiment: its saved config is the base, flags given now
            # override it, and the Trainer refuses overrides that would change the experiment.
            base = dict(run.load_resume_state()["config"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in vars(a).items():
        if k in fields and v is not None and k != "method_args":
            base[k] = v
    method = base.get("method", "arow")
    allowed = METHODS.get(method).hparams
    given = base.get("method_args") or {}
    if not isinstance(given, dict):
        raise ValueError(f"method_args must be a mapping of hyper-parameters, got {given!r}")
    unknown = sorted(set(given) - set(_method_hparams()))
    if unknown:
        raise ValueError(f"method_args: unknown hyper-parameter(s) {', '.join(unknown)} (no method takes them; "
                         f"{method} takes: {', '.join(allowed) or 'none'})")
    margs = {k: v for k, v in given.items() if k in allowed}
    dropped = set(given) - set(margs)
    if dropped:  # a preset written for another method: its hyper-parameters do not carry over
        log.info("ignoring the preset's %s: not hyper-parameters of %s", ", ".join(sorted(dropped)), method)
    for k, v in vars(a).items():
        if k.startswith("hp_") and v is not None:
            name = k[3:]
            if name not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} does not apply to method {method!r} "
                                 f"(it takes: {', '.join('--' + n.replace('_', '-') for n in allowed) or 'none'})")
            margs[name] = v
    base["method_args"] = margs
    if base.get("swa_start") == 0:  # --swa-start 0 turns off a preset's SWA
        base["swa_start"] = None
    cfg = TrainConfig.from_dict(base)
    if cfg.out is None:
        cfg.out = f"runs/{cfg.dataset}-{cfg.method}-{cfg.model}-s{cfg.seed}"
    return cfg.validate()


def cmd_train(a: argparse.Namespace) -> int:
    from . import distributed
    from .training import train

    cfg = _config_from_args(a)
    from .attacks import get_attack

    for name in (s.strip() for s in a.eval_attacks.split(",")):  # a typo must fail now, not after training
        if name:
            get_attack(name, cfg.eps if cfg.eps is not None else 0.1)
    if a.eval_n is not None and a.eval_n < 1:
        raise ValueError(f"--eval-n must be >= 1, got {a.eval_n}")
    test_data = None
    if a.eval_attacks.strip():  # missing or damaged test files must fail now, not after training
        from .data import load_dataset

        test_data = load_dataset(cfg.dataset, root=cfg.data_dir, split="test")
    bars = _Bars(enabled=sys.stderr.isatty() and os.environ.get("RANK", "0") == "0")
    t0 = time.perf_counter()
    log.info("training %s / %s on %s -> %s", cfg.method, cfg.model, cfg.dataset, cfg.out)
    result = train(cfg, callbacks=bars, resume=a.resume)
    train_seconds = time.perf_counter() - t0
    attacks = [s for s in a.eval_attacks.split(",") if s]
    status = 0
    if attacks:  # the same evaluation as `arow eval`, guards included
        ev = argparse.Namespace(run=cfg.out, attacks=a.eval_attacks, n=a.eval_n, eps=None, which="final",
                                batch_size=500, device=cfg.device, data_dir=cfg.data_dir, dataset=None,
                                json=None, model=result.model, train_seconds=train_seconds,
                                guards=not a.no_guards, guards_n=200, allow_guard_failures=False,
                                robustbench=None, eval_resume=True, test_data=test_data)
        status = cmd_eval(ev)
        if distributed.info().is_main:
            from .training import _plot_run

            _plot_run(Path(cfg.out))  # again: per_class.png needs eval.json; a failure only warns
            print(f"trained in {train_seconds:.0f}s; run folder {cfg.out}")
    else:
        log.info("trained in %.0fs; run folder %s", train_seconds, cfg.out)
    distributed.teardown()
    return status


# --------------------------------------------------------------------------- eval
def cmd_eval(a: argparse.Namespace) -> int:
    from . import distributed, model_from_checkpoint
    from .checkpoint import atomic_write_text, dump_json, load_checkpoint, resolve_checkpoint
    from .data import DATASETS, load_dataset
    from .evaluation import evaluate
    from .runs import RunDir, check_writable

    d = distributed.setup(a.device)
    device = distributed.resolve_device(a.device, d.local_rank)
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.eps is not None and not a.eps >= 0:
        raise ValueError(f"--eps must be >= 0, got {a.eps}")
    ckpt_path = resolve_checkpoint(a.run, a.which)
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt.get("config", {})
    spec = ckpt["model_spec"]
    dataset = a.dataset or spec.get("dataset") or cfg.get("dataset")
    if dataset not in DATASETS:
        raise ValueError(f"{ckpt_path}: does not say which data set it was trained on; pass --dataset")
    dinfo = DATASETS.get(dataset)
    shape = (spec.get("in_channels"), spec.get("image_size"), spec.get("num_classes"))
    if None not in shape and shape != (dinfo.in_channels, dinfo.image_size, dinfo.num_classes):
        raise ValueError(f"--dataset {dataset} ({dinfo.in_channels}x{dinfo.image_size}x{dinfo.image_size}, "
                         f"{dinfo.num_classes} classes) does not fit the model in {ckpt_path} "
                         f"({shape[0]}x{shape[1]}x{shape[1]}, {shape[2]} classes)")
    if a.n is not None and a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    test_data = getattr(a, "test_data", None)
    data = test_data if test_data is not None else load_dataset(dataset, root=a.data_dir or cfg.get("data_dir"),
                                                                split="test")
    full = len(data)
    if a.n is not None:
        data = data.subset(a.n)
    run = Path(a.run)
    run_dir = run if run.is_dir() else run.parent
    # eval.json holds the final model on the FULL test set; other checkpoints and subsets get their own file
    which = a.which if run.is_dir() else run.stem
    path = check_writable(a.json if a.json else RunDir(run_dir).eval_path(which, len(data), full), "--json")
    model = getattr(a, "model", None)
    model = model_from_checkpoint(ckpt, device=device) if model is None else model.to(device).eval()
    import torch

    model = model.to(memory_format=torch.channels_last)  # same numbers; measured 1.3-1.45x for PGD on the CPU
    eps = a.eps if a.eps is not None else ckpt.get("threat", {}).get("eps", dinfo.eps)
    attacks = [s.strip() for s in a.attacks.split(",") if s.strip()]
    if not attacks:
        raise ValueError("--attacks is empty")
    from .attacks import get_attack

    built = [get_attack(name, eps) for name in attacks]  # a typo fails now, not after the guards
    rb_file = getattr(a, "robustbench", None)
    if rb_file and not {"clean", "autoattack"} <= set(attacks):
        raise ValueError("--robustbench needs both clean and autoattack in --attacks")
    use_guards, guards_n = getattr(a, "guards", False), getattr(a, "guards_n", 200)
    if use_guards and guards_n < 1:
        raise ValueError(f"--guards-n must be >= 1, got {guards_n}")
    subset = len(data) < full
    info: dict[str, Any] = {"dataset": dataset, "test_set_size": full, "subset": subset, "checkpoint": ckpt["path"], "which": which,
                            "method": cfg.get("method"), "model": ckpt["model_spec"].get("name"),
                            "seed": cfg.get("seed")}
    if subset:
        info["warning"] = f"evaluated on a subset ({len(data)} of {full} test images); not a full-test-set number"
    data = data.to(device)
    guards: list[dict[str, Any]] = []
    if use_guards:  # cheap, so before the evaluation: an untrustworthy model fails fast
        from .guards import run_guards, tripped

        results = run_guards(model, data.x, data.y, eps=eps, num_classes=data.num_classes,
                             n=min(guards_n, len(data)), batch_size=a.batch_size)
        guards = [r.to_json() for r in results]
        bad = tripped(results)
        if d.is_main:
            rows = [[r.name, "pass" if r.passed else "FAIL", f"{r.value:.4g}", f"{r.threshold:.4g}", r.message]
                    for r in results]
            print(f"\nrobustness guards on the first {min(guards_n, len(data))} test images\n"
                  + _table(rows, ["guard", "result", "value", "limit", "what"]))
        if bad and not getattr(a, "allow_guard_failures", False):
            names = ", ".join(repr(r.name) for r in bad)
            msg = (f"robustness guard {names} tripped: {bad[0].message} "
                   f"(--allow-guard-failures reports the numbers anyway)")
            if d.is_main:
                atomic_write_text(dump_json({**info, "guards": guards, "error": msg}) + "\n", path)
                print(f"arow: error: {msg}", file=sys.stderr)
            return 3
    bars = _Bars(enabled=sys.stderr.isatty() and os.environ.get("RANK", "0") == "0")
    state_dir = run_dir / "eval_state" if getattr(a, "eval_resume", True) else None
    res = evaluate(model, data.x, data.y, built, eps=eps, num_classes=data.num_classes,
                   batch_size=a.batch_size, progress=bars.eval_progress, state_dir=state_dir)
    bars.close()
    out = res.to_json()
    out.update(info)
    out["guards"] = guards
    if getattr(a, "train_seconds", None) is not None:
        out["train_seconds"] = a.train_seconds
    if d.is_main:
        atomic_write_text(dump_json(out) + "\n", path)
        rows = [[k, f"{100 * v:.2f}%", res.descriptions.get(k, "worst case over all attacks above")]
                for k, v in res.accuracy.items()]
        title = f"{dataset} test set, {len(data)} of {full} images{' (SUBSET)' if subset else ''}, eps={eps:.4g}"
        print(f"\n{title}\n" + _table(rows, ["attack", "accuracy", "what"]))
        if subset:
            print(f"WARNING: evaluated on a subset ({len(data)} of {full} test images); not a full-test-set number.")
        if any(not g["passed"] for g in guards):
            print("WARNING: robustness guards tripped (see above); these numbers are likely overstated.")
        print(f"written {path}")
        if {"clean", "autoattack"} <= set(res.accuracy):
            from .robustbench import model_info, write_model_info

            rb = write_model_info(model_info(out), rb_file or run_dir / "robustbench.json")
            print(f"written {rb} (RobustBench model info)")
    return 0


# --------------------------------------------------------------------------- report, plot
def cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    rep, path = write_report(a.runs, a.out, a.format)
    print(rep.markdown())
    print(f"written {path}")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from .plots import eps_curve, plot_run

    factors = [float(v) for v in a.eps_factors.split(",") if v.strip()]
    for run in a.runs:
        if a.eps_curve:
            d = eps_curve(run, n=a.n, factors=factors, which=a.which, device=a.device, data_dir=a.data_dir,
                          batch_size=a.batch_size)
            rows = [[f"{p['eps']:.4g}", f"{p['factor']:g}", f"{100 * p['accuracy']:.2f}%"] for p in d["points"]]
            print(f"\n{run}: {d['attack']} accuracy vs eps on {d['n']} of {d['test_set_size']} test images"
                  f"{' (SUBSET)' if d['subset'] else ''}\n" + _table(rows, ["eps", "x train eps", "accuracy"]))
        for path in plot_run(run):
            print(f"written {path}")
    return 0


# --------------------------------------------------------------------------- bench
def cmd_bench(a: argparse.Namespace) -> int:
    from . import bench
    from .checkpoint import atomic_write_text

    split = lambda v: [s.strip() for s in v.split(",") if s.strip()]  # noqa: E731
    res = bench.run(split(a.models), split(a.methods), device=a.device, batch_size=a.batch_size, iters=a.iters,
                    warmup=a.warmup, steps=a.attack_steps, pgd_n=a.pgd_n, reference=not a.no_reference,
                    compile=a.compile, amp=a.amp, seed=a.seed, repeats=a.repeats, threads=a.threads,
                    on_row=log.info)
    res.meta["args"] = {k: v for k, v in vars(a).items() if k != "func"}
    print(res.markdown())
    if a.json:
        atomic_write_text(json.dumps(res.to_json(), indent=2) + "\n", a.json)
        print(f"written {a.json}")
    return 0


# --------------------------------------------------------------------------- export, convert
def cmd_export(a: argparse.Namespace) -> int:
    from .checkpoint import export_model, load_checkpoint, resolve_checkpoint

    if a.out is None:
        raise ValueError("--out FILE.safetensors is required")
    ckpt = load_checkpoint(resolve_checkpoint(a.run, a.which))
    path = export_model(ckpt, a.out)
    print(f"written {path} (weights and model header; `arow eval {path}` or arow.load_model({str(path)!r}))")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .checkpoint import convert_checkpoint

    if not a.trust_pickle:
        raise ValueError("arow convert reads the file with Python's full unpickler, which runs any code it holds; "
                         "pass --trust-pickle to confirm you trust where the file came from")
    files = sorted(Path(a.path).glob("*.pt")) if Path(a.path).is_dir() else [Path(a.path)]
    if not files:
        raise ValueError(f"{a.path}: no .pt files to convert")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{f}: no such file")
        print(f"converted {convert_checkpoint(f)} (now loads without unpickling code)")
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
    e.add_argument("--attacks", default="clean,pgd20,cw",
                   help="comma-separated, in order: clean, pgd20, cw, fgsm, autoattack (standard; runs on what "
                        "the attacks before it left robust), apgd-monitor, ...")
    e.add_argument("--n", type=int, help="first N test examples only (default: the full test set)")
    e.add_argument("--eps", type=float, help="default: the eps the model was trained with")
    e.add_argument("--which", choices=["final", "best", "last"], default="final")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--device", default="auto")
    e.add_argument("--data-dir")
    e.add_argument("--dataset", help="default: the dataset the model was trained on")
    e.add_argument("--json", help="where to write the results (default DIR/eval.json)")
    e.add_argument("--no-guards", dest="guards", action="store_false",
                   help="skip the checks against overstated robustness (eval mode, input range, gradients, "
                        "large eps, more steps, black-box)")
    e.add_argument("--guards-n", type=int, default=200, help="test images the guards use (default 200)")
    e.add_argument("--allow-guard-failures", action="store_true",
                   help="report the numbers even when a guard trips (default: exit status 3)")
    e.add_argument("--robustbench", metavar="FILE",
                   help="RobustBench model-info JSON (default DIR/robustbench.json whenever autoattack ran)")
    e.add_argument("--no-resume", dest="eval_resume", action="store_false",
                   help="recompute everything instead of continuing from DIR/eval_state")
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("report", help="compare run folders in one table (mean ± std over seeds)")
    r.add_argument("runs", nargs="+", metavar="DIR", help="run folders")
    r.add_argument("--out", help="file to write (default ./report.md, or ./report.csv with --format csv)")
    r.add_argument("--format", choices=["md", "csv"], default="md", help="format of the file (terminal: Markdown)")
    r.set_defaults(func=cmd_report)
    pl = sub.add_parser("plot", help="draw the PNGs of run folders (curves, per-class, weights, eps curve)")
    pl.add_argument("runs", nargs="+", metavar="DIR", help="run folders")
    pl.add_argument("--eps-curve", action="store_true", help="also run PGD-20 at several eps (-> eps_curve.json/png)")
    pl.add_argument("--n", type=int, default=1000, help="eps curve: first N test examples (default 1000)")
    pl.add_argument("--eps-factors", default="0,0.25,0.5,1,1.5,2,3", help="eps curve: multiples of the training eps")
    pl.add_argument("--which", choices=["final", "best", "last"], default="final", help="eps curve: checkpoint")
    pl.add_argument("--batch-size", type=int, default=500)
    pl.add_argument("--device", default="auto")
    pl.add_argument("--data-dir")
    pl.set_defaults(func=cmd_plot)
    b = sub.add_parser("bench", help="training images/s and GFLOP/s: our step vs a reference-style step")
    b.add_argument("--models", default="small-cnn,resnet18,wrn-34-10", help="comma-separated model names")
    b.add_argument("--methods", default="arow,trades", help="comma-separated training methods")
    b.add_argument("--batch-size", type=int, help="batch for every model (default: per model and device)")
    b.add_argument("--iters", type=int, help="timed training steps (default: per model and device)")
    b.add_argument("--warmup", type=int, help="untimed steps first (default: per model and device)")
    b.add_argument("--attack-steps", type=int, default=10, help="K, the training attack's steps (10)")
    b.add_argument("--pgd-n", type=int, help="images for the PGD-20 timing (0 skips; default per model)")
    b.add_argument("--repeats", type=int, default=1, help="alternate ours/reference N times, keep the best")
    b.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    b.add_argument("--no-reference", action="store_true", help="time our step only")
    b.add_argument("--compile", action="store_true", help="torch.compile the model in our step")
    b.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="our step (auto: bf16 on CUDA)")
    b.add_argument("--device", default="auto")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="also write the results to this JSON file")
    b.set_defaults(func=cmd_bench)
    x = sub.add_parser("export", help="write a run's model as safetensors (weights + model header) for sharing")
    x.add_argument("run", help="run folder or checkpoint file")
    x.add_argument("--out", help="the .safetensors file to write")
    x.add_argument("--which", choices=["final", "best", "last"], default="final")
    x.set_defaults(func=cmd_export)
    c = sub.add_parser("convert", help="rewrite a checkpoint of an older arow (or any trusted pickle) so that "
                                       "it loads safely")
    c.add_argument("path", help="checkpoint file or run folder (every .pt in it), rewritten in place")
    c.add_argument("--trust-pickle", action="store_true",
                   help="required: reading the old file runs whatever its pickle holds; only for files you trust")
    c.set_defaults(func=cmd_convert)
    ls = sub.add_parser("list", help="list methods, models, datasets, attacks and presets")
    ls.set_defaults(func=cmd_list)
    return p


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    quiet = a.quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun only rank 0 narrates
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)  # a kill (SIGTERM) ends like Ctrl-C: message, exit 130
    try:
        return a.func(a)
    except KeyboardInterrupt:
        out = getattr(a, "out", None)
        hint = (f"; continue with --resume --out {out}" if out else
                "; run the same command again to continue where it stopped" if a.command == "eval" else "")
        print(f"arow: interrupted{hint}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from .training import TrainingDiverged

        if not isinstance(e, TrainingDiverged):
            raise
        print(f"arow: error: {e}", file=sys.stderr)
        return 4
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"arow: error: {msg}", file=sys.stderr)
        return 2
