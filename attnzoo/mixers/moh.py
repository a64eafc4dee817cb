"""MoH: Mixture-of-Head attention (Jin, Zhu, Yuan, Yan; arXiv 2410.11842, ICML 2025).

Multi-head attention written as a sum over heads, MHA(X) = sum_i H^i W_O^i, with the heads treated as experts:
h_s shared heads are always active, and each token picks its top-K of the R = h - h_s routed heads. With x_t the
layer's (normed) input, H^i_t head i's attention output and W_s [h_s, d], W_r [R, d], W_h [2, d] bias-free routers:

    MoH(x_t) = sum_i g_{t,i} H^i_t W_O^i
    p_t = Softmax(W_r x_t) [R],   s_t = Softmax(W_s x_t) [h_s],   [a1, a2]_t = Softmax(W_h x_t)   (Eq. 6)
    scaling="paper" (Eq. 5):  g_{t,i} = a1 s_{t,i}                       shared heads i <= h_s
                              g_{t,i} = a2 p_{t,i}                       routed heads in TopK(p_t)
                              g_{t,i} = 0                                other routed heads
    scaling="code" (the released ViT/DiT code, SkyworkAI/MoH):
                              g_{t,i} = 2 a1 * h_s s_{t,i}               shared
                              g_{t,i} = 2 a2 * K p_{t,i} / sum_{j in TopK} p_{t,j}   selected routed
    so a uniform router gives every active head weight 1, as in MHA (the default: it keeps MHA's output scale).
    Load balance over the routed heads, with P_i = mean_t p_{t,i} and f_i = the fraction of tokens that select
    head i (Eq. 7):   L_b = sum_i P_i f_i  ("paper"),   L_b = R * sum_i P_i f_i  ("code": mean(P f) * R^2).
    router="query_norm" (MoH-LLaMA3's parameter-free router): n_{t,i} = ||x_t W_q^i|| over the routed heads,
    p_t = Softmax(n_t / std(n_t)); g = 1 for shared and selected routed heads, else 0 (straight-through in training).

Each layer's aux_loss is balance_coef * L_b / n_moh_layers (Eq. 8, beta = 0.01, averaged over the MoH layers as the
released code does), on "full" calls only. What differs from the paper: scaling="code" by default; every head is
computed for every token and unrouted heads get weight 0 (exact, no speedup), the weights applied in the flash
kernel's output-gate epilogue.

More in docs/mixers/moh.md: the loss's bookkeeping and padding, the layout and edge cases (h_s = 0 or 1,
two_stage=false), the query-norm router in full, and why real head skipping would save little.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.cache import KVCache
from attnzoo.config import ModelConfig
from attnzoo.layers import dense
from attnzoo.mixers.base import ForwardContext, MixerOutput, SharedParams
from attnzoo.mixers.gqa import GQAOptions, GQAttention
from attnzoo.registry import get_mixer, register


@dataclasses.dataclass(frozen=True)
class MoHOptions(GQAOptions):
    """GQA's head layout (n_heads, n_kv_heads, head_dim, window, qk_norm, rope, logits_soft_cap), plus:

    n_shared_heads: h_s, always-active heads, 0 <= h_s < n_heads (default n_heads // 2, MoH-LLaMA3's split).
    top_k: K, routed heads active per token, 1 <= K <= n_heads - h_s (default n_heads // 4, at least 1 and at most
      the routed heads: 75% of the heads active, as in MoH-LLaMA3; 12 heads: 6 shared + top-3 of 6).
    two_stage: the shared / routed balance a1, a2 = Softmax(W_h x) (Eq. 6); false: a1 = a2 = 1.
    scaling: "code" (the released code's weights and loss scale, default) or "paper" (Eqs. 5 and 7 as printed).
    balance_coef: beta, the load-balance loss coefficient (0.01 in the paper; 0 turns the loss off).
    router: "learned" (W_r, W_s, W_h: the paper's Eqs. 5-6, default) or "query_norm" (MoH-LLaMA3's parameter-free
      router from the routed heads' query norms with 0/1 straight-through gates; docs/mixers/moh.md).
    """

    n_shared_heads: int | None = None
    top_k: int | None = None
    two_stage: bool = True
    scaling: Literal["code", "paper"] = "code"
    balance_coef: float = 0.01
    router: Literal["learned", "query_norm"] = "learned"

    def __post_init__(self):
        super().__post_init__()
        if self.n_shared_heads is not None and self.n_shared_heads < 0:
            raise ValueError(f"n_shared_heads={self.n_shared_heads} must be >= 0 (or none for n_heads // 2)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 (or none for n_heads // 4)")
        if self.scaling not in ("code", "paper"):
            raise ValueError(f"scaling={self.scaling!r} must be one of 'code', 'paper'")
        if self.balance_coef < 0:
            raise ValueError(f"balance_coef={self.balance_coef} must be >= 0 (0.01 in the paper)")
        if self.router not in ("learned", "query_norm"):
            raise ValueError(f"router={self.router!r} must be one of 'learned', 'query_norm'")
        if self.router == "query_norm" and not self.two_stage:
            raise ValueError("two_stage=false has no effect with router=query_norm (its gates are 0/1, with no "
                             "shared / routed weights)")


def _split(options: MoHOptions, n_heads: int) -> tuple[int, int]:
    """(shared heads, routed heads per token) after the defaults."""
    n_shared = n_heads // 2 if options.n_shared_heads is None else options.n_shared_heads
    top_k = min(max(1, n_heads // 4), n_heads - n_shared) if options.top_k is None else options.top_k
    return n_shared, top_k


class Routing(NamedTuple):
    weights_BTH: jax.Array  # g, float32; shared heads first, zero for routed heads a token did not select
    probs_BTR: jax.Array  # p = Softmax(W_r x) over the routed heads
    selected_BTR: jax.Array  # 1.0 where the routed head is in the token's top-K
    alpha_BT2: jax.Array | None  # Softmax(W_h x), None without the two-stage router


@register("moh", options=MoHOptions)
class MoHAttention(GQAttention):
    """GQA's projections, cache and decode, with per-token head weights from the routers on the attention output."""

    @classmethod
    def check(cls, options: MoHOptions, config: ModelConfig) -> None:
        super().check(options, config)
        n_heads = options.n_heads or config.n_heads
        n_shared, top_k = _split(options, n_heads)
        if n_shared >= n_heads:
            raise ValueError(f"n_shared_heads={n_shared} must be in 0..{n_heads - 1} (n_heads={n_heads}: at least "
                             f"one head must be routed)")
        if top_k > n_heads - n_shared:
            raise ValueError(f"top_k={top_k} must be in 1..{n_heads - n_shared}, the routed heads "
                             f"(n_heads={n_heads} - n_shared_heads={n_shared})")
        if options.router == "query_norm" and n_heads - n_shared < 2:
            raise ValueError(f"router=query_norm normalises the routed heads' query norms by their spread, so it "
                             f"needs at least 2 routed heads (n_heads={n_heads} - n_shared_heads={n_shared})")

    def __init__(self, config: ModelConfig, options: MoHOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        super().__init__(config, options, shared=shared, rngs=rngs)
        self.n_shared, self.top_k = _split(options, self.n_heads)
        self.n_routed = self.n_heads - self.n_shared
        self.code_scaling = options.scaling == "code"
        self.query_norm_router = options.router == "query_norm"
        # The loss takes the mean of L_b over the MoH layers (as the released code does); each layer adds its share.
        n_moh_layers = sum(issubclass(get_mixer(spec.mixer).cls, MoHAttention) for spec in config.layers)
        self.balance_weight = options.balance_coef / n_moh_layers
        # Routers in float32: top-k choices and small weights should not depend on the compute dtype.
        kw = dict(dtype=jnp.float32, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        d, learned = config.d_model, not self.query_norm_router
        self.router_routed = dense(d, self.n_routed, **kw) if learned else None
        self.router_shared = dense(d, self.n_shared, **kw) if learned and self.n_shared > 1 else None
        self.router_stage = dense(d, 2, **kw) if learned and options.two_stage and self.n_shared > 0 else None

    def route(self, x_BTD) -> Routing:
        """Each token's head weights g (Eqs. 5-6, or the released code's scaling)."""
        probs_BTR = jax.nn.softmax(self.router_routed(x_BTD), axis=-1)
        _, top_BTK = jax.lax.top_k(probs_BTR, self.top_k)
        selected_BTR = jax.nn.one_hot(top_BTK, self.n_routed, dtype=jnp.float32).sum(axis=-2)
        routed_BTR = probs_BTR * selected_BTR
        if self.code_scaling:
            # The top-1 probability is >= 1/R, so the sum is never zero.
            routed_BTR = routed_BTR / routed_BTR.sum(axis=-1, keepdims=True) * self.top_k
        if self.n_shared == 0:
            return Routing(routed_BTR, probs_BTR, selected_BTR, None)
        if self.router_shared is None:  # one shared head: Softmax over one logit is 1
            shared_BTS = jnp.ones((*x_BTD.shape[:2], 1), jnp.float32)
        else:
            shared_BTS = jax.nn.softmax(self.router_shared(x_BTD), axis=-1)
        if self.code_scaling:
            shared_BTS = shared_BTS * self.n_shared
        alpha_BT2 = None
        if self.router_stage is not None:
            alpha_BT2 = jax.nn.softmax(self.router_stage(x_BTD), axis=-1)
            stage_BT2 = 2 * alpha_BT2 if self.code_scaling else alpha_BT2
            shared_BTS, routed_BTR = shared_BTS * stage_BT2[..., :1], routed_BTR * stage_BT2[..., 1:]
        return Routing(jnp.concatenate([shared_BTS, routed_BTR], axis=-1), probs_BTR, selected_BTR, alpha_BT2)

    def route_by_query_norm(self, q_BTHE) -> Routing:
        """MoH-LLaMA3's parameter-free router: 0/1 gates from the routed heads' query norms, straight-through."""
        norms_BTR = jnp.linalg.norm(q_BTHE[:, :, self.n_shared:].astype(jnp.float32), axis=-1)
        # torch.std's unbiased spread across the routed heads; floored so that equal norms cannot divide by zero.
        spread_BT1 = jnp.std(norms_BTR, axis=-1, ddof=1, keepdims=True)
        probs_BTR = jax.nn.softmax(norms_BTR / jnp.maximum(spread_BT1, 1e-6), axis=-1)
        _, top_BTK = jax.lax.top_k(probs_BTR, self.top_k)
        selected_BTR = jax.nn.one_hot(top_BTK, self.n_routed, dtype=jnp.float32).sum(axis=-2)
        routed_BTR = selected_BTR + (probs_BTR - jax.lax.stop_gradient(probs_BTR))  # value 0/1, gradient of p
        shared_BTS = jnp.ones((*q_BTHE.shape[:2], self.n_shared), jnp.float32)
        return Routing(jnp.concatenate([shared_BTS, routed_BTR], axis=-1), probs_BTR, selected_BTR, None)

    def balance_loss(self, routing: Routing, valid_BT=None) -> jax.Array:
        """L_b (Eq. 7, times R with the code's scaling) over the call's tokens (the valid ones, where given)."""
        importance_R = _token_mean(routing.probs_BTR, valid_BT)  # P_i
        load_R = jax.lax.stop_gradient(_token_mean(routing.selected_BTR, valid_BT))  # f_i
        loss = jnp.sum(importance_R * load_R)
        return loss * self.n_routed if self.code_scaling else loss

    def routing_metrics(self, routing: Routing, valid_BT=None) -> dict[str, jax.Array]:
        """Head load f_i (fraction of tokens routed to each routed head; balanced: top_k / R each), L_b, the
        routers' entropy (nats) and the mean shared-side stage weight a1, over the valid tokens where given."""
        load_R = _token_mean(routing.selected_BTR, valid_BT)
        probs = routing.probs_BTR
        entropy_BT1 = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1, keepdims=True)
        metrics = {"head_load_max": jnp.max(load_R), "head_load_min": jnp.min(load_R),
                   "head_load_cv": jnp.std(load_R) / jnp.mean(load_R),
                   "balance_loss": self.balance_loss(routing, valid_BT),
                   "router_entropy": _token_mean(entropy_BT1, valid_BT)[0]}
        if routing.alpha_BT2 is not None:
            metrics["shared_weight"] = _token_mean(routing.alpha_BT2[..., :1], valid_BT)[0]
        return metrics

    def __call__(self, x_BTD, ctx: ForwardContext, cache: KVCache | None = None) -> MixerOutput:
        q_BTHE, k_BTKE, v_BTKE = self.project(x_BTD)
        routing = self.route_by_query_norm(q_BTHE) if self.query_norm_router else self.route(x_BTD)
        q_BTHE, k_BTKE = self.position_qk(q_BTHE, k_BTKE, ctx.positions_BT)
        # The head weights ride in the flash kernel's output-gate epilogue (after the kernel when decoding).
        o_BTHE, cache, metrics = self.attend(q_BTHE, k_BTKE, v_BTKE, ctx, cache, gate_BTH=routing.weights_BTH)
        # Right-padded sequences of lengths_B tokens (decode's lengths_B counts cached tokens instead).
        valid_BT = None
        if ctx.mode != "decode" and ctx.lengths_B is not None:
            valid_BT = jnp.arange(x_BTD.shape[1])[None, :] < ctx.lengths_B[:, None]
        aux_loss = self.balance_weight * self.balance_loss(routing, valid_BT) if ctx.mode == "full" else 0.0
        if ctx.diagnostics:
            metrics = {**metrics, **self.routing_metrics(routing, valid_BT)}
        return MixerOutput(self.output(o_BTHE), cache, aux_loss, metrics)

    def flops_per_token(self, seq_len: int) -> int:
        routers = [r for r in (self.router_routed, self.router_shared, self.router_stage) if r is not None]
        # The parameter-free router's cost: the routed heads' query norms (a multiply-add per channel).
        norms = 2 * self.n_routed * self.head_dim if self.query_norm_router else 0
        return super().flops_per_token(seq_len) + sum(2 * r.in_features * r.out_features for r in routers) + norms


def _token_mean(x_BTX, valid_BT=None) -> jax.Array:
    """Mean over batch and time [X], over the valid tokens only where a mask is given."""
    if valid_BT is None:
        return jnp.mean(x_BTX, axis=(0, 1))
    weights_BT1 = valid_BT[..., None].astype(x_BTX.dtype)
    return jnp.sum(x_BTX * weights_BT1, axis=(0, 1)) / jnp.maximum(jnp.sum(weights_BT1), 1.0)
