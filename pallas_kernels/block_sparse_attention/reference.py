"""Pure-JAX block-sparse attention, the `implementation="xla"` backend: gathers each query block's selected K/V
blocks and runs a float32 softmax over them. Memory and FLOPs are linear in the number of list slots (MAXK), not in
S; differentiable by JAX autodiff (the gather's transpose is a scatter-add)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import MASK_VALUE


def _blocks(x_BS_, block: int):
    """[B, S, ...] -> [B, S // block, block, ...]."""
    return x_BS_.reshape(x_BS_.shape[0], x_BS_.shape[1] // block, block, *x_BS_.shape[2:])


def block_sparse_attention_reference(q_BTHE, k_BSKE, v_BSKF, kv_block_indices, kv_block_counts, *, block_q: int,
                                     block_k: int, causal: bool = True, q_positions_BT=None, kv_positions_BS=None,
                                     scale: float | None = None, return_lse: bool = False):
    """`block_sparse_attention` in float32 on validated inputs (see api.py for the arguments). Out-of-range ids are
    clamped; a duplicate id is attended twice. Returns out [B, T, H, F] in q.dtype (and lse [B, T, H] f32)."""
    b, t, h, e = q_BTHE.shape
    s, kh, f = k_BSKE.shape[1], k_BSKE.shape[2], v_BSKF.shape[3]
    g, nqb, nkb, maxk = h // kh, t // block_q, s // block_k, kv_block_indices.shape[-1]
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    ids_BKNM = jnp.clip(jnp.broadcast_to(kv_block_indices, (b, kh, nqb, maxk)), 0, nkb - 1)
    used_BKNM = jnp.arange(maxk) < jnp.broadcast_to(kv_block_counts, (b, kh, nqb))[..., None]

    def gather(x_BSKD):  # [B, S, K, D] -> selected blocks [B, K, NQB, MAXK * block_k, D]
        x_BKJcD = jnp.moveaxis(_blocks(x_BSKD, block_k), 3, 1)  # [B, K, NKB, block_k, D]
        sel = jnp.take_along_axis(x_BKJcD, ids_BKNM.reshape(b, kh, nqb * maxk, 1, 1), axis=2)
        return sel.reshape(b, kh, nqb, maxk * block_k, x_BSKD.shape[-1])

    k_BKNLE, v_BKNLF = gather(k_BSKE), gather(v_BSKF)
    q_BKNGQE = _blocks(q_BTHE, block_q).reshape(b, nqb, block_q, kh, g, e).transpose(0, 3, 1, 4, 2, 5)
    logits_BKNGQL = jnp.einsum("bkngqe,bknle->bkngql", q_BKNGQE, k_BKNLE, preferred_element_type=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST) * scale

    visible_BKNQL = jnp.broadcast_to(jnp.repeat(used_BKNM, block_k, axis=-1)[:, :, :, None, :],
                                     (b, kh, nqb, block_q, maxk * block_k))
    if causal:
        q_pos = jnp.arange(t)[None] if q_positions_BT is None else q_positions_BT
        kv_pos = jnp.arange(s)[None] if kv_positions_BS is None else kv_positions_BS
        q_pos_BNQ = jnp.broadcast_to(q_pos, (b, t)).reshape(b, 1, nqb, block_q)
        kv_pos_BKJc = jnp.broadcast_to(_blocks(jnp.broadcast_to(kv_pos, (b, s)), block_k)[:, None],
                                       (b, kh, nkb, block_k))
        kv_pos_BKNL = jnp.take_along_axis(kv_pos_BKJc, ids_BKNM.reshape(b, kh, nqb * maxk, 1), axis=2).reshape(
            b, kh, nqb, maxk * block_k)
        visible_BKNQL &= q_pos_BNQ[..., None] >= kv_pos_BKNL[:, :, :, None, :]
    visible_BKN1QL = visible_BKNQL[:, :, :, None]

    # Masked logits stay finite (so no NaN reaches any gradient); rows with no visible key get out 0, lse -inf.
    logits_BKNGQL = jnp.where(visible_BKN1QL, logits_BKNGQL, MASK_VALUE)
    lse_BKNGQ = jax.nn.logsumexp(logits_BKNGQL, axis=-1)
    probs_BKNGQL = jnp.where(visible_BKN1QL, jnp.exp(logits_BKNGQL - lse_BKNGQ[..., None]), 0.0)
    out_BKNGQF = jnp.einsum("bkngql,bknlf->bkngqf", probs_BKNGQL, v_BKNLF.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
    out_BTHF = out_BKNGQF.transpose(0, 2, 4, 1, 3, 5).reshape(b, t, h, f).astype(q_BTHE.dtype)
    if not return_lse:
        return out_BTHF
    lse_BKNGQ = jnp.where(visible_BKN1QL.any(-1), lse_BKNGQ, -jnp.inf)
    return out_BTHF, lse_BKNGQ.transpose(0, 2, 4, 1, 3).reshape(b, t, h)


def unsupported_reason(call) -> None:
    """The reference takes every call the API accepts."""
    return None


def run(call):
    return block_sparse_attention_reference(
        call.q_BTHE, call.k_BSKE, call.v_BSKF, call.kv_block_indices, call.kv_block_counts, block_q=call.block_q,
        block_k=call.block_k, causal=call.causal, q_positions_BT=call.q_positions_BT,
        kv_positions_BS=call.kv_positions_BS, scale=call.scale, return_lse=call.return_lse)
