"""The list of registered mixers as a markdown table, generated from the registry, for README.md and
docs/ARCHITECTURE.md (between `<!-- mixers:begin -->` and `<!-- mixers:end -->`; a test checks they are current).

    python -m attnzoo.mixer_catalog          # print the table
    python -m attnzoo.mixer_catalog --write  # rewrite it in README.md and docs/ARCHITECTURE.md

A row per registered name: the module (one file per variant), what it is (its module docstring's first
sentence),
the papers it cites (the module docstring's arXiv ids) and the options a name fixes (an alias such as `mqa`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from attnzoo.registry import get_mixer, registered

BEGIN, END = "<!-- mixers:begin -->", "<!-- mixers:end -->"
DOCS = ("README.md", "docs/ARCHITECTURE.md")
_ARXIV = re.compile(r"arXiv[ :]*(\d{4}\.\d{4,5})")


def _summary(module_doc: str | None) -> str:
    """The module docstring's first paragraph without its citations, up to its first ':' or sentence end."""
    paragraph = " ".join((module_doc or "").split("\n\n")[0].split())
    paragraph = re.sub(r"\s*\([^()]*(arXiv|et al|\d{4})[^()]*\)", "", paragraph)
    short = re.match(r"(.+?)(:\s|\.\s|\.$|$)", paragraph).group(1)
    return short if len(short) > 12 else re.match(r"(.+?)(\.\s|\.$|$)", paragraph).group(1)  # "MASA: ..."


def mixer_rows() -> list[dict[str, str]]:
    """One dict per mixer shipped in attnzoo.mixers (test-only and user mixers registered elsewhere are left out)."""
    rows = []
    for name in registered():
        entry = get_mixer(name)
        module = sys.modules[entry.cls.__module__]
        if not module.__name__.startswith("attnzoo.mixers."):
            continue
        papers = dict.fromkeys(_ARXIV.findall(module.__doc__ or ""))
        fixed = ", ".join(f"{key}={value!r}" for key, value in entry.defaults.items())
        rows.append({"name": name, "module": module.__name__.removeprefix("attnzoo.mixers."),
                     "what": _summary(module.__doc__),
                     "papers": " ".join(f"[{paper}](https://arxiv.org/abs/{paper})" for paper in papers),
                     "fixed": fixed})
    return rows


def mixer_table() -> str:
    lines = ["| mixer | file | what | papers | options the name fixes |", "|---|---|---|---|---|"]
    for row in mixer_rows():
        lines.append(f"| `{row['name']}` | `{row['module']}.py` | {row['what']} | {row['papers']} | "
                     f"{row['fixed'] or '–'} |")
    return "\n".join(lines)


def with_table(text: str, table: str, where: str = "") -> str:
    """`text` with the block between the markers replaced by `table`; a ValueError when the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{where or 'text'}: no {BEGIN} ... {END} block to hold the mixer table")
    return text[:start + len(BEGIN)] + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnzoo.mixer_catalog", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"rewrite the table in {' and '.join(DOCS)}")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent), help="the checkout")
    args = parser.parse_args(argv)
    table = mixer_table()
    if not args.write:
        print(table)
        return 0
    for doc in DOCS:
        path = Path(args.root) / doc
        path.write_text(with_table(path.read_text(), table, str(path)))
        print(f"wrote the mixer table into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
