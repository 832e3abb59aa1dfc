"""Every `arow ...` command shown in a code block of the README or docs/ parses with today's flags
(a synopsis with placeholders goes in a ```text block, which is not checked)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from arow.cli.commands import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
COMMAND = re.compile(r"^(?:\$ )?(?:\.venv/bin/)?(arow [a-z].*)$")


def commands(text: str) -> list[str]:
    """The arow command lines of the shell code blocks, continuation lines joined, comments dropped."""
    found: list[str] = []
    fence, buf = None, ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("```"):
            fence = None if fence is not None else s[3:].strip()
            continue
        if fence is None or fence == "text":
            continue
        m = COMMAND.match(s)
        if not buf and not m:
            continue
        buf = f"{buf} {s}" if buf else m.group(1)
        if buf.endswith("\\"):
            buf = buf[:-1]
            continue
        found.append(shlex.split(buf, comments=True))
        buf = ""
    return found


def test_the_docs_show_commands():
    assert sum(len(commands(p.read_text())) for p in DOCS) >= 20  # the extraction itself works


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(doc, capsys):
    parser = build_parser()
    for argv in commands(doc.read_text()):
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{doc.name}: `{shlex.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def test_a_stale_flag_in_a_doc_would_fail():
    sample = ("text\n```bash\narow eval runs/x \\\n  --attacks clean  # ok\narow train --no-such-flag\n```\n"
              "```text\narow X [--y]\n```")
    assert commands(sample) == [["arow", "eval", "runs/x", "--attacks", "clean"], ["arow", "train", "--no-such-flag"]]
    build_parser().parse_args(commands(sample)[0][1:])
    with pytest.raises(SystemExit):
        build_parser().parse_args(commands(sample)[1][1:])
