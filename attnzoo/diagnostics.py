"""Attention diagnostics any softmax mixer can return during evaluation, without materialising the [T, S] matrix.

Given the log-sum-exp the attention kernels already return (`attention(..., return_lse=True)`), one pass over key
blocks recovers, per query,

    sink share   p_i0 = exp(s_i0 - lse_i)                     (weight on the first token, the "attention sink")
    entropy      H_i = lse_i - sum_j p_ij s_ij                (nats; log(i + 1) for uniform causal attention)
    max |logit|  max_j |s_ij| over visible keys               (pre-softmax scale, after the scale and soft cap)

with s the scaled (and soft-capped) logits. Memory is O(T * block_k) per head group; cost is one extra q.k pass,
so mixers compute them only when the forward context asks (`ForwardContext.diagnostics`, off in training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_diagnostics(q_BTHE, k_BSKE, lse_BHT, *, scale: float, sliding_window: int | None = None,
                          logits_soft_cap: float | None = None, block_k: int = 128) -> dict[str, jax.Array]:
    """Causal self-attention diagnostics (keys aligned with queries), averaged over batch, heads and queries
    (max |logit|: the maximum). Returns {"sink_share", "entropy", "max_logit"} as float32 scalars."""
    b, t, h, e = q_BTHE.shape
    k_heads = k_BSKE.shape[2]
    g = h // k_heads
    q_BTKGE = q_BTHE.reshape(b, t, k_heads, g, e).astype(jnp.float32)
    lse_BTKG = jnp.swapaxes(lse_BHT, 1, 2).reshape(b, t, k_heads, g)
    n_blocks = -(-k_BSKE.shape[1] // block_k)
    k_pad = jnp.pad(k_BSKE.astype(jnp.float32), ((0, 0), (0, n_blocks * block_k - k_BSKE.shape[1]), (0, 0), (0, 0)))
    rows_T = jnp.arange(t)

    def logits(k_block, start):
        s = jnp.einsum("btkge,bskge->btkgs", q_BTKGE, k_block[:, :, :, None, :]) * scale
        if logits_soft_cap is not None:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        cols = start + jnp.arange(k_block.shape[1])
        visible = (cols[None, :] <= rows_T[:, None]) & (cols[None, :] < k_BSKE.shape[1])
        if sliding_window is not None:
            visible &= cols[None, :] > rows_T[:, None] - sliding_window
        return s, visible[None, :, None, None, :]

    def step(carry, j):
        expected_s, max_abs = carry
        start = j * block_k
        s, visible = logits(jax.lax.dynamic_slice_in_dim(k_pad, start, block_k, axis=1), start)
        p = jnp.where(visible, jnp.exp(s - lse_BTKG[..., None]), 0.0)
        expected_s = expected_s + jnp.sum(p * jnp.where(visible, s, 0.0), axis=-1)
        max_abs = jnp.maximum(max_abs, jnp.max(jnp.where(visible, jnp.abs(s), 0.0), axis=-1))
        return (expected_s, max_abs), None

    zeros = jnp.zeros((b, t, k_heads, g), jnp.float32)
    (expected_s, max_abs), _ = jax.lax.scan(step, (zeros, zeros), jnp.arange(n_blocks))
    s0, visible0 = logits(k_pad[:, :1], 0)
    sink = jnp.where(visible0[..., 0], jnp.exp(s0[..., 0] - lse_BTKG), 0.0)
    return {"sink_share": jnp.mean(sink), "entropy": jnp.mean(lse_BTKG - expected_s), "max_logit": jnp.max(max_abs)}
