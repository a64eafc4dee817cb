"""FlashAttention-2 backward as Pallas Triton kernels (Dao, https://arxiv.org/abs/2307.08691), beside the forward in
`pallas_triton.py`, on the residuals (q, k, v, gate, segment ids, ungated out, lse) that forward saves:

  dQ       grid (q blocks, B, Hq):  loops over the visible KV blocks.
  dK/dV    grid (kv blocks, B, Hkv): loops over the q heads of its GQA group and their visible q blocks, so dK/dV
                                    are written once per kv head with no extra reduction.

delta = rowsum(dO * O) runs in XLA. `attention_backward` is the custom-VJP backward of the Triton forward;
`flash_attention_backward` is the public entry for another forward kernel that saves the same residuals (the
Mosaic GPU forward in `pallas_mosaic_gpu.py`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import LOG2E, round_up
from pallas_kernels.flash_attention import pallas_triton_common as tc


def _load_do(do_ref, gate_ref, *index, d: int) -> list[jax.Array]:
    """dO tile with the output gate folded in (the cotangent of the ungated attention output)."""
    do = tc.load(do_ref, *index, d=d)
    if gate_ref is None:
        return do
    gate = gate_ref[index].astype(jnp.float32)[:, None]
    return [(c.astype(jnp.float32) * gate).astype(c.dtype) for c in do]


def _probs_and_dlogits(q, k, v, do, lse, delta, q_start, k_start, seg_ref, cfg: tc.Config):
    """Backward of one tile: P = softmax probabilities and dS = d loss / d(q.k) (without the softmax scale)."""
    s, dcap = tc.logits(q, k, q_start, k_start, seg_ref, cfg)
    p = jnp.exp2(s - (lse * LOG2E)[:, None])
    ds = p * (tc.dot_nt(do, v) - delta[:, None])
    return p, ds if dcap is None else ds * dcap


def _q_block_range(k_start, block_q: int, block_k: int, seq_q_padded: int, cfg: tc.Config):
    """[lo, hi) of the q blocks whose queries can see keys k_start .. k_start + block_k - 1."""
    lo = lax.div(k_start, block_q) if cfg.causal else 0
    hi = seq_q_padded // block_q
    if cfg.window is not None:
        hi = jnp.minimum(hi, lax.div(k_start + block_k + cfg.window - 2 + block_q, block_q))
    return lo, hi


# ------------------------------------------------------------------------------------------------------ kernels

def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, gate_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: tc.Config):
    # q_ref, dq_ref [bq, Dqk]; do_ref [bq, Dv]; lse_ref, delta_ref, gate_ref [bq]; k_ref/v_ref [S, D] of the kv head
    block_q, block_k = cfg.dq_blocks
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    q_start = pl.program_id(0) * block_q
    q = tc.load(q_ref, slice(None), d=dqk)
    do = _load_do(do_ref, gate_ref, slice(None), d=dv)
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        k_start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        k = tc.load(k_ref, keys, d=dqk)
        _, ds = _probs_and_dlogits(q, k, tc.load(v_ref, keys, d=dv), do, lse, delta, q_start, k_start, seg_ref, cfg)
        ds = ds.astype(k[0].dtype)
        return [a + tc.dot(ds, kc) for a, kc in zip(dq, k)]

    dq = lax.fori_loop(*tc.kv_block_range(q_start, block_q, block_k, cfg), body, tc.zeros(block_q, dqk))
    tc.store(dq_ref, [a * cfg.scale for a in dq])


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, gate_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cfg: tc.Config):
    # q_ref [T, G, Dqk], do_ref [T, G, Dv], gate_ref [T, G]: the G q heads of this kv head over the whole sequence;
    # lse_ref, delta_ref [G, T]; k_ref, dk_ref [bk, Dqk]; v_ref, dv_ref [bk, Dv]
    block_q, block_k = cfg.dkv_blocks
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    k_start = pl.program_id(0) * block_k
    k = tc.load(k_ref, slice(None), d=dqk)
    v = tc.load(v_ref, slice(None), d=dv)
    lo, hi = _q_block_range(k_start, block_q, block_k, q_ref.shape[0], cfg)

    def head(h, carry):
        def body(i, carry):
            dk, dv_acc = carry
            q_start = pl.multiple_of(i * block_q, block_q)
            rows = pl.ds(q_start, block_q)
            q = tc.load(q_ref, rows, h, d=dqk)
            do = _load_do(do_ref, gate_ref, rows, h, d=dv)
            p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[h, rows], delta_ref[h, rows], q_start, k_start,
                                       seg_ref, cfg)
            p, ds = p.astype(do[0].dtype), ds.astype(q[0].dtype)
            return ([a + tc.dot(ds, qc, trans_a=True) for a, qc in zip(dk, q)],
                    [a + tc.dot(p, dc, trans_a=True) for a, dc in zip(dv_acc, do)])
        return lax.fori_loop(lo, hi, body, carry)

    dk, dv_acc = lax.fori_loop(0, cfg.group, head, (tc.zeros(block_k, dqk), tc.zeros(block_k, dv)))
    tc.store(dk_ref, [a * cfg.scale for a in dk])
    tc.store(dv_ref, dv_acc)


# ------------------------------------------------------------------------------------------------ pallas_calls

def backward_dq(q_BTHE, k_BSKE, v_BSKF, gate_BTH, seg_BL, do_BTHF, lse_BHT, delta_BHT, cfg: tc.Config):
    b, t, hq, dqk = q_BTHE.shape
    dv = v_BSKF.shape[3]
    block_q, _ = cfg.dq_blocks
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(t // block_q, b, hq),
        in_specs=[
            *tc.per_query_block_specs(q_BTHE, k_BSKE, v_BSKF, gate_BTH, seg_BL, block_q, cfg.group),
            pl.BlockSpec((None, block_q, None, dv), lambda i, b, h: (b, i, h, 0)),
            row_spec, row_spec,
        ],
        out_specs=pl.BlockSpec((None, block_q, None, dqk), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q_BTHE.shape, q_BTHE.dtype), compiler_params=tc.compiler_params(cfg),
        interpret=cfg.interpret, name="flash_dq",
    )(q_BTHE, k_BSKE, v_BSKF, seg_BL, gate_BTH, do_BTHF, lse_BHT, delta_BHT)


def backward_dkv(q_BTHE, k_BSKE, v_BSKF, gate_BTH, seg_BL, do_BTHF, lse_BHT, delta_BHT, cfg: tc.Config):
    b, t, _, dqk = q_BTHE.shape
    s, hkv, dv = k_BSKE.shape[1], k_BSKE.shape[2], v_BSKF.shape[3]
    _, block_k = cfg.dkv_blocks
    g = cfg.group
    group_rows = pl.BlockSpec((None, g, t), lambda j, b, kh: (b, kh, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(s // block_k, b, hkv),
        in_specs=[
            pl.BlockSpec((None, t, g, dqk), lambda j, b, kh: (b, 0, kh, 0)),
            pl.BlockSpec((None, block_k, None, dqk), lambda j, b, kh: (b, j, kh, 0)),
            pl.BlockSpec((None, block_k, None, dv), lambda j, b, kh: (b, j, kh, 0)),
            None if seg_BL is None else pl.BlockSpec((None, seg_BL.shape[1]), lambda j, b, kh: (b, 0)),
            None if gate_BTH is None else pl.BlockSpec((None, t, g), lambda j, b, kh: (b, 0, kh)),
            pl.BlockSpec((None, t, g, dv), lambda j, b, kh: (b, 0, kh, 0)),
            group_rows, group_rows,
        ],
        out_specs=[pl.BlockSpec((None, block_k, None, dqk), lambda j, b, kh: (b, j, kh, 0)),
                   pl.BlockSpec((None, block_k, None, dv), lambda j, b, kh: (b, j, kh, 0))],
        out_shape=[jax.ShapeDtypeStruct(k_BSKE.shape, k_BSKE.dtype), jax.ShapeDtypeStruct(v_BSKF.shape, v_BSKF.dtype)],
        compiler_params=tc.compiler_params(cfg), interpret=cfg.interpret, name="flash_dkv",
    )(q_BTHE, k_BSKE, v_BSKF, seg_BL, gate_BTH, do_BTHF, lse_BHT, delta_BHT)


def attention_backward(cfg: tc.Config, res, cotangents):
    """The custom-VJP backward of `pallas_triton`'s forward: res = (q, k, v, gate, seg, ungated out, lse) on the
    padded arrays of `cfg`; returns (dq, dk, dv, dgate, None)."""
    q, k, v, gate, seg, o_ungated, lse_BHT = res
    d_out, d_lse_BHT = cotangents
    # rowsum(dOut * O): with a gate this is dgate, and delta = rowsum(gate*dOut * O) = gate * dgate.
    rowsum_BTH = jnp.sum(d_out.astype(jnp.float32) * o_ungated.astype(jnp.float32), axis=-1)
    dgate = None if gate is None else rowsum_BTH.astype(gate.dtype)
    delta_BTH = rowsum_BTH if gate is None else rowsum_BTH * gate.astype(jnp.float32)
    # d lse / d logits = P, so an lse cotangent folds into delta: dS = P * (dP - (delta - d_lse)).
    delta_BHT = jnp.swapaxes(delta_BTH, 1, 2) - d_lse_BHT
    args = (q, k, v, gate, seg, d_out, lse_BHT, delta_BHT, cfg)
    dq = backward_dq(*args)
    dk, dv = backward_dkv(*args)
    return dq, dk, dv, dgate, None


def seq_multiple(head_dim: int) -> int:
    """The backward's default tiles divide every sequence padded to a multiple of this (for head dims <= head_dim)."""
    return max(max(blocks) for blocks in tc.default_blocks(round_up(head_dim, 16)))


def flash_attention_backward(res, cotangents, *, causal: bool, scale: float, seq_k: int, interpret: bool):
    """dq, dk, dv for another forward kernel's residuals res = (q, k, v, out, lse), without window, segment ids,
    soft cap or gate; q, k, v padded along seq to multiples of `seq_multiple(head_dim)`, keys >= seq_k masked."""
    q, k, v, out, lse = res
    cfg, t_pad, s_pad, dqk_pad, dv_pad = tc.make_config(
        q.shape, k.shape, v.shape[3], causal=causal, sliding_window=None, scale=scale, logits_soft_cap=None,
        block_q=None, block_k=None, interpret=interpret)
    assert (t_pad, s_pad, dqk_pad, dv_pad) == (q.shape[1], k.shape[1], q.shape[3], v.shape[3]), (q.shape, v.shape)
    dq, dk, dv, _, _ = attention_backward(dataclasses.replace(cfg, seq_k=seq_k), (q, k, v, None, None, out, lse),
                                          cotangents)
    return dq, dk, dv
