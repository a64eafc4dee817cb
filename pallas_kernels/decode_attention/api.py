"""decode_attention: the Tq newest tokens of each sequence against its KV cache (forward only)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import auto_uses_pallas, check_implementation, default_interpret
from pallas_kernels.decode_attention.pallas_triton import decode_attention_pallas
from pallas_kernels.decode_attention.reference import decode_attention_reference


def _validate(q, k_cache, v_cache, lengths, sliding_window, logits_soft_cap, num_splits, block_k):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Tq, Hq, Dqk], got shape {q.shape}")
    if k_cache.ndim != 4 or v_cache.ndim != 4:
        raise ValueError(f"k_cache and v_cache must be [B, S, Hkv, D], got {k_cache.shape} and {v_cache.shape}")
    b, tq, hq, dqk = q.shape
    if k_cache.shape[0] != b or v_cache.shape[0] != b:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must have q's batch size {b}")
    if k_cache.shape[1:3] != v_cache.shape[1:3]:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must agree on [S, Hkv]")
    s, hkv = k_cache.shape[1:3]
    if k_cache.shape[3] != dqk:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} must equal q's head dim {dqk}")
    if hq % hkv:
        raise ValueError(f"q heads {hq} must be a multiple of the cache's kv heads {hkv}")
    if not 1 <= tq <= s:
        raise ValueError(f"q has {tq} tokens; need 1 <= Tq <= cache length {s}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape ({b},), got {lengths.dtype}{lengths.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if logits_soft_cap is not None and logits_soft_cap <= 0:
        raise ValueError(f"logits_soft_cap must be > 0 or None, got {logits_soft_cap}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
    if block_k is not None and (block_k < 16 or block_k & (block_k - 1)):
        raise ValueError(f"block_k must be a power of 2 >= 16 or None, got {block_k}")


def decode_attention(q_BTHD, k_cache_BSKD, v_cache_BSKE, lengths_B, *, scale: float | None = None,
                     sliding_window: int | None = None, logits_soft_cap: float | None = None,
                     num_splits: int | None = None, block_k: int | None = None, implementation: str = "auto",
                     interpret: bool | None = None) -> jax.Array:
    """Attention of the Tq newest tokens against a KV cache. Returns [B, Tq, Hq, Dv] in q.dtype.

    q_BTHD [B, Tq, Hq, Dqk]; k_cache_BSKD [B, S, Hkv, Dqk]; v_cache_BSKE [B, S, Hkv, Dv] (Dv may differ from Dqk,
    e.g. absorbed MLA: one latent head, Dqk 576, Dv 512); Hq % Hkv == 0, q head h reads kv head h // (Hq / Hkv).
    lengths_B [B] int: valid entries per sequence *including* the Tq new tokens, already written at positions
    lengths-Tq .. lengths-1 (clipped to [Tq, S]). Query t sits at p = lengths-Tq+t and sees keys j <= p, and
    j > p - sliding_window when a window is given; entries at j >= lengths are never read into the output.

    implementation: "pallas" (split-K Flash-Decoding kernel, interpreted off GPU), "xla" (the float32 reference),
    "auto" (xla; pallas on GPU once verified there, see `common.PALLAS_IN_AUTO`). num_splits / block_k override
    the kernel's heuristics.
    """
    check_implementation(implementation)
    if implementation == "cudnn":
        raise ValueError("implementation='cudnn' is not available for decode attention; use 'auto', 'pallas' "
                         "or 'xla'")
    _validate(q_BTHD, k_cache_BSKD, v_cache_BSKE, lengths_B, sliding_window, logits_soft_cap, num_splits, block_k)
    use_pallas = implementation == "pallas" or (implementation == "auto" and auto_uses_pallas())
    return _decode(q_BTHD, k_cache_BSKD, v_cache_BSKE, lengths_B,
                   scale=q_BTHD.shape[-1] ** -0.5 if scale is None else float(scale), sliding_window=sliding_window,
                   logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                   num_splits=num_splits, block_k=block_k, use_pallas=use_pallas,
                   interpret=default_interpret() if interpret is None else interpret)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logits_soft_cap", "num_splits", "block_k",
                                             "use_pallas", "interpret"))
def _decode(q, k_cache, v_cache, lengths, *, scale, sliding_window, logits_soft_cap, num_splits, block_k,
            use_pallas, interpret):
    lengths = jnp.clip(lengths.astype(jnp.int32), q.shape[1], k_cache.shape[1])
    if not use_pallas:
        return decode_attention_reference(q, k_cache, v_cache, lengths, scale=scale, sliding_window=sliding_window,
                                          logits_soft_cap=logits_soft_cap)
    return decode_attention_pallas(q, k_cache, v_cache, lengths, scale=scale, sliding_window=sliding_window,
                                   logits_soft_cap=logits_soft_cap, num_splits=num_splits, block_k=block_k,
                                   interpret=interpret)
