"""Backward of the chunked linear attention Triton forward (`pallas_triton.py`) as Pallas Triton kernels, on the
residuals it saves (q, k, v, log decay, document resets, initial state, final state): Lightning Attention-2's
Algorithm 2 (arXiv 2401.04658) with Mamba-2's data-dependent decay and the document masks of packed sequences.

Per chunk, with the factors of `pallas_triton_common.ChunkDecays` (D = pair, read, write, carry), S_in the state
entering the chunk, dS the cotangent of the state leaving it, and dO' = scale * dO:

    dP    = (dO' v^T) * D                          A = (q k^T) * D
    dq    = dP k + (dO' * read) S_in^T             forward loop over chunks, carrying S   (`_dq_kernel`)
    dk    = dP^T q + (v * write) dS^T              reverse loop over chunks, carrying dS  (`_dkv_kernel`)
    dv    = A^T dO' + (k * write) dS
    dS_in = carry * dS + (q * read)^T dO'          (the cotangent of the final state starts it; the state
                                                    entering chunk 0 gives d(initial state))

Both kernels use the forward's grid (B, H, value-column tiles) and its [E_pad, block_f] float32 carry (S or dS), so
nothing but the inputs is read from HBM and no per-chunk state is materialised. dP sums over the value columns, so
with several value tiles (or a GQA group of value heads per q/k head) dq and dk come out as float32 partials per
(value tile, value head) that XLA sums; with one tile and no group they are written in the input dtype directly.

d(log decay) in closed form (GLA, arXiv 2312.06635 section 4.3): every term of o_i carries exp(L_i) and every term
through k_j carries exp(-L_j), with L the cumulative log decay over the sequence, so
d L_t = q_t . dq_t - k_t . dk_t (the kernels write both row sums, per value head, from their float32 accumulators),
the final state adds <dS_final, S_final> to d L_last, and d g_s = sum_{t >= s} d L_t (a reverse cumsum in XLA).
Document resets only remove terms, so the identity holds with them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.chunked_linear_attention import pallas_triton_common as tc


def _dq_kernel(q_ref, k_ref, v_ref, g_ref, r_ref, s0_ref, do_ref, dq_ref, qdq_ref, *, cfg: tc.Config):
    # q_ref, k_ref, dq_ref: [T_pad, E_pad]; v_ref, do_ref: [T_pad, block_f]; g_ref, qdq_ref: [T_pad] f32;
    # r_ref: [T_pad] int32 or None; s0_ref: [E_pad, block_f] f32 or None
    dtype, chunk = q_ref.dtype, cfg.chunk_size

    def body(c, s):
        rows = tc.chunk_rows(c, chunk)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        decay = tc.chunk_decays(g_ref, r_ref, rows)
        dp = tc.dot(do, v, trans_b=True) * decay.pair
        dq = cfg.scale * (tc.dot(dp.astype(dtype), k)
                          + tc.dot(tc.scale_rows(do, decay.read), s.astype(dtype), trans_b=True))
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        qdq_ref[rows] = jnp.sum(q.astype(jnp.float32) * dq, axis=1)
        return decay.carry * s + tc.dot(tc.scale_rows(k, decay.write), v, trans_a=True)

    s = jnp.zeros((q_ref.shape[1], v_ref.shape[1]), jnp.float32) if s0_ref is None else s0_ref[...]
    lax.fori_loop(0, q_ref.shape[0] // chunk, body, s)


def _dkv_kernel(q_ref, k_ref, v_ref, g_ref, r_ref, do_ref, ds_ref, dk_ref, kdk_ref, dv_ref, ds0_ref, *,
                cfg: tc.Config):
    # q_ref, k_ref, dk_ref: [T_pad, E_pad]; v_ref, do_ref, dv_ref: [T_pad, block_f]; g_ref, kdk_ref: [T_pad] f32;
    # r_ref: [T_pad] int32 or None; ds_ref (the final state's cotangent), ds0_ref: [E_pad, block_f] f32
    dtype, chunk = q_ref.dtype, cfg.chunk_size
    num_chunks = q_ref.shape[0] // chunk

    def body(i, ds):
        rows = tc.chunk_rows(num_chunks - 1 - i, chunk)
        q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
        decay = tc.chunk_decays(g_ref, r_ref, rows)
        a = tc.dot(q, k, trans_b=True) * decay.pair
        dp = tc.dot(do, v, trans_b=True) * decay.pair
        ds_operand = ds.astype(dtype)
        dv = cfg.scale * tc.dot(a.astype(dtype), do, trans_a=True) + tc.dot(tc.scale_rows(k, decay.write),
                                                                            ds_operand)
        dk = cfg.scale * tc.dot(dp.astype(dtype), q, trans_a=True) + tc.dot(tc.scale_rows(v, decay.write),
                                                                            ds_operand, trans_b=True)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        kdk_ref[rows] = jnp.sum(k.astype(jnp.float32) * dk, axis=1)
        return decay.carry * ds + cfg.scale * tc.dot(tc.scale_rows(q, decay.read), do, trans_a=True)

    ds0_ref[...] = lax.fori_loop(0, num_chunks, body, ds_ref[...])


def _partials_shape(q, v, cfg: tc.Config):
    """dq / dk partials [value tiles, B, T_pad, H, E_pad] and their row sums q.dq / k.dk [value tiles, B, H, T_pad]."""
    b, t, h, f_pad = v.shape
    tiles = f_pad // cfg.block_f
    one_partial = tiles == 1 and h == q.shape[2]
    return (jax.ShapeDtypeStruct((tiles, b, t, h, q.shape[3]), q.dtype if one_partial else jnp.float32),
            jax.ShapeDtypeStruct((tiles, b, h, t), jnp.float32))


def backward_dq(q, k, v, g, resets, s0, do, cfg: tc.Config):
    """dq partials and q.dq row sums (`_partials_shape`) on padded arrays."""
    spec = tc.specs(q.shape, v.shape, cfg)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=tc.grid(v.shape, cfg),
        in_specs=[spec["qk"], spec["qk"], spec["value"], spec["token"], None if resets is None else spec["resets"],
                  None if s0 is None else spec["state"], spec["value"]],
        out_specs=[spec["qk_partial"], spec["token_partial"]],
        out_shape=list(_partials_shape(q, v, cfg)),
        compiler_params=tc.compiler_params(q.shape[3], cfg.block_f),
        interpret=cfg.interpret,
        name="chunked_linear_attention_bwd_dq",
    )(q, k, v, g, resets, s0, do)


def backward_dkv(q, k, v, g, resets, do, ds_final, cfg: tc.Config):
    """dk partials, k.dk row sums, dv [B, T_pad, H, F_pad] and d(initial state) [B, H, E_pad, F_pad] f32 on padded
    arrays."""
    spec = tc.specs(q.shape, v.shape, cfg)
    dk_shape, kdk_shape = _partials_shape(q, v, cfg)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=tc.grid(v.shape, cfg),
        in_specs=[spec["qk"], spec["qk"], spec["value"], spec["token"], None if resets is None else spec["resets"],
                  spec["value"], spec["state"]],
        out_specs=[spec["qk_partial"], spec["token_partial"], spec["value"], spec["state"]],
        out_shape=[dk_shape, kdk_shape, jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct(ds_final.shape, jnp.float32)],
        compiler_params=tc.compiler_params(q.shape[3], cfg.block_f),
        interpret=cfg.interpret,
        name="chunked_linear_attention_bwd_dkv",
    )(q, k, v, g, resets, do, ds_final)


def linear_attention_backward(cfg: tc.Config, residuals, cotangents):
    """The custom-VJP backward of `pallas_triton._linear_attention` on padded arrays: (dq, dk, dv, d log decay,
    None for the resets, d initial state or None)."""
    q, k, v, g, resets, s0, s_final = residuals
    do, ds_final = cotangents
    do, ds_final = do.astype(v.dtype), ds_final.astype(jnp.float32)
    dq, qdq = backward_dq(q, k, v, g, resets, s0, do, cfg)
    dk, kdk, dv, ds0 = backward_dkv(q, k, v, g, resets, do, ds_final, cfg)
    b, t, kh, e = q.shape

    def per_qk_head(partials):  # [tiles, B, T, H, E] -> [B, T, K, E]: sum value tiles and the group's value heads
        return partials.reshape(partials.shape[0], b, t, kh, -1, e).sum(axis=(0, 4)).astype(q.dtype)

    dlogcum_BHT = jnp.sum(qdq - kdk, axis=0)
    dlogcum_BHT = dlogcum_BHT.at[:, :, -1].add(jnp.sum(ds_final * s_final, axis=(2, 3)))
    dg_BTH = lax.cumsum(dlogcum_BHT, axis=2, reverse=True).transpose(0, 2, 1)
    return per_qk_head(dq), per_qk_head(dk), dv, dg_BTH.astype(g.dtype), None, None if s0 is None else ds0
