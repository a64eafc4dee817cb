"""The one attention entry point every softmax mixer calls; kernels plug in underneath.

`implementation`: "auto" (cuDNN on GPU where it applies, else the Pallas kernel; XLA off GPU), "xla", "cudnn",
"pallas" (interpreted off GPU, so it runs everywhere). See `pallas_kernels.flash_attention`.
"""

from __future__ import annotations

import jax

import pallas_kernels


def attention(q_BTHD, k_BSKD, v_BSKD, *, causal: bool = True, sliding_window: int | None = None,
              segment_ids_BT: jax.Array | None = None, scale: float | None = None,
              logits_soft_cap: float | None = None, gate_BTH: jax.Array | None = None,
              implementation: str = "auto") -> jax.Array:
    """Self-attention over a whole sequence (training, scoring, prefill). Returns [B, T, Hq, Dv]."""
    return pallas_kernels.flash_attention(
        q_BTHD, k_BSKD, v_BSKD, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids_BT,
        scale=scale, logits_soft_cap=logits_soft_cap, gate=gate_BTH, implementation=implementation)


def cached_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, lengths_B, *, sliding_window: int | None = None,
                     scale: float | None = None, logits_soft_cap: float | None = None,
                     implementation: str = "auto") -> jax.Array:
    """The T newest tokens (already written at lengths-T .. lengths-1) against the cache. Returns [B, T, Hq, Dv]."""
    # cuDNN has no decode path: "cudnn" models decode with the default choice.
    decode_impl = "auto" if implementation == "cudnn" else implementation
    return pallas_kernels.decode_attention(
        q_BTHD, k_cache_BSKD, v_cache_BSKD, lengths_B, sliding_window=sliding_window, scale=scale,
        logits_soft_cap=logits_soft_cap, implementation=decode_impl)
