"""`flash_attention`: one entry point for softmax attention over the op's table of implementations (`ops.py`).

Light: the backends (cudnn.py, pallas_mosaic_gpu.py, pallas_triton.py, xla_chunked.py, reference.py) are imported
on first use."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import ops
from pallas_kernels.common import check_attention_inputs, check_options, default_interpret, on_gpu


@dataclasses.dataclass(frozen=True)
class FlashCall:
    """One validated flash_attention call as every backend's `unsupported_reason(call)` and `run(call)` see it."""
    q_BTHE: jax.Array
    k_BSKE: jax.Array
    v_BSKF: jax.Array
    segment_ids_BT: jax.Array | None
    gate_BTH: jax.Array | None
    causal: bool
    sliding_window: int | None
    scale: float
    logits_soft_cap: float | None
    return_lse: bool
    block_q: int | None  # tile overrides of the Pallas kernels
    block_k: int | None
    interpret: bool  # Pallas interpret mode


def flash_attention(q, k, v, *, causal: bool = False, sliding_window: int | None = None, segment_ids=None,
                    scale: float | None = None, logits_soft_cap: float | None = None, gate=None,
                    return_lse: bool = False, implementation: str | Sequence[str] = "auto",
                    block_q: int | None = None, block_k: int | None = None, interpret: bool | None = None):
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
      implementation: "auto", one of `ops.implementations("flash_attention")` or a sequence of them tried in order
        (see `pallas_kernels.ops`):
          "cudnn"       jax.nn.dot_product_attention on cuDNN (GPU; bf16/fp16, Dv == Dqk, no segment ids, soft cap
                        or lse);
          "mosaic_gpu"  Hopper FA3-style Mosaic GPU forward with the Triton backward (bf16/fp16, head dim
                        64/128/256 == Dv; no window, segment ids, soft cap or gate);
          "triton"      the portable FlashAttention-2 Pallas Triton kernels (every option);
          "xla_chunked" float32 XLA in query blocks that skip the keys their mask hides, with a FlashAttention-2
                        backward (every option; the CPU backend);
          "xla"         the float32 reference, which materialises the logits.
        "auto": cuDNN where it applies on a GPU, else XLA (the Pallas kernels join once verified on a GPU, see
        `ops.PALLAS_IN_AUTO`); off GPU xla_chunked. Off GPU the Pallas kernels run in their interpreters.
      block_q, block_k: Pallas tile overrides (powers of 2, >= 16): every Triton kernel's tiles; the Mosaic GPU
        forward's (multiples of 64; block_q per consumer warpgroup); xla_chunked's query block (block_q).
        Other implementations ignore them.
      interpret: Pallas interpret mode; default: off GPU.

    Returns:
      out [B, T, Hq, Dv] in q.dtype, or (out, lse) with `return_lse`.
    """
    _check_inputs(q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids, gate=gate)
    check_options(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, block_q=block_q, block_k=block_k)
    call = FlashCall(q_BTHE=q, k_BSKE=k, v_BSKF=v, segment_ids_BT=segment_ids, gate_BTH=gate, causal=causal,
                     sliding_window=sliding_window,
                     scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                     logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                     return_lse=return_lse, block_q=block_q, block_k=block_k,
                     interpret=default_interpret() if interpret is None else interpret)
    _, backend = ops.select("flash_attention", implementation, call, gpu=on_gpu())
    return backend.run(call)


def _check_inputs(q, k, v, *, causal, sliding_window, segment_ids, gate):
    check_attention_inputs(q, k, v)
    (b, t, hq, _), s = q.shape, k.shape[1]
    if sliding_window is not None and not causal:
        raise ValueError("sliding_window needs causal=True (the window is the last W tokens)")
    if (causal or segment_ids is not None) and t != s:
        raise ValueError(f"causal/sliding_window/segment_ids need aligned self-attention positions, but q has "
                         f"seq {t} and k has seq {s}")
    if segment_ids is not None and (segment_ids.shape != (b, t) or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
        raise ValueError(f"segment_ids must be int [batch, seq] = {(b, t)}, got {segment_ids.dtype} "
                         f"{segment_ids.shape}")
    if gate is not None and gate.shape != (b, t, hq):
        raise ValueError(f"gate must be [batch, seq, q_heads] = {(b, t, hq)}, got {gate.shape}")
