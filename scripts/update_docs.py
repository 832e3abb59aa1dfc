"""Rewrite the generated parts of the docs from the code: the pass table of docs/performance.md.

    python scripts/update_docs.py          # rewrite
    python scripts/update_docs.py --check  # exit 1 if the doc is out of date
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from arow.methods import pass_table  # noqa: E402

BEGIN, END = "<!-- pass-table:begin -->", "<!-- pass-table:end -->"


def updated(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{pass_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text()
    new = updated(text)
    if "--check" in argv:
        if new != text:
            print(f"{doc} is out of date: run python scripts/update_docs.py", file=sys.stderr)
            return 1
        return 0
    doc.write_text(new)
    print(f"written {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
