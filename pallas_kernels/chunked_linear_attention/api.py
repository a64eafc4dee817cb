"""chunked_linear_attention: the decayed linear recurrence that Mamba-2 (SSD), Lightning / RetNet-style linear
attention and GLA share, over the op's table of implementations (`ops.py`). Light: the backends (pallas_triton.py,
reference.py) are imported on first use."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import ops
from pallas_kernels.common import FLOAT_DTYPES, default_interpret, on_gpu


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_BTKE", "k_BTKE", "v_BTHF", "log_decay_BTH", "initial_state_BHEF", "lengths_B",
                                "segment_ids_BT"],
                   meta_fields=["scale", "chunk_size", "interpret"])
@dataclasses.dataclass(frozen=True)
class LinearCall:
    """One validated chunked_linear_attention call as every backend's `unsupported_reason(call)` and `run(call)` see
    it (a pytree: the options are static under jit). `run` returns (o_BTHF, final_state_BHEF)."""
    q_BTKE: jax.Array
    k_BTKE: jax.Array
    v_BTHF: jax.Array
    log_decay_BTH: jax.Array  # [B, T, H] or, per key dimension, [B, T, H, E]
    initial_state_BHEF: jax.Array | None  # float32
    lengths_B: jax.Array | None  # int32
    segment_ids_BT: jax.Array | None  # int32
    scale: float
    chunk_size: int
    interpret: bool  # Pallas interpret mode


def chunked_linear_attention(q_BTKE, k_BTKE, v_BTHF, log_decay_BTH, *, scale: float = 1.0,
                             initial_state_BHEF=None, lengths_B=None, segment_ids_BT=None, chunk_size: int = 64,
                             return_final_state: bool = False, implementation: str | Sequence[str] = "auto",
                             interpret: bool | None = None):
    """Causal linear attention with a data-dependent decay, computed chunk by chunk, differentiable:

        S_t = exp(log_decay_t) * S_{t-1} + k_t^T v_t      (per value head h; S is [E, F], float32)
        o_t = scale * q_t S_t

    Mamba-2 / SSD maps to it as q = C, k = B, v = x * dt, log_decay = dt * A (n_groups = K); Lightning / RetNet as
    log_decay = -slope_h; GLA with a per-key-dimension log_decay_BTHE.

    Args:
      q_BTKE, k_BTKE: [B, T, K, E]; v_BTHF: [B, T, H, F]; one float dtype (bf16, fp16, fp32). K divides H: value
        head h reads q/k head h // (H / K).
      log_decay_BTH: [B, T, H], or [B, T, H, E] per key dimension (GLA); any float dtype, used in float32. Must be
        <= 0 (a decay in (0, 1]); checked when the array is concrete (numpy, or a constant closed over by a jitted
        caller included), never when it is traced, where positive values give exponents > 0 that can overflow.
      scale: multiplies the output.
      initial_state_BHEF: [B, H, E, F], the state before token 0 (continuing a prefill or a chunked decode);
        default zeros. Used in float32.
      lengths_B: [B] int, for right-padded batches: tokens at t >= lengths_B[b] change nothing (their k, v and
        log_decay are masked, so even non-finite padding is harmless), the final state is the state after each
        sequence's own last token, and the outputs at t >= lengths_B[b] are unspecified.
      segment_ids_BT: [B, T] int, packed documents: a document is a run of equal consecutive ids, and the state is
        reset to zero before each document's first token (t >= 1 whose id differs from token t - 1's), so nothing
        crosses documents, in the outputs nor in the gradients. The initial state belongs to token 0's document;
        the final state is the last document's (with lengths_B: the document holding each sequence's last token;
        padding starts no document).
      chunk_size: tokens per chunk, >= 1 (the Triton kernel: a power of 2 >= 16). The result does not depend on it
        beyond rounding.
      return_final_state: also return the state after the last token.
      implementation: "auto", one of `ops.implementations("chunked_linear_attention")` or a sequence of them tried
        in order: "triton" (Pallas Triton kernels, forward and backward: one program per (batch, head,
        value-column tile) carrying the float32 state, or in the backward its cotangent, through an in-kernel loop
        over chunks; scalar decays per head only: it declines per-key-dimension decays, with that reason, so
        "auto" and sequences such as ("triton", "xla") run those on the reference and implementation="triton"
        alone raises), "xla" (the float32 chunked reference, every call). "auto" is xla (triton on GPU once
        verified there, see `ops.PALLAS_IN_AUTO`).
      interpret: Pallas interpret mode; default: off GPU.

    Returns:
      o_BTHF [B, T, H, F] in q's dtype, or (o_BTHF, final_state_BHEF float32) with `return_final_state`.
    """
    _check_inputs(q_BTKE, k_BTKE, v_BTHF, log_decay_BTH, initial_state_BHEF, lengths_B, segment_ids_BT, chunk_size)
    call = LinearCall(q_BTKE=q_BTKE, k_BTKE=k_BTKE, v_BTHF=v_BTHF, log_decay_BTH=log_decay_BTH,
                      initial_state_BHEF=None if initial_state_BHEF is None else initial_state_BHEF.astype(
                          jnp.float32),
                      lengths_B=None if lengths_B is None else lengths_B.astype(jnp.int32),
                      segment_ids_BT=None if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32),
                      scale=float(scale), chunk_size=int(chunk_size),
                      interpret=default_interpret() if interpret is None else interpret)
    name, _ = ops.select("chunked_linear_attention", implementation, call, gpu=on_gpu())
    o_BTHF, final_state_BHEF = _run(call, name)
    return (o_BTHF, final_state_BHEF) if return_final_state else o_BTHF


@functools.partial(jax.jit, static_argnames="name")
def _run(call: LinearCall, name: str):
    return ops.load("chunked_linear_attention", name).run(call)


def _check_inputs(q, k, v, log_decay, initial_state, lengths, segment_ids, chunk_size):
    for name, x in (("q_BTKE", q), ("k_BTKE", k), ("v_BTHF", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q_BTKE, k_BTKE, v_BTHF must share one dtype of bfloat16/float16/float32, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k_BTKE must have q_BTKE's shape {q.shape}, got {k.shape}")
    b, t, kh, e = q.shape
    h, f = v.shape[2:]
    if v.shape[:2] != (b, t):
        raise ValueError(f"v_BTHF must have q_BTKE's batch and seq {(b, t)}, got {v.shape}")
    if t < 1:
        raise ValueError("the sequence must hold at least one token (seq >= 1)")
    if h % kh:
        raise ValueError(f"v_BTHF has {h} heads, q_BTKE/k_BTKE have {kh}: value heads must be a multiple of q/k "
                         f"heads")
    if log_decay.shape not in ((b, t, h), (b, t, h, e)) or not jnp.issubdtype(log_decay.dtype, jnp.floating):
        raise ValueError(f"log_decay_BTH must be a float array [batch, seq, heads] = {(b, t, h)} or, per key "
                         f"dimension, {(b, t, h, e)}; got {log_decay.dtype}{log_decay.shape}")
    if not isinstance(log_decay, jax.core.Tracer):
        # A concrete array (numpy, or a jax constant closed over by a jitted caller) is checked eagerly: under a jit
        # trace jnp ops would stage the comparison into a tracer, which has no truth value.
        with jax.ensure_compile_time_eval():
            positive = bool(jnp.any(jnp.asarray(log_decay) > 0))
        if positive:
            raise ValueError("log_decay_BTH must be <= 0 (a decay exp(log_decay) in (0, 1]); got positive values")
    if initial_state is not None and (initial_state.shape != (b, h, e, f)
                                      or not jnp.issubdtype(initial_state.dtype, jnp.floating)):
        raise ValueError(f"initial_state_BHEF must be a float array [batch, heads, E, F] = {(b, h, e, f)}, got "
                         f"{initial_state.dtype}{initial_state.shape}")
    if lengths is not None and (lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer)):
        raise ValueError(f"lengths_B must be an integer array of shape ({b},), got {lengths.dtype}{lengths.shape}")
    if segment_ids is not None and (segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids_BT must be an integer array of shape {(b, t)}, got "
                         f"{segment_ids.dtype}{segment_ids.shape}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
