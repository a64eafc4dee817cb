"""The contract every registered mixer passes (parameterised over the registry, so new mixers are covered)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig, registered

VOCAB, T = 61, 12
# Every registered mixer with its defaults, plus option combinations that change the computation.
MIXERS = registered() + ("gqa(window=4,qk_norm=true)", "mqa(logits_soft_cap=5.0,rope=false)")


def tiny_model(mixer: str, **overrides) -> LanguageModel:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      plan=f"{mixer}*2", attn_implementation="xla", **overrides)
    return LanguageModel(cfg, rngs=nnx.Rngs(0))


def random_tokens(seed: int, shape) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


@pytest.mark.parametrize("mixer", MIXERS)
def test_causality(mixer):
    model = tiny_model(mixer)
    tokens = random_tokens(1, (2, T))
    for t in (0, 5, T - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % VOCAB)
        a, b = model(tokens).logits_BTV, model(changed).logits_BTV
        np.testing.assert_array_equal(a[:, :t], b[:, :t])
        assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-6, "changing token t must change outputs at t"


@pytest.mark.parametrize("mixer", MIXERS)
def test_decode_with_cache_equals_full_forward(mixer):
    model = tiny_model(mixer)
    tokens = random_tokens(2, (3, T))
    full = model(tokens).logits_BTV
    prompt_lengths = jnp.array([3, 7, 1], jnp.int32)  # batched, different prompt lengths (right-padded)
    padded = jnp.where(jnp.arange(T)[None] < prompt_lengths[:, None], tokens, 0)
    out = model(padded, caches=model.init_caches(3, T), lengths_B=prompt_lengths, mode="prefill")
    for b, n in enumerate(prompt_lengths.tolist()):
        np.testing.assert_allclose(out.logits_BTV[b, :n], full[b, :n], rtol=1e-4, atol=1e-4)
    caches = out.caches
    # Feed each sequence its own next true token; compare with the full forward at that position.
    for step in range(T - int(prompt_lengths.max())):
        pos = prompt_lengths + step
        out = model(tokens[jnp.arange(3), pos][:, None], caches=caches, mode="decode")
        caches = out.caches
        np.testing.assert_allclose(out.logits_BTV[:, 0], full[jnp.arange(3), pos], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_finite_and_nonzero(mixer):
    model = tiny_model(mixer)
    tokens = random_tokens(3, (2, T))

    def loss(model):
        out = model(tokens[:, :-1])
        logp = jax.nn.log_softmax(out.logits_BTV)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean() + out.aux_loss

    grads = nnx.grad(loss)(model)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    mixer_grads = jax.tree.leaves(nnx.state(grads.blocks[0].mixer, nnx.Param))
    assert sum(float(jnp.abs(g).sum()) for g in mixer_grads) > 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_accounting_is_consistent(mixer):
    model = tiny_model(mixer)
    s = model.summary(seq_len=T)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert s.total_params == n_params == sum(count for _, count in s.rows)
    # Cache bytes per token == the measured growth of the decode caches per extra token of capacity.
    def cache_bytes(max_len):
        return sum(x.nbytes for x in jax.tree.leaves(model.init_caches(1, max_len)))
    assert cache_bytes(T + 1) - cache_bytes(T) == s.kv_cache_bytes_per_token
    assert s.flops_per_token > 2 * (n_params - VOCAB * 32)  # at least 2 FLOPs per non-embedding weight
