"""The ``arow`` command (and ``python -m arow``): it parses flags, calls the library, prints.

``train`` is :func:`arow.pipelines.train_and_evaluate`, ``eval`` :func:`arow.pipelines.evaluate_source`,
``study`` :func:`arow.study.run_study`, ``plot`` :func:`arow.plots.plot_runs`; ``report``, ``export``,
``convert``, ``pseudo-label`` and ``list`` wrap one library function each. Only this module configures
logging and draws progress bars. Bad input ends with one line on stderr and exit status 2, a tripped
robustness guard with 3, a diverged run with 4; an interrupted run says how to continue.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .cliflags import add_dataclass_flags, add_function_flags, call_args, dataclass_flags

log = logging.getLogger("arow")

#: errors whose message is the whole story for the user: one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)
GROUPS = ("method", "data", "model", "optimisation", "attack", "evaluation", "runtime")


# --------------------------------------------------------------------------- the commands
def _config_from_args(a: argparse.Namespace) -> Any:
    from .config import TrainConfig, resolve_config

    method_args = {k[3:]: v for k, v in vars(a).items() if k.startswith("hp_")}
    return resolve_config(dataclass_flags(a, TrainConfig), method_args, preset=a.preset, resume=a.resume)


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


def cmd_eval(a: argparse.Namespace) -> int:
    from . import distributed
    from .pipelines import evaluate_source
    from .progress import Progress

    bars = Progress()
    rep = evaluate_source(**call_args(a, evaluate_source, progress=bars.eval_progress, on_guards=_print_guards))
    bars.close()
    return _print_report(rep, distributed.info().is_main)


def cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    rep, path = write_report(**call_args(a, write_report))
    print(rep.markdown())
    print(f"written {path}")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from .plots import eps_curve, plot_runs

    curve = call_args(a, eps_curve) if a.eps_curve else None
    plot_runs(a.runs, a.out_dir, eps_curve_args=curve, echo=print)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .checkpoint import export_model, load_checkpoint, resolve_checkpoint

    path = export_model(load_checkpoint(resolve_checkpoint(**call_args(a, resolve_checkpoint))), a.out)
    print(f"written {path} (weights and model header; `arow eval {path}` or arow.load_model({str(path)!r}))")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .checkpoint import convert_path

    for f in convert_path(**call_args(a, convert_path)):
        print(f"converted {f} (now loads without unpickling code)")
    return 0


def cmd_pseudo_label(a: argparse.Namespace) -> int:
    from .pseudo import pseudo_label

    res = pseudo_label(**call_args(a, pseudo_label))
    print(res.summary())
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
    spec = StudySpec.resolve(a.spec, dataclass_flags(a, StudySpec), a.set or [])
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
    from .registry import catalogue

    for title, entries in catalogue().items():
        print(f"{title}:")
        for name, text in entries.items():
            print(f"  {name:22s} {text}")
    return 0


# --------------------------------------------------------------------------- the parser
def _train_flags(p: argparse.ArgumentParser) -> None:
    """Every config field is a flag, declared by its field in TrainConfig; then each method's hyper-parameters."""
    from .config import TrainConfig, method_flag_help
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    groups = {g: p.add_argument_group(f"{g} options") for g in GROUPS}
    add_dataclass_flags(p, TrainConfig, groups=groups, skip=["method_args"], choices={
        "method": METHODS.names(), "dataset": DATASETS.names(), "model": MODELS.names()})
    g = groups["runtime"]
    g.add_argument("--preset", "--config", help="recipe name (see `arow list`), YAML file, or a run's config.json "
                   "to replay it; flags override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt (its saved config)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for dest, (kind, text) in method_flag_help().items():
        kw = {"action": "store_true", "default": None} if kind is bool else {"type": kind, "metavar": dest.upper()}
        groups["method"].add_argument("--" + dest.replace("_", "-"), dest=f"hp_{dest}", help=text, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The commands; the flags of each come from the library function it calls (see :mod:`arow.cliflags`)."""
    from . import __version__
    from .checkpoint import convert_path, resolve_checkpoint
    from .data import DATASETS
    from .pipelines import evaluate_source
    from .plots import eps_curve, plot_runs
    from .pseudo import pseudo_label
    from .report import write_report
    from .study import StudySpec, run_study

    p = argparse.ArgumentParser(prog="arow", description="Adversarial training with ARoW and its baselines.")
    p.add_argument("--version", action="version", version=f"arow {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(func=func)
        return c

    _train_flags(command("train", cmd_train, "train a model (then evaluate it on the test set)"))
    e = command("eval", cmd_eval, "evaluate a run folder, checkpoint or .safetensors export on the test set")
    add_function_flags(e, evaluate_source, skip=["progress", "on_guards"], positional=["source"],
                       rename={"source": "run", "json_out": "json"},
                       extra={"model_factory": {"metavar": "PKG.MODULE:FN"}, "robustbench": {"metavar": "FILE"},
                              "dataset": {"choices": DATASETS.names()}})
    r = command("report", cmd_report, "compare run folders in one table (mean ± std over seeds)")
    add_function_flags(r, write_report, ["paths", "out", "fmt"], positional=["paths"],
                       rename={"paths": "DIR", "fmt": "format"})
    pl = command("plot", cmd_plot, "draw the PNGs of run folders (curves, per-class, weights, eps curve); with "
                                   "several, also figures comparing them")
    add_function_flags(pl, plot_runs, ["runs", "out_dir"], positional=["runs"],
                       rename={"runs": "DIR", "out_dir": "out"}, extra={"out_dir": {"metavar": "DIR"}})
    pl.add_argument("--eps-curve", action="store_true", help="also run PGD-20 at several eps (-> eps_curve.json/png)")
    add_function_flags(pl.add_argument_group("eps curve (with --eps-curve)"), eps_curve,
                       ["n", "factors", "which", "batch_size", "device", "data_dir"], rename={"factors": "eps_factors"})
    x = command("export", cmd_export, "write a run's model as safetensors (weights + model header) for sharing")
    add_function_flags(x, resolve_checkpoint, ["path", "which"], positional=["path"], rename={"path": "run"})
    x.add_argument("--out", required=True, help="the .safetensors file to write")
    c = command("convert", cmd_convert, "rewrite a checkpoint of an older arow (or any trusted pickle) so that it "
                                        "loads safely")
    add_function_flags(c, convert_path, positional=["path"])
    st = command("study", cmd_study, "train and evaluate methods x seeds alike, then compare them (paired by seed)")
    st.add_argument("spec", nargs="?", help="study YAML (methods, seeds, preset, overrides, ...); flags override it")
    add_dataclass_flags(st, StudySpec, skip=["overrides"])
    st.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run (repeatable)")
    st.add_argument("--out", help="study folder (run folders go into OUT/cells)")
    add_function_flags(st, run_study, ["jobs"])
    st.add_argument("--print-commands", action="store_true",
                    help="print the arow commands that finish each run (for a scheduler) instead of running them")
    st.add_argument("--collect", metavar="DIR", help="only build the comparison of study DIR from its finished runs")
    ps = command("pseudo-label", cmd_pseudo_label, "label unlabelled images with a trained model (-> .npz for "
                                                   "--extra-data)")
    add_function_flags(ps, pseudo_label, positional=["model_source"], rename={"model_source": "model"},
                       extra={"data": {"required": True}, "out": {"required": True},
                              "exclude_kept": {"metavar": "RUN_OR_FILE"}})
    command("list", cmd_list, "list methods, models, datasets, attacks and presets")
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
    except BrokenPipeError:  # e.g. `arow list | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exiting does not flush into it
        return 141
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
