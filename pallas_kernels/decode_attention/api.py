"""decode_attention: the Tq newest tokens of each sequence against its KV cache (forward only), over the op's table
of implementations (`ops.py`). Light: the backends (pallas_triton.py, reference.py) are imported on first use."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import ops
from pallas_kernels.common import check_attention_inputs, check_options, default_interpret, on_gpu


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_BTHE", "k_cache_BSKE", "v_cache_BSKF",
                                                                  "lengths_B"],
                   meta_fields=["scale", "sliding_window", "logits_soft_cap", "num_splits", "block_k", "interpret"])
@dataclasses.dataclass(frozen=True)
class DecodeCall:
    """One validated decode_attention call as every backend's `unsupported_reason(call)` and `run(call)` see it (a
    pytree: the options are static under jit)."""
    q_BTHE: jax.Array
    k_cache_BSKE: jax.Array
    v_cache_BSKF: jax.Array
    lengths_B: jax.Array  # int32, clipped to [Tq, S] by the time `run` sees it
    scale: float
    sliding_window: int | None
    logits_soft_cap: float | None
    num_splits: int | None  # overrides of the Triton kernel's heuristics
    block_k: int | None
    interpret: bool  # Pallas interpret mode


def decode_attention(q_BTHE, k_cache_BSKE, v_cache_BSKF, lengths_B, *, scale: float | None = None,
                     sliding_window: int | None = None, logits_soft_cap: float | None = None,
                     num_splits: int | None = None, block_k: int | None = None,
                     implementation: str | Sequence[str] = "auto", interpret: bool | None = None) -> jax.Array:
    """Attention of the Tq newest tokens against a KV cache. Returns [B, Tq, Hq, Dv] in q.dtype.

    q_BTHE [B, Tq, Hq, Dqk]; k_cache_BSKE [B, S, Hkv, Dqk]; v_cache_BSKF [B, S, Hkv, Dv] (Dv may differ from Dqk,
    e.g. absorbed MLA: one latent head, Dqk 576, Dv 512); Hq % Hkv == 0, q head h reads kv head h // (Hq / Hkv).
    lengths_B [B] int: valid entries per sequence *including* the Tq new tokens, already written at positions
    lengths-Tq .. lengths-1 (clipped to [Tq, S]). Query t sits at p = lengths-Tq+t and sees keys j <= p, and
    j > p - sliding_window when a window is given; entries at j >= lengths are never read into the output.

    implementation: "auto", one of `ops.implementations("decode_attention")` or a sequence of them tried in order:
    "triton" (split-K Flash-Decoding Pallas kernel, interpreted off GPU), "xla" (the float32 reference). "auto" is
    xla (triton on GPU once verified there, see `ops.PALLAS_IN_AUTO`). num_splits / block_k override the Triton
    kernel's heuristics.
    """
    _check_inputs(q_BTHE, k_cache_BSKE, v_cache_BSKF, lengths_B, num_splits)
    check_options(sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, block_k=block_k)
    call = DecodeCall(q_BTHE=q_BTHE, k_cache_BSKE=k_cache_BSKE, v_cache_BSKF=v_cache_BSKF, lengths_B=lengths_B,
                      scale=q_BTHE.shape[-1] ** -0.5 if scale is None else float(scale),
                      sliding_window=sliding_window,
                      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                      num_splits=num_splits, block_k=block_k,
                      interpret=default_interpret() if interpret is None else interpret)
    name, _ = ops.select("decode_attention", implementation, call, gpu=on_gpu())
    return _decode(call, name)


@functools.partial(jax.jit, static_argnames="name")
def _decode(call: DecodeCall, name: str):
    lengths_B = jnp.clip(call.lengths_B.astype(jnp.int32), call.q_BTHE.shape[1], call.k_cache_BSKE.shape[1])
    return ops.load("decode_attention", name).run(dataclasses.replace(call, lengths_B=lengths_B))


def _check_inputs(q, k_cache, v_cache, lengths, num_splits):
    check_attention_inputs(q, k_cache, v_cache, k_name="k_cache", v_name="v_cache")
    b, tq, _, _ = q.shape
    s = k_cache.shape[1]
    if not 1 <= tq <= s:
        raise ValueError(f"q has {tq} tokens; need 1 <= Tq <= cache length {s}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape ({b},), got {lengths.dtype}{lengths.shape}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
