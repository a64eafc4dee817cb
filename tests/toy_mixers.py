"""A test-only mixer that exercises what later variants need from the spine: a weight dictionary shared by every
layer of its kind (MASA-style), an auxiliary loss, metrics, and a recurrent (non-KV) decode cache.

    W_l = sum_i c_{l,i} A_i          (atoms A_i shared across layers, coefficients c_l per layer)
    y_t = mean_{s <= t} (x_s W_l)    (causal running mean; the cache is the running sum and count)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo import ModelConfig, MixerOutput, register
from attnzoo.mixers.base import resolve_options

N_ATOMS = 3


class AtomDictionary(nnx.Module):
    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        self.atoms = nnx.Param(jax.random.normal(rngs.params(), (N_ATOMS, d_model, d_model)) / d_model**0.5)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunningSum:
    sum_BD: jax.Array
    count_B: jax.Array

    @property
    def lengths_B(self):
        return self.count_B


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    aux_weight: float = 0.01


@register("toy_shared_dict")
class ToySharedDictMixer(nnx.Module):
    def __init__(self, config: ModelConfig, spec, *, shared, rngs: nnx.Rngs):
        self.opts = resolve_options(ToyOptions, spec.mixer, spec.kwargs)
        self.dictionary = shared["toy_atoms"]
        self.coeffs = nnx.Param(jax.random.normal(rngs.params(), (N_ATOMS,)))

    @classmethod
    def make_shared(cls, config: ModelConfig, rngs: nnx.Rngs):
        return {"toy_atoms": AtomDictionary(config.d_model, rngs=rngs)}

    def __call__(self, x_BTD, ctx, cache=None):
        w = jnp.einsum("a,aij->ij", self.coeffs[...], self.dictionary.atoms[...])
        h_BTD = x_BTD @ w
        t = x_BTD.shape[1]
        if ctx.mode == "decode":
            sums = cache.sum_BD[:, None] + jnp.cumsum(h_BTD, axis=1)
            counts = cache.count_B[:, None] + jnp.arange(1, t + 1)
            cache = RunningSum(sums[:, -1], cache.count_B + t)
        else:
            sums = jnp.cumsum(h_BTD, axis=1)
            counts = jnp.broadcast_to(jnp.arange(1, t + 1), sums.shape[:2])
            if ctx.mode == "prefill":
                last = ctx.lengths_B - 1
                cache = RunningSum(sums[jnp.arange(x_BTD.shape[0]), last], ctx.lengths_B)
        y = sums / counts[..., None]
        aux = self.opts.aux_weight * jnp.mean(self.coeffs[...] ** 2)
        return MixerOutput(y, cache, aux, {"coeff_norm": jnp.linalg.norm(self.coeffs[...])})

    def init_cache(self, batch: int, max_len: int):
        return RunningSum(jnp.zeros((batch, self.dictionary.atoms.shape[-1])), jnp.zeros((batch,), jnp.int32))

    def cache_bytes_per_token(self) -> int:
        return 0  # constant-size state

    def flops_per_token(self, seq_len: int) -> int:
        d = self.dictionary.atoms.shape[-1]
        return 2 * d * d + d
