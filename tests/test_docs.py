"""The docs say what the code knows: the mixer tables are generated from the registry, and nothing the repository
ships points to a file outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from attnzoo.mixer_catalog import BEGIN, DOCS, END, mixer_rows, mixer_table, with_table
from attnzoo.registry import registered

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("doc", DOCS)
def test_mixer_table_is_current(doc):
    text = (REPO / doc).read_text()
    assert with_table(text, mixer_table()) == text, f"{doc}: run `python -m attnzoo.mixer_catalog --write`"


def test_table_lists_every_shipped_mixer_with_its_file_and_paper():
    rows = {row["name"]: row for row in mixer_rows()}
    shipped = {name for name in registered() if name in rows}
    assert {"gqa", "mqa", "mla", "mamba2", "retnet", "titans_mac"} <= shipped
    assert rows["mqa"]["module"] == "gqa" and "n_kv_heads=1" in rows["mqa"]["fixed"]
    assert "2405.04434" in rows["mla"]["papers"] and all(row["papers"] for row in rows.values())
    assert "toy_side_inputs" not in rows  # test-only mixers stay out of the docs
    with pytest.raises(ValueError, match="no <!-- mixers:begin -->"):
        with_table("no markers here", "table")
    assert with_table(f"a\n{BEGIN}\nold\n{END}\nb", "new") == f"a\n{BEGIN}\nnew\n{END}\nb"


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"(?<![\w.])shared/|\.\./shared|routing_sparse\.md|specs/[a-z_]+\.md")
    found = []
    for folder in ("attnzoo", "pallas_kernels", "experiments", "docs", "notebooks"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".sh", ".txt", ".toml"}:
                found += [f"{path.relative_to(REPO)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                          if outside.search(line)]
    for path in REPO.glob("*.md"):
        found += [f"{path.name}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1) if outside.search(line)]
    assert not found, found
