"""Grouped-query attention: MHA, GQA and MQA in one module.

GQA (Ainslie et al. 2023, arXiv 2305.13245): Hq query heads share Hkv key/value heads, Hq % Hkv == 0;
MHA is Hkv = Hq (Vaswani et al. 2017), MQA is Hkv = 1 (Shazeer 2019, arXiv 1911.02150).

    q_h = RoPE(x W_q^h),  k_g = RoPE(x W_k^g),  v_g = x W_v^g,  g = h // (Hq / Hkv)
    o_h = softmax(q_h k_g^T / sqrt(D) + causal/window mask) v_g,   y = concat_h(o_h) W_o

Options (per layer, in the plan): n_heads, n_kv_heads, head_dim (default: the model's), window (sliding window,
tokens including the current one), qk_norm (RMSNorm on q and k per head, arXiv 2302.05442), rope (bool),
logits_soft_cap, implementation (default: the model's attn_implementation).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from attnzoo.attention import attention, cached_attention
from attnzoo.cache import KVCache
from attnzoo.config import LayerSpec, ModelConfig
from attnzoo.layers import RMSNorm, apply_rope, dense
from attnzoo.mixers.base import (ForwardContext, MixerOutput, SharedParams, average_context, dtype_bytes,
                                 resolve_options)
from attnzoo.registry import get_mixer, register


@dataclasses.dataclass(frozen=True)
class GQAOptions:
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    window: int | None = None
    qk_norm: bool = False
    rope: bool = True
    logits_soft_cap: float | None = None
    implementation: str | None = None


@register("gqa")
class GQAttention(nnx.Module):
    def __init__(self, config: ModelConfig, spec: LayerSpec, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        opts = resolve_options(GQAOptions, spec.mixer, {**get_mixer(spec.mixer).defaults, **spec.kwargs})
        self.n_heads = opts.n_heads or config.n_heads
        kv = opts.n_kv_heads if opts.n_kv_heads is not None else config.kv_heads
        self.n_kv_heads = self.n_heads if kv == "all" else kv
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"plan: {spec.mixer}: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        self.head_dim = opts.head_dim or config.dim_per_head
        if opts.window is not None and opts.window <= 0:
            raise ValueError(f"plan: {spec.mixer}: window={opts.window} must be a positive number of tokens")
        self.window = opts.window
        self.rope_base = config.rope_base if opts.rope else None
        self.soft_cap = opts.logits_soft_cap
        self.implementation = opts.implementation or config.attn_implementation
        self.cache_dtype = jnp.dtype(config.dtype)
        d, hd = config.d_model, self.head_dim
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q_proj = dense(d, self.n_heads * hd, **kw)
        self.k_proj = dense(d, self.n_kv_heads * hd, **kw)
        self.v_proj = dense(d, self.n_kv_heads * hd, **kw)
        self.o_proj = dense(self.n_heads * hd, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)
        self.q_norm = RMSNorm(hd, eps=config.norm_eps, param_dtype=kw["param_dtype"]) if opts.qk_norm else None
        self.k_norm = RMSNorm(hd, eps=config.norm_eps, param_dtype=kw["param_dtype"]) if opts.qk_norm else None

    def _project(self, x_BTD, positions_BT):
        b, t, _ = x_BTD.shape
        q = self.q_proj(x_BTD).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base is not None:
            q = apply_rope(q, positions_BT, base=self.rope_base)
            k = apply_rope(k, positions_BT, base=self.rope_base)
        return q, k, v

    def __call__(self, x_BTD, ctx: ForwardContext, cache: KVCache | None = None) -> MixerOutput:
        q, k, v = self._project(x_BTD, ctx.positions_BT)
        if ctx.mode == "decode":
            cache = cache.append(k, v)
            o = cached_attention(q, cache.k_BSHD, cache.v_BSHD, cache.lengths_B, sliding_window=self.window,
                                 logits_soft_cap=self.soft_cap, implementation=self.implementation)
        else:
            o = attention(q, k, v, causal=True, sliding_window=self.window, segment_ids_BT=ctx.segment_ids_BT,
                          logits_soft_cap=self.soft_cap, implementation=self.implementation)
            if ctx.mode == "prefill":
                cache = cache.prefill(k, v, ctx.lengths_B)
        b, t = x_BTD.shape[:2]
        return MixerOutput(self.o_proj(o.reshape(b, t, self.n_heads * self.head_dim)), cache)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.empty(batch, max_len, self.n_kv_heads, self.head_dim, self.head_dim, self.cache_dtype)

    def cache_bytes_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes(self.cache_dtype)

    def flops_per_token(self, seq_len: int) -> int:
        d = self.q_proj.in_features
        proj = 2 * d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        # q.k and p.v: 2 FLOPs per multiply-add each, over the keys a query sees on average.
        attend = 4 * self.n_heads * self.head_dim * average_context(seq_len, self.window)
        return int(round(proj + attend))


register("mha", n_kv_heads="all")(GQAttention)
register("mqa", n_kv_heads=1)(GQAttention)
