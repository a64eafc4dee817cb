"""Linear attention with an optional per-head decay, output norm and output gate: the linear-attention / RetNet /
simple-GLA / Lightning / Based family.

Katharopoulos et al., "Transformers are RNNs" (arXiv 2006.16236): softmax replaced by a feature map phi, normalised;
RetNet (Sun et al., arXiv 2307.08621), simple GLA (FLA's `SimpleGatedLinearAttention`, the scalar-gate case of GLA,
arXiv 2312.06635) and Lightning Attention-2 (Qin et al., arXiv 2401.04658, in TransNormerLLM's layer, arXiv
2307.14341): un-normalised, a per-head decay, an output norm and an output gate; Based (Arora et al., arXiv
2402.18668): the 2nd-order Taylor feature map.

Per head h (q/k/v heads laid out as GQA: H query heads, K key/value heads, head h reads kv head h // (H / K)):

    q_h = phi(RoPE?(x W_q^h)),  k_g = phi(RoPE?(x W_k^g)),  v_g = x W_v^g
    S_t = exp(g_t) S_{t-1} + k_t^T v_t          (state [E', F], float32; g_t <= 0 the log decay)
    z_t = exp(g_t) z_{t-1} + k_t                 (normalize only: carried as an extra all-ones value column)
    o_t = q_t S_t / (q_t z_t + eps)              normalize=true (phi positive: elu1, taylor2)
    o_t = Norm(scale * q_t S_t)                  normalize=false, Norm = output_norm
    y   = (act(x W_g) * concat_h(o_h)) W_o      output_gate=act; without a gate y = concat_h(o_h) W_o

    phi:     identity | elu1 = elu(x) + 1 | silu | taylor2 = [1, x / d^(1/4), vec(x x^T) / (sqrt(2 d))], d = feature_dim
    g_t[h]:  none 0 | fixed log(1 - 2^(-5-h)) | alibi -s_h (ALiBi's slopes, optionally depth-scaled)
             | learned -softplus(a_h) | data logsigmoid(x w_h + b_h) / gate_normalizer

Presets: retnet (identity, rope, fixed decay, GroupNorm, swish gate), simple_gla (identity, data decay with
gate_normalizer 16, RMSNorm, swish gate), lightning (silu, alibi decay, SRMSNorm, identity gate), based (taylor2,
feature_dim 16, normalised). What differs from the papers: retnet's value width is head_dim (RetNet doubles it);
simple_gla has no short convolutions on q/k/v and its gate bias starts at RetNet's gammas; lightning's slopes are
depth-scaled only when a plan gives layer_depth, and TransNormerLLM's LRPE is not implemented (rope=true instead).

More in docs/mixers/linear_attention.md: each feature map, decay and output norm in full, the presets, the kernel
path (`pallas_kernels.chunked_linear_attention`), the decode state, packed documents and the FLOPs count.

Extra shape letters: P = E' (feature width of phi), V = F' (value width incl. the normaliser column), X = H F (the
heads' output, concatenated).
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
from attnzoo.layers import NORMALIZER_EPS, RMSNorm, apply_rope, dense, taylor2_features
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports, head_counts
from attnzoo.registry import register

FEATURE_MAPS = ("identity", "elu1", "silu", "taylor2")
POSITIVE_FEATURE_MAPS = ("elu1", "taylor2")  # a normaliser q.z > 0 needs phi > 0
DECAYS = ("fixed", "alibi", "learned", "data")
OUTPUT_NORMS = ("rms", "group", "srms")
OUTPUT_GATES = {"swish": jax.nn.silu, "sigmoid": jax.nn.sigmoid, "identity": lambda x: x}
BASED_FEATURE_DIM = 16  # Based's default Taylor input width
DEPTH_EPS = 1e-5  # TransNormerLLM keeps the last layer's slopes just above 0


@dataclasses.dataclass(frozen=True)
class LinearAttentionOptions:
    """feature_map: phi, one of identity / elu1 / silu / taylor2. feature_dim: taylor2's input width (q/k projected
    to it; default 16, Based's); only with taylor2. decay: none / fixed (RetNet's gammas) / alibi (Lightning's
    slopes) / learned (per head) / data (per token and head). layer_depth: l / (L - 1) in [0, 1] of this layer, with
    decay=alibi: slopes times 1 - layer_depth + 1e-5 (TransNormerLLM); none: unscaled. gate_normalizer: tau of the
    data decay logsigmoid(x w + b) / tau (16 in simple_gla, as FLA's gate_logit_normalizer); only with decay=data.
    normalize: divide by q.z (needs a positive map: elu1 or taylor2), else an output norm. output_norm: rms (per
    head, FLA), group (per-head GroupNorm, RetNet) or srms (parameter-free RMS over all heads, TransNormerLLM); only
    with normalize=false, default rms there. output_gate: swish / sigmoid / identity activation of a gate projection
    multiplying the heads' output, or none. n_heads, n_kv_heads ("all": one kv head per query head), head_dim:
    default the model's. rope: rotary positions on q and k before phi. chunk_size: tokens per chunk of the chunked
    op (a power of 2 >= 16, so every implementation takes it; the result does not depend on it)."""

    feature_map: Literal["identity", "elu1", "silu", "taylor2"] = "elu1"
    feature_dim: int | None = None
    decay: Literal["fixed", "alibi", "learned", "data"] | None = None
    layer_depth: float | None = None
    gate_normalizer: float = 1.0
    normalize: bool = True
    output_norm: Literal["rms", "group", "srms"] | None = None
    output_gate: Literal["swish", "sigmoid", "identity"] | None = None
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
        if self.output_norm is not None and self.output_norm not in OUTPUT_NORMS:
            raise ValueError(f"output_norm={self.output_norm!r} must be one of {', '.join(OUTPUT_NORMS)} or none")
        if self.output_gate is not None and self.output_gate not in OUTPUT_GATES:
            raise ValueError(f"output_gate={self.output_gate!r} must be one of {', '.join(OUTPUT_GATES)} or none")
        for name in ("feature_dim", "n_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be a positive integer (or none for the default)")
        if isinstance(self.n_kv_heads, int) and self.n_kv_heads <= 0:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must be a positive integer, 'all' or none")
        if self.feature_dim is not None and self.feature_map != "taylor2":
            raise ValueError(f"feature_dim={self.feature_dim} is the taylor2 map's input width; set it only with "
                             f"feature_map=taylor2 (got feature_map={self.feature_map})")
        if self.layer_depth is not None and (self.decay != "alibi" or not 0 <= self.layer_depth <= 1):
            raise ValueError(f"layer_depth={self.layer_depth} scales the alibi slopes: set it in [0, 1] (l / (L - 1) "
                             f"of layer l of L) and only with decay=alibi (got decay={self.decay})")
        if self.gate_normalizer <= 0 or (self.gate_normalizer != 1 and self.decay != "data"):
            raise ValueError(f"gate_normalizer={self.gate_normalizer} divides the data decay's log gate: a number "
                             f"> 0, other than 1 only with decay=data (got decay={self.decay})")
        if self.normalize and self.feature_map not in POSITIVE_FEATURE_MAPS:
            raise ValueError(f"normalize=true needs a positive feature map (feature_map=elu1 or taylor2): with "
                             f"{self.feature_map} the normaliser q.z can be zero or negative; use normalize=false")
        if self.normalize and self.output_norm is not None:
            raise ValueError(f"output_norm={self.output_norm} replaces the normaliser q.z: set it only with "
                             f"normalize=false")
        if self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size={self.chunk_size} must be a power of 2 >= 16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearAttentionCache:
    """The recurrent state per query head, [B, H, E', F'] float32 (the normaliser z is its last value column)."""

    state_BHPV: jax.Array


def feature_map(name: str, x):
    if name == "elu1":
        return jax.nn.elu(x) + 1
    if name == "silu":
        return jax.nn.silu(x)
    if name == "taylor2":
        return taylor2_features(x)
    return x


def feature_width(name: str, d: int) -> int:
    return 1 + d + d * d if name == "taylor2" else d


def retnet_log_decay(n_heads: int) -> np.ndarray:
    """log gamma_h for RetNet's gamma_h = 1 - 2^(-5-h) (float64: gamma rounds to 1 in float32 for large h)."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(n_heads))))


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi's head slopes (arXiv 2108.12409), Lightning's s_h: 2^(-8 h / n), h = 1..n, for n a power of 2; else
    those of the largest power of 2 below n, then every other slope of the next power of 2."""
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = 2.0 ** (-8.0 * np.arange(1, closest + 1) / closest)
    if closest == n_heads:
        return slopes
    return np.concatenate([slopes, alibi_slopes(2 * closest)[0::2][: n_heads - closest]])


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    return y + np.log(-np.expm1(-y))


def fixed_log_decay(options: LinearAttentionOptions, n_heads: int) -> np.ndarray:
    """log decay per head of decay=fixed (RetNet's gammas) or decay=alibi (Lightning's slopes, depth-scaled)."""
    if options.decay == "fixed":
        return retnet_log_decay(n_heads)
    depth_scale = 1.0 if options.layer_depth is None else 1 - options.layer_depth + DEPTH_EPS
    return -alibi_slopes(n_heads) * depth_scale


class GroupNorm(nnx.Module):
    """GroupNorm with one group per head on [..., H, F]: each head's output centred and scaled to unit variance
    (float32), then a learned scale and bias per channel (RetNet's per-head normalisation)."""

    def __init__(self, n_heads: int, dim: int, *, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((n_heads, dim), param_dtype))
        self.bias = nnx.Param(jnp.zeros((n_heads, dim), param_dtype))

    def __call__(self, x_BTHF):
        x32 = x_BTHF.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x_BTHF.dtype)


class SimpleRMSNorm(nnx.Module):
    """TransNormerLLM's SRMSNorm on [..., H, F]: x / rms(x) over all heads together, no parameters (float32)."""

    def __init__(self, *, eps: float):
        self.eps = eps

    def __call__(self, x_BTHF):
        x32 = x_BTHF.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=(-2, -1), keepdims=True) + self.eps)
        return y.astype(x_BTHF.dtype)


