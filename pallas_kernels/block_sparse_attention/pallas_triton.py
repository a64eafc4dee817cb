"""Block-sparse FlashAttention-2 forward as a Pallas Triton kernel, the "triton" implementation of
block_sparse_attention, with its backward (dQ and dK/dV kernels) in `pallas_triton_bwd.py` behind one
`jax.custom_vjp`.

Forward grid (q tiles, B, H): each program reads its query block's count and kv block ids from the index table (plain
int refs: Triton has no scalar prefetch) and runs the online softmax over the tiles of those blocks only, with a
dynamic fori_loop bound (the axlearn / ragged-attention pattern), loading K/V tiles with `pl.ds(id * block_k, ...)`
from refs spanning the kv head's whole sequence. Work is linear in the count; empty lists cost one store. GQA: query
head h reads kv head h // group and its lists. A query with no visible key writes 0 and lse -inf.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse_attention import pallas_triton_bwd
from pallas_kernels.block_sparse_attention import pallas_triton_common as bc
from pallas_kernels.common import LN2, pad_axis
from pallas_kernels.flash_attention import pallas_triton_common as flash_tiles


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, q_pos_ref, kv_pos_ref, o_ref, lse_ref, *, cfg: bc.Config):
    # q_ref, o_ref [tq, D]; k_ref/v_ref [S, D] (the kv head's whole sequence); idx_ref [NQB, MAXK], cnt_ref [NQB]
    # (the kv head's lists); q_pos_ref [T], kv_pos_ref [S]; lse_ref [tq]
    tq, tk = cfg.fwd_tiles
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    q_start = pl.program_id(0) * tq
    row = q_start // cfg.block_q
    q = flash_tiles.load(q_ref, slice(None), d=dqk)
    q_pos = bc.positions(q_pos_ref, q_start, tq, cfg)

    def body(n, carry):
        acc, m, l = carry
        k_start = bc.listed_tile_start(idx_ref, row, n, cfg.block_k, tk)
        keys = pl.ds(k_start, tk)
        s, visible = bc.logits(q, flash_tiles.load(k_ref, keys, d=dqk), q_pos,
                               bc.positions(kv_pos_ref, k_start, tk, cfg), cfg)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if visible is not None:  # a row may have seen no visible key yet (m_new == MASK_VALUE)
            p = jnp.where(visible, p, 0.0)
        v = flash_tiles.load(v_ref, keys, d=dv)
        acc = [alpha[:, None] * a + flash_tiles.dot(p.astype(vc.dtype), vc) for a, vc in zip(acc, v)]
        return acc, m_new, alpha * l + p.sum(axis=-1)

    init = (flash_tiles.zeros(tq, dv), jnp.full((tq,), -jnp.inf, jnp.float32), jnp.zeros((tq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, cnt_ref[row] * (cfg.block_k // tk), body, init)
    seen = l > 0.0
    inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)[:, None]
    flash_tiles.store(o_ref, [a * inv_l for a in acc])
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) * LN2, -jnp.inf)


def forward(q_BTHE, k_BSKE, v_BSKF, idx, cnt, q_pos_BT, kv_pos_BS, cfg: bc.Config):
    """Forward kernel on head-dim-padded arrays: (out [B, T, H, F], lse [B, H, T] f32)."""
    b, t, h, dqk = q_BTHE.shape
    s, dv = k_BSKE.shape[1], v_BSKF.shape[3]
    tq, _ = cfg.fwd_tiles
    g = cfg.group
    batch_of, head_of = (lambda i, b, h: b), (lambda i, b, h: h // g)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(t // tq, b, h),
        in_specs=[
            pl.BlockSpec((None, tq, None, dqk), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, s, None, dqk), lambda i, b, h: (b, 0, h // g, 0)),
            pl.BlockSpec((None, s, None, dv), lambda i, b, h: (b, 0, h // g, 0)),
            bc.table_spec(idx, batch_of, head_of), bc.table_spec(cnt, batch_of, head_of),
            bc.position_spec(q_pos_BT, batch_of), bc.position_spec(kv_pos_BS, batch_of),
        ],
        out_specs=[pl.BlockSpec((None, tq, None, dv), lambda i, b, h: (b, i, h, 0)),
                   pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, t, h, dv), q_BTHE.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=bc.compiler_params(cfg), interpret=cfg.interpret, name="block_sparse_fwd",
    )(q_BTHE, k_BSKE, v_BSKF, idx, cnt, q_pos_BT, kv_pos_BS)


# ------------------------------------------------------------------------------------------------------ autodiff

@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, idx, cnt, q_pos, kv_pos, cfg: bc.Config):
    return forward(q, k, v, idx, cnt, q_pos, kv_pos, cfg)


def _attention_fwd(q, k, v, idx, cnt, q_pos, kv_pos, cfg: bc.Config):
    out, lse = forward(q, k, v, idx, cnt, q_pos, kv_pos, cfg)
    return (out, lse), (q, k, v, idx, cnt, q_pos, kv_pos, out, lse)


_attention.defvjp(_attention_fwd, pallas_triton_bwd.attention_backward)


def block_sparse_attention_triton(q_BTHE, k_BSKE, v_BSKF, kv_block_indices, kv_block_counts, *, block_q: int,
                                  block_k: int, causal: bool, q_positions_BT, kv_positions_BS, scale: float,
                                  interpret: bool):
    """Pads head dims to the kernels' tile rules, runs the custom-VJP kernels, slices back: (out [B, T, H, F],
    lse [B, T, H] f32). Inputs are assumed validated (api.block_sparse_attention)."""
    t, s, dv = q_BTHE.shape[1], k_BSKE.shape[1], v_BSKF.shape[3]
    cfg, dqk_pad, dv_pad = bc.make_config(q_BTHE.shape, k_BSKE.shape, dv, block_q=block_q, block_k=block_k,
                                          causal=causal, scale=scale, interpret=interpret)
    q_pos = kv_pos = None
    if causal:
        q_pos = jnp.arange(t, dtype=jnp.int32)[None] if q_positions_BT is None else q_positions_BT
        kv_pos = jnp.arange(s, dtype=jnp.int32)[None] if kv_positions_BS is None else kv_positions_BS
    # Out-of-range ids (only possible with unchecked traced lists) are clamped, as in the xla reference.
    idx = jnp.clip(kv_block_indices, 0, s // block_k - 1)
    out, lse = _attention(pad_axis(q_BTHE, 3, dqk_pad), pad_axis(k_BSKE, 3, dqk_pad), pad_axis(v_BSKF, 3, dv_pad),
                          idx, kv_block_counts, q_pos, kv_pos, cfg)
    return out[..., :dv], jnp.swapaxes(lse, 1, 2)


def unsupported_reason(call) -> str | None:
    for name in ("block_q", "block_k"):
        block = getattr(call, name)
        if block < 16 or block & (block - 1):
            return f"{name}={block} (the Triton kernels tile blocks that are powers of 2 >= 16)"
    return None


def run(call):
    out, lse = block_sparse_attention_triton(
        call.q_BTHE, call.k_BSKE, call.v_BSKF, call.kv_block_indices, call.kv_block_counts, block_q=call.block_q,
        block_k=call.block_k, causal=call.causal, q_positions_BT=call.q_positions_BT,
        kv_positions_BS=call.kv_positions_BS, scale=call.scale, interpret=call.interpret)
    return (out, lse) if call.return_lse else out
