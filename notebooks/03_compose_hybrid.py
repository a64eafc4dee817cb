# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Compose a hybrid in a few lines, train it, compare it
#
# A hybrid is a layer plan: recurrent layers for cheap long context, a few attention layers for exact recall,
# `@tag` to share one block between depths, block options in brackets. Here: Mamba-2 layers without MLP around
# two attention layers that share their parameters, trained on the built-in corpus beside pure GQA and pure
# Mamba-2 at the same budget (runs cached in `runs/compare`, so the baselines a zoo run trained are reused).
# `ATTNZOO_SMOKE=1` runs a tiny version in seconds.
#
# ![hybrid vs baselines](figures/03_hybrid_frontier.png)
#
# Why mix: on associative recall (MQAR, `experiments/mqar_recall.py`), two layers of attention alone, or of a
# recurrent mixer alone, recall about one pair in four after 1000 small steps, while one Mamba-2 layer under one
# attention layer recalls almost every pair (the recurrent layer's convolution hands each value its key, the
# attention layer looks the key up):
#
# ![MQAR recall](figures/mqar_recall_cpu.png)

# %%
from flax import nnx
from nbsetup import OUT, SCALE, SMOKE, save

from attnzoo import LanguageModel, ModelConfig, generate
from attnzoo.data import ByteTokenizer
from attnzoo.train.runs import load_run
from experiments.compare.config import SCALES
from experiments.compare.run import compare
from experiments.compare_zoo.config import FAMILIES
from experiments.study import Variant

HYBRID = "mamba2[mlp=none],gqa@attn" if SMOKE else "mamba2[mlp=none],gqa@attn,mamba2[mlp=none],gqa@attn"
ZOO = {variant.name: variant for family in FAMILIES.values() for variant in family}  # plans and labels
BASELINES = [] if SMOKE else [ZOO["gqa"], ZOO["mamba2"]]

# %% [markdown]
# The plan checks itself when the config is built (a typo in a mixer option fails here, naming the layer and the
# option); the summary counts the shared attention block once and the KV cache of its two layers.

# %%
config = ModelConfig(vocab_size=ByteTokenizer().vocab_size, plan=HYBRID, n_layers=HYBRID.count(",") + 1,
                     **SCALES[SCALE].model)
print(LanguageModel(config, rngs=nnx.Rngs(0)).summary(SCALES[SCALE].training.seq_len))

# %%
results = compare([Variant("hybrid", HYBRID, "Mamba-2 + shared GQA"), *BASELINES], SCALE, OUT, progress=False)
print(results.table)

# %%
save(results.figures["frontier.png"], "03_hybrid_frontier.png")

# %% [markdown]
# The trained hybrid is an ordinary run directory (`attnzoo-generate --run-dir ...` works on it too): sample from
# it with the mixed decode state (a recurrent state per Mamba-2 layer, a KV cache per attention layer).

# %%
hybrid_row = results.rows[0]
run = load_run(OUT / "runs" / f"{hybrid_row['variant']}-s{SCALES[SCALE].seeds[0]}")
prompt = "def main("
[continuation] = generate(run.model, [list(run.tokenizer.encode(prompt))], max_new_tokens=8 if SMOKE else 120,
                          temperature=0.8, top_k=40, seed=0)
print(prompt + run.tokenizer.decode(continuation))
