"""Execute a jupytext percent-format notebook (`notebooks/NN_name.py`) top to bottom and write it as an .ipynb with
its outputs (printed text, and the figure or value a cell ends with), without Jupyter or a kernel. Needs jupytext
(`pip install -e ".[notebooks]"`).

Regenerate the committed notebooks (real mode, the `cpu` scale; rewrites their figures in notebooks/figures/).
Notebooks 01 and 03 train the runs that `runs/compare` does not hold yet (for an empty cache, about 8 and 4 minutes
on a busy 2-core CPU; a cached run made by other code than the checkout's stops the notebook: remove runs/compare
and run again); 02 reads the study's saved results:

    python notebooks/execute.py notebooks/01_compare_attention.py notebooks/02_deconstructing_attention.py \
        notebooks/03_compose_hybrid.py

Smoke mode, as the tests run it (tiny models, seconds; figures and .ipynb go to --out-dir):

    python notebooks/execute.py notebooks/[0-9][0-9]_*.py --smoke --out-dir /tmp/nb

The .py file is the source: edit it, then regenerate its .ipynb (tests/test_notebooks.py checks that the cells of
each committed .ipynb are the jupytext conversion of its .py). Cells run in one namespace, in this process, with
the notebook's directory as the working directory. A cell that raises stops the notebook: the .ipynb is still
written (with the traceback as that cell's error output) and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import io
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import jupytext
import nbformat


def _display(value: Any) -> dict[str, Any] | None:
    """An execute_result's data for a cell's final value: PNG for a matplotlib Figure, else its repr."""
    if value is None:
        return None
    if hasattr(value, "savefig"):
        buffer = io.BytesIO()
        value.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        return {"image/png": base64.b64encode(buffer.getvalue()).decode(), "text/plain": repr(value)}
    return {"text/plain": repr(value)}


def run_cell(source: str, namespace: dict[str, Any], filename: str,
             execution_count: int | None = None) -> tuple[list[dict[str, Any]], bool]:
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
        outputs.append({"output_type": "execute_result", "data": data, "metadata": {},
                        "execution_count": execution_count})
    return outputs, failed


def execute(notebook: Path, ipynb: Path) -> bool:
    """Run `notebook` and write `ipynb`; True when every cell ran."""
    notebook = notebook.resolve()
    document = jupytext.read(notebook)  # the cells as `jupytext --to ipynb` converts them
    document.metadata.update(kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
                             language_info={"name": "python"})
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(notebook)}
    previous_dir, previous_path = Path.cwd(), list(sys.path)
    os.chdir(notebook.parent)
    sys.path.insert(0, str(notebook.parent))  # as `python notebook.py` and Jupyter see it
    ok, count = True, 0
    try:
        for number, cell in enumerate(document.cells):
            cell.id = f"cell-{number}"  # stable ids: regenerating changes only what the outputs changed
            if cell.cell_type != "code" or not ok:
                continue
            count += 1
            outputs, failed = run_cell(cell.source, namespace, f"{notebook.name} cell {number}", count)
            cell.outputs, cell.execution_count = [nbformat.from_dict(output) for output in outputs], count
            if failed:
                ok = False
                print(f"{notebook.name}: cell {number} raised:\n" + "\n".join(outputs[-1]["traceback"]),
                      file=sys.stderr)
    finally:
        os.chdir(previous_dir)
        sys.path[:] = previous_path
        for name, module in list(sys.modules.items()):  # helpers beside the notebook start fresh for the next
            if Path(getattr(module, "__file__", None) or "/").parent == notebook.parent:
                del sys.modules[name]
    nbformat.write(document, ipynb)
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
