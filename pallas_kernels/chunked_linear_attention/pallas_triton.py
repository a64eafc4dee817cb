"""Chunked linear attention as a Pallas Triton kernel: the "triton" implementation of chunked_linear_attention
(forward; the backward recomputes through the XLA reference's VJP for now).

Lightning Attention-2's fused forward (arXiv 2401.04658; OpenNLPLab lightning_attn2.py `_fwd_kernel`) with Mamba-2's
data-dependent scalar decay: grid (B, H, value-column tiles); each program keeps its [E, block_f] float32 state in
registers and loops over the chunks in order (state is never carried across grid steps: on GPU that is undefined).
Per chunk of C tokens, with G the chunk-local cumulative log decay (cumsum in the kernel, float32):

    o     = scale * [ (q k^T * exp(G_i - G_j))_{i>=j} v  +  (q * exp(G)) S ]
    S     = exp(G_last) * S + (k * exp(G_last - G))^T v

Every exponent is <= 0 and masked before exp. The decays are multiplied into the operands before they are cast to
the input dtype for the tensor-core dots, which accumulate in float32 (fp32 inputs: IEEE dots). Value-column tiles
recompute q k^T, as Lightning-2 does, to fill the GPU when B * H is small.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.chunked_linear_attention.reference import (chunked_linear_attention_reference,
                                                                mask_past_lengths)
from pallas_kernels.common import cdiv, next_power_of_2, pad_axis

STATE_ELEMENTS = 128 * 64  # float32 state tile per program (E x block_f): 32 KiB of registers


@dataclasses.dataclass(frozen=True)
class Config:
    """Static options of one call (hashable: the custom VJP's non-differentiable argument)."""
    scale: float
    chunk_size: int
    interpret: bool


def _kernel(q_ref, k_ref, v_ref, g_ref, *refs, chunk: int, num_chunks: int, scale: float, has_initial_state: bool,
            precision):
    # q_ref, k_ref: [T_pad, E_pad]; v_ref, o_ref: [T_pad, block_f]; g_ref: [T_pad] f32; s0_ref, s_ref: [E_pad,
    # block_f] f32
    s0_ref, o_ref, s_ref = refs if has_initial_state else (None, *refs)
    pos = jnp.arange(chunk)
    causal = pos[:, None] >= pos[None, :]
    is_last = pos == chunk - 1
    dtype = q_ref.dtype
    f32_dot = functools.partial(lax.dot_general, precision=precision, preferred_element_type=jnp.float32)

    def body(c, s):
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]
        cum = jnp.cumsum(g_ref[rows])
        cum_last = jnp.sum(jnp.where(is_last, cum, 0.0))
        scores = f32_dot(q, k, (((1,), (1,)), ((), ())))
        a = scores * jnp.exp(jnp.where(causal, cum[:, None] - cum[None, :], -jnp.inf))
        q_dec = (q.astype(jnp.float32) * jnp.exp(cum)[:, None]).astype(dtype)
        o = (f32_dot(a.astype(dtype), v, (((1,), (0,)), ((), ())))
             + f32_dot(q_dec, s.astype(dtype), (((1,), (0,)), ((), ()))))
        o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
        k_dec = (k.astype(jnp.float32) * jnp.exp(cum_last - cum)[:, None]).astype(dtype)
        return jnp.exp(cum_last) * s + f32_dot(k_dec, v, (((0,), (0,)), ((), ())))

    s = s0_ref[...] if has_initial_state else jnp.zeros(s_ref.shape, jnp.float32)
    s_ref[...] = lax.fori_loop(0, num_chunks, body, s)


