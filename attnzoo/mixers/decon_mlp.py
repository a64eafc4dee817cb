"""Deconstructing Attention's MLP variant (Xue, Moosavi, Aletras, arXiv 2510.11602, Eqs. 4-5): no token mixing.

The attention sub-layer is replaced by a position-wise gated MLP whose parameters match the attention it replaces:

    O = FC_Dn(SiLU(FC_Gt(H)) * FC_Up(H))        (per token; nothing moves between positions)

Width: attention with H query heads, K kv heads of width E has D E (2 H + 2 K) weights (4 D^2 for MHA with
H E = D); the three D x w matrices match it at w = round(D E (2 H + 2 K) / (3 D)), 4 D / 3 for MHA (the paper
matches parameter counts; its exact width is not stated). No decode state: decoding is the same per-token map.

FLOPs per token: 2 * 3 D w.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from attnzoo.config import ModelConfig
from attnzoo.layers import SwiGLU
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports
from attnzoo.registry import register


@dataclasses.dataclass(frozen=True)
class DeconMLPOptions:
    """hidden: the MLP's width; default the one matching the parameters of MHA with the model's heads."""

    hidden: int | None = None

    def __post_init__(self):
        if self.hidden is not None and self.hidden <= 0:
            raise ValueError(f"hidden={self.hidden} must be a positive integer (or none for the matched width)")


def attention_matched_width(config: ModelConfig) -> int:
    """The width w whose 3 D w weights are closest to MHA's D E (2 H + 2 H) with the model's heads."""
    d = config.d_model
    return round(d * config.dim_per_head * 4 * config.n_heads / (3 * d))


@register("decon_mlp", options=DeconMLPOptions)
class DeconMLP(Mixer):
    supports = Supports(decode=True, multi_token_decode=True)

    def __init__(self, config: ModelConfig, options: DeconMLPOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.hidden = options.hidden or attention_matched_width(config)
        self.mlp = SwiGLU(config.d_model, self.hidden, dtype=jnp.dtype(config.dtype),
                          param_dtype=jnp.dtype(config.param_dtype), out_scale=1 / (2 * config.n_layers) ** 0.5,
                          rngs=rngs)

    def __call__(self, x_BTD, ctx: ForwardContext, cache=None) -> MixerOutput:
        return MixerOutput(self.mlp(x_BTD), cache)

    def init_cache(self, batch: int, max_len: int):
        return None  # position-wise: nothing to remember

    def flops_per_token(self, seq_len: int) -> int:
        return self.mlp.flops_per_token()
