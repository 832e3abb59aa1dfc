"""The command-line flags are built from the library's declarations (arow.cli.flags): the parsing rules,
and that every command's defaults are the defaults of the library function it calls."""
from __future__ import annotations

import argparse
import inspect
from typing import Literal, Optional, Sequence

import pytest

from arow.cli.flags import add_function_flags, call_args, number, param_docs


def sample(source: Optional[str], names: Sequence[str] = ("a", "b"), *, eps: Optional[float] = None,
           which: Literal["final", "best"] = "final", check: bool = True, force: bool = False, n: int = 3) -> None:
    """Do something.

    Args:
        source: where from (``names`` says
            which ones)
        names: the names
        eps: a radius, as ``eps``
        which: which file
        check: look first
        force: do it anyway
        n: how many

    Returns nothing.
    """


def parser(**kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_function_flags(p, sample, list(inspect.signature(sample).parameters), positional=["source"], **kw)
    return p


def test_param_docs_reads_the_args_section_with_continuation_lines():
    docs = param_docs(sample)
    assert list(docs) == ["source", "names", "eps", "which", "check", "force", "n"]
    assert docs["source"] == "where from (``names`` says which ones)" and docs["n"] == "how many"
    assert param_docs(number) == {}  # no Args: section


def test_flags_take_type_default_and_choices_from_the_signature():
    p = parser()
    assert call_args(p.parse_args([]), sample) == {"source": None, "names": ("a", "b"), "eps": None,
                                                  "which": "final", "force": False, "n": 3}  # check: not given
    a = p.parse_args(["S", "--names", "x, y", "--eps", "8/255", "--which", "best", "--no-check", "--force",
                      "--n", "5"])
    assert call_args(a, sample) == {"source": "S", "names": ["x", "y"], "eps": 8 / 255, "which": "best",
                                    "check": False, "force": True, "n": 5}
    assert p.parse_args(["--check"]).check is True
    for bad in (["--which", "worst"], ["--n", "x"], ["--eps", "1/0"]):
        with pytest.raises((argparse.ArgumentError, SystemExit)):
            p.parse_args(bad)


def test_help_names_flags_and_shows_the_library_default():
    text = parser(rename={"names": "labels"}).format_help()
    assert "where from (--labels says which ones)" in text  # ``names`` in the docs reads as its flag
    assert "a radius, as --eps" in text and "the names; comma-separated (default a,b)" in text
    assert "--check, --no-check" in text and "look first (default True)" in text and "(default 3)" in text


def test_an_undocumented_parameter_fails_when_the_parser_is_built():
    def f(x: int = 1) -> None:
        """No Args section."""

    with pytest.raises(TypeError, match="'x' has no line in the Args: section"):
        add_function_flags(argparse.ArgumentParser(), f, ["x"])


def _defaults_of(fn, skip=()):
    return {k: v.default for k, v in inspect.signature(fn).parameters.items()
            if v.default is not inspect.Parameter.empty and k not in skip}


def test_every_command_passes_the_library_defaults_when_no_flag_is_given():
    """A default hard-coded in the CLI (and drifting from the library's) fails here."""
    from arow.runs.records import convert_path, export_model
    from arow.cli.commands import build_parser
    from arow.config import resolve_config
    from arow.pipelines import evaluate_source
    from arow.evaluation.curve import eps_curve
    from arow.pseudo import pseudo_label
    from arow.reporting.tables import write_report
    from arow.study import run_study

    p = build_parser()
    cases = [(["eval", "R"], evaluate_source, ("source", "progress", "on_guards", "attacks", "settings", "guards")),
             (["report", "R"], write_report, ()),
             (["plot", "R", "--eps-curve"], eps_curve, ("attack",)),
             (["pseudo-label", "R", "--data", "D", "--out", "O"], pseudo_label, ("out",)),
             (["export", "R", "--out", "O"], export_model, ()),
             (["convert", "R"], convert_path, ()),
             (["study", "--methods", "arow", "--out", "S"], run_study, ("echo",)),
             (["train"], resolve_config, ())]
    for argv, fn, skip in cases:
        given = call_args(p.parse_args(argv), fn)
        expected = _defaults_of(fn, skip)
        assert {k: given.get(k, expected[k]) for k in expected} == expected, argv


def test_study_flags_come_from_the_study_spec():
    from arow.cli.commands import build_parser
    from arow.cli.flags import dataclass_flags
    from arow.study import StudySpec

    a = build_parser().parse_args(["study", "--methods", "arow,trades", "--seeds", "0,2", "--no-guards",
                                   "--aa-n", "0", "--out", "S"])
    spec = StudySpec.resolve(None, dataclass_flags(a, StudySpec))
    assert [v.label for v in spec.variants] == ["arow", "trades"] and spec.seeds == [0, 2]
    assert (spec.guards, spec.aa_n) == (False, 0)
    assert spec.eps_curve_n == StudySpec.__dataclass_fields__["eps_curve_n"].default  # not given: the spec's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "--seeds", "0,x", "--out", "S"])


def test_eval_flags_come_from_the_evaluation_settings():
    """`arow eval`'s flags are the fields of EvalSettings and GuardSettings: their defaults when no
    flag is given, each flag landing on its field, and every field a flag."""
    import dataclasses

    from arow.cli.commands import build_parser
    from arow.evaluation.settings import EvalSettings, GuardSettings

    p = build_parser()
    flags = vars(p.parse_args(["eval", "R"]))
    assert EvalSettings.from_flags(flags) == EvalSettings() and GuardSettings.from_flags(flags) == GuardSettings()
    a = vars(p.parse_args(["eval", "R", "--attacks", "clean,cw", "--n", "50", "--eps", "8/255", "--norm", "l2",
                           "--which", "best", "--no-resume", "--json", "o.json", "--no-guards", "--guards-n", "9",
                           "--guards-seed", "3", "--allow-guard-failures", "--batch-size", "7"]))
    s, g = EvalSettings.from_flags(a), GuardSettings.from_flags(a)
    assert (s.attacks, s.n, s.eps, s.norm, s.which, s.resume, s.json_out, s.batch_size) == (
        ["clean", "cw"], 50, 8 / 255, "l2", "best", False, "o.json", 7)
    assert (g.enabled, g.n, g.seed, g.allow_failures) == (False, 9, 3, True)
    for cls in (EvalSettings, GuardSettings):
        assert set(cls.flag_names()) <= set(flags), cls
        assert all(f.metadata["help"] for f in dataclasses.fields(cls))
