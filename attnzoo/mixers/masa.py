"""MASA: Matrix Atom Sharing in Attention (Zhussip, Shopkhoev, Ali, Lefkimmiatis; arXiv 2508.04581, AAAI-26).

GQA attention whose projection matrices are drawn from dictionaries of matrix atoms shared by every MASA layer
of the model, one dictionary per projection type P in `share` ("qkvo": Q, K, V and O; "qkv": O stays an
ordinary per-layer matrix):

    W^P_l = sum_{n=1..N} c^P_{l,n} A^P_n         A^P: [N, d_in, d_out] shared,  c^P_l: [N] per layer
    q = RoPE(x W^Q_l), k = RoPE(x W^K_l), v = x W^V_l,  o = softmax(q k^T / sqrt(E) + mask) v,  y = o W^O_l

Atoms and coefficients are learned jointly by backprop on the LM loss, with no orthogonality or norm terms.
With N = L/3 atoms per projection (the paper's default, L the number of MASA layers) the attention parameters
shrink by 1 - N (d_in d_out + L) / (L d_in d_out) ~= 66.7% for QKVO and 50% for QKV. Our default is
max(2, round(L / 3)) (at most L): with one atom every layer's projection would be a scalar multiple of one shared
matrix (at L = 4, round(4/3) = 1 would cut 75%, not 66.7%), so from two MASA layers on one atom is only built when
asked for with n_atoms=1. A single MASA layer has one atom by default (W = c A: its own matrix, nothing shared).

Costs. The KV cache and the per-token FLOPs are GQA's: each layer forms W^P_l once per forward (N d_in d_out
multiply-adds, independent of the number of tokens), so `flops_per_token` counts only x W, as the paper's
8 d^2 (n + k) counts the atom combination once per sequence, not per token.

Coefficients. By default (coeff_generator=false) each layer's c^P_l is a trained [N] parameter, c ~ N(0, s^2) with
s = coeff_init_std or 1/sqrt(N), so that E[Var(W_l)] equals the per-layer init's variance; atoms take the per-layer
projections' fan-in init (O scaled down like GQA's o_proj). The paper instead predicts c_l during training from a
trainable per-block embedding through a 3-layer MLP, and keeps only the resulting C after training (so inference
is the same). coeff_generator=true does that here: each layer and shared projection type P has an embedding
e^P_l ~ N(0, I) of width w = generator_width, and one MLP per P, shared by the layers, gives
c^P_l = W3 relu(W2 relu(W1 e^P_l + b1) + b2) + b3 (He init, W3 scaled so that c starts with std s as above). Its
widths, activation and whether Q/K/V/O share one embedding are not given in the paper's main text; ours are
choices. The MLP runs once per layer per forward, like forming W_l, so it adds no per-token FLOPs. The direct
coefficients stay the default because the generator's exact form is unknown; the forward is the same either way.

Weight decay. Our trainer (attnzoo.train.optim.weight_decay_mask) decays only parameters of two or more dimensions
that are not norms or biases: the atoms get weight decay, the coefficients ([N] per layer) get none, and with the
generator its W1..W3 get decay while its biases and the embeddings ([w] per layer) get none. The paper does not say
(its training hyperparameters are in an appendix that was not available); with its generator C is an output, not
a parameter, so any decay it applied acted on the MLP and the embeddings, not on C directly.

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
from attnzoo.layers import dense
from attnzoo.mixers.base import SharedParams, head_counts
from attnzoo.mixers.gqa import GQAOptions, GQAttention
from attnzoo.registry import register

SHARE_CHOICES = ("qkv", "qkvo")
GENERATOR_WIDTH = 64  # the coefficient generator's default width (a choice: the paper gives none)


@dataclasses.dataclass(frozen=True)
class MASAOptions(GQAOptions):
    """GQA's options (heads, rope, qk_norm, window, soft cap), plus:

    n_atoms: atoms per dictionary (None: max(2, round(L / 3)) but at most L, L the number of MASA layers; the
      paper's S = L/3). With two or more MASA layers, one atom (every layer a scalar multiple of one matrix) only
      when given explicitly.
    share: which projections come from shared dictionaries ("qkvo" or "qkv"; the others are per-layer matrices).
    coeff_init_std: std of the initial coefficients (None: 1/sqrt(n_atoms)).
    coeff_generator: predict each layer's coefficients from a trained layer embedding through a shared 3-layer MLP
      (the paper's training-time reparameterisation; module docstring); false: train the coefficients directly.
    generator_width: the generator's embedding and hidden width.
    """

    n_atoms: int | None = None
    share: Literal["qkv", "qkvo"] = "qkvo"
    coeff_init_std: float | None = None
    coeff_generator: bool = False
    generator_width: int = GENERATOR_WIDTH

    def __post_init__(self):
        super().__post_init__()
        if self.n_atoms is not None and self.n_atoms < 1:
            raise ValueError(f"n_atoms={self.n_atoms} must be >= 1 (or none for max(2, MASA layers / 3))")
        if self.share not in SHARE_CHOICES:
            raise ValueError(f"share={self.share!r} must be one of {', '.join(map(repr, SHARE_CHOICES))}")
        if self.coeff_init_std is not None and self.coeff_init_std <= 0:
            raise ValueError(f"coeff_init_std={self.coeff_init_std} must be > 0 (or none for 1/sqrt(n_atoms))")
        if self.generator_width < 1:
            raise ValueError(f"generator_width={self.generator_width} must be >= 1")
        if self.generator_width != GENERATOR_WIDTH and not self.coeff_generator:
            raise ValueError(f"generator_width={self.generator_width} has no effect without coeff_generator=true")


class CoefficientGenerator(nnx.Module):
    """c = W3 relu(W2 relu(W1 e + b1) + b2) + b3: a layer embedding [w] -> its coefficients [N]. He init keeps
    E[relu(.)^2] at 1/2 of a unit pre-activation, so c starts with std `coeff_std` for e ~ N(0, I)."""

    def __init__(self, width: int, n_atoms: int, *, coeff_std: float, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([dense(width, width, **kw), dense(width, width, scale=2**0.5, **kw),
                                dense(width, n_atoms, scale=coeff_std * 2**0.5, **kw)])

    def __call__(self, embedding_W):
        h = embedding_W
        for layer in self.layers[:-1]:
            h = jax.nn.relu(layer(h))
        return self.layers[-1](h)


class MatrixAtoms(nnx.Module):
    """One projection type's dictionary: N matrices [d_in, d_out], shared by every MASA layer, and the coefficient
    generator when the layers' coefficients are predicted."""

    def __init__(self, n_atoms: int, d_in: int, d_out: int, *, scale: float, generator: CoefficientGenerator | None,
                 param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=scale / d_in**0.5)
        self.atoms = nnx.Param(init(rngs.params(), (n_atoms, d_in, d_out), param_dtype))
        self.generator = generator


class AtomProjection(nnx.Module):
    """x W with W = sum_n c_n A_n: this layer's coefficients over a shared dictionary (a drop-in for a bias-free
    nnx.Linear). The layer holds c, or, with the dictionary's generator, the embedding it predicts c from."""

    def __init__(self, dictionary: MatrixAtoms, *, coeff_std: float, dtype, rngs: nnx.Rngs):
        self.dictionary = dictionary
        n_atoms = dictionary.atoms.shape[0]
        param_dtype = dictionary.atoms.dtype
        if dictionary.generator is None:
            self.coeffs = nnx.Param(coeff_std * jax.random.normal(rngs.params(), (n_atoms,), param_dtype))
            self.embedding = None
        else:
            self.coeffs = None
            width = dictionary.generator.layers[0].in_features
            self.embedding = nnx.Param(jax.random.normal(rngs.params(), (width,), param_dtype))
        self.dtype = dtype

    @property
    def in_features(self) -> int:
        return self.dictionary.atoms.shape[1]

    def coefficients(self) -> jax.Array:
        """c_l [N]: trained directly, or predicted from this layer's embedding."""
        if self.embedding is None:
            return self.coeffs[...]
        return self.dictionary.generator(self.embedding[...]).astype(self.dictionary.atoms.dtype)

    def weight(self) -> jax.Array:
        """W = sum_n c_n A_n, formed once per forward (never x A_n per atom: N times the matmul)."""
        return jnp.einsum("n,nio->io", self.coefficients(), self.dictionary.atoms[...])

    def __call__(self, x_BTI):
        return x_BTI.astype(self.dtype) @ self.weight().astype(self.dtype)


def _coeff_std(options: MASAOptions, n_atoms: int) -> float:
    return options.coeff_init_std or n_atoms**-0.5


def _masa_layers(config: ModelConfig) -> list[tuple[int, MASAOptions]]:
    """(index, resolved options) of every MASA layer in the plan."""
    return [(i, options) for i, options in enumerate(config.layer_options) if isinstance(options, MASAOptions)]


def _dictionary_layout(config: ModelConfig, options: MASAOptions, n_masa_layers: int) -> tuple:
    """What every MASA layer must agree on to share the dictionaries: (n_atoms, share, heads, kv heads, head dim,
    coefficient generator width or None)."""
    # At least two atoms unless asked (one atom makes every layer's projection a multiple of one matrix), except
    # for a single MASA layer, whose one atom is just its own matrix.
    n_atoms = options.n_atoms or min(n_masa_layers, max(2, round(n_masa_layers / 3)))
    generator = options.generator_width if options.coeff_generator else None
    return (n_atoms, options.share, *head_counts(config, options), generator)


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
                             f"that share the dictionary (or none for max(2, that number / 3))")
        for j, other in layers:
            if _dictionary_layout(config, other, len(layers)) != layout:
                raise ValueError(f"MASA layers share one dictionary per projection, so they must agree on n_atoms, "
                                 f"share, n_heads, n_kv_heads, head_dim, coeff_generator and generator_width; "
                                 f"layer {j} ({config.layers[j]}) differs")

    @classmethod
    def make_shared(cls, config: ModelConfig, options: MASAOptions, rngs: nnx.Rngs) -> dict[str, MatrixAtoms]:
        n_atoms, share, n_heads, n_kv_heads, head_dim, generator_width = _dictionary_layout(
            config, options, len(_masa_layers(config)))
        d, param_dtype = config.d_model, jnp.dtype(config.param_dtype)
        shapes = {"q": (d, n_heads * head_dim), "k": (d, n_kv_heads * head_dim), "v": (d, n_kv_heads * head_dim),
                  "o": (n_heads * head_dim, d)}
        # The same init as GQA's per-layer projections, the output one scaled down for the residual stream.
        scales = {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1 / (2 * config.n_layers) ** 0.5}
        coeff_std = _coeff_std(options, n_atoms)

        def generator():
            if generator_width is None:
                return None
            return CoefficientGenerator(generator_width, n_atoms, coeff_std=coeff_std, param_dtype=param_dtype,
                                        rngs=rngs)

        return {f"masa_{p}": MatrixAtoms(n_atoms, *shapes[p], scale=scales[p], generator=generator(),
                                         param_dtype=param_dtype, rngs=rngs) for p in share}

    def __init__(self, config: ModelConfig, options: MASAOptions, *, shared: SharedParams, rngs: nnx.Rngs):
        # GQA builds every per-layer matrix; the shared ones are replaced (an init-time cost only).
        super().__init__(config, options, shared=shared, rngs=rngs)
        for p in options.share:
            dictionary = shared[f"masa_{p}"]
            coeff_std = _coeff_std(options, dictionary.atoms.shape[0])
            setattr(self, f"{p}_proj", AtomProjection(dictionary, coeff_std=coeff_std, dtype=jnp.dtype(config.dtype),
                                                      rngs=rngs))


register("masa_qkv", options=MASAOptions, share="qkv")(MASAttention)
