"""The ``arow`` command (and ``python -m arow``): it parses flags, calls the library, prints.

``train`` is :func:`arow.pipelines.train_and_evaluate`, ``eval`` :func:`arow.pipelines.evaluate_source`,
``study`` :func:`arow.study.runner.run_study`, ``plot`` :func:`arow.reporting.plots.plot_runs`; ``report``, ``export``,
``convert``, ``pseudo-label`` and ``list`` wrap one library function each. Only this module configures
logging and draws progress bars. Bad input ends with one line on stderr and exit status 2, a tripped
robustness guard with 3, a diverged run with 4; an interrupted run says how to continue. Under
torchrun only rank 0 prints results and progress; every rank prints its errors.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .. import __version__
from ..runs.checkpoint import dump_json
from ..runs.records import convert_path, export_model
from .flags import add_dataclass_flags, add_function_flags, call_args, dataclass_flags, param_docs
from ..config import TrainConfig, method_flag_help, preset_description, resolve_config
from ..data import DATASETS
from ..methods import METHODS
from ..models import MODELS
from ..evaluation.settings import EvalSettings, GuardSettings
from ..pipelines import catalogue, evaluate_loaded, evaluate_source, train_and_evaluate
from ..evaluation.sources import UserModelError, open_robustbench
from ..evaluation.cascade import quiet_attack_lines
from ..evaluation.curve import eps_curve
from ..reporting.plots import plot_runs
from .progress import Progress, log_through_bars
from ..pseudo import pseudo_label
from ..reporting.tables import write_report
from ..runs.rundir import RunDir
from ..study.collect import collect, publish_study
from ..study.runner import prepare_study, run_study, study_commands
from ..study.slurm import LAUNCHERS, submit_study, submit_train
from ..study.status import status_text, study_status
from ..study.spec import StudyError, StudySpec
from ..training.errors import TrainingDiverged

log = logging.getLogger("arow")

#: errors whose message is the whole story for the user: one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)


# --------------------------------------------------------------------------- the commands
def _config_from_args(a: argparse.Namespace) -> Any:
    method_args = {k[3:]: v for k, v in vars(a).items() if k.startswith("hp_")}
    return resolve_config(dataclass_flags(a, TrainConfig), method_args, preset=a.preset, resume=a.resume)


def cmd_train(a: argparse.Namespace) -> int:
    cfg = _config_from_args(a)
    if a.print_config:
        print(dump_json(cfg.to_dict()))
        return 0
    if LAUNCHERS[a.launcher]:
        return _submit_train(a, cfg)
    eval_bars = Progress()
    with quiet_attack_lines():  # the evaluation's progress, then its table: its numbers once, as in `arow eval`
        run = train_and_evaluate(cfg, callbacks=[Progress()], resume=a.resume, progress=eval_bars.eval_progress,
                                 on_guards=_print_guards)
    eval_bars.close()
    status = _print_report(run.evaluation) if run.evaluation is not None else 0
    print(f"trained in {run.seconds:.0f}s; run folder {cfg.out}")
    return status


def _print_guards(rep: Any) -> None:
    print("\n" + rep.guards_text(), flush=True)


def _print_report(rep: Any) -> int:
    """Print an evaluation's report: exit status 3 when a robustness guard tripped."""
    if rep.error:
        print(f"arow: error: {rep.error}", file=sys.stderr)
        return 3
    print("\n" + rep.text())
    print(f"written {rep.path}")
    if rep.robustbench:
        print(f"written {rep.robustbench} (RobustBench model info)")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    flags = vars(a)
    settings, guards = EvalSettings.from_flags(flags), GuardSettings.from_flags(flags)
    bars = Progress()
    with quiet_attack_lines():  # progress while it runs (bars, or a line every 30 s), the numbers in the table
        if a.robustbench_model is not None:  # a RobustBench zoo model, then the same evaluation as any source
            _zoo_alone(a)
            src = open_robustbench(**call_args(a, open_robustbench, dataset=settings.dataset))
            rep = evaluate_loaded(src, settings, guards, progress=bars.eval_progress, on_guards=_print_guards)
        else:
            rep = evaluate_source(**call_args(a, evaluate_source, attacks=None, settings=settings, guards=guards,
                                              progress=bars.eval_progress, on_guards=_print_guards))
    bars.close()
    return _print_report(rep)


