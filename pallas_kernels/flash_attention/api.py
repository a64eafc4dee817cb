"""`flash_attention`: one entry point for softmax attention, dispatching to the Pallas kernel, cuDNN or XLA."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import auto_uses_pallas, check_implementation, default_interpret, on_gpu
from pallas_kernels.flash_attention import pallas_mosaic_gpu
from pallas_kernels.flash_attention.pallas_triton import flash_attention_pallas
from pallas_kernels.flash_attention.reference import flash_attention_reference

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
BACKENDS = ("triton", "mosaic_gpu")


def flash_attention(q, k, v, *, causal: bool = False, sliding_window: int | None = None, segment_ids=None,
                    scale: float | None = None, logits_soft_cap: float | None = None, gate=None,
                    return_lse: bool = False, implementation: str = "auto", block_q: int | None = None,
                    block_k: int | None = None, interpret: bool | None = None, backend: str = "triton"):
    """Softmax attention, FlashAttention-2 style (https://arxiv.org/abs/2307.08691), differentiable.

    Args:
      q: [B, T, Hq, Dqk]; k: [B, S, Hkv, Dqk]; v: [B, S, Hkv, Dv]. Hq % Hkv == 0 (GQA/MQA without repeating K/V);
        Dv may differ from Dqk (MLA). bf16, fp16 or fp32, all the same dtype; accumulation is fp32.
      causal: key j visible to query i iff j <= i (positions aligned, so T == S).
      sliding_window: W >= 1, with causal: also j > i - W (the last W tokens, the query's own included).
      segment_ids: [B, T] int, the same array for queries and keys (T == S): attend within a segment only.
      scale: logit scale, default 1/sqrt(Dqk).
      logits_soft_cap: c > 0: logits = c * tanh(logits / c) (after scaling, before masking).
      gate: [B, T, Hq], already activated, multiplied into the output: out = gate[..., None] * softmax(qk) v.
      return_lse: also return lse [B, Hq, T] float32, the natural-log log-sum-exp of the scaled, capped, masked
        logits, so attention over disjoint key sets merges exactly.
      implementation: "pallas" (the Triton kernel; interpreted off GPU), "cudnn" (jax.nn.dot_product_attention),
        "xla" (the reference, materialises the logits), or "auto": cuDNN where it applies on a GPU, else XLA
        (Pallas once the kernels are verified on a GPU, see `common.PALLAS_IN_AUTO`); XLA off GPU.
      block_q, block_k: override the kernel tiles (powers of 2, >= 16) of every Pallas kernel; with
        backend="mosaic_gpu" they set its forward tiles (multiples of 64; block_q is per consumer warpgroup).
      interpret: Pallas interpret mode; default: off GPU.
      backend: the Pallas kernel family behind "pallas" (and "auto" when it picks Pallas): "triton" (portable
        FlashAttention-2 kernels) or "mosaic_gpu" (Hopper FA3-style forward, Triton backward; calls it can't take
        -- sliding window, segment ids, soft cap, gate, fp32, head dims other than 64/128/256, Dv != Dqk -- run
        the Triton kernels). Off GPU both run in their interpreters.

    Returns:
      out [B, T, Hq, Dv] in q.dtype, or (out, lse) with `return_lse`.
    """
    check_implementation(implementation)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    _check_inputs(q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
                  logits_soft_cap=logits_soft_cap, gate=gate, block_q=block_q, block_k=block_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    cudnn_problem = _cudnn_problem(q, v, segment_ids=segment_ids, logits_soft_cap=logits_soft_cap,
                                   return_lse=return_lse)
    if implementation == "auto":
        if on_gpu() and not cudnn_problem:
            implementation = "cudnn"
        else:
            implementation = "pallas" if auto_uses_pallas() else "xla"

    if implementation == "xla":
        return flash_attention_reference(q, k, v, causal=causal, sliding_window=sliding_window,
                                         segment_ids=segment_ids, scale=scale, logits_soft_cap=logits_soft_cap,
                                         gate=gate, return_lse=return_lse)
    if implementation == "cudnn":
        if cudnn_problem:
            raise ValueError(f"implementation='cudnn' does not support {cudnn_problem}; use 'pallas' or 'xla'")
        if not on_gpu():
            raise ValueError("implementation='cudnn' needs a GPU backend; use 'pallas' or 'xla'")
        out = jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, implementation="cudnn",
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0))
        # The gate is an elementwise epilogue XLA fuses; cuDNN has no slot for it.
        return out if gate is None else (out * gate[..., None]).astype(q.dtype)

    interpret = default_interpret() if interpret is None else interpret
    if backend == "mosaic_gpu" and pallas_mosaic_gpu.unsupported_reason(
            q, k, v, sliding_window=sliding_window, segment_ids=segment_ids, logits_soft_cap=logits_soft_cap,
            gate=gate) is None:
        out, lse = pallas_mosaic_gpu.flash_attention_mosaic_gpu(
            q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k, interpret=interpret)
        return (out, lse) if return_lse else out
    out, lse = flash_attention_pallas(
        q, k, v, gate_BTH=gate, segment_ids_BT=segment_ids, causal=causal, sliding_window=sliding_window,
        scale=scale, logits_soft_cap=logits_soft_cap, block_q=block_q, block_k=block_k, interpret=interpret)
    return (out, lse) if return_lse else out


def _cudnn_problem(q, v, *, segment_ids, logits_soft_cap, return_lse) -> str | None:
    """Why jax.nn.dot_product_attention(implementation="cudnn") can't run this call, or None if it can."""
    d = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q.dtype} inputs (cuDNN takes bf16/fp16)"
    if v.shape[-1] != d:
        return f"unequal q/k and v head dims ({d} vs {v.shape[-1]}; jax.nn requires equal)"
    if d > 256 or d % 8:
        return f"head_dim {d} (cuDNN needs <= 256 and a multiple of 8)"
    if segment_ids is not None:
        return "segment_ids"
    if logits_soft_cap is not None:
        return "logits_soft_cap"
    if return_lse:
        return "return_lse (jax.nn rounds cuDNN's softmax statistics to the output dtype)"
    return None


def _check_inputs(q, k, v, *, causal, sliding_window, segment_ids, logits_soft_cap, gate, block_q, block_k):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q, k, v must share one of bf16/fp16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, t, hq, dqk), (_, s, hkv, _) = q.shape, k.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k and v must be [batch={b}, seq, kv_heads, head_dim] with the same batch, seq and heads "
                         f"as each other, got k {k.shape}, v {v.shape}")
    if k.shape[-1] != dqk:
        raise ValueError(f"q and k must share head_dim, got q {dqk} and k {k.shape[-1]}")
    if hq % hkv:
        raise ValueError(f"q has {hq} heads, k has {hkv}: q heads must be a multiple of kv heads")
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window needs causal=True (the window is the last W tokens)")
        if int(sliding_window) != sliding_window or sliding_window < 1:
            raise ValueError(f"sliding_window must be an int >= 1, got {sliding_window!r}")
    if (causal or segment_ids is not None) and t != s:
        raise ValueError(f"causal/sliding_window/segment_ids need aligned self-attention positions, but q has "
                         f"seq {t} and k has seq {s}")
    if segment_ids is not None and (segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be int [batch, seq] = {(b, t)}, got {segment_ids.dtype} "
                         f"{segment_ids.shape}")
    if gate is not None and gate.shape != (b, t, hq):
        raise ValueError(f"gate must be [batch, seq, q_heads] = {(b, t, hq)}, got {gate.shape}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap!r}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"{name} must be a power of 2 >= 16 (Triton's tile rules), got {block}")
