"""Pure-JAX decode attention (masked softmax in float32), the `implementation="xla"` backend, and the masking rules
the kernel shares with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import MASK_VALUE


def query_positions(lengths_B: jax.Array, num_queries: int) -> jax.Array:
    """Cache positions [B, Tq] of the Tq newest tokens, which sit at lengths-Tq .. lengths-1."""
    return lengths_B[:, None] - num_queries + jnp.arange(num_queries, dtype=lengths_B.dtype)


def visible(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """Whether a query at cache position `q_pos` sees the key at `k_pos` (broadcasting).

    Causal (k_pos <= q_pos), and inside the last `sliding_window` positions when one is given. Since every query
    sits below its sequence's length, this also hides the cache entries at and beyond the length."""
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """Gemma-2 style logit soft cap, cap * tanh(logits / cap); identity when `cap` is None."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def decode_attention_reference(q_BTHE, k_cache_BSKE, v_cache_BSKF, lengths_B, *, scale: float | None = None,
                               sliding_window: int | None = None,
                               logits_soft_cap: float | None = None) -> jax.Array:
    """The Tq newest tokens of each sequence against its KV cache, in float32. Returns [B, Tq, Hq, Dv] in q.dtype.

    Cache entries at positions >= lengths[b] may hold anything (NaN included): they never reach the output."""
    b, tq, hq, dqk = q_BTHE.shape
    s, hkv = k_cache_BSKE.shape[1:3]
    group = hq // hkv
    scale = dqk ** -0.5 if scale is None else scale
    hi = jax.lax.Precision.HIGHEST
    q = q_BTHE.astype(jnp.float32).reshape(b, tq, hkv, group, dqk)
    k_pos = jnp.arange(s, dtype=lengths_B.dtype)
    in_cache_BS = k_pos[None, :] < lengths_B[:, None]
    # Zero the stale entries: a NaN there would survive a zero softmax weight (0 * NaN = NaN).
    k = jnp.where(in_cache_BS[:, :, None, None], k_cache_BSKE.astype(jnp.float32), 0.0)
    v = jnp.where(in_cache_BS[:, :, None, None], v_cache_BSKF.astype(jnp.float32), 0.0)
    logits = soft_cap(jnp.einsum("btkgd,bskd->bkgts", q, k, precision=hi) * scale, logits_soft_cap)
    mask_BTS = visible(query_positions(lengths_B, tq)[:, :, None], k_pos[None, None, :], sliding_window)
    logits = jnp.where(mask_BTS[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bske->btkge", probs, v, precision=hi)
    return out.reshape(b, tq, hq, v.shape[-1]).astype(q_BTHE.dtype)


def unsupported_reason(call) -> None:
    """The reference takes every call the API accepts."""
    return None


def run(call):
    return decode_attention_reference(call.q_BTHE, call.k_cache_BSKE, call.v_cache_BSKF, call.lengths_B,
                                      scale=call.scale, sliding_window=call.sliding_window,
                                      logits_soft_cap=call.logits_soft_cap)
