"""Linear attention with an optional per-head decay: the linear-attention / RetNet / simple-GLA / Based family.

Katharopoulos et al., "Transformers are RNNs" (arXiv 2006.16236): softmax replaced by a feature map phi, normalised;
RetNet (Sun et al., arXiv 2307.08621) and Lightning Attention-2 (Qin et al., arXiv 2401.04658): a fixed per-head decay,
un-normalised, with a per-head output norm; simple GLA (FLA `simple_gla`, the scalar-gate case of GLA, arXiv
2312.06635): a data-dependent per-head decay; Based (Arora et al., arXiv 2402.18668): the 2nd-order Taylor feature map.

Per head h (q/k/v heads laid out as GQA: H query heads, K key/value heads, head h reads kv head h // (H / K)):

    q_h = phi(RoPE?(x W_q^h)),  k_g = phi(RoPE?(x W_k^g)),  v_g = x W_v^g
    S_t = exp(g_t) S_{t-1} + k_t^T v_t          (state [E', F], float32; g_t <= 0 the log decay)
    z_t = exp(g_t) z_{t-1} + k_t                 (normalize only: carried as an extra all-ones value column)
    o_t = q_t S_t / (q_t z_t + eps)              normalize=true (phi positive: elu1, taylor2)
    o_t = RMSNorm(scale * q_t S_t)               normalize=false (per head, as RetNet's / Lightning's output norm)
    y   = concat_h(o_h) W_o

Feature maps phi: identity; elu1 = elu(x) + 1 (Katharopoulos); taylor2 = [1, x / d^(1/4), vec(x x^T) / (sqrt(2 d))]
on q/k projected to d = feature_dim (Based's TaylorExp), so phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d),
the 2nd-order Taylor expansion of exp(s). scale = head_dim^-1/2 for identity / elu1 (FLA's default), 1 for taylor2
(its map already carries 1/sqrt(d)) and irrelevant when normalised.

Decays g_t[h]: none (0; `decay=none` in a plan); fixed, RetNet's gamma_h = 1 - 2^(-5-h); learned, -softplus(a_h) per
head; data, -softplus(x w_h + b_h) per token and head. Learned and data start at RetNet's gammas
(a_h, b_h = softplus^-1(-log gamma_h)).

The recurrence runs through `pallas_kernels.chunked_linear_attention` (the model's "chunked_linear_attention"
implementation). Key/value heads are repeated to the H query heads before it, since each query head's decay makes its
own state. Decode state (`LinearAttentionCache`): S (and z) per head, [B, H, E', F(+1)] float32, a constant size, so
`cache_bytes_per_token() == 0`. Packed documents (`ctx.segment_ids_BT`, full and prefill; a document is a run of
equal consecutive ids): the op resets S (and z) at each document's first token, so nothing crosses documents; a
packed prefill leaves each prompt's last document's state. Rotary positions follow `ctx.positions_BT` (restarted per
document by the caller in packed training).

FLOPs per token (2 per multiply-add; feature maps, decay gates and norms not counted):
    2 D (H E_qk + K E_qk + K F) + 2 H F D (projections) + 2 D H (data decay) + 4 H E' F' (state update and read-out)
with E_qk = head_dim (feature_dim for taylor2), E' = phi's width, F' = F + 1 when normalised.

Extra shape letters: P = E' (feature width of phi), V = F' (value width incl. the normaliser column).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from attnzoo.config import ModelConfig
from attnzoo.layers import RMSNorm, apply_rope, dense
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports
from attnzoo.mixers.gqa import heads
from attnzoo.registry import register

FEATURE_MAPS = ("identity", "elu1", "taylor2")
DECAYS = ("fixed", "learned", "data")
BASED_FEATURE_DIM = 16  # Based's default Taylor input width
NORMALIZER_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class LinearAttentionOptions:
    """feature_map: phi, one of identity / elu1 / taylor2. feature_dim: taylor2's input width (q/k projected to it;
    default 16, Based's); only with taylor2. decay: none / fixed (RetNet) / learned (per head) / data (per token and
    head). normalize: divide by q.z (needs a positive map: elu1 or taylor2), else a per-head output RMSNorm.
    n_heads, n_kv_heads ("all": one kv head per query head), head_dim: default the model's. rope: rotary positions on
    q and k before phi. chunk_size: tokens per chunk of the chunked op (a power of 2 >= 16, so every implementation
    takes it; the result does not depend on it)."""

    feature_map: Literal["identity", "elu1", "taylor2"] = "elu1"
    feature_dim: int | None = None
    decay: Literal["fixed", "learned", "data"] | None = None
    normalize: bool = True
    n_heads: int | None = None
    n_kv_heads: int | Literal["all"] | None = None
    head_dim: int | None = None
    rope: bool = False
    chunk_size: int = 64

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={self.feature_map!r} must be one of {', '.join(FEATURE_MAPS)}")
        if self.decay is not None and self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r} must be one of {', '.join(DECAYS)} or none")
        for name in ("feature_dim", "n_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be a positive integer (or none for the default)")
        if isinstance(self.n_kv_heads, int) and self.n_kv_heads <= 0:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must be a positive integer, 'all' or none")
        if self.feature_dim is not None and self.feature_map != "taylor2":
            raise ValueError(f"feature_dim={self.feature_dim} is the taylor2 map's input width; set it only with "
                             f"feature_map=taylor2 (got feature_map={self.feature_map})")
        if self.normalize and self.feature_map == "identity":
            raise ValueError("normalize=true needs a positive feature map (feature_map=elu1 or taylor2): with "
                             "identity the normaliser q.z can be zero or negative; use normalize=false")
        if self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size={self.chunk_size} must be a power of 2 >= 16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearAttentionCache:
    """The recurrent state per query head, [B, H, E', F'] float32 (the normaliser z is its last value column)."""

    state_BHPV: jax.Array


def taylor2_features(x_BTHD):
    """Based's TaylorExp: [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)], width 1 + d + d^2, so that
    phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d)."""
    d = x_BTHD.shape[-1]
    outer = (x_BTHD[..., :, None] * x_BTHD[..., None, :]).reshape(*x_BTHD.shape[:-1], d * d)
    return jnp.concatenate([jnp.ones_like(x_BTHD[..., :1]), x_BTHD / d**0.25, outer / math.sqrt(2 * d)], axis=-1)


def feature_map(name: str, x):
    if name == "elu1":
        return jax.nn.elu(x) + 1
    if name == "taylor2":
        return taylor2_features(x)
    return x


def feature_width(name: str, d: int) -> int:
    return 1 + d + d * d if name == "taylor2" else d


def retnet_log_decay(n_heads: int) -> np.ndarray:
    """log gamma_h for RetNet's gamma_h = 1 - 2^(-5-h) (float64: gamma rounds to 1 in float32 for large h)."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(n_heads))))


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    return y + np.log(-np.expm1(-y))


