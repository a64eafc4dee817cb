# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Comparing attention variants: loss curves, the KV-cache frontier, attention maps and sinks
#
# Trains the same small decoder with the attention zoo's plans (MHA, GQA, MQA, MLA, CCA, CCGQA and gated
# attention) on the built-in corpus (the Python standard library's sources, byte tokens), on the same tokens and
# budget, and compares validation loss with each plan's KV-cache bytes per token and parameter count (from
# `model.summary()`); then looks inside two trained models: where their heads attend, and how much attention
# lands on the first token (the attention sink gated attention removes).
#
# The training goes through `experiments/compare` (`python experiments/compare/run.py --scale cpu` does the same
# from a shell). Runs are cached by plan and settings in `runs/compare`, shared with
# `experiments/compare_zoo/run.py`: after a zoo run this notebook trains nothing. `ATTNZOO_SMOKE=1` runs a tiny
# version in seconds (the tests do); `python notebooks/execute.py notebooks/01_compare_attention.py` writes the
# executed `.ipynb`. The figures below are the committed real-mode (`cpu` scale) outputs.

# %%
import json
from pathlib import Path

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from nbsetup import OUT, SCALE, SMOKE, save

from attnzoo.data import ByteTokenizer
from attnzoo.train.runs import load_run
from experiments.compare.config import SCALES
from experiments.compare.run import compare
from experiments.compare_zoo.config import FAMILIES
from experiments.gated_sink.probes import attention_probabilities, layer_metric
from experiments.study import Variant

ZOO = {variant.name: variant for variant in FAMILIES["attention"]}  # the zoo's plans and labels
VARIANTS = [Variant("gqa", "gqa*1", "GQA"), Variant("gated", "gated*1", "gated (G1)")] if SMOKE else [
    ZOO[name] for name in ("mha", "gqa", "mqa", "mla", "cca", "ccgqa", "gated")]
scale = SCALES[SCALE]
print(f"model {dict(scale.model)}, {scale.training.steps} steps of {scale.training.batch_size} x "
      f"{scale.training.seq_len} tokens, seeds {scale.seeds}")

# %%
results = compare(VARIANTS, SCALE, OUT, progress=False)
print(results.table)

# %% [markdown]
# ## Training curves
#
# ![loss curves](figures/01_loss_curves.png)

# %%
save(results.figures["loss_curves.png"], "01_loss_curves.png")

# %% [markdown]
# ## Loss against KV cache and parameters
#
# The dashed line joins the plans no other plan beats on both KV-cache bytes per token and loss (black rings mark
# them). At this scale
# (a few hundred thousand tokens, one seed unless `--seeds` says more) differences of a few hundredths of a nat
# are within seed-to-seed noise: run more seeds (`python experiments/compare/run.py --scale cpu --seeds 0 1 2`)
# before reading an ordering into them.
#
# ![frontier](figures/01_frontier.png)
#
# The whole zoo at the same scale and budget (`python experiments/compare_zoo/run.py --scale cpu`: recurrent,
# linear-attention and hybrid plans too, coloured by family; one seed):
#
# ![the zoo](figures/zoo_cpu_frontier.png)

# %%
save(results.figures["frontier.png"], "01_frontier.png")

# %% [markdown]
# ## Attention maps and sinks
#
# The attention probabilities of the last layer of the trained GQA and gated models on one validation snippet
# (head 0; queries down, keys across), and the share of attention on the first token per layer, averaged over
# heads and queries: the Gated Attention paper (arXiv 2505.06708) reports 0.467 for its baseline and 0.048 with
# the G1 gate at 15B MoE scale; `experiments/gated_sink/` measures it at ours.
#
# ![attention maps](figures/01_attention_maps.png)
# ![first-token share per layer](figures/01_sinks.png)
#
# The study with the paper's controls and two seeds (`python experiments/gated_sink/run.py --scale cpu --seeds 0
# 1`): at this scale no sink forms in any variant (first-token share about 0.03, below the uniform 0.04), and the
# gates stay near their initial 0.5.
#
# ![gated sink study](figures/gated_sink_cpu.png)

# %%
row_of = {variant.name: row for variant, row in zip(VARIANTS, results.rows)}  # rows come in VARIANTS' order
models = {row_of[name]["label"]: load_run(OUT / "runs" / f"{row_of[name]['variant']}-s{scale.seeds[0]}").model
          for name in ("gqa", "gated")}
snippet = Path(json.__file__).read_text()[2000:2000 + min(64, scale.training.seq_len)]
tokens_BT = np.asarray([ByteTokenizer().encode(snippet)])
fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
for ax, (label, model) in zip(axes, models.items()):
    last = model.config.n_layers - 1
    p_TS = attention_probabilities(model, last, tokens_BT)[0, 0]
    ax.imshow(p_TS, cmap="viridis", vmax=np.quantile(p_TS[p_TS > 0], 0.99))
    ax.set_title(f"{label}: layer {last}, head 0 (first-token share {p_TS[:, 0].mean():.2f})", fontsize=9)
    ax.set_xlabel("key position")
axes[0].set_ylabel("query position")
save(fig, "01_attention_maps.png")

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
for label, model in models.items():
    metrics = model(jnp.asarray(tokens_BT), diagnostics=True).metrics
    shares = layer_metric({k: float(v) for k, v in metrics.items()}, "sink_share", model.config.n_layers)
    ax.plot(range(len(shares)), shares, marker="o", label=label)
ax.set_xlabel("layer")
ax.set_ylabel("attention share of the first token")
ax.set_xticks(range(len(shares)))
ax.grid(alpha=0.3)
ax.legend()
save(fig, "01_sinks.png")
