"""flash_attention in plain XLA, query block by query block: the "xla_chunked" implementation (tokamax's idea of the
same name), the CPU backend that "auto" picks off GPU.

Each query block attends to the one contiguous key range it can see: causal and sliding-window blocks never compute
the keys wholly in their future or past their window (about half of a causal square), and each block takes one
exact softmax over its range, so there is no online rescaling. GQA without repeating K/V: a kv head's G query heads
are rows of one batched matmul, q [B, K, N, E] with N = T*G rows (row t*G + g) against k [B, K, S, E]. Everything
runs in float32.

The gradient is a `jax.custom_vjp` with FlashAttention-2's backward (https://arxiv.org/abs/2307.08691): each
block's probabilities are recomputed from the saved lse, dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O) +
dlse), dQ = dS K, dK = dS^T Q; autodiff would save every block's probabilities and transpose the softmax graph.
The query blocks are a static Python loop (a handful of blocks, each with its own static key range and mask).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import MASK_VALUE, cdiv, round_up

# A block's logits [B, Hq, block, keys] float32 should fit a core's L2 cache (2 MiB on the machine measured: at B8
# T256 Hq8, blocks of 32 queries ran ~1.5x faster than blocks of 64), but every block is compiled on its own (a
# static loop, ~0.5 s of XLA compile per block for forward and backward), so there are at most MAX_BLOCKS.
BLOCK_LOGITS_BYTES = 2 << 20
MAX_BLOCKS = 8
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)  # fp32 matmuls off CPU too


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: a `nondiff_argnums` of the custom VJP)."""
    group: int  # G query heads per kv head
    ranges: tuple[tuple[int, int, int, int], ...]  # per query block: (t0, t1, k0, k1), keys [k0, k1) visible
    causal: bool
    window: int | None
    soft_cap: float | None


def query_block(batch: int, seq_q: int, seq_k: int, heads_q: int, sliding_window: int | None) -> int:
    """Default query block (a multiple of 16): the longest whose logits fit BLOCK_LOGITS_BYTES, but at least
    seq_q / MAX_BLOCKS; seq_q (one block) when that is shorter."""
    keys = seq_k if sliding_window is None else min(seq_k, sliding_window)
    fits = BLOCK_LOGITS_BYTES // (4 * batch * heads_q * keys) // 16 * 16
    return min(seq_q, max(fits, round_up(cdiv(seq_q, MAX_BLOCKS), 16)))


def block_ranges(seq_q: int, seq_k: int, block: int, *, causal: bool, sliding_window: int | None):
    """(t0, t1, k0, k1) per query block: the smallest key range holding every key the block's queries see."""
    ranges = []
    for t0 in range(0, seq_q, block):
        t1 = min(t0 + block, seq_q)
        k0 = 0 if sliding_window is None else max(0, t0 - sliding_window + 1)
        ranges.append((t0, t1, k0, t1 if causal else seq_k))
    return tuple(ranges)


def _static_mask(t0, t1, k0, k1, cfg: Config):
    """Boolean [t1 - t0, k1 - k0] causal / window mask of one block, or None when it sees its whole range."""
    if not cfg.causal:
        return None
    pos = np.arange(t0, t1)[:, None] - np.arange(k0, k1)[None, :]  # i - j
    visible = pos >= 0
    if cfg.window is not None:
        visible &= pos < cfg.window
    return None if visible.all() else visible


def _logits(q_BKNE, k_BKSE, seg_BT, block, cfg: Config):
    """One block's masked, capped logits [B, K, rows, keys] (q prescaled) and tanh of the capped logits (None
    without a cap), which the backward needs before masking."""
    t0, t1, k0, k1 = block
    logits = _einsum("bkne,bkse->bkns", q_BKNE, k_BKSE[:, :, k0:k1])
    tanh = None
    if cfg.soft_cap is not None:
        tanh = jnp.tanh(logits / cfg.soft_cap)
        logits = cfg.soft_cap * tanh
    mask = _static_mask(t0, t1, k0, k1, cfg)
    mask = None if mask is None else jnp.asarray(mask)[None]
    if seg_BT is not None:
        same = seg_BT[:, t0:t1, None] == seg_BT[:, None, k0:k1]
        mask = same if mask is None else mask & same
    if mask is not None:  # rows are (t, g): broadcast the [B, t, s] mask over the group
        b, k, rows, keys = logits.shape
        logits = jnp.where(mask[:, None, :, None, :], logits.reshape(b, k, t1 - t0, cfg.group, keys),
                           MASK_VALUE).reshape(b, k, rows, keys)
    return logits, tanh


def _rows(block, cfg: Config) -> slice:
    return slice(block[0] * cfg.group, block[1] * cfg.group)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BKNE, k_BKSE, v_BKSF, seg_BT, cfg: Config):
    """(out [B, K, N, F], lse [B, K, N]) from prescaled float32 q (N = T*G rows)."""
    return _attention_fwd(q_BKNE, k_BKSE, v_BKSF, seg_BT, cfg)[0]


