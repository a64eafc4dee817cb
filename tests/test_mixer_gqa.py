"""GQA / MHA / MQA specifics (the registry-wide contract is in test_mixer_contract.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig


@pytest.mark.parametrize("mixer, kv_heads", [("mha", 8), ("gqa", 2), ("mqa", 1)])
def test_summary_matches_closed_form(mixer, kv_heads):
    d, h, hd, layers, vocab, mlp, seq = 64, 8, 8, 2, 97, 192, 32
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=h, n_kv_heads=2, mlp_hidden=mlp,
                      plan=f"{mixer}*{layers}", tie_embeddings=False)
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    attn = d * h * hd + 2 * d * kv_heads * hd + h * hd * d
    per_layer = attn + 3 * d * mlp + 2 * d
    assert s.total_params == vocab * d + layers * per_layer + d + d * vocab
    assert s.kv_cache_bytes_per_token == layers * 2 * kv_heads * hd * 4
    avg_ctx = (seq + 1) / 2
    flops = layers * (2 * attn + 4 * h * hd * avg_ctx + 2 * 3 * d * mlp) + 2 * d * vocab
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)
    assert "total parameters" in s.table()


def test_window_reduces_attention_flops():
    base = dict(vocab_size=50, d_model=32, n_layers=1, n_heads=4)
    full = LanguageModel(ModelConfig(plan="gqa", **base), rngs=nnx.Rngs(0)).summary(seq_len=64)
    windowed = LanguageModel(ModelConfig(plan="gqa(window=8)", **base), rngs=nnx.Rngs(0)).summary(seq_len=64)
    avg_full, avg_win = 65 / 2, (8 * 9 / 2 + 56 * 8) / 64
    assert full.flops_per_token - windowed.flops_per_token == pytest.approx(4 * 32 * (avg_full - avg_win), abs=1)


def test_mha_and_mqa_are_gqa_with_fixed_kv_heads():
    base = dict(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                kernels={"flash_attention": "xla"})
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)), jnp.int32)
    for alias, explicit in (("mha", "gqa(n_kv_heads=4)"), ("mqa", "gqa(n_kv_heads=1)")):
        a = LanguageModel(ModelConfig(plan=alias, **base), rngs=nnx.Rngs(1))
        b = LanguageModel(ModelConfig(plan=explicit, **base), rngs=nnx.Rngs(1))
        assert a.blocks[0].mixer.n_kv_heads == b.blocks[0].mixer.n_kv_heads
        np.testing.assert_array_equal(a(tokens).logits_BTV, b(tokens).logits_BTV)
    # An alias's fixed option may still be overridden in the plan.
    assert LanguageModel(ModelConfig(plan="mqa(n_kv_heads=2)", **base),
                         rngs=nnx.Rngs(1)).blocks[0].mixer.n_kv_heads == 2
