# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Deconstructing Attention: the paper's table from saved results
#
# `experiments/deconstructing_attention/` (arXiv 2510.11602) trains attention variants (MLP, approximate and
# non-approximate attention, random / fixed / static query-key sources) uniform and hybrid with standard
# attention, in the study convention: `OUT/results.csv` (one row per variant, mean and std over seeds),
# `OUT/results.md`, `OUT/runs/<variant>-s<seed>/result.json` and the study's own reports (paper-style tables,
# plots). This notebook reads those files, whatever variants and metrics they hold, and shows them; in real mode
# it trains nothing. Produce the results first, e.g.
#
#     python experiments/deconstructing_attention/run.py --scale cpu      # OUT: runs/deconstructing_attention-cpu
#
# and set `ATTNZOO_DECON_OUT` to another OUT if you wrote one elsewhere (default: `runs/deconstructing_attention-cpu`,
# else the results saved in `experiments/deconstructing_attention/results/`). In smoke mode (`ATTNZOO_SMOKE=1`, the
# tests) the notebook trains the first variants of the study's smoke grid itself, on the standard-library corpus.
#
# ![validation loss per variant](figures/02_val_loss.png)

# %%
import csv
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt
from nbsetup import OUT, REPO, SMOKE, save, shown

STUDY_DIR = REPO / "experiments" / "deconstructing_attention"
SMOKE_VARIANTS = 1  # the smoke grid's first variants (each is a 6-layer model: seconds apiece)
SAVED = [REPO / "runs" / "deconstructing_attention-cpu", STUDY_DIR / "results"]  # a fresh run's OUT, then D's
DECON_OUT = Path(os.environ.get("ATTNZOO_DECON_OUT") or (OUT / "deconstructing_attention" if SMOKE else next(
    (out for out in SAVED if (out / "results.csv").exists()), SAVED[0])))
available = importlib.util.find_spec("experiments.deconstructing_attention") is not None
print(f"study package: {'found' if available else 'NOT FOUND'} ({shown(STUDY_DIR)}); results from {shown(DECON_OUT)}")

# %%
if SMOKE and available:
    from experiments.deconstructing_attention import config as decon_config
    from experiments.deconstructing_attention import run as decon_run
    from experiments.study import run_study

    smoke_study = dataclasses.replace(decon_config.STUDY, variants=decon_config.STUDY.variants[:SMOKE_VARIANTS])
    run_study(smoke_study, "smoke", DECON_OUT, data="stdlib", progress=False, echo=lambda _: None,
              reports=getattr(decon_run, "REPORTS", {}), evaluate_run=getattr(decon_run, "evaluate_run", None))
elif SMOKE:
    print("experiments/deconstructing_attention is not in this checkout: nothing to train in smoke mode")

have_results = (DECON_OUT / "results.csv").exists()
if not have_results:
    print(f"no results in {shown(DECON_OUT)}: run `python experiments/deconstructing_attention/run.py --scale cpu` "
          f"(or set ATTNZOO_DECON_OUT); the cells below show nothing until then")

# %% [markdown]
# ## The results: every model-level metric (mean ± std over seeds; per-layer columns are in results.csv), and
# the per-run records when the run directories are there

# %%
rows = list(csv.DictReader((DECON_OUT / "results.csv").open())) if have_results else []
metrics = [key[:-len("_mean")] for key in (rows[0] if rows else {}) if key.endswith("_mean") and "/" not in key]


def cell(row, metric):
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return "" if mean == "" else f"{float(mean):.4g}" + (f" ± {float(std):.2g}" if std else "")


if rows:
    print((DECON_OUT / "results.md").read_text().splitlines()[0])
    print("| variant | plan | " + " | ".join(metrics) + " |\n|---|---|" + "---|" * len(metrics))
    for row in rows:
        print(f"| {row['label']} | `{row['plan']}` | " + " | ".join(cell(row, m) for m in metrics) + " |")
    for record_path in sorted(DECON_OUT.glob("runs/*/result.json")):
        record = json.loads(record_path.read_text())
        print(f"{record_path.parent.name}: step {record['step']}, plan {record['plan']}, "
              + ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items() if isinstance(v, float))[:160])

# %% [markdown]
# ## The study's own reports: the paper-style tables beside the published numbers, and its plots

# %%
reports = sorted(p for p in DECON_OUT.glob("*.md") if p.name != "results.md") if have_results else []
for report in reports:
    print(f"--- {report.name}\n{report.read_text()}")
plots = sorted(p.name for p in DECON_OUT.glob("*.png")) if have_results else []
print("plots:", ", ".join(plots) or "none")

# %% [markdown]
# ## Validation loss per variant (mean ± std over seeds)

# %%
def plot_val_loss(rows):
    ordered = sorted(rows, key=lambda row: float(row["val_loss_mean"]))
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ordered) + 1.5))
    errors = [float(row["val_loss_std"] or 0) for row in ordered]
    ax.barh([row["label"] for row in ordered], [float(row["val_loss_mean"]) for row in ordered], xerr=errors,
            color=["black" if row["variant"] == "standard" else "tab:blue" for row in ordered])
    ax.invert_yaxis()
    ax.set_xlabel("validation loss (nats/token)")
    ax.set_xlim(min(float(row["val_loss_mean"]) for row in ordered) * 0.95, None)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


save(plot_val_loss(rows), "02_val_loss.png") if rows else print("no results to plot")
