"""Deconstructing Attention's Non-approximate variant (Xue, Moosavi, Aletras, arXiv 2510.11602, Eqs. 7-8, 18).

Softmax over a per-token score instead of a pairwise similarity (relaxes the mathematical form), per head:

    q_j = SiLU(h_j W_Q),  k_j = h_j W_K,  v_j = h_j W_V
    s_j = q_j . k_j / sqrt(E)                                  (one scalar per token: no q_i . k_j for i != j)
    o_i = sum_{j<=i} exp(s_j) v_j / sum_{j<=i} exp(s_j)        (a causal cumulative softmax-weighted mean)
    y   = concat_h(o_h) W_O

Computed in float32 as a stable prefix scan over (running max m, sum exp(s - m) v, sum exp(s - m)): the same
combine runs the whole sequence (an associative scan), the prefill and the decode step, whose state is constant
in size (`cache_bytes_per_token() == 0`). `qk_norm` (RMSNorm on the q and k projections per head, before the
SiLU; Qwen3's QK-norm, which the paper credits for the 1.7B model converging) is the paper's rescue ablation.
Packed documents (segment ids) are not supported (the scan has no per-document reset).

FLOPs per token (2 per multiply-add): 2 D E (3 H) + 2 H E D (projections) + 2 H E (scores) + 2 H E (weighted sum).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.config import ModelConfig
from attnzoo.diagnostics import attention_diagnostics
from attnzoo.layers import RMSNorm, dense
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports
from attnzoo.registry import register

EMPTY_MAX = -1e30  # running max of an empty prefix: exp(EMPTY_MAX - s) underflows to 0, never NaN


@dataclasses.dataclass(frozen=True)
class DeconNonApproxOptions:
    """qk_norm: RMSNorm on the q and k projections per head (the paper's QK-norm rescue; off reproduces it)."""

    qk_norm: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CumulativeSoftmaxState:
    """The prefix so far per head, float32: running max [B, H], sum exp(s - max) v [B, H, F], sum exp(s - max)."""

    max_BH: jax.Array
    num_BHF: jax.Array
    den_BH: jax.Array


def combine(earlier, later):
    """The prefix state of `earlier` followed by `later` (each (max, weighted value sum, weight sum))."""
    max_a, num_a, den_a = earlier
    max_b, num_b, den_b = later
    new_max = jnp.maximum(max_a, max_b)
    w_a, w_b = jnp.exp(max_a - new_max), jnp.exp(max_b - new_max)
    return new_max, num_a * w_a[..., None] + num_b * w_b[..., None], den_a * w_a + den_b * w_b


def cumulative_softmax(s_BTH, v_BTHF, state: CumulativeSoftmaxState | None = None):
    """Prefix states after each token, (max [B,T,H], num [B,T,H,F], den [B,T,H]), continuing `state` if given."""
    tokens = (s_BTH, v_BTHF, jnp.ones_like(s_BTH))
    prefix = jax.lax.associative_scan(combine, tokens, axis=1)
    if state is None:
        return prefix
    carried = (state.max_BH[:, None], state.num_BHF[:, None], state.den_BH[:, None])
    return combine(carried, prefix)


@register("decon_nonapprox", options=DeconNonApproxOptions)
class DeconNonApprox(Mixer):
    supports = Supports(decode=True, multi_token_decode=True)

    def __init__(self, config: ModelConfig, options: DeconNonApproxOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.n_heads, self.head_dim = config.n_heads, config.dim_per_head
        d, h, e = config.d_model, self.n_heads, self.head_dim
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = (dense(d, h * e, **kw) for _ in range(3))
        self.o_proj = dense(h * e, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)
        norm = dict(eps=config.norm_eps, param_dtype=kw["param_dtype"])
        self.q_norm = RMSNorm(e, **norm) if options.qk_norm else None
        self.k_norm = RMSNorm(e, **norm) if options.qk_norm else None

    def scores_values(self, x_BTD):
        """s [B,T,H] = SiLU(q) . k / sqrt(E) and v [B,T,H,F], float32."""
        b, t, _ = x_BTD.shape
        q_BTHE, k_BTHE, v_BTHF = (proj(x_BTD).reshape(b, t, self.n_heads, self.head_dim).astype(jnp.float32)
                                  for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:
            q_BTHE, k_BTHE = self.q_norm(q_BTHE), self.k_norm(k_BTHE)
        s_BTH = jnp.sum(jax.nn.silu(q_BTHE) * k_BTHE, axis=-1) / math.sqrt(self.head_dim)
        return s_BTH, v_BTHF

    def __call__(self, x_BTD, ctx: ForwardContext, cache: CumulativeSoftmaxState | None = None) -> MixerOutput:
        if ctx.segment_ids_BT is not None and ctx.mode == "full":
            raise ValueError("decon_nonapprox: packed documents (segment_ids_BT) are not supported; the cumulative "
                             "softmax has no per-document reset")
        b, t, _ = x_BTD.shape
        s_BTH, v_BTHF = self.scores_values(x_BTD)
        max_BTH, num_BTHF, den_BTH = cumulative_softmax(s_BTH, v_BTHF, cache if ctx.mode == "decode" else None)
        o_BTHF = num_BTHF / den_BTH[..., None]
        metrics = {}
        if ctx.diagnostics:  # the map exp(s_j - lse_i) is attention with q = 1 and k = s (width 1), scale 1
            lse_BHT = jnp.swapaxes(max_BTH + jnp.log(den_BTH), 1, 2)
            metrics = attention_diagnostics(jnp.ones_like(s_BTH)[..., None], s_BTH[..., None], lse_BHT, scale=1.0)
        if ctx.mode != "full":
            last_B = jnp.full((b,), t - 1) if ctx.mode == "decode" else ctx.lengths_B - 1
            at = jnp.maximum(last_B, 0)[:, None, None]
            state = (jnp.take_along_axis(max_BTH, at, 1)[:, 0], jnp.take_along_axis(num_BTHF, at[..., None], 1)[:, 0],
                     jnp.take_along_axis(den_BTH, at, 1)[:, 0])
            if ctx.mode == "prefill":  # an empty prompt leaves the empty state
                empty = self.init_cache(b, 1)
                has_tokens_B = ctx.lengths_B > 0
                state = tuple(jnp.where(has_tokens_B.reshape(-1, *[1] * (x.ndim - 1)), x, e)
                              for x, e in zip(state, (empty.max_BH, empty.num_BHF, empty.den_BH)))
            cache = CumulativeSoftmaxState(*state)
        y = self.o_proj(o_BTHF.reshape(b, t, self.n_heads * self.head_dim).astype(x_BTD.dtype))
        return MixerOutput(y, cache, metrics=metrics)

    def attention_map(self, x_BTD, ctx: ForwardContext):
        """The explicit causal map A [B,H,T,T], A_ij = exp(s_j) / sum_{k<=i} exp(s_k) (for the indicators)."""
        s_BTH, _ = self.scores_values(x_BTD)
        t = s_BTH.shape[1]
        logits_BHTS = jnp.broadcast_to(jnp.swapaxes(s_BTH, 1, 2)[:, :, None, :], (*s_BTH.shape[::2], t, t))
        causal = jnp.tril(jnp.ones((t, t), bool))
        return jax.nn.softmax(jnp.where(causal, logits_BHTS, -jnp.inf), axis=-1), logits_BHTS

    def init_cache(self, batch: int, max_len: int) -> CumulativeSoftmaxState:
        h, f = self.n_heads, self.head_dim
        return CumulativeSoftmaxState(jnp.full((batch, h), EMPTY_MAX, jnp.float32),
                                      jnp.zeros((batch, h, f), jnp.float32), jnp.zeros((batch, h), jnp.float32))

    def flops_per_token(self, seq_len: int) -> int:
        d, h, e = self.q_proj.in_features, self.n_heads, self.head_dim
        return 2 * d * e * 3 * h + 2 * h * e * d + 2 * h * e + 2 * h * e
