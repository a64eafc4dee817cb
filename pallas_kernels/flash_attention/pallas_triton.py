"""FlashAttention-2 forward as a Pallas Triton kernel (Dao, https://arxiv.org/abs/2307.08691), the "triton"
implementation of flash_attention, with its backward (dQ and dK/dV kernels) in `pallas_triton_bwd.py` behind one
`jax.custom_vjp`.

Layout [batch, seq, heads, head_dim]. Forward grid (q blocks, B, Hq): online softmax over the visible KV blocks;
writes out (gated in the epilogue) and the natural-log lse [B, Hq, T] that the backward and branch merges need.
GQA/MQA: q head h reads kv head h // group through the BlockSpec index maps. Softmax runs in base 2 (logits
prescaled by log2(e), then exp2). Causal and sliding-window loops skip fully masked blocks with dynamic fori_loop
bounds; one masking helper (`pallas_triton_common.logits`) serves all three kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import LN2, pad_axis
from pallas_kernels.flash_attention import pallas_triton_bwd
from pallas_kernels.flash_attention import pallas_triton_common as tc


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, gate_ref, o_ref, lse_ref, o_ungated_ref=None, *, cfg: tc.Config):
    # q_ref [bq, Dqk]; k_ref [S, Dqk], v_ref [S, Dv] (whole sequence of one kv head); seg_ref [L]; gate_ref [bq]
    # o_ref, o_ungated_ref [bq, Dv]; lse_ref [bq]
    block_q, block_k = cfg.fwd_blocks
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    q_start = pl.program_id(0) * block_q
    q = tc.load(q_ref, slice(None), d=dqk)

    def body(j, carry):
        acc, m, l = carry
        k_start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        s, _ = tc.logits(q, tc.load(k_ref, keys, d=dqk), q_start, k_start, seg_ref, cfg)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = tc.load(v_ref, keys, d=dv)
        acc = [alpha[:, None] * a + tc.dot(p.astype(vc.dtype), vc) for a, vc in zip(acc, v)]
        return acc, m_new, alpha * l + p.sum(axis=-1)

    init = (tc.zeros(block_q, dv), jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(*tc.kv_block_range(q_start, block_q, block_k, cfg), body, init)
    inv_l = (1.0 / l)[:, None]  # l >= 1: the row maximum contributes exp2(0)
    out = [a * inv_l for a in acc]
    if o_ungated_ref is not None:
        tc.store(o_ungated_ref, out)
    if gate_ref is not None:
        gate = gate_ref[...].astype(jnp.float32)[:, None]
        out = [o * gate for o in out]
    tc.store(o_ref, out)
    lse_ref[...] = (m + jnp.log2(l)) * LN2


def forward(q_BTHE, k_BSKE, v_BSKF, gate_BTH, seg_BL, cfg: tc.Config, *, save_ungated: bool):
    """Forward kernel on padded arrays: (out [B,T,Hq,Dv], lse [B,Hq,T] f32, ungated out or None)."""
    b, t, hq, _ = q_BTHE.shape
    dv = v_BSKF.shape[3]
    block_q, _ = cfg.fwd_blocks
    out_shape = [jax.ShapeDtypeStruct((b, t, hq, dv), q_BTHE.dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)]
    o_spec = pl.BlockSpec((None, block_q, None, dv), lambda i, b, h: (b, i, h, 0))
    out_specs = [o_spec, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))]
    if save_ungated:
        out_shape.append(out_shape[0])
        out_specs.append(o_spec)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(t // block_q, b, hq),
        in_specs=tc.per_query_block_specs(q_BTHE, k_BSKE, v_BSKF, gate_BTH, seg_BL, block_q, cfg.group),
        out_specs=out_specs, out_shape=out_shape, compiler_params=tc.compiler_params(cfg),
        interpret=cfg.interpret, name="flash_fwd",
    )(q_BTHE, k_BSKE, v_BSKF, seg_BL, gate_BTH)
    return outs[0], outs[1], outs[2] if save_ungated else None


# ------------------------------------------------------------------------------------------------------ autodiff

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, gate, seg, cfg: tc.Config):
    out, lse, _ = forward(q, k, v, gate, seg, cfg, save_ungated=False)
    return out, lse


def _attention_fwd(q, k, v, gate, seg, cfg: tc.Config):
    out, lse, o_ungated = forward(q, k, v, gate, seg, cfg, save_ungated=gate is not None)
    return (out, lse), (q, k, v, gate, seg, out if gate is None else o_ungated, lse)


_attention.defvjp(_attention_fwd, pallas_triton_bwd.attention_backward)


def flash_attention_triton(q_BTHE, k_BSKE, v_BSKF, *, gate_BTH=None, segment_ids_BT=None, causal: bool,
                           sliding_window: int | None, scale: float, logits_soft_cap: float | None,
                           block_q: int | None, block_k: int | None, interpret: bool):
    """Pads to the kernels' tile rules, runs the custom-VJP kernels, and slices back: (out [B,T,Hq,Dv],
    lse [B,Hq,T] f32). Inputs are assumed validated (api.flash_attention)."""
    t, dv = q_BTHE.shape[1], v_BSKF.shape[3]
    cfg, t_pad, s_pad, dqk_pad, dv_pad = tc.make_config(
        q_BTHE.shape, k_BSKE.shape, dv, causal=causal, sliding_window=sliding_window, scale=scale,
        logits_soft_cap=logits_soft_cap, block_q=block_q, block_k=block_k, interpret=interpret)
    q = pad_axis(pad_axis(q_BTHE, 3, dqk_pad), 1, t_pad)
    k = pad_axis(pad_axis(k_BSKE, 3, dqk_pad), 1, s_pad)
    v = pad_axis(pad_axis(v_BSKF, 3, dv_pad), 1, s_pad)
    gate = None if gate_BTH is None else pad_axis(gate_BTH, 1, t_pad)
    seg = None if segment_ids_BT is None else pad_axis(segment_ids_BT.astype(jnp.int32), 1, max(t_pad, s_pad), -1)
    out, lse = _attention(q, k, v, gate, seg, cfg)
    return out[:, :t, :, :dv], lse[:, :, :t]


def unsupported_reason(call) -> None:
    """The Triton kernels take every call the API accepts (off GPU in interpret mode)."""
    return None


def run(call):
    out, lse = flash_attention_triton(
        call.q_BTHE, call.k_BSKE, call.v_BSKF, gate_BTH=call.gate_BTH, segment_ids_BT=call.segment_ids_BT,
        causal=call.causal, sliding_window=call.sliding_window, scale=call.scale,
        logits_soft_cap=call.logits_soft_cap, block_q=call.block_q, block_k=call.block_k, interpret=call.interpret)
    return (out, lse) if call.return_lse else out
