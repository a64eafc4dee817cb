"""attnzoo attention modules give the same outputs and gradients through the Pallas kernel and through XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig, generate


def model_with(implementation: str, plan: str) -> LanguageModel:
    cfg = ModelConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, plan=plan,
                      attn_implementation=implementation)
    return LanguageModel(cfg, rngs=nnx.Rngs(7))


def loss_and_grads(model, tokens):
    def loss(model):
        logp = jax.nn.log_softmax(model(tokens[:, :-1]).logits_BTV)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    return value, jax.tree.leaves(nnx.state(grads, nnx.Param))


@pytest.mark.parametrize("plan", ["gqa*2", "mqa(window=5),gqa(qk_norm=true,logits_soft_cap=2.0)"])
def test_pallas_matches_xla_in_the_model(plan):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 53, (2, 14)), jnp.int32)
    xla_loss, xla_grads = loss_and_grads(model_with("xla", plan), tokens)
    pallas_loss, pallas_grads = loss_and_grads(model_with("pallas", plan), tokens)
    np.testing.assert_allclose(pallas_loss, xla_loss, rtol=1e-5)
    for p, x in zip(pallas_grads, xla_grads, strict=True):
        np.testing.assert_allclose(p, x, rtol=1e-4, atol=1e-5)


def test_generation_through_the_decode_kernel_matches_xla():
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    assert generate(model_with("pallas", "gqa,mqa"), prompts, 5) == generate(model_with("xla", "gqa,mqa"), prompts, 5)
