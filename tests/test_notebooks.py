"""Every notebook (jupytext py:percent under notebooks/) runs end to end in smoke mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.py"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_smoke_mode(notebook, tmp_path):
    env = {**os.environ, "ATTNZOO_SMOKE": "1", "ATTNZOO_OUT": str(tmp_path), "MPLBACKEND": "Agg",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(notebook)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(tmp_path.glob("*.png")), "the notebook writes its comparison plot"
    assert "val loss" in done.stdout
