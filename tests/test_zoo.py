"""The attention zoo composes: every variant in one plan with GQA trains, and generates through mixed caches."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from model_checks import greedy_by_rescoring, train_losses

from attnzoo import LanguageModel, ModelConfig, generate

ZOO_PLAN = "mla*2,ccgqa,gated,moh,masa*2,gqa"


def zoo_model(seed: int = 0) -> LanguageModel:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=8, n_heads=4, n_kv_heads=2, max_seq_len=64, plan=ZOO_PLAN,
                      kernels={"flash_attention": "xla", "decode_attention": "xla"})
    return LanguageModel(cfg, rngs=nnx.Rngs(seed))


def test_every_variant_in_one_plan_trains():
    model = zoo_model()
    assert [block.mixer.__class__.__name__ for block in model.blocks][:2] == ["MultiHeadLatentAttention"] * 2
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 17)), jnp.int32)
    losses = train_losses(model, tokens, 8)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1
    summary = model.summary(seq_len=16)
    assert summary.kv_cache_bytes_per_token > 0 and dict(summary.rows)["shared"] > 0  # MASA's atoms, once


def test_generate_with_mixed_caches_equals_greedy_rescoring():
    model = zoo_model(seed=1)
    prompts = [[1, 2, 3, 4], [5], [6, 7]]
    new = generate(model, prompts, max_new_tokens=5)
    assert new == [greedy_by_rescoring(model, prompt, 5) for prompt in prompts]
