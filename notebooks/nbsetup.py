"""What every notebook does first: put this checkout on sys.path (experiments/ is not installed), choose smoke or
real mode, and say where runs and figures go.

Smoke mode (`ATTNZOO_SMOKE=1`, what the tests run) trains a few steps of tiny models into `ATTNZOO_OUT` (default:
a new temporary directory) and writes figures there. Real mode trains at the `cpu` scale into `runs/compare` (the
run cache shared with experiments/compare and experiments/compare_zoo, so runs those trained are reused) and
writes figures into notebooks/figures/, where the committed ones live.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))  # Jupyter sets its inline backend here

NOTEBOOKS = Path(__file__).resolve().parent
REPO = NOTEBOOKS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMOKE = bool(os.environ.get("ATTNZOO_SMOKE"))
SCALE = "smoke" if SMOKE else "cpu"
OUT = Path(os.environ.get("ATTNZOO_OUT") or (tempfile.mkdtemp(prefix="attnzoo-nb-") if SMOKE
                                             else REPO / "runs" / "compare"))
FIGURES = OUT if SMOKE else NOTEBOOKS / "figures"


def save(fig, name: str):
    """Write `fig` as FIGURES/<name> (PNG) and return it, so a cell can end with it."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / name, dpi=100, bbox_inches="tight")
    return fig


def shown(path: Path) -> str:
    """`path` relative to the checkout where it lies inside it (no machine's absolute paths in saved outputs)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


print(f"{'smoke' if SMOKE else 'real'} mode: scale {SCALE}, runs in {shown(OUT)}, figures in {shown(FIGURES)}")
