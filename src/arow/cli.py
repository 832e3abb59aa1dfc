"""The ``arow`` command (and ``python -m arow``): it parses flags, calls the library, prints.

``train`` is :func:`arow.pipelines.train_and_evaluate`, ``eval`` :func:`arow.pipelines.evaluate_source`,
``study`` :func:`arow.study.run_study`, ``plot`` :func:`arow.plots.plot_runs`; ``report``, ``export``,
``convert``, ``pseudo-label`` and ``list`` wrap one library function each. Only this module configures
logging and draws progress bars. Bad input ends with one line on stderr and exit status 2, a tripped
robustness guard with 3, a diverged run with 4; an interrupted run says how to continue.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger("arow")

#: errors whose message is the whole story for the user: one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)
GROUPS = ("method", "data", "model", "optimisation", "attack", "evaluation", "runtime")


# --------------------------------------------------------------------------- train
def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every config field is a flag, from its declaration (group, help, choices) in TrainConfig."""
    from .config import TrainConfig, method_flag_help
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    registries = {"method": METHODS.names(), "dataset": DATASETS.names(), "model": MODELS.names()}
    groups = {g: p.add_argument_group(f"{g} options") for g in GROUPS}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method_args":
            continue
        meta, flag, hint = f.metadata, "--" + f.name.replace("_", "-"), hints[f.name]
        kind = (typing.get_args(hint) or [hint])[0]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f"{meta['help']} (default {default})" if default not in (None, False) else meta["help"]
        g = groups[meta["group"]]
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif typing.get_origin(hint) is list and kind is str:  # e.g. --extra-data A --extra-data B
            g.add_argument(flag, action="append", metavar="FILE", help=meta["help"])
        elif typing.get_origin(hint) is list:
            g.add_argument(flag, type=lambda s: [float(v) for v in s.split(",")], help=help + "; comma-separated")
        else:
            g.add_argument(flag, type=kind, choices=registries.get(f.name) or meta["choices"], help=help)
    g = groups["runtime"]
    g.add_argument("--preset", "--config", help="recipe name (see `arow list`), YAML file, or a run's config.json "
                   "to replay it; flags override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt (its saved config)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g = groups["method"]
    for dest, (kind, text) in method_flag_help().items():
        kw = {"action": "store_true", "default": None} if kind is bool else {"type": kind, "metavar": dest.upper()}
        g.add_argument("--" + dest.replace("_", "-"), dest=f"hp_{dest}", help=text, **kw)


def _config_from_args(a: argparse.Namespace):
    from .config import TrainConfig, resolve_config

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(a).items() if k in fields}
    method_overrides = {k[3:]: v for k, v in vars(a).items() if k.startswith("hp_")}
    return resolve_config(overrides, method_overrides, preset=a.preset, resume=a.resume)


def cmd_train(a: argparse.Namespace) -> int:
    from .checkpoint import dump_json
    from .pipelines import train_and_evaluate
    from .progress import Progress

    cfg = _config_from_args(a)
    if a.print_config:
        print(dump_json(cfg.to_dict()))
        return 0
    eval_bars = Progress()
    run = train_and_evaluate(cfg, callbacks=[Progress()], resume=a.resume, progress=eval_bars.eval_progress,
                             on_guards=_print_guards)
    eval_bars.close()
    status = _print_report(run.evaluation, run.is_main) if run.evaluation is not None else 0
    if run.is_main:
        print(f"trained in {run.seconds:.0f}s; run folder {cfg.out}")
    return status


# --------------------------------------------------------------------------- eval
def _print_guards(rep: Any) -> None:
    from . import distributed

    if distributed.info().is_main:  # under torchrun only rank 0 prints
        print("\n" + rep.guards_text(), flush=True)


def _print_report(rep: Any, main: bool) -> int:
    """Print an evaluation's report (on rank 0): exit status 3 when a robustness guard tripped."""
    if not main:
        return 3 if rep.error else 0
    if rep.error:
        print(f"arow: error: {rep.error}", file=sys.stderr)
        return 3
    print("\n" + rep.text())
    print(f"written {rep.path}")
    if rep.robustbench:
        print(f"written {rep.robustbench} (RobustBench model info)")
    return 0


