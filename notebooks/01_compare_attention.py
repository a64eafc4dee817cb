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
# count (from `model.summary()`). `ATTNZOO_SMOKE=1` shrinks everything so the notebook runs in CI.
# Open as a notebook with `jupytext --to ipynb notebooks/01_compare_attention.py`.

# %%
import os
import tempfile

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.data import ByteTokenizer, TokenDataset, stdlib_corpus, unigram_entropy
from attnzoo.train import TrainConfig, train

SMOKE = bool(os.environ.get("ATTNZOO_SMOKE"))
OUT = os.environ.get("ATTNZOO_OUT", tempfile.mkdtemp(prefix="attnzoo-nb01-"))
PLANS = {
    "MHA": "mha*4",
    "GQA (2 kv heads)": "gqa*4",
    "MQA": "mqa*4",
    "GQA + window 32": "gqa(window=32)*3,gqa",
}
steps = 8 if SMOKE else 400
training = TrainConfig(steps=steps, batch_size=8 if SMOKE else 16, seq_len=64 if SMOKE else 128, lr=3e-3,
                       warmup_steps=2 if SMOKE else 40, eval_every=steps, eval_batches=2 if SMOKE else 10,
                       ckpt_every=steps, log_every=max(1, steps // 20))

# %%
tokenizer = ByteTokenizer()
corpus = stdlib_corpus()
dataset = TokenDataset.build(corpus, tokenizer, os.path.join(OUT, "cache"))
entropy = unigram_entropy(dataset, "val")
print(f"{corpus.name}: {dataset.num_tokens('train'):,} train tokens; unigram entropy {entropy:.3f} nats/token")

# %%
results = {}
for name, plan in PLANS.items():
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64 if SMOKE else 128, n_layers=4, n_heads=4,
                         n_kv_heads=2, plan=plan)
    model = LanguageModel(config, rngs=nnx.Rngs(0))
    summary = model.summary(seq_len=training.seq_len)
    run = train(model, training, dataset, os.path.join(OUT, plan.replace("*", "x")), tokenizer=tokenizer,
                data={"corpus": corpus.name, "fingerprint": corpus.fingerprint}, progress=False,
                sample_tokens=0, echo=lambda _: None)
    results[name] = dict(val_loss=run.val_loss, kv_bytes=summary.kv_cache_bytes_per_token,
                         params=summary.total_params, flops=summary.flops_per_token)
    print(f"{name:18s} val loss {run.val_loss:.3f}  KV {summary.kv_cache_bytes_per_token:6,d} B/token  "
          f"params {summary.total_params:,}  FLOPs/token {summary.flops_per_token:,}")

# %% [markdown]
# One seed per plan: at this scale differences of a few hundredths of a nat are within seed-to-seed noise.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, key, label in ((axes[0], "kv_bytes", "KV-cache bytes per token (fp32)"), (axes[1], "params", "parameters")):
    for name, r in results.items():
        ax.scatter(r[key], r["val_loss"], s=60)
        ax.annotate(name, (r[key], r["val_loss"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
axes[0].set_ylabel("validation loss (nats/token)")
fig.suptitle(f"{steps} steps on {corpus.name}; unigram entropy {entropy:.2f} nats/token")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "compare_attention.png"), dpi=110)
print("plot:", os.path.join(OUT, "compare_attention.png"))
