"""The ``arow`` command (and ``python -m arow``): it parses flags, calls the library, prints.

``train`` and ``eval`` are :func:`arow.pipelines.train_run` and :func:`arow.pipelines.evaluate_run`;
``report``, ``plot``, ``export``, ``convert``, ``pseudo-label`` and ``list`` wrap one library function
each. Only this module configures logging and draws progress bars. Bad input ends with one line on
stderr and exit status 2, a tripped robustness guard with 3, a diverged run with 4; an interrupted
run says how to continue.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("arow")

#: errors whose message is the whole story for the user: one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError)
GROUPS = ("method", "data", "model", "optimisation", "attack", "evaluation", "runtime")


# --------------------------------------------------------------------------- train
def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every config field is a flag, from its declaration (group, help, choices) in TrainConfig."""
    from .config import TrainConfig, method_flags
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    registries = {"method": METHODS.names(), "dataset": DATASETS.names(), "model": MODELS.names()}
    groups = {g: p.add_argument_group(f"{g} options") for g in GROUPS}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method_args":
            continue
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        kind = typing.get_args(hints[f.name])[0] if typing.get_args(hints[f.name]) else hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help = f"{meta['help']} (default {default})" if default not in (None, False) else meta["help"]
        g = groups[meta["group"]]
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif typing.get_origin(hints[f.name]) is list and kind is str:  # e.g. --extra-data A --extra-data B
            g.add_argument(flag, action="append", metavar="FILE", help=meta["help"])
        elif typing.get_origin(hints[f.name]) is list:
            g.add_argument(flag, type=lambda s: [float(v) for v in s.split(",")], help=help + "; comma-separated")
        else:
            g.add_argument(flag, type=kind, choices=registries.get(f.name) or meta["choices"], help=help)
    g = groups["runtime"]
    g.add_argument("--preset", "--config", help="recipe name (see `arow list`), YAML file, or a run's config.json "
                   "to replay it; flags override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt (its saved config)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g = groups["method"]
    for dest, owners in sorted(method_flags().items()):
        cls = METHODS.get(next(iter(owners)))
        h = cls.hparams[owners[next(iter(owners))]]
        shorthand = len({METHODS.get(m).hparams[k].help for m, k in owners.items()}) > 1
        text = f"shorthand for the chosen method's {dest} (see the prefixed flags)" if shorthand else h.help
        flag = "--" + dest.replace("_", "-")
        if h.type is bool:
            g.add_argument(flag, dest=f"hp_{dest}", action="store_true", default=None, help=text)
        else:
            g.add_argument(flag, dest=f"hp_{dest}", type=h.type, metavar=dest.upper(), help=text)


def _config_from_args(a: argparse.Namespace):
    from .config import TrainConfig, resolve_config

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(a).items() if k in fields}
    method_overrides = {k[3:]: v for k, v in vars(a).items() if k.startswith("hp_")}
    return resolve_config(overrides, method_overrides, preset=a.preset, resume=a.resume)


def cmd_train(a: argparse.Namespace) -> int:
    from . import distributed
    from .attacks import get_attack
    from .callbacks import plot_run_safely
    from .checkpoint import dump_json
    from .data import load_dataset
    from .pipelines import train_run
    from .progress import Progress

    cfg = _config_from_args(a)
    if a.print_config:
        print(dump_json(cfg.to_dict()))
        return 0
    attacks = [s.strip() for s in cfg.eval_attacks.split(",") if s.strip()]
    for name in attacks:  # a typo must fail now, not after training
        get_attack(name, cfg.eps, norm=cfg.norm)
    # missing or damaged test files must fail now, not after training
    test = load_dataset(cfg.dataset, root=cfg.data_dir, split="test") if attacks else None
    bars = Progress()
    t0 = time.perf_counter()
    log.info("training %s / %s on %s -> %s", cfg.method, cfg.model, cfg.dataset, cfg.out)
    result = train_run(cfg, callbacks=[bars], resume=a.resume, plots=not attacks)
    seconds = time.perf_counter() - t0
    status = 0
    if attacks:  # the same evaluation as `arow eval`, guards included, on the model in memory
        status = _eval_and_print(cfg.out, attacks, model=result.model, data=test, n=cfg.eval_n, device=cfg.device,
                                 guards=cfg.guards, extra={"train_seconds": seconds})
        if distributed.info().is_main:
            plot_run_safely(Path(cfg.out))  # after eval.json exists: per_class.png needs it
    if distributed.info().is_main:
        print(f"trained in {seconds:.0f}s; run folder {cfg.out}")
    distributed.teardown()
    return status