@register("linear_attention", options=LinearAttentionOptions)
class LinearAttention(Mixer):
    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=("chunked_linear_attention",))

    @classmethod
    def check(cls, options: LinearAttentionOptions, config: ModelConfig) -> None:
        n_heads, n_kv_heads, head_dim = heads(config, options)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        qk_dim = qk_width(options, head_dim)
        if options.rope and qk_dim % 2:
            raise ValueError(f"the q/k width {qk_dim} (head_dim, or feature_dim with taylor2) must be even for "
                             f"rotary embeddings (or set rope=false)")

    def __init__(self, config: ModelConfig, options: LinearAttentionOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = heads(config, options)
        self.qk_dim = qk_width(options, self.head_dim)
        self.feature_map = options.feature_map
        self.feature_dim = feature_width(options.feature_map, self.qk_dim)
        self.decay = options.decay
        self.normalize = options.normalize
        self.scale = 1.0 if options.normalize or options.feature_map == "taylor2" else self.head_dim**-0.5
        self.rope_base = config.rope_base if options.rope else None
        self.chunk_size = options.chunk_size
        self.implementation = config.kernel("chunked_linear_attention")
        d, h, k = config.d_model, self.n_heads, self.n_kv_heads
        param_dtype = jnp.dtype(config.param_dtype)
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d, h * self.qk_dim, **kw)
        self.k_proj = dense(d, k * self.qk_dim, **kw)
        self.v_proj = dense(d, k * self.head_dim, **kw)
        self.o_proj = dense(h * self.head_dim, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)
        decay_init_H = jnp.asarray(inverse_softplus(-retnet_log_decay(h)), param_dtype)
        self.decay_logit = nnx.Param(decay_init_H) if options.decay == "learned" else None
        self.decay_proj = dense(d, h, use_bias=True, **kw) if options.decay == "data" else None
        if self.decay_proj is not None:
            self.decay_proj.bias = nnx.Param(decay_init_H)
        self.out_norm = None if options.normalize else RMSNorm(self.head_dim, eps=config.norm_eps,
                                                               param_dtype=param_dtype)

    def log_decay(self, x_BTD):
        """g [B, T, H] float32, <= 0."""
        b, t, _ = x_BTD.shape
        if self.decay == "fixed":
            return jnp.broadcast_to(jnp.asarray(retnet_log_decay(self.n_heads), jnp.float32), (b, t, self.n_heads))
        if self.decay == "learned":
            return jnp.broadcast_to(-jax.nn.softplus(self.decay_logit[...].astype(jnp.float32)), (b, t, self.n_heads))
        if self.decay == "data":
            return -jax.nn.softplus(self.decay_proj(x_BTD).astype(jnp.float32))
        return jnp.zeros((b, t, self.n_heads), jnp.float32)

    def __call__(self, x_BTD, ctx: ForwardContext, cache: LinearAttentionCache | None = None) -> MixerOutput:
        b, t, _ = x_BTD.shape
        group = self.n_heads // self.n_kv_heads
        q_BTHE = self.q_proj(x_BTD).reshape(b, t, self.n_heads, self.qk_dim)
        k_BTKE = self.k_proj(x_BTD).reshape(b, t, self.n_kv_heads, self.qk_dim)
        v_BTKF = self.v_proj(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim)
        if self.rope_base is not None:
            q_BTHE = apply_rope(q_BTHE, ctx.positions_BT, base=self.rope_base)
            k_BTKE = apply_rope(k_BTKE, ctx.positions_BT, base=self.rope_base)
        q_BTHP = feature_map(self.feature_map, q_BTHE)
        # Every query head decays its own state, so kv heads are repeated to the query heads.
        k_BTHP = jnp.repeat(feature_map(self.feature_map, k_BTKE), group, axis=2)
        v_BTHV = jnp.repeat(v_BTKF, group, axis=2)
        if self.normalize:  # an all-ones value column makes the op carry z_t = sum of decayed k's beside S
            v_BTHV = jnp.concatenate([v_BTHV, jnp.ones_like(v_BTHV[..., :1])], axis=-1)

        decode = ctx.mode == "decode"
        o_BTHV, state_BHPV = pallas_kernels.chunked_linear_attention(
            q_BTHP, k_BTHP, v_BTHV, self.log_decay(x_BTD), scale=self.scale,
            initial_state_BHEF=cache.state_BHPV if decode else None,
            lengths_B=ctx.lengths_B if ctx.mode == "prefill" else None,
            segment_ids_BT=None if decode else ctx.segment_ids_BT,  # decode continues each cached sequence
            chunk_size=self.chunk_size, return_final_state=True, implementation=self.implementation)
        if ctx.mode != "full":
            cache = LinearAttentionCache(state_BHPV)

        if self.normalize:
            o_BTHF = o_BTHV[..., :-1] / (o_BTHV[..., -1:] + NORMALIZER_EPS)
        else:
            o_BTHF = self.out_norm(o_BTHV)
        return MixerOutput(self.o_proj(o_BTHF.reshape(b, t, self.n_heads * self.head_dim)), cache)

    def init_cache(self, batch: int, max_len: int) -> LinearAttentionCache:
        value_width = self.head_dim + self.normalize
        return LinearAttentionCache(jnp.zeros((batch, self.n_heads, self.feature_dim, value_width), jnp.float32))

    def flops_per_token(self, seq_len: int) -> int:
        d, h, k, f = self.q_proj.in_features, self.n_heads, self.n_kv_heads, self.head_dim
        project = 2 * d * (h * self.qk_dim + k * self.qk_dim + k * f) + 2 * h * f * d
        decay = 2 * d * h if self.decay == "data" else 0
        # phi(k)^T v into the state and phi(q) S out of it, per head.
        recur = 4 * h * self.feature_dim * (f + self.normalize)
        return project + decay + recur


def qk_width(options: LinearAttentionOptions, head_dim: int) -> int:
    """Width of the q/k projections per head: taylor2's feature_dim, else head_dim."""
    if options.feature_map == "taylor2":
        return options.feature_dim or BASED_FEATURE_DIM
    return head_dim


register("retnet", options=LinearAttentionOptions, feature_map="identity", decay="fixed", normalize=False)(
    LinearAttention)
register("simple_gla", options=LinearAttentionOptions, feature_map="identity", decay="data", normalize=False)(
    LinearAttention)
register("based", options=LinearAttentionOptions, feature_map="taylor2", decay=None, normalize=True)(
    LinearAttention)
