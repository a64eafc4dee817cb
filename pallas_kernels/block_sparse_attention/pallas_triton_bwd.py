"""Block-sparse FlashAttention-2 backward as Pallas Triton kernels, beside the forward in `pallas_triton.py`, on the
residuals (q, k, v, lists, positions, out, lse) it saves:

  dQ       grid (q tiles, B, H):   loops over the tiles of its query block's listed kv blocks (kv_block_indices).
  dK/dV    grid (kv tiles, B, K):  loops over the q heads of its GQA group and the tiles of the query blocks that
                                   list its kv block (the transposed lists of `transpose_block_indices`, built on
                                   device: no atomics, deterministic), so dK/dV are written once per kv head.

delta = rowsum(dO * O) - dlse runs in XLA (an lse cotangent folds into delta since d lse / d logits = P).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.block_sparse_attention import pallas_triton_common as bc
from pallas_kernels.block_sparse_attention.api import transpose_block_indices
from pallas_kernels.common import LOG2E
from pallas_kernels.flash_attention import pallas_triton_common as flash_tiles


def _probs_and_dlogits(q, k, v, do, lse, delta, q_pos, kv_pos, cfg: bc.Config):
    """Backward of one tile: P (masked entries underflow to exactly 0: lse is finite) and dS = dL/d(q.k) / scale."""
    s, _ = bc.logits(q, k, q_pos, kv_pos, cfg)
    p = jnp.exp2(s - (lse * LOG2E)[:, None])
    return p, p * (flash_tiles.dot_nt(do, v) - delta[:, None])


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, q_pos_ref, kv_pos_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: bc.Config):
    # q_ref, dq_ref [tq, Dqk]; do_ref [tq, Dv]; lse_ref, delta_ref [tq]; k_ref/v_ref [S, D] of the kv head
    tq, tk = cfg.dq_tiles
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    q_start = pl.program_id(0) * tq
    row = q_start // cfg.block_q
    q = flash_tiles.load(q_ref, slice(None), d=dqk)
    do = flash_tiles.load(do_ref, slice(None), d=dv)
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = bc.positions(q_pos_ref, q_start, tq, cfg)

    def body(n, dq):
        k_start = bc.listed_tile_start(idx_ref, row, n, cfg.block_k, tk)
        keys = pl.ds(k_start, tk)
        k = flash_tiles.load(k_ref, keys, d=dqk)
        _, ds = _probs_and_dlogits(q, k, flash_tiles.load(v_ref, keys, d=dv), do, lse, delta, q_pos,
                                   bc.positions(kv_pos_ref, k_start, tk, cfg), cfg)
        ds = ds.astype(k[0].dtype)
        return [a + flash_tiles.dot(ds, kc) for a, kc in zip(dq, k)]

    dq = lax.fori_loop(0, cnt_ref[row] * (cfg.block_k // tk), body, flash_tiles.zeros(tq, dqk))
    flash_tiles.store(dq_ref, [a * cfg.scale for a in dq])


def _dkv_kernel(q_ref, k_ref, v_ref, q_idx_ref, q_cnt_ref, q_pos_ref, kv_pos_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg: bc.Config):
    # q_ref [T, G, Dqk], do_ref [T, G, Dv]: the G q heads of this kv head; lse_ref, delta_ref [G, T];
    # q_idx_ref [NKB, NQB], q_cnt_ref [NKB]: the transposed lists; k_ref, dk_ref [tk, Dqk]; v_ref, dv_ref [tk, Dv]
    tq, tk = cfg.dkv_tiles
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    k_start = pl.program_id(0) * tk
    row = k_start // cfg.block_k
    k = flash_tiles.load(k_ref, slice(None), d=dqk)
    v = flash_tiles.load(v_ref, slice(None), d=dv)
    kv_pos = bc.positions(kv_pos_ref, k_start, tk, cfg)
    n_tiles = q_cnt_ref[row] * (cfg.block_q // tq)

    def head(h, carry):
        def body(n, carry):
            dk, dv_acc = carry
            q_start = bc.listed_tile_start(q_idx_ref, row, n, cfg.block_q, tq)
            rows = pl.ds(q_start, tq)
            q = flash_tiles.load(q_ref, rows, h, d=dqk)
            do = flash_tiles.load(do_ref, rows, h, d=dv)
            p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[h, rows], delta_ref[h, rows],
                                       bc.positions(q_pos_ref, q_start, tq, cfg), kv_pos, cfg)
            p, ds = p.astype(do[0].dtype), ds.astype(q[0].dtype)
            return ([a + flash_tiles.dot(ds, qc, trans_a=True) for a, qc in zip(dk, q)],
                    [a + flash_tiles.dot(p, dc, trans_a=True) for a, dc in zip(dv_acc, do)])
        return lax.fori_loop(0, n_tiles, body, carry)

    dk, dv_acc = lax.fori_loop(0, cfg.group, head, (flash_tiles.zeros(tk, dqk), flash_tiles.zeros(tk, dv)))
    flash_tiles.store(dk_ref, [a * cfg.scale for a in dk])
    flash_tiles.store(dv_ref, dv_acc)


# ------------------------------------------------------------------------------------------------ pallas_calls

def backward_dq(q, k, v, idx, cnt, q_pos, kv_pos, do, lse_BHT, delta_BHT, cfg: bc.Config):
    b, t, h, dqk = q.shape
    s, dv = k.shape[1], v.shape[3]
    tq, _ = cfg.dq_tiles
    g = cfg.group
    batch_of, head_of = (lambda i, b, h: b), (lambda i, b, h: h // g)
    row_spec = pl.BlockSpec((None, None, tq), lambda i, b, h: (b, h, i))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(t // tq, b, h),
        in_specs=[
            pl.BlockSpec((None, tq, None, dqk), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, s, None, dqk), lambda i, b, h: (b, 0, h // g, 0)),
            pl.BlockSpec((None, s, None, dv), lambda i, b, h: (b, 0, h // g, 0)),
            bc.table_spec(idx, batch_of, head_of), bc.table_spec(cnt, batch_of, head_of),
            bc.position_spec(q_pos, batch_of), bc.position_spec(kv_pos, batch_of),
            pl.BlockSpec((None, tq, None, dv), lambda i, b, h: (b, i, h, 0)),
            row_spec, row_spec,
        ],
        out_specs=pl.BlockSpec((None, tq, None, dqk), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=bc.compiler_params(cfg),
        interpret=cfg.interpret, name="block_sparse_dq",
    )(q, k, v, idx, cnt, q_pos, kv_pos, do, lse_BHT, delta_BHT)


def backward_dkv(q, k, v, q_idx, q_cnt, q_pos, kv_pos, do, lse_BHT, delta_BHT, cfg: bc.Config):
    b, t, _, dqk = q.shape
    s, kh, dv = k.shape[1], k.shape[2], v.shape[3]
    _, tk = cfg.dkv_tiles
    g = cfg.group
    batch_of, head_of = (lambda j, b, kh: b), (lambda j, b, kh: kh)
    group_rows = pl.BlockSpec((None, g, t), lambda j, b, kh: (b, kh, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(s // tk, b, kh),
        in_specs=[
            pl.BlockSpec((None, t, g, dqk), lambda j, b, kh: (b, 0, kh, 0)),
            pl.BlockSpec((None, tk, None, dqk), lambda j, b, kh: (b, j, kh, 0)),
            pl.BlockSpec((None, tk, None, dv), lambda j, b, kh: (b, j, kh, 0)),
            bc.table_spec(q_idx, batch_of, head_of), bc.table_spec(q_cnt, batch_of, head_of),
            bc.position_spec(q_pos, batch_of), bc.position_spec(kv_pos, batch_of),
            pl.BlockSpec((None, t, g, dv), lambda j, b, kh: (b, 0, kh, 0)),
            group_rows, group_rows,
        ],
        out_specs=[pl.BlockSpec((None, tk, None, dqk), lambda j, b, kh: (b, j, kh, 0)),
                   pl.BlockSpec((None, tk, None, dv), lambda j, b, kh: (b, j, kh, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=bc.compiler_params(cfg), interpret=cfg.interpret, name="block_sparse_dkv",
    )(q, k, v, q_idx, q_cnt, q_pos, kv_pos, do, lse_BHT, delta_BHT)


def attention_backward(cfg: bc.Config, res, cotangents):
    """The custom-VJP backward of `pallas_triton`'s forward: res = (q, k, v, idx, cnt, q_pos, kv_pos, out, lse);
    returns (dq, dk, dv) and None for the integer inputs."""
    q, k, v, idx, cnt, q_pos, kv_pos, out, lse_BHT = res
    d_out, d_lse_BHT = cotangents
    delta_BHT = jnp.swapaxes(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 1, 2) - d_lse_BHT
    # Rows with no visible key (lse -inf) have P == 0: a finite stand-in keeps exp2(masked - lse) at exactly 0.
    lse_BHT = jnp.where(jnp.isfinite(lse_BHT), lse_BHT, 0.0)
    common = (q_pos, kv_pos, d_out, lse_BHT, delta_BHT, cfg)
    dq = backward_dq(q, k, v, idx, cnt, *common)
    q_idx, q_cnt = transpose_block_indices(idx, cnt, num_kv_blocks=k.shape[1] // cfg.block_k)
    dk, dv = backward_dkv(q, k, v, q_idx, q_cnt, *common)
    return dq, dk, dv, None, None, None, None
