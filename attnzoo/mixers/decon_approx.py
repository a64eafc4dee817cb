"""Deconstructing Attention's Approximate variant (Xue, Moosavi, Aletras, arXiv 2510.11602, Eq. 6 and Appx. I):
softmax replaced by its 2nd-order Taylor expansion, A ~ Taylor_2(Q K^T / sqrt(E)), following Based (Arora et al.,
arXiv 2402.18668). Per head, with q~ = RoPE?(q) / E^(1/4) and k~ = RoPE?(k) / E^(1/4) (so q~ . k~ = s = q.k/sqrt(E)):

normalization="separate" (the paper's Appx. I form: each order normalised on its own, elementwise squares):
    o_i = o0_i + o1_i + o2_i,   on_i = sum_{j<=i} a^n_ij v_j / sum_{j<=i} a^n_ij,
    a^0_ij = 1,   a^1_ij = q~_i . k~_j,   a^2_ij = (q~_i^2 / sqrt 2) . (k~_j^2 / sqrt 2)
  The state is S_n = sum_j phi_n(k_j)^T v_j and z_n = sum_j phi_n(k_j) with phi_0 = 1, phi_1(x) = x~,
  phi_2(x) = x~^2 / sqrt 2: 2 E x F matrices + 3 vectors per head, the paper's 4 d^2 / h + 6 d bytes at 2 bytes per
  number (Table 8). The first-order denominator q~_i . z_1 has no fixed sign (a pitfall the spec flags): it is
  moved away from zero by NORMALIZER_EPS with its own sign, never clipped to a positive value.
normalization="joint" (Based): one map normalised jointly, positive for every s:
    o_i = sum_{j<=i} (1 + s_ij + s_ij^2 / 2) v_j / sum_{j<=i} (1 + s_ij + s_ij^2 / 2)
  with Based's features phi(x) = [1, x~, vec(x~ x~^T) / sqrt 2] (`attnzoo.layers.taylor2_features`), width
  1 + E + E^2.

Training and scoring use the quadratic masked form (float32); prefill and decode use the recurrent form: the new
tokens' map among themselves plus their features against the carried state, so a decode call of any length is
exact and the state does not grow (`cache_bytes_per_token() == 0`). Packed documents are not supported.

FLOPs per token (2 per multiply-add, the recurrent form): 2 D E (3 H) + 2 H E D (projections)
+ 4 H P (F + 1) (state update and read-out) with P the total feature width (1 + 2 E separate, 1 + E + E^2 joint).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.config import ModelConfig
from attnzoo.layers import NORMALIZER_EPS, apply_rope, dense, taylor2_features
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports
from attnzoo.registry import register

NORMALIZATIONS = ("separate", "joint")


@dataclasses.dataclass(frozen=True)
class DeconApproxOptions:
    """normalization: "separate" (the paper's Appx. I: each Taylor order normalised on its own) or "joint"
    (Based: 1 + s + s^2/2 normalised once). rope: rotary positions on q and k (the paper's base model has RoPE;
    whether its Approx variant keeps it is not stated)."""

    normalization: Literal["separate", "joint"] = "separate"
    rope: bool = True

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r} must be one of {', '.join(NORMALIZATIONS)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TaylorState:
    """Per normalisation group: sum phi(k)^T v [B, H, P, F] and sum phi(k) [B, H, P], float32."""

    kv_BHPF: tuple[jax.Array, ...]
    k_BHP: tuple[jax.Array, ...]


def taylor_scores(q_BTHE, k_BSHE, normalization: str) -> list[jax.Array]:
    """The un-normalised map of each normalisation group, [B, H, T, S] (q and k already divided by E^(1/4))."""
    s_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE, k_BSHE)
    if normalization == "joint":
        return [1 + s_BHTS + s_BHTS**2 / 2]
    second_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE**2, k_BSHE**2) / 2
    return [jnp.ones_like(s_BHTS), s_BHTS, second_BHTS]


def taylor_features(x_BTHE, normalization: str) -> list[jax.Array]:
    """phi of each group, [B, T, H, P], so that phi(q) . phi(k) equals the group's `taylor_scores` entry."""
    if normalization == "joint":  # Based's map divides by E^(1/4) itself: undo ours
        return [taylor2_features(x_BTHE * x_BTHE.shape[-1] ** 0.25)]
    return [jnp.ones_like(x_BTHE[..., :1]), x_BTHE, x_BTHE**2 / math.sqrt(2)]


def signed_away_from_zero(den):
    return den + jnp.where(den >= 0, NORMALIZER_EPS, -NORMALIZER_EPS)


@register("decon_approx", options=DeconApproxOptions)
class DeconApprox(Mixer):
    supports = Supports(decode=True, multi_token_decode=True)

    def __init__(self, config: ModelConfig, options: DeconApproxOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.n_heads, self.head_dim = config.n_heads, config.dim_per_head
        self.normalization = options.normalization
        self.rope_base = config.rope_base if options.rope else None
        d, h, e = config.d_model, self.n_heads, self.head_dim
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = (dense(d, h * e, **kw) for _ in range(3))
        self.o_proj = dense(h * e, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)

    @classmethod
    def check(cls, options: DeconApproxOptions, config: ModelConfig) -> None:
        if options.rope and config.dim_per_head % 2:
            raise ValueError(f"head_dim={config.dim_per_head} must be even for rotary embeddings (or set rope=false)")

    def project(self, x_BTD, positions_BT):
        """q~, k~ (RoPE'd, divided by E^(1/4)) and v, [B,T,H,E] float32."""
        b, t, _ = x_BTD.shape
        q, k, v = (proj(x_BTD).reshape(b, t, self.n_heads, self.head_dim).astype(jnp.float32)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope_base is not None:
            q, k = (apply_rope(x, positions_BT, base=self.rope_base) for x in (q, k))
        return q / self.head_dim**0.25, k / self.head_dim**0.25, v

    def __call__(self, x_BTD, ctx: ForwardContext, cache: TaylorState | None = None) -> MixerOutput:
        if ctx.segment_ids_BT is not None and ctx.mode == "full":
            raise ValueError("decon_approx: packed documents (segment_ids_BT) are not supported")
        b, t, _ = x_BTD.shape
        q_BTHE, k_BTHE, v_BTHF = self.project(x_BTD, ctx.positions_BT)
        causal = jnp.tril(jnp.ones((t, t), bool))
        decode = ctx.mode == "decode"
        q_features = taylor_features(q_BTHE, self.normalization) if decode else None
        o_BTHF = jnp.zeros_like(v_BTHF)
        for n, a_BHTS in enumerate(taylor_scores(q_BTHE, k_BTHE, self.normalization)):
            a_BHTS = jnp.where(causal, a_BHTS, 0.0)
            num_BTHF = jnp.einsum("bhts,bshf->bthf", a_BHTS, v_BTHF)
            den_BTH = jnp.swapaxes(a_BHTS.sum(-1), 1, 2)
            if decode:  # the new tokens against everything before them
                num_BTHF += jnp.einsum("bthp,bhpf->bthf", q_features[n], cache.kv_BHPF[n])
                den_BTH += jnp.einsum("bthp,bhp->bth", q_features[n], cache.k_BHP[n])
            o_BTHF += num_BTHF / signed_away_from_zero(den_BTH)[..., None]
        if ctx.mode != "full":
            valid_BT = (jnp.arange(t)[None, :] < ctx.lengths_B[:, None]) if ctx.mode == "prefill" else \
                jnp.ones((b, t), bool)
            cache = self.update_state(cache, k_BTHE, v_BTHF, valid_BT)
        y = self.o_proj(o_BTHF.reshape(b, t, self.n_heads * self.head_dim).astype(x_BTD.dtype))
        return MixerOutput(y, cache)

    def update_state(self, state: TaylorState, k_BTHE, v_BTHF, valid_BT) -> TaylorState:
        """The state with the valid new tokens' phi(k)^T v and phi(k) added."""
        weight_BT1 = valid_BT[..., None].astype(jnp.float32)
        kv, ks = [], []
        for n, k_BTHP in enumerate(taylor_features(k_BTHE, self.normalization)):
            k_BTHP = k_BTHP * weight_BT1[..., None]
            kv.append(state.kv_BHPF[n] + jnp.einsum("bthp,bthf->bhpf", k_BTHP, v_BTHF))
            ks.append(state.k_BHP[n] + k_BTHP.sum(1))
        return TaylorState(tuple(kv), tuple(ks))

    def attention_map(self, x_BTD, ctx: ForwardContext):
        """The effective causal map A [B,H,T,T] with o = A v (rows sum to 3 with separate normalisation, to 1 with
        joint), and the first-order scores s = q.k / sqrt(E) (for the indicators)."""
        q_BTHE, k_BTHE, _ = self.project(x_BTD, ctx.positions_BT)
        t = q_BTHE.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        maps = [jnp.where(causal, a, 0.0) for a in taylor_scores(q_BTHE, k_BTHE, self.normalization)]
        a_BHTS = sum(a / signed_away_from_zero(a.sum(-1, keepdims=True)) for a in maps)
        return a_BHTS, jnp.einsum("bthe,bshe->bhts", q_BTHE, k_BTHE)

    def feature_widths(self) -> list[int]:
        e = self.head_dim
        return [1 + e + e * e] if self.normalization == "joint" else [1, e, e]

    def init_cache(self, batch: int, max_len: int) -> TaylorState:
        h, f = self.n_heads, self.head_dim
        widths = self.feature_widths()
        return TaylorState(tuple(jnp.zeros((batch, h, p, f), jnp.float32) for p in widths),
                           tuple(jnp.zeros((batch, h, p), jnp.float32) for p in widths))

    def flops_per_token(self, seq_len: int) -> int:
        d, h, e = self.q_proj.in_features, self.n_heads, self.head_dim
        return 2 * d * e * 3 * h + 2 * h * e * d + 4 * h * sum(self.feature_widths()) * (e + 1)