# --------------------------------------------------------------------------- eval
def _eval_and_print(source: Any, attacks: list[str], **kw: Any) -> int:
    from . import distributed
    from .pipelines import evaluate_run
    from .progress import Progress

    bars = Progress()
    main = distributed.info().is_main
    rep = evaluate_run(source, attacks, progress=bars.eval_progress, **kw,
                       on_guards=lambda r: print("\n" + r.guards_text(), flush=True) if main else None)
    bars.close()
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
    from .user_models import is_user_model_file, load_user_model

    attacks = [s.strip() for s in a.attacks.split(",")]
    if a.model_factory or (a.run and is_user_model_file(a.run)):
        return _eval_user_model(a, attacks, load_user_model)
    if a.run is None:
        raise ValueError("give a run folder, checkpoint, .safetensors export, TorchScript or .pt2 file, "
                         "or --model-factory pkg.module:function")
    if a.weights:
        raise ValueError("--weights goes with --model-factory pkg.module:function")
    return _eval_and_print(a.run, attacks, n=a.n, eps=a.eps, norm=a.norm, which=a.which, dataset=a.dataset,
                           data_dir=a.data_dir, device=a.device, batch_size=a.batch_size, guards=a.guards,
                           guards_n=a.guards_n,
                           allow_guard_failures=a.allow_guard_failures, resume=a.eval_resume, json_out=a.json,
                           robustbench=a.robustbench)


def _eval_user_model(a: argparse.Namespace, attacks: list[str], load_user_model) -> int:
    from .pipelines import evaluate_user_model
    from .progress import Progress

    if a.model_factory and a.run:
        raise ValueError(f"give either a model file ({a.run}) or --model-factory, not both")
    spec = a.model_factory or a.run
    model = load_user_model(spec, weights=a.weights)
    name = (spec.partition(":")[2] if a.model_factory else Path(spec).stem) or "model"
    bars = Progress()
    rep = evaluate_user_model(model, a.dataset, attacks, eps=a.eps, norm=a.norm or "linf", name=name, n=a.n,
                              data_dir=a.data_dir, device=a.device, batch_size=a.batch_size, guards=a.guards,
                              guards_n=a.guards_n,
                              allow_guard_failures=a.allow_guard_failures, json_out=a.json,
                              progress=bars.eval_progress, on_guards=lambda r: print("\n" + r.guards_text(), flush=True))
    bars.close()
    if rep.error:
        print(f"arow: error: {rep.error}", file=sys.stderr)
        return 3
    print("\n" + rep.text())
    print(f"written {rep.path}")
    return 0


def _number(s: str) -> float:
    """A float, or a fraction such as 8/255."""
    num, sep, den = s.partition("/")
    try:
        return float(num) / float(den) if sep else float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.031 or 8/255, got {s!r}") from None


# --------------------------------------------------------------------------- report, plot, export, list
def cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    rep, path = write_report(a.runs, a.out, a.format)
    print(rep.markdown())
    print(f"written {path}")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from .plots import check_compare_out, compare_runs, eps_curve, plot_run
    from .report import load_run, markdown_table

    if len(a.runs) > 1:  # a wrong folder or --out fails before any figure is drawn
        for run in a.runs:
            load_run(run)
        check_compare_out(a.out if a.out is not None else Path.cwd(), a.runs)
    elif a.out is not None:
        log.warning("--out is used with two or more run folders (the comparison figures); %s gets its own PNGs",
                    a.runs[0])
    factors = [float(v) for v in a.eps_factors.split(",") if v.strip()]
    for run in a.runs:
        if a.eps_curve:
            d = eps_curve(run, n=a.n, factors=factors, which=a.which, device=a.device, data_dir=a.data_dir,
                          batch_size=a.batch_size)
            rows = [[f"{p['eps']:.4g}", f"{p['factor']:g}", f"{100 * p['accuracy']:.2f}%"] for p in d["points"]]
            print(f"\n{run}: {d['attack']} accuracy vs eps on {d['n']} of {d['test_set_size']} test images"
                  f"{' (SUBSET)' if d['subset'] else ''}\n" + markdown_table(rows, ["eps", "x train eps", "accuracy"]))
        for path in plot_run(run):
            print(f"written {path}")
    if len(a.runs) > 1:
        out = Path(a.out) if a.out is not None else Path.cwd()
        paths = compare_runs(a.runs, out)
        for path in paths:
            print(f"written {path}")
        if not paths:
            print(f"no comparison figure: none of the {len(a.runs)} runs has the data for one (see the log)")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .checkpoint import export_model, load_checkpoint, resolve_checkpoint

    if a.out is None:
        raise ValueError("--out FILE.safetensors is required")
    ckpt = load_checkpoint(resolve_checkpoint(a.run, a.which))
    path = export_model(ckpt, a.out)
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
    import shlex

    from .study import Study, StudySpec, collect

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
    study = Study(a.out, spec)
    if a.print_commands:
        study.save()  # so that `arow study --collect` knows the study
        for cell, steps in study.commands():
            print(f"# {cell.name}" + ("" if steps else ": finished"))
            for _, cmd in steps:
                print(shlex.join(cmd))
        return 0
    cells = spec.cells()
    log.info("study %s: %d runs (%d methods x %d seeds), %d at a time", a.out, len(cells), len(spec.variants),
             len(spec.seeds), a.jobs)
    status = study.run(jobs=a.jobs, echo=lambda s: print(s, flush=True))
    collect(a.out)
    print((Path(a.out) / "results.md").read_text())
    failed = [k for k, v in status.items() if v != "done"]
    if failed:
        print(f"arow: {len(failed)} run(s) failed: {', '.join(failed)} (see results.md; rerun the command to retry them)",
              file=sys.stderr)
    return 1 if failed else 0


