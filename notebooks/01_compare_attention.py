# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # MHA vs GQA vs MQA vs sliding window: loss against KV cache and parameters
#
# Trains the same small decoder with four attention plans on the built-in corpus (the Python standard library's
# sources, byte tokens) and compares validation loss with each plan's KV-cache bytes per token and parameter
# count (from `model.summary()`). This notebook is a view over the study in `experiments/compare_attention/`
# (its config module declares the plans and scales); `python experiments/compare_attention/run.py --scale cpu`
# runs the same from a shell. `ATTNZOO_SMOKE=1` runs the `smoke` scale so the notebook runs in CI; finished runs
# in `ATTNZOO_OUT` are reused. Open as a notebook with `jupytext --to ipynb notebooks/01_compare_attention.py`.

# %%
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))

# experiments/ is not installed: import it from this checkout (Jupyter runs the notebook inside notebooks/).
NOTEBOOK_DIR = Path(__file__).parent if "__file__" in globals() else Path.cwd()
sys.path.insert(0, str(NOTEBOOK_DIR.resolve().parent))

from experiments.compare_attention import run as compare_attention  # noqa: E402
from experiments.compare_attention.config import STUDY  # noqa: E402

SCALE = "smoke" if os.environ.get("ATTNZOO_SMOKE") else "cpu"
OUT = os.environ.get("ATTNZOO_OUT", tempfile.mkdtemp(prefix="attnzoo-nb01-"))
scale = STUDY.scales[SCALE]
print(f"scale {SCALE}: model {scale.model}, {scale.training.steps} steps of {scale.training.batch_size} x "
      f"{scale.training.seq_len} tokens, seeds {scale.seeds}")
for variant in STUDY.variants:
    print(f"  {variant.label:18s} {variant.plan}")

# %%
results = compare_attention.run(SCALE, OUT, progress=False)
print(results.table)

# %% [markdown]
# Error bars are one standard deviation over seeds (the `cpu` scale trains two per plan): at this scale
# differences of a few hundredths of a nat are within seed-to-seed noise.

# %%
print("plot:", results.files["compare_attention.png"])
results.figures["compare_attention.png"]
