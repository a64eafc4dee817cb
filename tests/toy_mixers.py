"""Test-only mixers that exercise what later variants need from the spine.

toy_shared_dict: a weight dictionary shared by every layer of its kind (MASA-style), an auxiliary loss, metrics,
and a recurrent (non-KV) decode cache:

    W_l = sum_i c_{l,i} A_i          (atoms A_i shared across layers, coefficients c_l per layer)
    y_t = mean_{s <= t} (x_s W_l)    (causal running mean; the cache is the running sum)

toy_side_inputs: reads the model-level inputs of the forward context (input embeddings, the side stream):

    y_t = x_t W + e_t U + mean_s(side_s) V       (e: the token embeddings; side: a second stream, if any)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo import Mixer, MixerOutput, ModelConfig, register


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    aux_weight: float = 0.01
    n_atoms: int = 3

    def __post_init__(self):
        if self.n_atoms < 1:
            raise ValueError(f"n_atoms={self.n_atoms} must be >= 1")


class AtomDictionary(nnx.Module):
    def __init__(self, n_atoms: int, d_model: int, *, rngs: nnx.Rngs):
        self.atoms = nnx.Param(jax.random.normal(rngs.params(), (n_atoms, d_model, d_model)) / d_model**0.5)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunningSum:
    sum_BD: jax.Array


@register("toy_shared_dict", options=ToyOptions)
class ToySharedDictMixer(Mixer):
    def __init__(self, config: ModelConfig, options: ToyOptions, *, shared, rngs: nnx.Rngs):
        self.aux_weight = options.aux_weight
        self.dictionary = shared["toy_atoms"]
        self.coeffs = nnx.Param(jax.random.normal(rngs.params(), (options.n_atoms,)))

    @classmethod
    def make_shared(cls, config: ModelConfig, options: ToyOptions, rngs: nnx.Rngs):
        return {"toy_atoms": AtomDictionary(options.n_atoms, config.d_model, rngs=rngs)}

    def __call__(self, x_BTD, ctx, cache=None):
        w = jnp.einsum("a,aij->ij", self.coeffs[...], self.dictionary.atoms[...])
        h_BTD = x_BTD @ w
        b, t = x_BTD.shape[:2]
        sums = jnp.cumsum(h_BTD, axis=1)
        counts = ctx.positions_BT + 1
        if ctx.mode == "decode":
            sums = cache.sum_BD[:, None] + sums
            cache = RunningSum(sums[:, -1])
        elif ctx.mode == "prefill":
            cache = RunningSum(sums[jnp.arange(b), ctx.lengths_B - 1])
        y = sums / counts[..., None]
        aux = self.aux_weight * jnp.mean(self.coeffs[...] ** 2)
        return MixerOutput(y, cache, aux, {"coeff_norm": jnp.linalg.norm(self.coeffs[...])})

    def init_cache(self, batch: int, max_len: int):
        return RunningSum(jnp.zeros((batch, self.dictionary.atoms.shape[-1])))

    def flops_per_token(self, seq_len: int) -> int:
        d = self.dictionary.atoms.shape[-1]
        return 2 * d * d + d


@register("toy_side_inputs")
class ToySideInputsMixer(Mixer):
    def __init__(self, config: ModelConfig, options, *, shared, rngs: nnx.Rngs):
        d = config.d_model
        self.w = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.u = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(d, d, use_bias=False, rngs=rngs)

    def __call__(self, x_BTD, ctx, cache=None):
        y = self.w(x_BTD) + self.u(ctx.input_embeddings_BTD)
        if ctx.side_BSD is not None:
            y = y + self.v(ctx.side_BSD.mean(axis=1, keepdims=True))
        return MixerOutput(y, cache)

    def init_cache(self, batch: int, max_len: int):
        return None  # position-wise: nothing to remember

    def flops_per_token(self, seq_len: int) -> int:
        d = self.w.in_features
        return 2 * 3 * d * d  # x W and e U per token, and the side stream's V as if per token (an upper bound)