def _zoo_alone(a: argparse.Namespace) -> None:
    """--robustbench-model names the model by itself: no run folder, model file or factory beside it."""
    given = [flag for flag, value in (("a model file or run folder", a.source), ("--model-factory", a.model_factory),
                                      ("--weights", a.weights), ("--model-format", a.model_format)) if value]
    if given:
        raise UserModelError(f"--robustbench-model names the model to evaluate; drop {', '.join(given)}")


def cmd_report(a: argparse.Namespace) -> int:
    rep, path = write_report(**call_args(a, write_report))
    print(rep.markdown())
    print(f"written {path}")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    curve = call_args(a, eps_curve) if a.eps_curve else None
    plot_runs(a.runs, a.out_dir, eps_curve_args=curve, echo=print)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    path = export_model(**call_args(a, export_model))
    print(f"written {path} (weights and model header; `arow eval {path}` or arow.load_model({str(path)!r}))")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    for f in convert_path(**call_args(a, convert_path)):
        print(f"converted {f} (now loads without unpickling code)")
    return 0


def cmd_pseudo_label(a: argparse.Namespace) -> int:
    res = pseudo_label(**call_args(a, pseudo_label))
    print(res.summary())
    print(f"written {res.path} (train on it with --extra-data {res.path})")
    return 0


def _submit_train(a: argparse.Namespace, cfg: Any) -> int:
    """``arow train --launcher slurm``: submit the run (one task per GPU) and return."""
    s = submit_train(**call_args(a, submit_train, cfg=cfg, cluster=LAUNCHERS[a.launcher]))
    print(f"submitted {s.name} as job {s.job_id}; its log: {s.stdout} (rank 0)")
    return 0


def cmd_study(a: argparse.Namespace) -> int:
    if a.status:
        print(status_text(study_status(a.status)))
        return 0
    if a.to and not a.publish:
        raise StudyError("--to names where --publish copies a study: give --publish DIR too")
    if a.collect or a.publish:
        if a.publish and not a.to:
            raise StudyError("--publish DIR needs --to DEST, the folder that receives the study's small files")
        folder = Path(a.to if a.publish else a.collect)
        result = publish_study(a.publish, a.to) if a.publish else collect(a.collect, baseline=a.baseline)
        print((folder / result["files"][0]).read_text())
        print(f"written {folder / result['files'][0]}, " + ", ".join(result["files"][1:])
              + "".join(f", {Path(p).name}" for p in result.get("plots", [])))
        return 0
    spec = StudySpec.resolve(a.spec, dataclass_flags(a, StudySpec), a.set or [])
    if LAUNCHERS[a.launcher] and (a.print_commands or a.prepare):
        raise StudyError("--launcher slurm submits the cells; --print-commands and --prepare submit nothing: "
                         "give one or the other")
    if a.print_commands or a.prepare:
        print((study_commands if a.print_commands else prepare_study)(a.out, spec))
        return 0
    if LAUNCHERS[a.launcher]:
        submit_study(**call_args(a, submit_study, path=a.out, spec=spec, cluster=LAUNCHERS[a.launcher],
                                 echo=lambda s: print(s, flush=True)))
        return 0
    failed, results = run_study(a.out, spec, jobs=a.jobs, rows=a.rows, echo=lambda s: print(s, flush=True))
    print(results)
    if failed:
        print(f"arow: {len(failed)} run(s) failed: {', '.join(failed)} (see results.md; rerun the command to "
              "retry them)", file=sys.stderr)
    return 1 if failed else 0


