"""flash_attention on cuDNN through jax.nn.dot_product_attention(implementation="cudnn")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import on_gpu


def unsupported_reason(call) -> str | None:
    """Why cuDNN (as jax.nn exposes it) can't take this call, or None if it can."""
    q, v = call.q_BTHE, call.v_BSKF
    d = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q.dtype} inputs (cuDNN takes bf16/fp16)"
    if v.shape[-1] != d:
        return f"unequal q/k and v head dims ({d} vs {v.shape[-1]}; jax.nn requires equal)"
    if d > 256 or d % 8:
        return f"head_dim {d} (cuDNN needs <= 256 and a multiple of 8)"
    for name, value in (("segment_ids", call.segment_ids_BT), ("logits_soft_cap", call.logits_soft_cap)):
        if value is not None:
            return f"{name} (not in jax.nn's cuDNN path)"
    if call.return_lse:
        return "return_lse (jax.nn rounds cuDNN's softmax statistics to the output dtype)"
    if not on_gpu():  # last, so that off GPU the other reasons still show
        return "needs a GPU backend"
    return None


def run(call):
    out = jax.nn.dot_product_attention(
        call.q_BTHE, call.k_BSKE, call.v_BSKF, scale=call.scale, is_causal=call.causal, implementation="cudnn",
        local_window_size=None if call.sliding_window is None else (call.sliding_window - 1, 0))
    # The gate is an elementwise epilogue XLA fuses; cuDNN has no slot for it.
    return out if call.gate_BTH is None else (out * call.gate_BTH[..., None]).astype(call.q_BTHE.dtype)
