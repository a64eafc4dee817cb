"""Pure-JAX attention that materialises the logits: the oracle every flash-attention kernel is tested against,
and the `implementation="xla"` backend. Written independently of the kernel's tile-wise masking on purpose."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import MASK_VALUE


def attention_mask(seq_q: int, seq_k: int, *, causal: bool = False, sliding_window: int | None = None,
                   segment_ids_BT: jax.Array | None = None) -> jax.Array | None:
    """Boolean [1 or B, T, S] mask of visible keys (None when everything is visible).

    Positions are aligned: query i and key j sit at positions i and j. Causal: j <= i; sliding window W: also
    j > i - W; segment ids: same segment."""
    mask = None
    if causal or sliding_window is not None:
        pos = jnp.arange(seq_q)[:, None] - jnp.arange(seq_k)[None, :]  # i - j
        mask = pos >= 0
        if sliding_window is not None:
            mask &= pos < sliding_window
        mask = mask[None]
    if segment_ids_BT is not None:
        same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def flash_attention_reference(q_BTHE, k_BSKE, v_BSKF, *, causal: bool = False, sliding_window: int | None = None,
                              segment_ids=None, scale: float | None = None, logits_soft_cap: float | None = None,
                              gate=None, return_lse: bool = False):
    """Softmax attention in float32 with every option of `flash_attention`; returns out [B, T, Hq, Dv] in q.dtype
    (and lse [B, Hq, T] float32 with `return_lse`). GQA by grouping q heads, never by repeating K/V."""
    b, t, hq, dqk = q_BTHE.shape
    s, hkv, dv = k_BSKE.shape[1], k_BSKE.shape[2], v_BSKF.shape[3]
    group = hq // hkv
    scale = 1.0 / math.sqrt(dqk) if scale is None else scale
    q_BTKGE = q_BTHE.reshape(b, t, hkv, group, dqk)
    logits_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGE, k_BSKE, preferred_element_type=jnp.float32,
                              precision=jax.lax.Precision.HIGHEST) * scale
    if logits_soft_cap is not None:
        logits_BKGTS = logits_soft_cap * jnp.tanh(logits_BKGTS / logits_soft_cap)
    mask_BTS = attention_mask(t, s, causal=causal, sliding_window=sliding_window, segment_ids_BT=segment_ids)
    if mask_BTS is not None:
        logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, MASK_VALUE)
    lse_BKGT = jax.nn.logsumexp(logits_BKGTS, axis=-1)
    probs_BKGTS = jnp.exp(logits_BKGTS - lse_BKGT[..., None])
    out_BTKGF = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKF.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
    out_BTHF = out_BTKGF.reshape(b, t, hq, dv)
    if gate is not None:
        out_BTHF = out_BTHF * gate.astype(jnp.float32)[..., None]
    out_BTHF = out_BTHF.astype(q_BTHE.dtype)
    if return_lse:
        return out_BTHF, lse_BKGT.reshape(b, hq, t)
    return out_BTHF


def unsupported_reason(call) -> None:
    """The reference takes every call the API accepts."""
    return None


def run(call):
    return flash_attention_reference(
        call.q_BTHE, call.k_BSKE, call.v_BSKF, causal=call.causal, sliding_window=call.sliding_window,
        segment_ids=call.segment_ids_BT, scale=call.scale, logits_soft_cap=call.logits_soft_cap, gate=call.gate_BTH,
        return_lse=call.return_lse)
