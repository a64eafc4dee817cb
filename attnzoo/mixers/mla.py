"""Multi-head Latent Attention (MLA): DeepSeek-V2 (arXiv 2405.04434, section 2.1, Eqs. 9-19) and V3 (arXiv 2412.19437).

Keys and values come from one joint low-rank latent; position goes through a decoupled RoPE path with one rotary
key shared by all heads. With d_c = kv_lora_rank, d_c' = q_lora_rank, d_h = qk_nope_head_dim, d_h^R =
qk_rope_head_dim, d_v = v_head_dim and n_h heads:

    c^KV_t = RMSNorm(W^DKV h_t)                            [d_c]          (the latent the decode cache holds)
    k^R_t  = RoPE(W^KR h_t)                                [d_h^R]        (one head, shared; cached after RoPE)
    k^C_t  = W^UK c^KV_t,  v^C_t = W^UV c^KV_t             [n_h, d_h], [n_h, d_v]
    c^Q_t  = RMSNorm(W^DQ h_t)                             [d_c']         (q_lora_rank = 0: c^Q_t = h_t, no norm)
    q^C_t  = W^UQ c^Q_t,  q^R_t = RoPE(W^QR c^Q_t)         [n_h, d_h], [n_h, d_h^R]
    q_{t,i} = [q^C_{t,i}; q^R_{t,i}],  k_{t,i} = [k^C_{t,i}; k^R_t]
    o_{t,i} = sum_j softmax_j(q_{t,i}^T k_{j,i} / sqrt(d_h + d_h^R)) v^C_{j,i},   u_t = W^O [o_{t,1}; ...; o_{t,n_h}]

Training / prefill up-project K and V per head and run plain MHA (head widths d_h + d_h^R for q/k and d_v for v:
192 / 128 in the DeepSeek shape). The decode cache holds only [c^KV_t; k^R_t], d_c + d_h^R elements per token
(576 in the DeepSeek shape). Decode absorbs W^UK into the query and W^UV into the output, which
turns attention into MQA with one latent head over the cache (V2 section 2.1.2):

    q^lat_{t,i} = W^UK_i^T q^C_{t,i}                       [d_c]
    o^lat_{t,i} = sum_j softmax_j([q^lat_{t,i}; q^R_{t,i}]^T [c^KV_j; k^R_j] / sqrt(d_h + d_h^R)) c^KV_j
    o_{t,i} = W^UV_i o^lat_{t,i}

(q/k width d_c + d_h^R and v width d_c: 576 / 512 in the DeepSeek shape; the scale stays 1/sqrt(d_h + d_h^R)).
`decode="naive"` instead re-up-projects the cached latent to per-head K/V (as MaxText does); both equal the full
forward (in float32 to 1e-6; in bfloat16 naive decode is bit-exact, while the absorbed products round in another
order: their error against a float32 model stays that of the bf16 forward, and float32 products did not reduce it).

FLOPs: `flops_per_token(seq_len)` counts the training / prefill path; `decode_flops_per_token(context_len)` one
decoded token on the absorbed (or naive) path, whose attention runs at d_c + d_h^R / d_c per head instead of
d_h + d_h^R / d_v, with the up-projections once per token (absorbed) or over the whole context (naive).
Projections are named as in DeepSeek's released Hugging Face checkpoints (q_proj or q_a_proj /
q_a_layernorm / q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj); RoPE is rotate-half here, the
checkpoints use interleaved pairs (a fixed permutation of the rotary columns of q_b_proj and kv_a_proj_with_mqa).
Softmax attention runs through `attnzoo.attention` (the model's `flash_attention` / `decode_attention` kernels).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.attention import attention, cached_attention
from attnzoo.cache import write_at
from attnzoo.config import ModelConfig
from attnzoo.diagnostics import attention_diagnostics
from attnzoo.layers import RMSNorm, apply_rope, dense
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports, average_context, dtype_bytes
from attnzoo.registry import register


@dataclasses.dataclass(frozen=True)
class MLAOptions:
    """Widths default from the model's head width E (config.dim_per_head), in DeepSeek-V2's proportions
    (d_c = 4 d_h, d_h^R = d_h / 2):

    n_heads: query heads n_h (default the model's; K and V are per head, so the model's n_kv_heads is not used).
    q_lora_rank: d_c', the query latent width; 0 (default, as in V2-Lite): no query compression, q = W^Q h.
    kv_lora_rank: d_c, the joint KV latent width (default 4 E).
    qk_nope_head_dim: d_h, per-head width of the content query / key (default E).
    qk_rope_head_dim: d_h^R, width of the decoupled rotary query / shared key, even (default E / 2 rounded down to
      an even number, at least 2).
    v_head_dim: d_v, per-head value width (default E).
    decode: "absorbed" (W^UK / W^UV folded into query and output: MQA over the cached latent) or "naive" (the
      cached latent re-up-projected to per-head K / V).
    """

    n_heads: int | None = None
    q_lora_rank: int = 0
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    decode: Literal["absorbed", "naive"] = "absorbed"

    def __post_init__(self):
        for name in ("n_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be a positive integer (or none for the default)")
        if self.q_lora_rank < 0:
            raise ValueError(f"q_lora_rank={self.q_lora_rank} must be >= 0 (0: no query compression)")
        if self.qk_rope_head_dim is not None and self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)")


@dataclasses.dataclass(frozen=True)
class MLADims:
    """The resolved widths: n_h, d_c', d_c, d_h, d_h^R, d_v."""

    n_heads: int
    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v: int

    @classmethod
    def resolve(cls, config: ModelConfig, opts: MLAOptions) -> "MLADims":
        e = config.dim_per_head
        return cls(n_heads=opts.n_heads or config.n_heads, q_lora=opts.q_lora_rank,
                   kv_lora=opts.kv_lora_rank or 4 * e, nope=opts.qk_nope_head_dim or e,
                   rope=opts.qk_rope_head_dim or 2 * max(1, e // 4), v=opts.v_head_dim or e)

    @property
    def qk(self) -> int:
        return self.nope + self.rope

    @property
    def latent(self) -> int:
        """Cached elements per token: the normalised KV latent and the rotated shared key."""
        return self.kv_lora + self.rope


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
    """[c^KV_t; k^R_t] of every past token as one latent head; the model's DecodeState says how many are valid.
    Its first kv_lora_rank columns double as the absorbed path's values."""

    latent_BSKE: jax.Array  # K = 1

    @classmethod
    def empty(cls, batch: int, max_len: int, width: int, dtype) -> "LatentCache":
        return cls(jnp.zeros((batch, max_len, 1, width), dtype))

    def write(self, latent_BTKE, at_B) -> "LatentCache":
        return LatentCache(write_at(self.latent_BSKE, latent_BTKE, at_B))


@register("mla", options=MLAOptions)
class MultiHeadLatentAttention(Mixer):
    supports = Supports(kernel_ops=("flash_attention", "decode_attention"))
    inert_options = {"decode": "the decode algorithm (absorbed or naive): the same result up to float rounding"}

    def __init__(self, config: ModelConfig, options: MLAOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.dims = dims = MLADims.resolve(config, options)
        self.decode_path = options.decode
        self.scale = dims.qk**-0.5
        self.rope_base = config.rope_base
        self.flash_implementation = config.kernel("flash_attention")
        self.decode_implementation = config.kernel("decode_attention")
        self.cache_dtype = jnp.dtype(config.dtype)
        d, h = config.d_model, dims.n_heads
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        norm = dict(eps=config.norm_eps, param_dtype=kw["param_dtype"])
        if dims.q_lora:
            self.q_a_proj = dense(d, dims.q_lora, **kw)
            self.q_a_layernorm = RMSNorm(dims.q_lora, **norm)
            self.q_b_proj = dense(dims.q_lora, h * dims.qk, **kw)
        else:
            self.q_proj = dense(d, h * dims.qk, **kw)
        self.kv_a_proj_with_mqa = dense(d, dims.latent, **kw)
        self.kv_a_layernorm = RMSNorm(dims.kv_lora, **norm)
        self.kv_b_proj = dense(dims.kv_lora, h * (dims.nope + dims.v), **kw)
        self.o_proj = dense(h * dims.v, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)

    def _queries(self, x_BTD, positions_BT):
        """(q^C [B,T,H,d_h], RoPE'd q^R [B,T,H,d_h^R])."""
        dims = self.dims
        q_BTX = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD))) if dims.q_lora else self.q_proj(x_BTD)
        q_BTHE = q_BTX.reshape(*x_BTD.shape[:2], dims.n_heads, dims.qk)
        return q_BTHE[..., :dims.nope], apply_rope(q_BTHE[..., dims.nope:], positions_BT, base=self.rope_base)

    def _latent(self, x_BTD, positions_BT):
        """[RMSNorm(c^KV); RoPE(k^R)] as one latent head [B,T,1,d_c + d_h^R]: what the cache holds."""
        kv_BTX = self.kv_a_proj_with_mqa(x_BTD)[:, :, None, :]
        c_kv_BTKC = self.kv_a_layernorm(kv_BTX[..., :self.dims.kv_lora])
        k_rope_BTKR = apply_rope(kv_BTX[..., self.dims.kv_lora:], positions_BT, base=self.rope_base)
        return jnp.concatenate([c_kv_BTKC, k_rope_BTKR], axis=-1)

    def _per_head_kv(self, latent_BSKE):
        """Up-projected per-head keys [k^C; k^R] [B,S,H,d_h + d_h^R] and values v^C [B,S,H,d_v]."""
        dims = self.dims
        b, s = latent_BSKE.shape[:2]
        kv_BSHX = self.kv_b_proj(latent_BSKE[:, :, 0, :dims.kv_lora]).reshape(b, s, dims.n_heads, dims.nope + dims.v)
        k_rope_BSHR = jnp.broadcast_to(latent_BSKE[..., dims.kv_lora:], (b, s, dims.n_heads, dims.rope))
        return jnp.concatenate([kv_BSHX[..., :dims.nope], k_rope_BSHR], axis=-1), kv_BSHX[..., dims.nope:]

    def _absorbed_decode(self, q_nope_BTHN, q_rope_BTHR, cache: LatentCache, lengths_B):
        """MQA over the cached latent with W^UK folded into the query and W^UV into the output."""
        dims = self.dims
        w_CHX = self.kv_b_proj.kernel[...].astype(q_nope_BTHN.dtype).reshape(dims.kv_lora, dims.n_heads, -1)
        q_lat_BTHC = jnp.einsum("bthn,chn->bthc", q_nope_BTHN, w_CHX[..., :dims.nope])
        o_lat_BTHC = cached_attention(jnp.concatenate([q_lat_BTHC, q_rope_BTHR], axis=-1), cache.latent_BSKE,
                                      cache.latent_BSKE[..., :dims.kv_lora], lengths_B, scale=self.scale,
                                      implementation=self.decode_implementation)
        return jnp.einsum("bthc,chv->bthv", o_lat_BTHC, w_CHX[..., dims.nope:])

    def __call__(self, x_BTD, ctx: ForwardContext, cache: LatentCache | None = None) -> MixerOutput:
        q_nope_BTHN, q_rope_BTHR = self._queries(x_BTD, ctx.positions_BT)
        latent_BTKE = self._latent(x_BTD, ctx.positions_BT)
        b, t = x_BTD.shape[:2]
        metrics = {}
        if ctx.mode == "decode":
            cache = cache.write(latent_BTKE, ctx.lengths_B)
            if self.decode_path == "absorbed":
                o_BTHV = self._absorbed_decode(q_nope_BTHN, q_rope_BTHR, cache, ctx.lengths_B + t)
            else:
                k_BSHE, v_BSHV = self._per_head_kv(cache.latent_BSKE)
                o_BTHV = cached_attention(jnp.concatenate([q_nope_BTHN, q_rope_BTHR], axis=-1), k_BSHE, v_BSHV,
                                          ctx.lengths_B + t, scale=self.scale,
                                          implementation=self.decode_implementation)
        else:
            q_BTHE = jnp.concatenate([q_nope_BTHN, q_rope_BTHR], axis=-1)
            k_BTHE, v_BTHV = self._per_head_kv(latent_BTKE)
            o_BTHV = attention(q_BTHE, k_BTHE, v_BTHV, causal=True, segment_ids_BT=ctx.segment_ids_BT,
                               scale=self.scale, return_lse=ctx.diagnostics, implementation=self.flash_implementation)
            if ctx.diagnostics:
                o_BTHV, lse_BHT = o_BTHV
                metrics = attention_diagnostics(q_BTHE, k_BTHE, lse_BHT, scale=self.scale)
            if ctx.mode == "prefill":
                cache = cache.write(latent_BTKE, jnp.zeros((b,), jnp.int32))
        return MixerOutput(self.o_proj(o_BTHV.reshape(b, t, self.dims.n_heads * self.dims.v)), cache,
                           metrics=metrics)

    def init_cache(self, batch: int, max_len: int) -> LatentCache:
        return LatentCache.empty(batch, max_len, self.dims.latent, self.cache_dtype)

    def cache_bytes_per_token(self) -> int:
        return self.dims.latent * dtype_bytes(self.cache_dtype)

    def _projection_flops(self) -> int:
        """Per token on every path: the query projections, W^DKV / W^KR (the latent) and W^O."""
        dims, d = self.dims, self.o_proj.out_features
        h = dims.n_heads
        q_proj = d * dims.q_lora + dims.q_lora * h * dims.qk if dims.q_lora else d * h * dims.qk
        return 2 * (q_proj + d * dims.latent + h * dims.v * d)

    def flops_per_token(self, seq_len: int) -> int:
        """The training / prefill path: projections, the token's up-projection W^UK / W^UV, then MHA with q.k at
        d_h + d_h^R and p.v at d_v over the average causal context. Decode costs differ: decode_flops_per_token."""
        dims = self.dims
        h = dims.n_heads
        up = 2 * dims.kv_lora * h * (dims.nope + dims.v)
        attend = 2 * h * (dims.qk + dims.v) * average_context(seq_len, None)
        return int(round(self._projection_flops() + up + attend))

    def decode_flops_per_token(self, context_len: int, path: Literal["absorbed", "naive"] | None = None) -> int:
        """FLOPs of one decoded token attending `context_len` cached tokens (itself included), on `path` (default
        this layer's `decode` option); 2 per multiply-add, as flops_per_token.

        absorbed: projections + 2 n_h d_c (d_h + d_v) (W^UK into the query, W^UV out of the latent output: once per
          token, whatever the context) + 2 n_h ((d_c + d_h^R) + d_c) context_len (MQA over the 576 / 512-wide
          latent in the DeepSeek shape).
        naive: projections + 2 context_len d_c n_h (d_h + d_v) (the cached latent re-up-projected at every step)
          + 2 n_h ((d_h + d_h^R) + d_v) context_len (MHA at 192 / 128)."""
        path = path or self.decode_path
        if path not in ("absorbed", "naive"):
            raise ValueError(f"path={path!r} must be 'absorbed' or 'naive' (or none: the layer's decode option)")
        dims = self.dims
        h = dims.n_heads
        up = 2 * dims.kv_lora * h * (dims.nope + dims.v)
        if path == "absorbed":
            return self._projection_flops() + up + 2 * h * (dims.latent + dims.kv_lora) * context_len
        return self._projection_flops() + (up + 2 * h * (dims.qk + dims.v)) * context_len