def _attention_fwd(q_BKNE, k_BKSE, v_BKSF, seg_BT, cfg: Config):
    outs, lses = [], []
    for block in cfg.ranges:
        logits, _ = _logits(q_BKNE[:, :, _rows(block, cfg)], k_BKSE, seg_BT, block, cfg)
        m = jnp.max(logits, axis=-1, keepdims=True)
        p = jnp.exp(logits - m)
        l = jnp.sum(p, axis=-1, keepdims=True)  # >= 1: the row maximum contributes exp(0)
        pv = _einsum("bkns,bksf->bknf", p, v_BKSF[:, :, block[2]:block[3]])
        outs.append(pv / l)
        lses.append((m + jnp.log(l))[..., 0])
    out, lse = jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)
    return (out, lse), (q_BKNE, k_BKSE, v_BKSF, seg_BT, out, lse)


def _attention_bwd(cfg: Config, residuals, cotangents):
    q_BKNE, k_BKSE, v_BKSF, seg_BT, out, lse = residuals
    d_out, d_lse = cotangents
    # dS = P * (dP - rowsum(dO * O) + dlse): the softmax's Jacobian, plus lse's own gradient (d lse / d s = P)
    row_term = d_lse - jnp.sum(d_out * out, axis=-1)
    d_q, d_k, d_v = [], jnp.zeros_like(k_BKSE), jnp.zeros_like(v_BKSF)
    for block in cfg.ranges:
        rows, keys = _rows(block, cfg), slice(block[2], block[3])
        q = q_BKNE[:, :, rows]
        logits, tanh = _logits(q, k_BKSE, seg_BT, block, cfg)
        p = jnp.exp(logits - lse[:, :, rows, None])
        d_o = d_out[:, :, rows]
        d_v = d_v.at[:, :, keys].add(_einsum("bkns,bknf->bksf", p, d_o))
        d_p = _einsum("bknf,bksf->bkns", d_o, v_BKSF[:, :, keys])
        d_s = p * (d_p + row_term[:, :, rows, None])
        if tanh is not None:
            d_s = d_s * (1 - tanh * tanh)
        d_q.append(_einsum("bkns,bkse->bkne", d_s, k_BKSE[:, :, keys]))
        d_k = d_k.at[:, :, keys].add(_einsum("bkns,bkne->bkse", d_s, q))
    return jnp.concatenate(d_q, axis=2), d_k, d_v, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention_xla_chunked(q_BTHE, k_BSKE, v_BSKF, *, gate_BTH=None, segment_ids_BT=None, causal: bool,
                                sliding_window: int | None, scale: float, logits_soft_cap: float | None,
                                block_q: int | None = None):
    """(out [B, T, Hq, Dv] in q.dtype, lse [B, Hq, T] float32). Inputs are assumed validated
    (api.flash_attention); `block_q` overrides the query block."""
    b, t, hq, dqk = q_BTHE.shape
    s, hkv, dv = k_BSKE.shape[1], k_BSKE.shape[2], v_BSKF.shape[3]
    group = hq // hkv
    block = block_q or query_block(b, t, s, hq, sliding_window)
    cfg = Config(group=group, causal=causal, window=sliding_window, soft_cap=logits_soft_cap,
                 ranges=block_ranges(t, s, block, causal=causal, sliding_window=sliding_window))
    q_BKNE = (q_BTHE.astype(jnp.float32) * scale).reshape(b, t, hkv, group, dqk).transpose(0, 2, 1, 3, 4)
    k_BKSE = k_BSKE.astype(jnp.float32).transpose(0, 2, 1, 3)
    v_BKSF = v_BSKF.astype(jnp.float32).transpose(0, 2, 1, 3)
    out_BKNF, lse_BKN = _attention(q_BKNE.reshape(b, hkv, t * group, dqk), k_BKSE, v_BKSF, segment_ids_BT, cfg)
    out_BTHF = out_BKNF.reshape(b, hkv, t, group, dv).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, dv)
    if gate_BTH is not None:
        out_BTHF = out_BTHF * gate_BTH.astype(jnp.float32)[..., None]
    lse_BHT = lse_BKN.reshape(b, hkv, t, group).transpose(0, 1, 3, 2).reshape(b, hq, t)
    return out_BTHF.astype(q_BTHE.dtype), lse_BHT


def unsupported_reason(call) -> None:
    """Takes every call the API accepts."""
    return None


def run(call):
    out, lse = flash_attention_xla_chunked(
        call.q_BTHE, call.k_BSKE, call.v_BSKF, gate_BTH=call.gate_BTH, segment_ids_BT=call.segment_ids_BT,
        causal=call.causal, sliding_window=call.sliding_window, scale=call.scale,
        logits_soft_cap=call.logits_soft_cap, block_q=call.block_q)
    return (out, lse) if call.return_lse else out