def cmd_list(a: argparse.Namespace) -> int:
    from .attacks import ATTACKS
    from .config import preset_description, preset_names
    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    for title, reg in (("methods", METHODS), ("models", MODELS), ("datasets", DATASETS), ("attacks", ATTACKS)):
        print(f"{title}:")
        for n in reg.names():
            print(f"  {n:22s} {reg.help(n)}")
    print("presets:")
    for n in preset_names():
        desc = " ".join(str(preset_description(n)).split())
        first = re.split(r"(?<!et al)\. (?=[A-Z])|: ", desc)[0]  # the first sentence or clause
        print(f"  {n:22s} {first if len(first) <= 100 else first[:97].rsplit(' ', 1)[0] + ' ...'}")
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
    e = sub.add_parser("eval", help="evaluate a run folder, checkpoint or .safetensors export on the test set")
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
    e.add_argument("--which", choices=["final", "best", "last"], default="final")
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--device", default="auto")
    e.add_argument("--data-dir")
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
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("report", help="compare run folders in one table (mean ± std over seeds)")
    r.add_argument("runs", nargs="+", metavar="DIR", help="run folders")
    r.add_argument("--out", help="file to write (default ./report.md, or ./report.csv with --format csv)")
    r.add_argument("--format", choices=["md", "csv"], default="md", help="format of the file (terminal: Markdown)")
    r.set_defaults(func=cmd_report)
    pl = sub.add_parser("plot", help="draw the PNGs of run folders (curves, per-class, weights, eps curve); "
                                     "with several, also figures comparing them")
    pl.add_argument("runs", nargs="+", metavar="DIR", help="run folders")
    pl.add_argument("--out", metavar="DIR",
                    help="with two or more run folders: the folder for the comparison figures compare_*.png "
                         "(default: the current directory; never one of the run folders)")
    pl.add_argument("--eps-curve", action="store_true", help="also run PGD-20 at several eps (-> eps_curve.json/png)")
    pl.add_argument("--n", type=int, default=1000, help="eps curve: first N test examples (default 1000)")
    pl.add_argument("--eps-factors", default="0,0.25,0.5,1,1.5,2,3", help="eps curve: multiples of the training eps")
    pl.add_argument("--which", choices=["final", "best", "last"], default="final", help="eps curve: checkpoint")
    pl.add_argument("--batch-size", type=int, default=500)
    pl.add_argument("--device", default="auto")
    pl.add_argument("--data-dir")
    pl.set_defaults(func=cmd_plot)
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
    st = sub.add_parser("study", help="train and evaluate methods x seeds alike, then compare them (paired by seed)")
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
    st.set_defaults(func=cmd_study)
    ps = sub.add_parser("pseudo-label", help="label unlabelled images with a trained model (-> .npz for "
                                             "--extra-data)")
    ps.add_argument("model", help="run folder, checkpoint file or .safetensors export")
    ps.add_argument("--data", required=True, help="an .npz (image) or RST pickle (data) file, its labels ignored, "
                    "or a dataset name with an optional split: fashion-mnist, cifar10:train (default split train)")
    ps.add_argument("--out", help="the .npz to write (image, label = argmax, confidence = max softmax)")
    ps.add_argument("--exclude-kept", metavar="RUN_OR_FILE", help="leave out the training images a run folder used "
                    "as labelled data (its --labels-kept and validation split), or the positions in a .txt/.npy")
    ps.add_argument("--which", choices=["final", "best", "last"], default="final")
    ps.add_argument("--batch-size", type=int, default=500)
    ps.add_argument("--device", default="auto")
    ps.add_argument("--data-dir")
    ps.set_defaults(func=cmd_pseudo_label)
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
        if sys.stderr.isatty():  # log lines go through the progress bar instead of overwriting it
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm([log, logging.getLogger()]):
                return a.func(a)
        return a.func(a)
    except KeyboardInterrupt:
        out = getattr(a, "out", None)
        if a.command == "train" and out:
            from .runs import RunDir

            hint = (f"; continue with --resume --out {out}" if RunDir(out).has_checkpoint() else
                    "; no epoch had finished, so nothing was saved: run the same command again")
        else:
            hint = ("; run the same command again to continue where it stopped" if a.command in ("eval", "study")
                    else "")
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