def cmd_list(a: argparse.Namespace) -> int:
    entries_by_title = catalogue()
    # each preset with its whole description (the catalogue's line is its first clause)
    entries_by_title["presets"] = {name: preset_description(name) for name in entries_by_title.get("presets", {})}
    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    for title, entries in entries_by_title.items():
        print(f"{title}:")
        for name, text in entries.items():
            print(_list_entry(name, text, width))
    return 0


def _list_entry(name: str, text: str, width: int) -> str:
    """``  name  text`` with the text wrapped (never cut) under its column, within ``width``.

    >>> print(_list_entry("pgd<K>", "PGD on cross-entropy, K steps of eps/4, random start", 50))
      pgd<K>                 PGD on cross-entropy, K
                             steps of eps/4, random
                             start
    """
    head = f"  {name:22s} "
    return textwrap.fill(" ".join(text.split()), width=width, initial_indent=head,
                         subsequent_indent=" " * len(head), break_long_words=False, break_on_hyphens=False)


# --------------------------------------------------------------------------- the parser
def _train_flags(p: argparse.ArgumentParser) -> None:
    """Every config field is a flag, declared by its field in TrainConfig; then each method's hyper-parameters."""
    groups = add_dataclass_flags(p, TrainConfig, skip=["method_args"], choices={
        "method": METHODS.names(), "dataset": DATASETS.names(), "model": MODELS.names()})
    add_function_flags(groups["runtime"], resolve_config, ["preset", "resume"],
                       extra={"preset": {"aliases": ["--config"]}})
    groups["runtime"].add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    _launcher_flags(p, submit_train, "submit the run to a Slurm cluster instead of training here (one task per GPU)",
                    ["nodes", "gpus_per_node", "time", "partition", "account", "cpus_per_task", "mem", "constraint",
                     "sbatch_arg", "max_requeues"])
    for dest, (kind, text) in method_flag_help().items():
        kw = {"action": "store_true", "default": None} if kind is bool else {"type": kind, "metavar": dest.upper()}
        groups["method"].add_argument("--" + dest.replace("_", "-"), dest=f"hp_{dest}", help=text, **kw)


def _launcher_flags(p: argparse.ArgumentParser, fn: Callable[..., Any], slurm: str, names: list[str]) -> None:
    """``--launcher`` and the job's resources (the parameters ``names`` of ``fn``), in their own group."""
    g = p.add_argument_group("cluster options (with --launcher slurm; docs/cluster.md)")
    g.add_argument("--launcher", choices=list(LAUNCHERS), default="local", metavar="{local,slurm}",
                   help=f"local: run on this machine (default); slurm: {slurm}, through submitit, and return")
    repeatable = {"action": "append", "type": str, "default": None, "metavar": "KEY=VALUE",
                  "help": param_docs(fn)["sbatch_arg"]}
    add_function_flags(g, fn, names, extra={"sbatch_arg": repeatable})


