"""Command-line flags built from the library's own declarations, so that each is declared once.

A flag of ``arow`` is either a field of a config dataclass (:class:`~arow.config.schema.TrainConfig`,
:class:`~arow.study.spec.StudySpec`: type, default, and ``help``/``group``/``choices`` metadata) or a
parameter of the library function the command calls (its annotation, its default and its line in the
function's ``Args:`` section). ``--help`` therefore shows the library's defaults and the text of its
API documentation; a default changed in the library changes the command with it.

>>> import argparse
>>> def f(n: int = 3, *, names: Sequence[str] = ("a",), fast: bool = False):
...     '''Args:
...         n: how many
...         names: which ones
...         fast: go fast'''
>>> p = argparse.ArgumentParser()
>>> add_function_flags(p, f, ["n", "names", "fast"])
>>> call_args(p.parse_args(["--names", "b,c", "--fast"]), f)
{'n': 3, 'names': ['b', 'c'], 'fast': True}
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import typing
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

_NONE = type(None)


def number(s: str) -> float:
    """A float, or a fraction such as 8/255."""
    num, sep, den = s.partition("/")
    try:
        return float(num) / float(den) if sep else float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.031 or 8/255, got {s!r}") from None


def param_docs(fn: Callable[..., Any]) -> dict[str, str]:
    """The ``Args:`` section of ``fn``'s docstring (Google style) as ``{parameter: text}``."""
    docs: dict[str, str] = {}
    lines = inspect.getdoc(fn).splitlines() if inspect.getdoc(fn) else []
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Args:"), len(lines))
    name, indent = None, None
    for line in lines[start:]:
        if not line.strip():
            break
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        m = re.match(r"\s*(\w+)(?: \([^)]*\))?: (.*)", line)
        if width == indent and m:
            name, docs[m.group(1)] = m.group(1), m.group(2).strip()
        elif width > indent and name:
            docs[name] += " " + line.strip()
        else:
            break
    return docs


def _value_type(hint: Any) -> tuple[Any, Optional[tuple[Any, ...]], bool]:
    """(element type, choices, is a sequence) of an annotation: Optional, Literal and Sequence unwrapped."""
    args = [a for a in typing.get_args(hint) if a is not _NONE]
    if typing.get_origin(hint) is typing.Union:
        return _value_type(args[0])  # Optional[X], or a PathLike union: its first member (str)
    if typing.get_origin(hint) is Literal:
        return type(args[0]), tuple(args), False
    if typing.get_origin(hint) in (list, tuple, Sequence, typing.get_origin(Sequence[str])) and args:
        kind, choices, _ = _value_type(args[0])
        return kind, choices, True
    return (str if hint is os.PathLike else hint), None, False


