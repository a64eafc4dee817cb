"""Attention diagnostics from the kernels' lse and one blockwise pass equal those of the materialised matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.diagnostics import attention_diagnostics
from pallas_kernels import flash_attention


def dense_diagnostics(q, k, *, scale, window, cap):
    b, t, h, e = q.shape
    g = h // k.shape[2]
    s = jnp.einsum("bthe,bshe->bhts", q, jnp.repeat(k, g, axis=2)) * scale
    if cap is not None:
        s = cap * jnp.tanh(s / cap)
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    visible = (j <= i) & (True if window is None else j > i - window)
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    entropy = -jnp.sum(jnp.where(visible, p * jnp.log(jnp.where(visible, p, 1.0)), 0.0), axis=-1)
    return {"sink_share": p[..., 0].mean(), "entropy": entropy.mean(),
            "max_logit": jnp.max(jnp.where(visible, jnp.abs(s), 0.0))}


@pytest.mark.parametrize("heads, window, cap, block_k", [((4, 4), None, None, 128), ((6, 2), 5, None, 4),
                                                          ((4, 1), None, 2.0, 3)])
def test_blockwise_diagnostics_equal_the_dense_matrix(heads, window, cap, block_k):
    (h, kh), t, e = heads, 11, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = 2 * jax.random.normal(keys[0], (2, t, h, e))
    k = jax.random.normal(keys[1], (2, t, kh, e))
    v = jax.random.normal(keys[2], (2, t, kh, e))
    scale = e**-0.5
    _, lse = flash_attention(q, k, v, causal=True, sliding_window=window, logits_soft_cap=cap, return_lse=True,
                             implementation="xla")
    got = attention_diagnostics(q, k, lse, scale=scale, sliding_window=window, logits_soft_cap=cap, block_k=block_k)
    want = dense_diagnostics(q, k, scale=scale, window=window, cap=cap)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_uniform_attention_has_the_closed_form_entropy_and_sink_share():
    t = 9
    q = jnp.zeros((1, t, 2, 4))  # all logits 0: query i attends uniformly to i + 1 keys
    k = jax.random.normal(jax.random.key(1), (1, t, 2, 4))
    _, lse = flash_attention(q, k, k, causal=True, return_lse=True, implementation="xla")
    got = attention_diagnostics(q, k, lse, scale=0.5, block_k=4)
    n = np.arange(1, t + 1)
    np.testing.assert_allclose(got["entropy"], np.log(n).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["sink_share"], (1 / n).mean(), rtol=1e-6)
    assert float(got["max_logit"]) == 0.0


def test_the_model_reports_diagnostics_per_layer_only_when_asked():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, plan="gqa,gqa(window=3)",
                      kernels={"flash_attention": "xla"})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 10)), jnp.int32)
    plain = model(tokens)
    assert plain.metrics == {}
    out = model(tokens, diagnostics=True)
    np.testing.assert_array_equal(out.logits_BTV, plain.logits_BTV)
    assert set(out.metrics) == {f"layer{i}/{name}" for i in (0, 1) for name in ("sink_share", "entropy", "max_logit")}
    # A window of 3 keys caps the entropy at log(3); full causal attention over 10 tokens can exceed it.
    assert 0 < float(out.metrics["layer1/entropy"]) <= np.log(3) + 1e-6
    assert 0 < float(out.metrics["layer0/sink_share"]) <= 1
