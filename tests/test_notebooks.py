"""Every notebook (jupytext percent format, notebooks/NN_name.py) runs top to bottom in smoke mode through
notebooks/execute.py, in this process (one JAX import for all), and its executed .ipynb holds the outputs; the
committed .ipynb beside each .py (executed in real mode) has the cells of the .py's jupytext conversion."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jupytext
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
sys.path.insert(0, str(NOTEBOOK_DIR))

import execute  # noqa: E402  (notebooks/execute.py)


@pytest.fixture
def smoke_env(tmp_path, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNZOO_SMOKE", "1")
    monkeypatch.setenv("ATTNZOO_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("ATTNZOO_CACHE", str(tmp_path_factory.getbasetemp() / "corpus-cache"))  # tokenized once
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Smoke runs check that every cell runs, not what the numbers are: compile without XLA's optimisations
    # (about a quarter less CPU time).
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield tmp_path
    jax.config.update("jax_disable_most_optimizations", previous)


def test_notebooks_are_found():
    assert [p.name for p in NOTEBOOKS][:3] == ["01_compare_attention.py", "02_deconstructing_attention.py",
                                               "03_compose_hybrid.py"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(notebook, smoke_env):
    ipynb = smoke_env / notebook.with_suffix(".ipynb").name
    assert execute.execute(notebook, ipynb), "a cell raised (traceback above)"
    cells = nbformat.read(ipynb, as_version=4).cells
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    assert code and all(cell["execution_count"] for cell in code)
    outputs = [output for cell in code for output in cell["outputs"]]
    assert not [output for output in outputs if output["output_type"] == "error"]
    text = "".join("".join(output.get("text", "")) for output in outputs)
    assert "smoke mode" in text
    if notebook.name != "02_deconstructing_attention.py" or (NOTEBOOK_DIR.parent / "experiments" /
                                                            "deconstructing_attention").exists():
        assert "val loss" in text  # a results table
        assert list((smoke_env / "out").glob("*.png")), "the notebook saves its figures"
        assert any("image/png" in output.get("data", {}) for output in outputs)


def cell_sources(document) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in document.cells]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_ipynb_has_the_cells_of_its_source(notebook):
    ipynb = notebook.with_suffix(".ipynb")
    regenerate = f"regenerate it: python notebooks/execute.py notebooks/{notebook.name}"
    assert ipynb.exists(), f"{ipynb.name} is missing; {regenerate}"
    committed = nbformat.read(ipynb, as_version=4)
    assert cell_sources(committed) == cell_sources(jupytext.read(notebook)), f"{ipynb.name} is stale; {regenerate}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_ipynb_holds_its_real_mode_outputs(notebook):
    ipynb = notebook.with_suffix(".ipynb")
    assert ipynb.stat().st_size < 1_000_000, "keep the executed notebook small (no large embedded arrays)"
    committed = nbformat.read(ipynb, as_version=4)
    nbformat.validate(committed)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    outputs = [output for cell in code for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert outputs[0].text.startswith("real mode: scale cpu")
    assert str(NOTEBOOK_DIR.parent) not in ipynb.read_text(), "no absolute paths of the checkout that ran it"


def test_a_failing_cell_is_recorded_and_stops_the_notebook(tmp_path):
    notebook = tmp_path / "99_fails.py"
    notebook.write_text("# %%\nprint('before')\n\n# %%\n1 / 0\n\n# %%\nprint('never')\n")
    assert not execute.execute(notebook, tmp_path / "out.ipynb")
    cells = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
    assert cells[0]["outputs"][0]["text"] == "before\n"
    assert cells[1]["outputs"][0]["ename"] == "ZeroDivisionError" and cells[2]["outputs"] == []