def output_norm(name: str, n_heads: int, head_dim: int, config: ModelConfig) -> nnx.Module:
    """The norm on the heads' output [..., H, F] when normalize=false (see OUTPUT_NORMS)."""
    param_dtype = jnp.dtype(config.param_dtype)
    if name == "group":
        return GroupNorm(n_heads, head_dim, eps=config.norm_eps, param_dtype=param_dtype)
    if name == "srms":
        return SimpleRMSNorm(eps=config.norm_eps)
    return RMSNorm(head_dim, eps=config.norm_eps, param_dtype=param_dtype)


@register("linear_attention", options=LinearAttentionOptions)
class LinearAttention(Mixer):
    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=("chunked_linear_attention",))
    inert_options = {"chunk_size": "the chunk length of the chunked scan: the same result up to float rounding"}

    @classmethod
    def check(cls, options: LinearAttentionOptions, config: ModelConfig) -> None:
        n_heads, n_kv_heads, head_dim = head_counts(config, options)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        qk_dim = qk_width(options, head_dim)
        if options.rope and qk_dim % 2:
            raise ValueError(f"the q/k width {qk_dim} (head_dim, or feature_dim with taylor2) must be even for "
                             f"rotary embeddings (or set rope=false)")

    def __init__(self, config: ModelConfig, options: LinearAttentionOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = head_counts(config, options)
        self.qk_dim = qk_width(options, self.head_dim)
        self.feature_map = options.feature_map
        self.feature_dim = feature_width(options.feature_map, self.qk_dim)
        self.decay = options.decay
        self.gate_normalizer = options.gate_normalizer
        self.normalize = options.normalize
        self.scale = 1.0 if options.normalize or options.feature_map == "taylor2" else self.head_dim**-0.5
        self.rope_base = config.rope_base if options.rope else None
        self.chunk_size = options.chunk_size
        self.implementation = config.kernel("chunked_linear_attention")
        d, h, k, f = config.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        param_dtype = jnp.dtype(config.param_dtype)
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d, h * self.qk_dim, **kw)
        self.k_proj = dense(d, k * self.qk_dim, **kw)
        self.v_proj = dense(d, k * f, **kw)
        self.g_proj = dense(d, h * f, **kw) if options.output_gate else None
        self.gate_activation = options.output_gate
        self.o_proj = dense(h * f, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)
        # Constant decays as static floats (float64-exact up to the float32 cast in log_decay).
        self.fixed_log_decay_H = (tuple(map(float, fixed_log_decay(options, h)))
                                  if options.decay in ("fixed", "alibi") else None)
        # -log gamma_h, RetNet's multi-scale decay rates, where learned and data decays start.
        retnet_rate_H = -retnet_log_decay(h)
        self.decay_logit = (nnx.Param(jnp.asarray(inverse_softplus(retnet_rate_H), param_dtype))
                            if options.decay == "learned" else None)
        self.decay_proj = dense(d, h, use_bias=True, **kw) if options.decay == "data" else None
        if self.decay_proj is not None:  # logsigmoid(b) / tau = log gamma
            self.decay_proj.bias = nnx.Param(jnp.asarray(
                -inverse_softplus(options.gate_normalizer * retnet_rate_H), param_dtype))
        self.out_norm = None if options.normalize else output_norm(options.output_norm or "rms", h, f, config)

    def log_decay(self, x_BTD):
        """g [B, T, H] float32, <= 0."""
        b, t, _ = x_BTD.shape
        if self.fixed_log_decay_H is not None:
            return jnp.broadcast_to(jnp.asarray(self.fixed_log_decay_H, jnp.float32), (b, t, self.n_heads))
        if self.decay == "learned":
            return jnp.broadcast_to(-jax.nn.softplus(self.decay_logit[...].astype(jnp.float32)), (b, t, self.n_heads))
        if self.decay == "data":
            return jax.nn.log_sigmoid(self.decay_proj(x_BTD).astype(jnp.float32)) / self.gate_normalizer
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
        o_BTX = o_BTHF.reshape(b, t, self.n_heads * self.head_dim)
        if self.g_proj is not None:
            o_BTX = o_BTX * OUTPUT_GATES[self.gate_activation](self.g_proj(x_BTD))
        return MixerOutput(self.o_proj(o_BTX), cache)

    def init_cache(self, batch: int, max_len: int) -> LinearAttentionCache:
        value_width = self.head_dim + self.normalize
        return LinearAttentionCache(jnp.zeros((batch, self.n_heads, self.feature_dim, value_width), jnp.float32))

    def flops_per_token(self, seq_len: int) -> int:
        d, h, k, f = self.q_proj.in_features, self.n_heads, self.n_kv_heads, self.head_dim
        project = 2 * d * (h * self.qk_dim + k * self.qk_dim + k * f) + 2 * h * f * d
        gate = 2 * d * h * f if self.g_proj is not None else 0
        decay = 2 * d * h if self.decay == "data" else 0
        # phi(k)^T v into the state and phi(q) S out of it, per head.
        recur = 4 * h * self.feature_dim * (f + self.normalize)
        return project + gate + decay + recur


def qk_width(options: LinearAttentionOptions, head_dim: int) -> int:
    """Width of the q/k projections per head: taylor2's feature_dim, else head_dim."""
    if options.feature_map == "taylor2":
        return options.feature_dim or BASED_FEATURE_DIM
    return head_dim


register("retnet", options=LinearAttentionOptions, feature_map="identity", rope=True, decay="fixed", normalize=False,
         output_norm="group", output_gate="swish")(LinearAttention)
register("simple_gla", options=LinearAttentionOptions, feature_map="identity", decay="data", gate_normalizer=16.0,
         normalize=False, output_norm="rms", output_gate="swish")(LinearAttention)
register("lightning", options=LinearAttentionOptions, feature_map="silu", decay="alibi", normalize=False,
         output_norm="srms", output_gate="identity")(LinearAttention)
register("based", options=LinearAttentionOptions, feature_map="taylor2", decay=None, normalize=True)(
    LinearAttention)
