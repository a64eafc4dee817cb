"""Chunked linear attention as Pallas Triton kernels: the "triton" implementation of chunked_linear_attention. The
forward is here; its backward (dQ, dK/dV kernels) is in `pallas_triton_bwd.py`, behind one `jax.custom_vjp`.

Lightning Attention-2's fused forward (arXiv 2401.04658; OpenNLPLab lightning_attn2.py `_fwd_kernel`) with Mamba-2's
data-dependent scalar decay: grid (B, H, value-column tiles); each program keeps its [E, block_f] float32 state in
registers and loops over the chunks in order (state is never carried across grid steps: on GPU that is undefined).
Per chunk of C tokens, with G the chunk-local cumulative log decay (cumsum in the kernel, float32):

    o     = scale * [ (q k^T * exp(G_i - G_j))_{i>=j} v  +  (q * exp(G)) S ]
    S     = exp(G_last) * S + (k * exp(G_last - G))^T v

Every exponent is <= 0 and masked before exp (`pallas_triton_common.chunk_decays`, which also applies the document
masks of packed sequences). The decays are multiplied into the operands before they are cast to the input dtype
for the tensor-core dots, which accumulate in float32 (fp32 inputs: IEEE dots). Value-column tiles recompute
q k^T, as Lightning-2 does, to fill the GPU when B * H is small.

Per-key-dimension decays (GLA, log_decay [B, T, H, E]) are declined (`unsupported_reason`), so they run on the XLA
reference: "auto" and sequences fall through to "xla", and implementation="triton" alone raises naming it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.chunked_linear_attention import pallas_triton_bwd
from pallas_kernels.chunked_linear_attention import pallas_triton_common as tc
from pallas_kernels.chunked_linear_attention.reference import mask_past_lengths, segment_resets
from pallas_kernels.common import pad_axis


def _forward_kernel(q_ref, k_ref, v_ref, g_ref, r_ref, s0_ref, o_ref, s_ref, *, cfg: tc.Config):
    # q_ref, k_ref: [T_pad, E_pad]; v_ref, o_ref: [T_pad, block_f]; g_ref: [T_pad] f32; r_ref: [T_pad] int32 or
    # None; s0_ref (or None), s_ref: [E_pad, block_f] f32
    dtype, chunk = q_ref.dtype, cfg.chunk_size

    def body(c, s):
        rows = tc.chunk_rows(c, chunk)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        decay = tc.chunk_decays(g_ref, r_ref, rows)
        a = tc.dot(q, k, trans_b=True) * decay.pair
        o = tc.dot(a.astype(dtype), v) + tc.dot(tc.scale_rows(q, decay.read), s.astype(dtype))
        o_ref[rows, :] = (cfg.scale * o).astype(o_ref.dtype)
        return decay.carry * s + tc.dot(tc.scale_rows(k, decay.write), v, trans_a=True)

    s = jnp.zeros(s_ref.shape, jnp.float32) if s0_ref is None else s0_ref[...]
    s_ref[...] = lax.fori_loop(0, q_ref.shape[0] // chunk, body, s)


def forward(q, k, v, g, resets, s0, cfg: tc.Config):
    """The forward kernel on padded arrays (q, k [B, T_pad, K, E_pad]; v [B, T_pad, H, F_pad]; g [B, T_pad, H] f32;
    resets [B, T_pad] int32 or None; s0 [B, H, E_pad, F_pad] f32 or None): (o [B, T_pad, H, F_pad] in q's dtype,
    final state [B, H, E_pad, F_pad] f32)."""
    b, _, h, f_pad = v.shape
    spec = tc.specs(q.shape, v.shape, cfg)
    state_spec = None if s0 is None else spec["state"]
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=tc.grid(v.shape, cfg),
        in_specs=[spec["qk"], spec["qk"], spec["value"], spec["token"],
                  None if resets is None else spec["resets"], state_spec],
        out_specs=[spec["value"], spec["state"]],
        out_shape=[jax.ShapeDtypeStruct(v.shape, q.dtype), jax.ShapeDtypeStruct((b, h, q.shape[3], f_pad),
                                                                                 jnp.float32)],
        compiler_params=tc.compiler_params(q.shape[3], cfg.block_f),
        interpret=cfg.interpret,
        name="chunked_linear_attention_fwd",
    )(q, k, v, g, resets, s0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _linear_attention(q, k, v, g, resets, s0, cfg: tc.Config):
    return forward(q, k, v, g, resets, s0, cfg)


def _linear_attention_fwd(q, k, v, g, resets, s0, cfg: tc.Config):
    o, s = forward(q, k, v, g, resets, s0, cfg)
    return (o, s), (q, k, v, g, resets, s0, s)


_linear_attention.defvjp(_linear_attention_fwd, pallas_triton_bwd.linear_attention_backward)


def unsupported_reason(call) -> str | None:
    if call.log_decay_BTH.ndim == 4:
        return ("per-key-dimension log_decay [B, T, H, E] (GLA) is not supported: the Triton kernels take scalar "
                "decays per head only (the XLA reference takes both)")
    if call.chunk_size < 16 or call.chunk_size & (call.chunk_size - 1):
        return f"chunk_size must be a power of 2 >= 16 (Triton's tile rule), got {call.chunk_size}"
    return None


def run(call):
    """Pads to the kernels' tile rules (T to chunks, E and F to powers of 2 >= 16: no-ops for the usual widths and
    training lengths), runs the custom-VJP kernels and slices back."""
    k, v, log_decay = mask_past_lengths(call.k_BTKE, call.v_BTHF, call.log_decay_BTH, call.lengths_B)
    _, t, _, e = call.q_BTKE.shape
    f = v.shape[3]
    t_pad, e_pad, f_pad, block_f = tc.padded_sizes(t, e, f, call.chunk_size)
    q, k = (pad_axis(pad_axis(x, 1, t_pad), 3, e_pad) for x in (call.q_BTKE, k))
    v = pad_axis(pad_axis(v, 1, t_pad), 3, f_pad)
    g = pad_axis(log_decay.astype(jnp.float32), 1, t_pad)  # padded tokens: decay 1, k = v = 0
    resets = (None if call.segment_ids_BT is None
              else segment_resets(call.segment_ids_BT, call.lengths_B, call.chunk_size))
    s0 = (None if call.initial_state_BHEF is None
          else pad_axis(pad_axis(call.initial_state_BHEF, 2, e_pad), 3, f_pad))
    cfg = tc.Config(scale=call.scale, chunk_size=call.chunk_size, block_f=block_f, interpret=call.interpret)
    o, s = _linear_attention(q, k, v, g, resets, s0, cfg)
    return o[:, :t, :, :f], s[:, :, :e, :f]