def _eval_and_print(evaluate: Callable[..., Any], *args: Any, **kw: Any) -> int:
    """Run ``evaluate`` (e.g. :func:`arow.pipelines.evaluate_source`) with progress bars, printing the
    guards' verdicts as soon as they are in, then the report."""
    from . import distributed
    from .progress import Progress

    bars = Progress()
    rep = evaluate(*args, progress=bars.eval_progress, on_guards=_print_guards, **kw)
    bars.close()
    return _print_report(rep, distributed.info().is_main)


def cmd_eval(a: argparse.Namespace) -> int:
    from .pipelines import evaluate_source

    attacks = [s.strip() for s in a.attacks.split(",")]
    return _eval_and_print(evaluate_source, a.run, attacks, model_factory=a.model_factory, weights=a.weights,
                           norm=a.norm, which=a.which, dataset=a.dataset, resume=a.eval_resume,
                           robustbench=a.robustbench, n=a.n, eps=a.eps, data_dir=a.data_dir, device=a.device,
                           batch_size=a.batch_size, guards=a.guards, guards_n=a.guards_n,
                           allow_guard_failures=a.allow_guard_failures, json_out=a.json)


def _number(s: str) -> float:
    """A float, or a fraction such as 8/255."""
    num, sep, den = s.partition("/")
    try:
        return float(num) / float(den) if sep else float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.031 or 8/255, got {s!r}") from None


# --------------------------------------------------------------------------- the other subcommands
def cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    rep, path = write_report(a.runs, a.out, a.format)
    print(rep.markdown())
    print(f"written {path}")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from .plots import plot_runs

    if len(a.runs) == 1 and a.out is not None:
        log.warning("--out is used with two or more run folders (the comparison figures); %s gets its own PNGs",
                    a.runs[0])
    curve = {"n": a.n, "factors": [float(v) for v in a.eps_factors.split(",") if v.strip()], "which": a.which,
             "device": a.device, "data_dir": a.data_dir, "batch_size": a.batch_size}
    plot_runs(a.runs, a.out, eps_curve_args=curve if a.eps_curve else None, echo=print)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .checkpoint import export_model, load_checkpoint, resolve_checkpoint

    if a.out is None:
        raise ValueError("--out FILE.safetensors is required")
    path = export_model(load_checkpoint(resolve_checkpoint(a.run, a.which)), a.out)
    print(f"written {path} (weights and model header; `arow eval {path}` or arow.load_model({str(path)!r}))")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .checkpoint import convert_path

    if not a.trust_pickle:
        raise ValueError("arow convert reads the file with Python's full unpickler, which runs any code it holds; "
                         "pass --trust-pickle to confirm you trust where the file came from")
    for f in convert_path(a.path):
        print(f"converted {f} (now loads without unpickling code)")
    return 0


def cmd_pseudo_label(a: argparse.Namespace) -> int:
    from .pseudo import pseudo_label

    if a.out is None:
        raise ValueError("--out FILE.npz is required")
    res = pseudo_label(a.model, a.data, a.out, which=a.which, batch_size=a.batch_size, device=a.device,
                       data_dir=a.data_dir, exclude_kept=a.exclude_kept)
    excluded = f" ({res.source['excluded']} labelled ones left out)" if res.source["excluded"] else ""
    print(f"labelled {len(res.labels)} images of {res.source['data']}{excluded} with {res.source['model']}: "
          f"mean confidence {float(res.confidence.mean()):.3f}; per class {res.histogram()}")
    print(f"written {res.path} (train on it with --extra-data {res.path})")
    return 0


def cmd_study(a: argparse.Namespace) -> int:
    from .study import StudySpec, collect, run_study, study_commands

    if a.collect:
        result = collect(a.collect, baseline=a.baseline)
        print((Path(a.collect) / result["files"][0]).read_text())
        print(f"written {Path(a.collect) / result['files'][0]}, " + ", ".join(result["files"][1:])
              + "".join(f", {Path(p).name}" for p in result.get("plots", [])))
        return 0
    flags = {"methods": a.methods, "seeds": a.seeds, "preset": a.preset, "baseline": a.baseline, "aa_n": a.aa_n,
             "eps_curve_n": a.eps_curve_n, "attacks": a.attacks, "guards": a.guards}
    spec = StudySpec.resolve(a.spec, flags, a.set or [])
    if a.out is None:
        raise ValueError("--out FOLDER is required (the study folder; run folders go into FOLDER/cells)")
    if a.print_commands:
        print(study_commands(a.out, spec))
        return 0
    failed, results = run_study(a.out, spec, jobs=a.jobs, echo=lambda s: print(s, flush=True))
    print(results)
    if failed:
        print(f"arow: {len(failed)} run(s) failed: {', '.join(failed)} (see results.md; rerun the command to "
              "retry them)", file=sys.stderr)
    return 1 if failed else 0


