"""Execute a jupytext percent-format notebook (`notebooks/NN_name.py`) top to bottom and write it as an .ipynb with
its outputs (printed text, and the figure or value a cell ends with), without Jupyter or a kernel:

    python notebooks/execute.py notebooks/01_compare_attention.py            # real mode -> 01_compare_attention.ipynb
    python notebooks/execute.py notebooks/[0-9][0-9]_*.py --smoke --out-dir /tmp/nb   # smoke mode, as the tests

Cells run in one namespace, in this process, with the notebook's directory as the working directory. A cell that
raises stops the notebook: the .ipynb is still written (with the traceback as that cell's error output) and the
command exits with status 1. With Jupyter installed, `jupytext --to ipynb --execute notebooks/NN_name.py` does the
same through a kernel.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

CELL_MARKER = "# %%"
HEADER_FENCE = "# ---"


def parse_cells(source: str) -> list[dict[str, Any]]:
    """The notebook's cells: [{"cell_type": "code" | "markdown", "source": text}], jupytext percent format (the
    leading `# ---` metadata block dropped; markdown lines lose their `# ` prefix)."""
    lines = source.splitlines()
    if lines and lines[0] == HEADER_FENCE:
        end = lines.index(HEADER_FENCE, 1)
        lines = lines[end + 1:]
    cells, current = [], None
    for line in lines:
        if line.startswith(CELL_MARKER):
            current = {"cell_type": "markdown" if "[markdown]" in line else "code", "lines": []}
            cells.append(current)
        elif current is not None:
            current["lines"].append(line)
    parsed = []
    for cell in cells:
        body = cell["lines"]
        if cell["cell_type"] == "markdown":
            body = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in body]
        text = "\n".join(body).strip("\n")
        if text:
            parsed.append({"cell_type": cell["cell_type"], "source": text})
    return parsed


def _display(value: Any) -> dict[str, Any] | None:
    """An execute_result's data for a cell's final value: PNG for a matplotlib Figure, else its repr."""
    if value is None:
        return None
    if hasattr(value, "savefig"):
        buffer = io.BytesIO()
        value.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        return {"image/png": base64.b64encode(buffer.getvalue()).decode(), "text/plain": repr(value)}
    return {"text/plain": repr(value)}


def run_cell(source: str, namespace: dict[str, Any], filename: str) -> tuple[list[dict[str, Any]], bool]:
    """Execute one code cell; (its outputs in nbformat 4, whether it raised)."""
    stdout = io.StringIO()
    outputs: list[dict[str, Any]] = []
    failed = False
    try:
        tree = ast.parse(source, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
            exec(compile(tree, filename, "exec"), namespace)
            value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace) if last else None
        data = _display(value)
    except Exception as error:  # noqa: BLE001 - recorded as the cell's error output, then the notebook stops
        failed, data = True, None
        outputs.append({"output_type": "error", "ename": type(error).__name__, "evalue": str(error),
                        "traceback": traceback.format_exc().splitlines()})
    if stdout.getvalue():
        outputs.insert(0, {"output_type": "stream", "name": "stdout", "text": stdout.getvalue()})
    if data is not None:
        outputs.append({"output_type": "execute_result", "data": data, "metadata": {}, "execution_count": None})
    return outputs, failed


def execute(notebook: Path, ipynb: Path) -> bool:
    """Run `notebook` and write `ipynb`; True when every cell ran."""
    notebook = notebook.resolve()
    cells = parse_cells(notebook.read_text())
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(notebook)}
    previous_dir, previous_path = Path.cwd(), list(sys.path)
    os.chdir(notebook.parent)
    sys.path.insert(0, str(notebook.parent))  # as `python notebook.py` and Jupyter see it
    ok, count = True, 0
    try:
        for number, cell in enumerate(cells):
            cell["id"] = f"cell-{number}"
            cell["metadata"] = {}
            if cell["cell_type"] != "code" or not ok:
                if cell["cell_type"] == "code":
                    cell.update(outputs=[], execution_count=None)
                continue
            count += 1
            cell["outputs"], failed = run_cell(cell["source"], namespace, f"{notebook.name} cell {number}")
            cell["execution_count"] = count
            if failed:
                ok = False
                print(f"{notebook.name}: cell {number} raised:\n" +
                      "\n".join(cell["outputs"][-1]["traceback"]), file=sys.stderr)
    finally:
        os.chdir(previous_dir)
        sys.path[:] = previous_path
        for name, module in list(sys.modules.items()):  # helpers beside the notebook start fresh for the next
            if Path(getattr(module, "__file__", None) or "/").parent == notebook.parent:
                del sys.modules[name]
    for cell in cells:
        cell["source"] = cell["source"].splitlines(keepends=True)
    document = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                             "language_info": {"name": "python"}}}
    ipynb.write_text(json.dumps(document, indent=1) + "\n")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="notebooks/execute.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path, help="jupytext percent-format .py notebooks")
    parser.add_argument("--smoke", action="store_true", help="ATTNZOO_SMOKE=1: the notebooks' seconds-long mode")
    parser.add_argument("--out-dir", type=Path, help="where the .ipynb files go (default: beside each notebook)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["ATTNZOO_SMOKE"] = "1"
    os.environ.setdefault("MPLBACKEND", "Agg")
    failed = []
    for notebook in args.notebooks:
        ipynb = (args.out_dir or notebook.parent) / notebook.with_suffix(".ipynb").name
        ipynb.parent.mkdir(parents=True, exist_ok=True)
        if not execute(notebook, ipynb):
            failed.append(notebook.name)
        print(f"wrote {ipynb}" + (" (a cell raised)" if notebook.name in failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