def _converter(kind: Any, many: bool) -> Callable[[str], Any]:
    one = number if kind is float else kind
    if not many:
        return one

    def values(s: str) -> list[Any]:
        try:
            return [one(v.strip()) for v in s.split(",") if v.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {s!r}") from None

    return values


def _show(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)


def add_function_flags(p: Any, fn: Callable[..., Any], names: Optional[Sequence[str]] = None, *,
                       skip: Sequence[str] = (), positional: Sequence[str] = (),
                       rename: Optional[Mapping[str, str]] = None,
                       extra: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
    """Add a flag to ``p`` for each parameter ``names`` of ``fn`` (default: all but ``skip``;
    ``positional`` ones as arguments).

    Type, choices (``Literal``) and default come from the signature, help from the docstring's
    ``Args:`` section, where ``` ``x`` ``` naming another parameter reads as its flag, and other
    ``` ``code`` ``` as plain text. A bool is a switch ``--x``, with ``--no-x`` when it defaults to
    True; a sequence of values is comma-separated (a positional one takes several arguments); a float
    takes fractions such as ``8/255``. ``rename`` gives a flag another name than its parameter (the
    value still lands on the parameter's name); ``extra[name]`` adds keyword arguments of
    ``add_argument`` (e.g. ``required=True``), and ``extra[name]["aliases"]`` more names of the flag.
    """
    sig, hints, docs = inspect.signature(fn), typing.get_type_hints(fn), param_docs(fn)
    rename = dict(rename or {})

    def cli_name(name: str) -> str:
        return rename.get(name, name).replace("_", "-")

    def text(name: str) -> str:
        if name not in docs:
            raise TypeError(f"{fn.__qualname__}: parameter {name!r} has no line in the Args: section of its docstring")
        flags = {k: "--" + cli_name(k) for k in sig.parameters if k not in positional}
        return re.sub(r"``(.+?)``", lambda m: flags.get(m.group(1), m.group(1)), docs[name])

    for name in names if names is not None else [n for n in sig.parameters if n not in skip]:
        default = sig.parameters[name].default
        kind, choices, many = _value_type(hints[name])
        help = text(name)
        if name in positional:
            nargs = "+" if many else "?" if default is None or _NONE in typing.get_args(hints[name]) else None
            p.add_argument(name, **{"metavar": cli_name(name), "help": help, **({"nargs": nargs} if nargs else {}),
                                    **(extra or {}).get(name, {})})
            continue
        flag = "--" + cli_name(name)
        if kind is bool:  # --x, and --no-x when x is on by default (not given: the function's default)
            kw = {"action": argparse.BooleanOptionalAction, "default": argparse.SUPPRESS,
                  "help": help + " (default True)"} if default else {"action": "store_true", "help": help}
        else:
            help += "; comma-separated" if many else ""
            shown = f" (default {_show(default)})" if default not in (None, inspect.Parameter.empty) else ""
            kw = {"type": _converter(kind, many), "choices": None if many else choices, "help": help + shown,
                  "default": None if default is inspect.Parameter.empty else default,
                  "metavar": None if choices else cli_name(name).upper().replace("-", "_")}
        more = dict((extra or {}).get(name, {}))
        if "choices" in more:  # listed in the help instead of a placeholder
            more.setdefault("metavar", None)
        p.add_argument(flag, *more.pop("aliases", ()), dest=name, **{**kw, **more})


class NegatedSwitch(argparse.Action):
    """The switch of a setting named in the negative, ``no_x``: ``--no-x`` sets it (True), ``--x``
    clears it (False); not given, it stays at its default.

    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("--no-bn-decay", "--bn-decay", dest="no_bn_decay", action=NegatedSwitch)
    >>> [p.parse_args(a).no_bn_decay for a in (["--no-bn-decay"], ["--bn-decay"], [])]
    [True, False, None]
    """

    def __init__(self, option_strings: Sequence[str], dest: str, default: Any = None, help: Optional[str] = None,
                 **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, bool(option_string and option_string.startswith("--no-")))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def call_args(a: argparse.Namespace, fn: Callable[..., Any], **override: Any) -> dict[str, Any]:
    """The values in ``a`` that ``fn`` takes, as keyword arguments (``override`` added)."""
    given = vars(a)
    return {**{k: given[k] for k in inspect.signature(fn).parameters if k in given}, **override}


def add_dataclass_flags(p: Any, cls: type, *, choices: Optional[Mapping[str, Sequence[str]]] = None,
                        skip: Sequence[str] = ()) -> dict[str, Any]:
    """A flag per field of the dataclass ``cls``, declared by the field's metadata: ``help``, and
    optionally ``group`` (the ``GROUP options`` section of ``--help`` it is listed in; the groups
    are made in the order the fields first name them and returned by name), ``choices``
    (``choices`` given here win: registries known only at run time), ``flag`` (its name on the
    command line and in :func:`dataclass_flags`, when not the field's) and ``comma`` (a list of
    strings given comma-separated; otherwise such a list is a repeatable flag) and ``metavar`` (the
    placeholder of its value in ``--help``). Every flag defaults to
    None (not given), so that flags override a preset or a file; the help shows the field's default."""
    hints, groups = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata and f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = p.add_argument_group(f"{f.metadata['group']} options")
        if f.name in skip:
            continue
        meta, name = f.metadata, f.metadata.get("flag", f.name)
        kind, kind_choices, many = _value_type(hints[f.name])
        kind = kind if kind in (str, int, float, bool) else str  # e.g. a list of study variants: their names
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = f" (default {_show(default)})" if default not in (None, False, [], {}) else ""
        g = groups.get(meta.get("group"), p)
        flag = "--" + name.replace("_", "-")
        if kind is bool and name.startswith("no_"):  # --no-bn-decay and --bn-decay, not --no-no-bn-decay
            g.add_argument(flag, "--" + name[3:].replace("_", "-"), dest=name, action=NegatedSwitch, default=None,
                           help=meta["help"] + shown)
        elif kind is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=meta["help"] + shown)
        elif many and kind is str and not meta.get("comma"):
            g.add_argument(flag, dest=name, action="append", metavar="FILE", help=meta["help"])  # repeatable
        elif many:
            g.add_argument(flag, dest=name, type=_converter(kind, True), metavar=name.upper(),
                           help=meta["help"] + "; comma-separated" + shown)
        else:
            g.add_argument(flag, dest=name, type=_converter(kind, False),
                           choices=(choices or {}).get(f.name) or meta.get("choices") or kind_choices,
                           help=meta["help"] + shown, **({"metavar": meta["metavar"]} if meta.get("metavar") else {}))
    return groups


def dataclass_flags(a: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags of ``cls`` given in ``a`` (see :func:`add_dataclass_flags`); None: not given."""
    names = [f.metadata.get("flag", f.name) for f in dataclasses.fields(cls)]
    return {k: v for k, v in vars(a).items() if k in names}