def cmd_list(a: argparse.Namespace) -> int:
    from .attacks import ATTACKS
    from .config import preset_names, preset_summary
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    for title, reg in (("methods", METHODS), ("models", MODELS), ("datasets", DATASETS), ("attacks", ATTACKS)):
        print(f"{title}:")
        for n in reg.names():
            print(f"  {n:22s} {reg.help(n)}")
    print("presets:")
    for n in preset_names():
        print(f"  {n:22s} {preset_summary(n)}")
    return 0


# --------------------------------------------------------------------------- the parser
def _model_args(p: argparse.ArgumentParser, which_only: bool = False, **which: str) -> None:
    """The flags of the subcommands that load a trained model and run it on data (``export``: --which only);
    ``which`` (e.g. help=...) goes to --which."""
    p.add_argument("--which", choices=["final", "best", "last"], default="final", **which)
    if not which_only:
        p.add_argument("--batch-size", type=int, default=100, help="examples per attack batch (default 100: "
                       "the fastest measured on a CPU; verdicts of PGD and CW do not depend on it)")
        p.add_argument("--device", default="auto")
        p.add_argument("--data-dir")


def _command(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="arow", description="Adversarial training with ARoW and its baselines.")
    p.add_argument("--version", action="version", version=f"arow {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_args(_command(sub, "train", cmd_train, "train a model (then evaluate it on the test set)"))
    e = _command(sub, "eval", cmd_eval, "evaluate a run folder, checkpoint or .safetensors export on the test set")
    e.add_argument("run", nargs="?", help="run folder, checkpoint, .safetensors export, or your own model as a "
                   "TorchScript file or exported program (.pt2; then --dataset and --eps are required)")
    e.add_argument("--model-factory", metavar="PKG.MODULE:FN",
                   help="your own model: a function returning the nn.Module (inputs in [0, 1], logits out); "
                        "with --weights, --dataset and --eps")
    e.add_argument("--weights", help="state dict for --model-factory (.safetensors, or a torch.save file read with "
                                     "weights_only=True)")
    e.add_argument("--attacks", default="clean,pgd20,cw",
                   help="comma-separated, in order: clean, pgd20, cw, fgsm, autoattack (standard; runs on what "
                        "the attacks before it left robust), apgd-monitor, ...")
    e.add_argument("--n", type=int, help="first N test examples only (default: the full test set)")
    e.add_argument("--eps", type=_number, help="e.g. 0.1 or 8/255 (default: the eps the model was trained with; "
                                               "with another --norm, that norm's data-set default)")
    e.add_argument("--norm", choices=["linf", "l2"], help="threat model: linf or l2 (default: the norm the model "
                                                          "was trained with; L-inf for your own model)")
    _model_args(e)
    e.add_argument("--dataset", help="default: the dataset the model was trained on")
    e.add_argument("--json", help="where to write the results (default DIR/eval.json; DIR/eval_n<N>.json with --n)")
    e.add_argument("--no-guards", dest="guards", action="store_false",
                   help="skip the checks against overstated robustness (the results then say so)")
    e.add_argument("--guards-n", type=int, default=200, help="test images the guards use (default 200)")
    e.add_argument("--allow-guard-failures", action="store_true",
                   help="report the numbers even when a guard trips (default: exit status 3)")
    e.add_argument("--robustbench", metavar="FILE",
                   help="RobustBench model-info JSON (default DIR/robustbench.json whenever autoattack ran)")
    e.add_argument("--no-resume", dest="eval_resume", action="store_false",
                   help="recompute everything instead of continuing from DIR/eval_state")
    r = _command(sub, "report", cmd_report, "compare run folders in one table (mean ± std over seeds)")
    r.add_argument("runs", nargs="+", metavar="DIR", help="run folders")
    r.add_argument("--out", help="file to write (default ./report.md, or ./report.csv with --format csv)")
    r.add_argument("--format", choices=["md", "csv"], default="md", help="format of the file (terminal: Markdown)")
    pl = _command(sub, "plot", cmd_plot, "draw the PNGs of run folders (curves, per-class, weights, eps curve); "
                                         "with several, also figures comparing them")
    pl.add_argument("runs", nargs="+", metavar="DIR", help="run folders")
    pl.add_argument("--out", metavar="DIR",
                    help="with two or more run folders: the folder for the comparison figures compare_*.png "
                         "(default: the current directory; never one of the run folders)")
    pl.add_argument("--eps-curve", action="store_true", help="also run PGD-20 at several eps (-> eps_curve.json/png)")
    pl.add_argument("--n", type=int, default=1000, help="eps curve: first N test examples (default 1000)")
    pl.add_argument("--eps-factors", default="0,0.25,0.5,1,1.5,2,3", help="eps curve: multiples of the training eps")
    _model_args(pl, help="eps curve: checkpoint")
    x = _command(sub, "export", cmd_export, "write a run's model as safetensors (weights + model header) for sharing")
    x.add_argument("run", help="run folder or checkpoint file")
    x.add_argument("--out", help="the .safetensors file to write")
    _model_args(x, which_only=True)
    c = _command(sub, "convert", cmd_convert, "rewrite a checkpoint of an older arow (or any trusted pickle) so "
                                              "that it loads safely")
    c.add_argument("path", help="checkpoint file or run folder (every .pt in it), rewritten in place")
    c.add_argument("--trust-pickle", action="store_true",
                   help="required: reading the old file runs whatever its pickle holds; only for files you trust")
    st = _command(sub, "study", cmd_study, "train and evaluate methods x seeds alike, then compare them "
                                           "(paired by seed)")
    st.add_argument("spec", nargs="?", help="study YAML (methods, seeds, preset, overrides, ...); flags override it")
    st.add_argument("--methods", help="comma-separated methods, e.g. arow,trades,mart,pgd-at (variants: YAML)")
    st.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    st.add_argument("--preset", help="recipe of every run (name, YAML or config.json; default: the embedded one)")
    st.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run (repeatable)")
    st.add_argument("--out", help="study folder (run folders go into OUT/cells)")
    st.add_argument("--baseline", help="method the others are compared against, paired by seed (default trades; "
                                       "with --collect: another row, written to results_vs_<row>.*)")
    st.add_argument("--attacks", help="full-test-set attacks of every run (default clean,pgd20,cw)")
    st.add_argument("--aa-n", type=int, help="standard AutoAttack on the first N test images (default 1000; 0 skips)")
    st.add_argument("--eps-curve-n", type=int, help="PGD-20 against eps on the first N test images (default 1000; "
                                                    "0 skips)")
    st.add_argument("--no-guards", dest="guards", action="store_false", default=None,
                    help="skip the robustness guards of each run's evaluation")
    st.add_argument("--jobs", type=int, default=1, help="runs at once (one per GPU when several are visible, "
                                                         "else sharing the CPU threads)")
    st.add_argument("--print-commands", action="store_true",
                    help="print the arow commands that finish each run (for a scheduler) instead of running them")
    st.add_argument("--collect", metavar="DIR", help="only build the comparison of study DIR from its finished runs")
    ps = _command(sub, "pseudo-label", cmd_pseudo_label, "label unlabelled images with a trained model (-> .npz "
                                                         "for --extra-data)")
    ps.add_argument("model", help="run folder, checkpoint file or .safetensors export")
    ps.add_argument("--data", required=True, help="an .npz (image) or RST pickle (data) file, its labels ignored, "
                    "or a dataset name with an optional split: fashion-mnist, cifar10:train (default split train)")
    ps.add_argument("--out", help="the .npz to write (image, label = argmax, confidence = max softmax)")
    ps.add_argument("--exclude-kept", metavar="RUN_OR_FILE", help="leave out the training images a run folder used "
                    "as labelled data (its --labels-kept and validation split), or the positions in a .txt/.npy")
    _model_args(ps)
    _command(sub, "list", cmd_list, "list methods, models, datasets, attacks and presets")
    return p


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    quiet = a.quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun only rank 0 narrates
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)  # a kill (SIGTERM) ends like Ctrl-C: message, exit 130
    try:
        if sys.stderr.isatty():  # log lines go through the progress bar instead of overwriting it
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm([log, logging.getLogger()]):
                return a.func(a)
        return a.func(a)
    except KeyboardInterrupt:
        out, hint = getattr(a, "out", None), ""
        if a.command == "train" and out:
            from .runs import RunDir

            hint = (f"; continue with --resume --out {out}" if RunDir(out).has_checkpoint() else
                    "; no epoch had finished, so nothing was saved: run the same command again")
        elif a.command in ("eval", "study"):
            hint = "; run the same command again to continue where it stopped"
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