def build_parser() -> argparse.ArgumentParser:
    """The commands; the flags of each come from the library function it calls (see :mod:`arow.cli.flags`)."""
    p = argparse.ArgumentParser(prog="arow", description="Adversarial training with ARoW and its baselines.")
    p.add_argument("--version", action="version", version=f"arow {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="also arow's debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(func=func)
        # also after the command (`arow eval -q ...`); not given there, `arow -q eval` decides
        c.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")
        c.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also arow's debug messages")
        return c

    _train_flags(command("train", cmd_train, "train a model (then evaluate it on the test set)"))
    e = command("eval", cmd_eval, "evaluate a run folder, checkpoint or .safetensors export (or your own model) on "
                                  "the test set")
    add_function_flags(e, evaluate_source, ["source", "model_factory", "weights", "trust_code", "model_format"],
                       positional=["source"], rename={"source": "run"},
                       extra={"model_factory": {"metavar": "PKG.MODULE:FN"}, "weights": {"metavar": "FILE"}})
    add_function_flags(e.add_argument_group("RobustBench model zoo"), open_robustbench,
                       ["robustbench_model", "model_dir", "threat_model"],
                       extra={"robustbench_model": {"metavar": "NAME"}, "model_dir": {"metavar": "DIR"}})
    add_dataclass_flags(e, EvalSettings, choices={"dataset": DATASETS.names()})
    add_dataclass_flags(e, GuardSettings)
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
    add_function_flags(x, export_model, positional=["source"], rename={"source": "run"},
                       extra={"out": {"required": True}})
    c = command("convert", cmd_convert, "rewrite a checkpoint of an older arow (or any trusted pickle) so that it "
                                        "loads safely")
    add_function_flags(c, convert_path, positional=["path"])
    st = command("study", cmd_study, "train and evaluate methods x seeds alike, then compare them (paired by seed)")
    st.add_argument("spec", nargs="?", help="study YAML (methods, seeds, preset, overrides, ...); flags override it")
    add_dataclass_flags(st, StudySpec, skip=["overrides", "plan"])
    st.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run (repeatable)")
    add_function_flags(st, run_study, ["jobs", "rows"])
    _launcher_flags(st, submit_study, "submit the unfinished cells as one job array (one job per cell)",
                    ["time", "partition", "account", "gpus_per_cell", "cpus_per_cell", "mem", "constraint",
                     "sbatch_arg", "array_parallelism", "max_requeues"])
    todo = st.add_mutually_exclusive_group()
    todo.add_argument("--print-commands", action="store_true",
                      help="check the study and print the command that finishes each run; writes nothing")
    todo.add_argument("--prepare", action="store_true",
                      help="check the study, write study.json and each run's cell.json, and print the command "
                           "that runs each (for a scheduler) instead of running them")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="study folder (run folders go into OUT/cells)")
    where.add_argument("--collect", metavar="DIR", help="only build the comparison of study DIR from its finished runs")
    where.add_argument("--publish", metavar="DIR", help="copy what rebuilds study DIR (its spec, and each run's "
                       "config, records and evaluations with per-example verdicts; no checkpoint) into --to DEST, "
                       "and build the comparison there")
    st.add_argument("--to", metavar="DEST", help="with --publish: the folder to publish into (e.g. docs/results/NAME)")
    where.add_argument("--status", metavar="DIR", help="one table of the cells of study DIR: done, running, queued, "
                                                       "failed (with its error line), interrupted, not started")
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
    if a.quiet and a.verbose:
        print("arow: error: -q (warnings and errors only) and -v (debug messages too) contradict each other; "
              "choose one", file=sys.stderr)
        return 2
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 narrates and prints results
    logging.basicConfig(level=logging.WARNING if a.quiet or not rank0 else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if a.verbose and rank0:  # arow's own debug lines, not those of matplotlib and the other libraries
        logging.getLogger("arow").setLevel(logging.DEBUG)
    signal.signal(signal.SIGTERM, _terminate)  # a kill (SIGTERM) ends like Ctrl-C: message, exit 130
    try:
        with log_through_bars(), contextlib.redirect_stdout(sys.stdout if rank0 else open(os.devnull, "w")):
            return a.func(a)
    except BrokenPipeError:  # e.g. `arow list | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exiting does not flush into it
        return 141
    except KeyboardInterrupt:
        out, hint = getattr(a, "out", None), ""
        if a.command == "train" and out:
            hint = (f"; continue with --resume --out {out}" if RunDir(out).has_checkpoint() else
                    "; no epoch had finished, so nothing was saved: run the same command again")
        elif a.command in ("eval", "study"):
            hint = "; run the same command again to continue where it stopped"
        print(f"arow: interrupted{hint}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"arow: error: {e}", file=sys.stderr)
        return 4
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"arow: error: {msg}", file=sys.stderr)
        return 2
