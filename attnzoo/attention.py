"""The attention entry point every dense softmax mixer calls (the routed mixers call the block-sparse op through
`attnzoo.block_routing`); the kernels plug in underneath.

`implementation` is the model's choice for the op (`ModelConfig.kernel("flash_attention")` /
`kernel("decode_attention")`): "auto", one implementation name, or a sequence tried in order; see
`pallas_kernels.ops` for each op's table.
"""

from __future__ import annotations

import jax

import pallas_kernels


def attention(q_BTHE, k_BSKE, v_BSKF, *, causal: bool = True, sliding_window: int | None = None,
              segment_ids_BT: jax.Array | None = None, scale: float | None = None,
              logits_soft_cap: float | None = None, gate_BTH: jax.Array | None = None, return_lse: bool = False,
              implementation="auto"):
    """Self-attention over a whole sequence (training, scoring, prefill). Returns out [B, T, H, F], or
    (out, lse [B, H, T] float32) with `return_lse`."""
    return pallas_kernels.flash_attention(
        q_BTHE, k_BSKE, v_BSKF, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids_BT,
        scale=scale, logits_soft_cap=logits_soft_cap, gate=gate_BTH, return_lse=return_lse,
        implementation=implementation)


def cached_attention(q_BTHE, k_cache_BSKE, v_cache_BSKF, lengths_B, *, sliding_window: int | None = None,
                     scale: float | None = None, logits_soft_cap: float | None = None,
                     implementation="auto") -> jax.Array:
    """The T newest tokens (already written at lengths-T .. lengths-1) against the cache. Returns [B, T, H, F]."""
    return pallas_kernels.decode_attention(
        q_BTHE, k_cache_BSKE, v_cache_BSKF, lengths_B, sliding_window=sliding_window, scale=scale,
        logits_soft_cap=logits_soft_cap, implementation=implementation)