def _forward(q_BTKE, k_BTKE, v_BTHF, log_decay_BTH, initial_state_BHEF, cfg: Config):
    """The kernel on inputs padded to its tile rules (T to chunks, E and F to powers of 2 >= 16; no-ops for the
    usual widths and training lengths): (o [B, T, H, F], final state [B, H, E, F] f32)."""
    b, t, kh, e = q_BTKE.shape
    h, f = v_BTHF.shape[2:]
    group, chunk = h // kh, cfg.chunk_size
    num_chunks = cdiv(t, chunk)
    t_pad, e_pad, f_pad = num_chunks * chunk, max(16, next_power_of_2(e)), max(16, next_power_of_2(f))
    block_f = min(f_pad, max(16, STATE_ELEMENTS // e_pad))
    q, k = (pad_axis(pad_axis(x, 1, t_pad), 3, e_pad) for x in (q_BTKE, k_BTKE))
    v = pad_axis(pad_axis(v_BTHF, 1, t_pad), 3, f_pad)
    g = pad_axis(log_decay_BTH.astype(jnp.float32), 1, t_pad)  # padded tokens: decay 1, k = v = 0
    has_initial_state = initial_state_BHEF is not None
    state_spec = pl.BlockSpec((None, None, e_pad, block_f), lambda i, j, n: (i, j, 0, n))
    in_specs = [
        pl.BlockSpec((None, t_pad, None, e_pad), lambda i, j, n: (i, 0, j // group, 0)),
        pl.BlockSpec((None, t_pad, None, e_pad), lambda i, j, n: (i, 0, j // group, 0)),
        pl.BlockSpec((None, t_pad, None, block_f), lambda i, j, n: (i, 0, j, n)),
        pl.BlockSpec((None, t_pad, None), lambda i, j, n: (i, 0, j)),
    ]
    inputs = [q, k, v, g]
    if has_initial_state:
        in_specs.append(state_spec)
        inputs.append(pad_axis(pad_axis(initial_state_BHEF, 2, e_pad), 3, f_pad))
    kernel = functools.partial(
        _kernel, chunk=chunk, num_chunks=num_chunks, scale=cfg.scale, has_initial_state=has_initial_state,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT)
    o, s = pl.pallas_call(
        kernel,
        grid=(b, h, f_pad // block_f),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, t_pad, None, block_f), lambda i, j, n: (i, 0, j, n)), state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, t_pad, h, f_pad), q.dtype),
                   jax.ShapeDtypeStruct((b, h, e_pad, f_pad), jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=4 if e_pad * block_f <= 64 * 64 else 8, num_stages=2),
        interpret=cfg.interpret,
        name="chunked_linear_attention_fwd",
    )(*inputs)
    return o[:, :t, :, :f], s[:, :, :e, :f]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _linear_attention(q, k, v, log_decay, initial_state, cfg: Config):
    return _forward(q, k, v, log_decay, initial_state, cfg)


def _linear_attention_fwd(q, k, v, log_decay, initial_state, cfg: Config):
    return _forward(q, k, v, log_decay, initial_state, cfg), (q, k, v, log_decay, initial_state)


def _linear_attention_bwd(cfg: Config, residuals, cotangents):
    """Recomputes through the chunked XLA reference's VJP (a Pallas backward kernel is future work)."""
    reference = functools.partial(chunked_linear_attention_reference, scale=cfg.scale, chunk_size=cfg.chunk_size)
    _, vjp = jax.vjp(lambda q, k, v, g, s0: reference(q, k, v, g, initial_state_BHEF=s0), *residuals)
    return vjp(cotangents)


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


def unsupported_reason(call) -> str | None:
    if call.log_decay_BTH.ndim == 4:
        return "per-key-dimension log_decay [B, T, H, E] (GLA) is not supported yet: scalar decays per head only"
    if call.chunk_size < 16 or call.chunk_size & (call.chunk_size - 1):
        return f"chunk_size must be a power of 2 >= 16 (Triton's tile rule), got {call.chunk_size}"
    return None


def run(call):
    k, v, log_decay = mask_past_lengths(call.k_BTKE, call.v_BTHF, call.log_decay_BTH, call.lengths_B)
    return _linear_attention(call.q_BTKE, k, v, log_decay, call.initial_state_BHEF,
                             Config(scale=call.scale, chunk_size=call.chunk_size, interpret=call.interpret))
