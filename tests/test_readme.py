"""The README's Python quickstart runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path


def test_readme_quickstart_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart"):]  # other sections' snippets need files that are not here
    snippet = re.search(r"```python\n(.*?)```", quickstart, flags=re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "README.md", "exec"), {})
    printed = out.getvalue()
    assert "(1, 11, 259)" in printed and "total parameters" in printed and "layer2 (gqa" in printed
