"""MASA: Matrix Atom Sharing in Attention (Zhussip, Shopkhoev, Ali, Lefkimmiatis; arXiv 2508.04581, AAAI-26).

GQA attention whose projection matrices are drawn from dictionaries of matrix atoms shared by every MASA layer
of the model, one dictionary per projection type P in `share` ("qkvo": Q, K, V and O; "qkv": O stays an
ordinary per-layer matrix):

    W^P_l = sum_{n=1..N} c^P_{l,n} A^P_n         A^P: [N, d_in, d_out] shared,  c^P_l: [N] per layer
    q = RoPE(x W^Q_l), k = RoPE(x W^K_l), v = x W^V_l,  o = softmax(q k^T / sqrt(E) + mask) v,  y = o W^O_l

Atoms and coefficients are learned jointly by backprop on the LM loss, with no orthogonality or norm terms.
With N = L/3 atoms per projection (the paper's default, L the number of MASA layers) the attention parameters
shrink by 1 - N (d_in d_out + L) / (L d_in d_out) ~= 66.7% for QKVO and 50% for QKV.

Costs. The KV cache and the per-token FLOPs are GQA's: each layer forms W^P_l once per forward (N d_in d_out
multiply-adds, independent of the number of tokens), so `flops_per_token` counts only x W, as the paper's
8 d^2 (n + k) counts the atom combination once per sequence, not per token.

Coefficient init: the paper's appendix (initialisation, and the embedding -> 3-layer MLP that predicts c_l during
training, folded into C afterwards) was not available, so this module trains C directly. Atoms take the
per-layer projections' fan-in init (O scaled down like GQA's o_proj) and c ~ N(0, coeff_init_std^2), by default
std 1/sqrt(N), so that E[Var(W_l)] equals the per-layer init's variance.

Everything else (heads, RoPE, qk_norm, window, soft cap, decode with GQA's KVCache, diagnostics) is GQA's:
the mixer subclasses `GQAttention` and replaces the shared projections.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.config import ModelConfig
from attnzoo.mixers.base import SharedParams
from attnzoo.mixers.gqa import GQAOptions, GQAttention, heads
from attnzoo.registry import register

SHARE_CHOICES = ("qkv", "qkvo")


@dataclasses.dataclass(frozen=True)
class MASAOptions(GQAOptions):
    """GQA's options (heads, rope, qk_norm, window, soft cap), plus:

    n_atoms: atoms per dictionary (None: the number of MASA layers / 3, rounded, at least 1; the paper's S = L/3).
    share: which projections come from shared dictionaries ("qkvo" or "qkv"; the others are per-layer matrices).
    coeff_init_std: std of the initial coefficients (None: 1/sqrt(n_atoms)).
    """

    n_atoms: int | None = None
    share: Literal["qkv", "qkvo"] = "qkvo"
    coeff_init_std: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.n_atoms is not None and self.n_atoms < 1:
            raise ValueError(f"n_atoms={self.n_atoms} must be >= 1 (or none for the number of MASA layers / 3)")
        if self.share not in SHARE_CHOICES:
            raise ValueError(f"share={self.share!r} must be one of {', '.join(map(repr, SHARE_CHOICES))}")
        if self.coeff_init_std is not None and self.coeff_init_std <= 0:
            raise ValueError(f"coeff_init_std={self.coeff_init_std} must be > 0 (or none for 1/sqrt(n_atoms))")


class MatrixAtoms(nnx.Module):
    """One projection type's dictionary: N matrices [d_in, d_out], shared by every MASA layer."""

    def __init__(self, n_atoms: int, d_in: int, d_out: int, *, scale: float, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=scale / d_in**0.5)
        self.atoms = nnx.Param(init(rngs.params(), (n_atoms, d_in, d_out), param_dtype))


class AtomProjection(nnx.Module):
    """x W with W = sum_n c_n A_n: this layer's coefficients over a shared dictionary (a drop-in for a bias-free
    nnx.Linear)."""

    def __init__(self, dictionary: MatrixAtoms, *, coeff_init_std: float | None, dtype, rngs: nnx.Rngs):
        self.dictionary = dictionary
        n_atoms = dictionary.atoms.shape[0]
        std = coeff_init_std or n_atoms**-0.5
        self.coeffs = nnx.Param(std * jax.random.normal(rngs.params(), (n_atoms,), dictionary.atoms.dtype))
        self.dtype = dtype

    @property
    def in_features(self) -> int:
        return self.dictionary.atoms.shape[1]

    def weight(self) -> jax.Array:
        """W = sum_n c_n A_n, formed once per forward (never x A_n per atom: N times the matmul)."""
        return jnp.einsum("n,nio->io", self.coeffs[...], self.dictionary.atoms[...])

    def __call__(self, x_BTI):
        return x_BTI.astype(self.dtype) @ self.weight().astype(self.dtype)


def _masa_layers(config: ModelConfig) -> list[tuple[int, MASAOptions]]:
    """(index, resolved options) of every MASA layer in the plan."""
    return [(i, options) for i, options in enumerate(config.layer_options) if isinstance(options, MASAOptions)]


def _dictionary_layout(config: ModelConfig, options: MASAOptions, n_masa_layers: int) -> tuple:
    """What every MASA layer must agree on to share the dictionaries: (n_atoms, share, heads, kv heads, head dim)."""
    n_atoms = options.n_atoms or max(1, round(n_masa_layers / 3))
    return (n_atoms, options.share, *heads(config, options))


@register("masa", options=MASAOptions)
class MASAttention(GQAttention):
    @classmethod
    def check(cls, options: MASAOptions, config: ModelConfig) -> None:
        super().check(options, config)
        if options.qkv_bias or options.out_bias:
            raise ValueError("qkv_bias / out_bias are not supported by masa: its projections are the shared "
                             "atoms' combinations, which have no bias")
        layers = _masa_layers(config)
        layout = _dictionary_layout(config, options, len(layers))
        if layout[0] > len(layers):
            raise ValueError(f"n_atoms={layout[0]} must be between 1 and the number of MASA layers ({len(layers)}) "
                             f"that share the dictionary (or none for that number / 3)")
        for j, other in layers:
            if _dictionary_layout(config, other, len(layers)) != layout:
                raise ValueError(f"MASA layers share one dictionary per projection, so they must agree on n_atoms, "
                                 f"share, n_heads, n_kv_heads and head_dim; layer {j} ({config.layers[j]}) differs")

    @classmethod
    def make_shared(cls, config: ModelConfig, options: MASAOptions, rngs: nnx.Rngs) -> dict[str, MatrixAtoms]:
        n_atoms, share, n_heads, n_kv_heads, head_dim = _dictionary_layout(config, options,
                                                                           len(_masa_layers(config)))
        d = config.d_model
        shapes = {"q": (d, n_heads * head_dim), "k": (d, n_kv_heads * head_dim), "v": (d, n_kv_heads * head_dim),
                  "o": (n_heads * head_dim, d)}
        # The same init as GQA's per-layer projections, the output one scaled down for the residual stream.
        scales = {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1 / (2 * config.n_layers) ** 0.5}
        return {f"masa_{p}": MatrixAtoms(n_atoms, *shapes[p], scale=scales[p],
                                         param_dtype=jnp.dtype(config.param_dtype), rngs=rngs) for p in share}

    def __init__(self, config: ModelConfig, options: MASAOptions, *, shared: SharedParams, rngs: nnx.Rngs):
        # GQA builds every per-layer matrix; the shared ones are replaced (an init-time cost only).
        super().__init__(config, options, shared=shared, rngs=rngs)
        for p in options.share:
            setattr(self, f"{p}_proj", AtomProjection(shared[f"masa_{p}"], coeff_init_std=options.coeff_init_std,
                                                      dtype=jnp.dtype(config.dtype), rngs=rngs))


register("masa_qkv", options=MASAOptions, share="qkv")(MASAttention)
