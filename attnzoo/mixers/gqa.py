"""Grouped-query attention: MHA, GQA and MQA in one module.

GQA (Ainslie et al. 2023, arXiv 2305.13245): H query heads share K key/value heads, H % K == 0;
MHA is K = H (Vaswani et al. 2017), MQA is K = 1 (Shazeer 2019, arXiv 1911.02150).

    q_h = RoPE(x W_q^h),  k_g = RoPE(x W_k^g),  v_g = x W_v^g,  g = h // (H / K)
    o_h = softmax(q_h k_g^T / sqrt(E) + causal/window mask) v_g,   y = concat_h(o_h) W_o

Softmax attention runs through `attnzoo.attention` (the model's `flash_attention` / `decode_attention` kernels).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
from flax import nnx

from attnzoo.attention import attention, cached_attention
from attnzoo.cache import KVCache
from attnzoo.config import ModelConfig
from attnzoo.diagnostics import attention_diagnostics
from attnzoo.layers import RMSNorm, RopeScaling, apply_rope, dense
from attnzoo.mixers.base import (
    ForwardContext,
    Mixer,
    MixerOutput,
    SharedParams,
    Supports,
    average_context,
    dtype_bytes,
    head_counts,
    reject_unused,
)
from attnzoo.registry import register

ROPE_FACTORS = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len")


@dataclasses.dataclass(frozen=True)
class GQAOptions:
    """n_heads, n_kv_heads ("all": MHA), head_dim: default the model's. window: sliding window in tokens including
    the current one. qk_norm: RMSNorm on q and k per head (arXiv 2302.05442). rope: rotary positions.
    logits_soft_cap: c * tanh(logits / c). qkv_bias / out_bias: biases on the q, k, v / output projections (Qwen2
    has the first, Llama's attention_bias both). rope_scaling: "linear" or "llama3" frequency rescaling for context
    extension (see attnzoo.layers.RopeScaling) with rope_factor, and for llama3 rope_low_freq_factor,
    rope_high_freq_factor, rope_original_max_len (each factor is an error without the scaling that reads it)."""

    n_heads: int | None = None
    n_kv_heads: int | Literal["all"] | None = None
    head_dim: int | None = None
    window: int | None = None
    qk_norm: bool = False
    rope: bool = True
    logits_soft_cap: float | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    rope_scaling: Literal["linear", "llama3"] | None = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self):
        self.rope_frequency_scaling()  # checks the rope_* values
        if self.rope_scaling is None:
            reject_unused(self, ROPE_FACTORS, "without rope_scaling")
        elif self.rope_scaling == "linear":
            reject_unused(self, ROPE_FACTORS[1:], "with rope_scaling='linear' (only 'llama3' reads it)")
        for name in ("n_heads", "head_dim", "window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be a positive integer (or none for the default)")
        if isinstance(self.n_kv_heads, int) and self.n_kv_heads <= 0:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must be a positive integer, 'all' or none")
        if self.logits_soft_cap is not None and self.logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap={self.logits_soft_cap} must be > 0 (or none)")

    def rope_frequency_scaling(self) -> RopeScaling | None:
        if self.rope_scaling is None:
            return None
        return RopeScaling(self.rope_scaling, self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                           self.rope_original_max_len)


@register("gqa", options=GQAOptions)
class GQAttention(Mixer):
    supports = Supports(kernel_ops=("flash_attention", "decode_attention"))

    @classmethod
    def check(cls, options: GQAOptions, config: ModelConfig) -> None:
        n_heads, n_kv_heads, head_dim = head_counts(config, options)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        if options.rope and head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings (or set rope=false)")
        if options.rope_scaling is not None and not options.rope:
            raise ValueError(f"rope_scaling={options.rope_scaling!r} needs rope=true")

    def __init__(self, config: ModelConfig, options: GQAOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = head_counts(config, options)
        self.window = options.window
        self.rope_base = config.rope_base if options.rope else None
        self.rope_scaling = options.rope_frequency_scaling()
        self.soft_cap = options.logits_soft_cap
        self.flash_implementation = config.kernel("flash_attention")
        self.decode_implementation = config.kernel("decode_attention")
        self.cache_dtype = jnp.dtype(config.dtype)
        d, e = config.d_model, self.head_dim
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q_proj = dense(d, self.n_heads * e, use_bias=options.qkv_bias, **kw)
        self.k_proj = dense(d, self.n_kv_heads * e, use_bias=options.qkv_bias, **kw)
        self.v_proj = dense(d, self.n_kv_heads * e, use_bias=options.qkv_bias, **kw)
        self.o_proj = dense(self.n_heads * e, d, scale=1 / (2 * config.n_layers) ** 0.5, use_bias=options.out_bias,
                            **kw)
        norm = dict(eps=config.norm_eps, param_dtype=kw["param_dtype"])
        self.q_norm = RMSNorm(e, **norm) if options.qk_norm else None
        self.k_norm = RMSNorm(e, **norm) if options.qk_norm else None

    # The forward in steps that variants (gated attention, MoH, MASA) reuse and extend.
    def project(self, x_BTD):
        """Raw per-head projections: q [B,T,H,E], k and v [B,T,K,E]."""
        b, t, _ = x_BTD.shape
        return (self.q_proj(x_BTD).reshape(b, t, self.n_heads, self.head_dim),
                self.k_proj(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim),
                self.v_proj(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim))

    def position_qk(self, q_BTHE, k_BTKE, positions_BT):
        """QK-norm, then rotary positions."""
        if self.q_norm is not None:
            q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
        if self.rope_base is not None:
            q_BTHE = apply_rope(q_BTHE, positions_BT, base=self.rope_base, scaling=self.rope_scaling)
            k_BTKE = apply_rope(k_BTKE, positions_BT, base=self.rope_base, scaling=self.rope_scaling)
        return q_BTHE, k_BTKE

    def attend(self, q_BTHE, k_BTKE, v_BTKE, ctx: ForwardContext, cache: KVCache | None,
               gate_BTH=None) -> tuple:
        """Causal attention over the sequence, or of the new tokens against the cache: (o [B,T,H,E], cache,
        metrics). `gate_BTH` multiplies each head's output (the flash kernel's epilogue; after the decode kernel)."""
        t = q_BTHE.shape[1]
        metrics = {}
        if ctx.mode == "decode":
            cache = cache.write(k_BTKE, v_BTKE, ctx.lengths_B)
            o_BTHE = cached_attention(q_BTHE, cache.k_BSKE, cache.v_BSKE, ctx.lengths_B + t,
                                      sliding_window=self.window, logits_soft_cap=self.soft_cap,
                                      implementation=self.decode_implementation)
            if gate_BTH is not None:
                o_BTHE = (o_BTHE * gate_BTH[..., None]).astype(o_BTHE.dtype)
            return o_BTHE, cache, metrics
        o_BTHE = attention(q_BTHE, k_BTKE, v_BTKE, causal=True, sliding_window=self.window,
                           segment_ids_BT=ctx.segment_ids_BT, logits_soft_cap=self.soft_cap, gate_BTH=gate_BTH,
                           return_lse=ctx.diagnostics, implementation=self.flash_implementation)
        if ctx.diagnostics:
            o_BTHE, lse_BHT = o_BTHE
            metrics = attention_diagnostics(q_BTHE, k_BTKE, lse_BHT, scale=self.head_dim**-0.5,
                                            sliding_window=self.window, logits_soft_cap=self.soft_cap)
        if ctx.mode == "prefill":
            cache = cache.write(k_BTKE, v_BTKE, jnp.zeros((q_BTHE.shape[0],), jnp.int32))
        return o_BTHE, cache, metrics

    def output(self, o_BTHE):
        b, t = o_BTHE.shape[:2]
        return self.o_proj(o_BTHE.reshape(b, t, self.n_heads * self.head_dim))

    def __call__(self, x_BTD, ctx: ForwardContext, cache: KVCache | None = None) -> MixerOutput:
        q_BTHE, k_BTKE, v_BTKE = self.project(x_BTD)
        q_BTHE, k_BTKE = self.position_qk(q_BTHE, k_BTKE, ctx.positions_BT)
        o_BTHE, cache, metrics = self.attend(q_BTHE, k_BTKE, v_BTKE, ctx, cache)
        return MixerOutput(self.output(o_BTHE), cache, metrics=metrics)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.empty(batch, max_len, self.n_kv_heads, self.head_dim, self.cache_dtype)

    def cache_bytes_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes(self.cache_dtype)

    def flops_per_token(self, seq_len: int) -> int:
        d = self.q_proj.in_features
        proj = 2 * d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        # q.k and p.v, 2 FLOPs per multiply-add each, over the keys a causal query sees on average (about half the
        # sequence: the causal-halved convention of FlashAttention and of the peer MFU in BENCHMARKS.md; PaLM counts
        # it whole).
        attend = 4 * self.n_heads * self.head_dim * average_context(seq_len, self.window)
        return int(round(proj + attend))


register("mha", options=GQAOptions, n_kv_heads="all")(GQAttention)
register("mqa", options=GQAOptions, n_kv_heads=1)(GQAttention)
