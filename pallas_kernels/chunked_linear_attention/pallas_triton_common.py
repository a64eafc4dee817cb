"""What the chunked linear attention Pallas Triton forward (`pallas_triton.py`) and backward
(`pallas_triton_bwd.py`) share: the static config and tiles, the block specs, the per-chunk decay factors (the
only place the kernels exponentiate) and the tile dots.

Every kernel has the grid (B, H, value-column tiles of block_f) and one program walks the chunks of its (batch,
value head) in order (forward, dQ) or in reverse (dK/dV), carrying one [E_pad, block_f] float32 state or state
cotangent in registers. Triton loads power-of-2 tiles only, so E and F are padded to powers of 2 >= 16 and T to a
multiple of the chunk (a power of 2 >= 16); q/k head h // (H / K) is read through the index maps (GQA, Mamba-2
groups), never repeated in HBM.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import cdiv, next_power_of_2

STATE_ELEMENTS = 128 * 64  # float32 state tile per program (E_pad x block_f): 32 KiB of registers


@dataclasses.dataclass(frozen=True)
class Config:
    """Static options of one call on padded arrays (hashable: the custom VJP's non-differentiable argument)."""
    scale: float
    chunk_size: int
    block_f: int
    interpret: bool


def padded_sizes(t: int, e: int, f: int, chunk_size: int) -> tuple[int, int, int, int]:
    """(T_pad, E_pad, F_pad, block_f): T to whole chunks, E and F to powers of 2 >= 16, and the value tile that
    keeps E_pad * block_f <= STATE_ELEMENTS."""
    e_pad, f_pad = max(16, next_power_of_2(e)), max(16, next_power_of_2(f))
    return cdiv(t, chunk_size) * chunk_size, e_pad, f_pad, min(f_pad, max(16, STATE_ELEMENTS // e_pad))


def grid(v_shape, cfg: Config) -> tuple[int, int, int]:
    """(B, H, value tiles) of v [B, T_pad, H, F_pad]."""
    return v_shape[0], v_shape[2], v_shape[3] // cfg.block_f


def compiler_params(e_pad: int, block_f: int):
    return plt.CompilerParams(num_warps=4 if e_pad * block_f <= 64 * 64 else 8, num_stages=2)


# -------------------------------------------------------------------------------------------------- block specs

def specs(q_shape, v_shape, cfg: Config):
    """Block specs by role, for the grid (batch i, value head j, value tile n): q/k (GQA through the index map),
    a value-width tile ([B, T_pad, H, F_pad]: v, o, dO, dV), a per-token row of head j ([B, T_pad, H]: log decay),
    the document resets ([B, T_pad]), a state tile ([B, H, E_pad, F_pad]) and the per-value-tile partials
    ([n_f, B, T_pad, H, E_pad]: dQ, dK; [n_f, B, H, T_pad]: q.dQ, k.dK)."""
    _, t, kh, e = q_shape
    h = v_shape[2]
    group, bf = h // kh, cfg.block_f
    return dict(
        qk=pl.BlockSpec((None, t, None, e), lambda i, j, n: (i, 0, j // group, 0)),
        value=pl.BlockSpec((None, t, None, bf), lambda i, j, n: (i, 0, j, n)),
        token=pl.BlockSpec((None, t, None), lambda i, j, n: (i, 0, j)),
        resets=pl.BlockSpec((None, t), lambda i, j, n: (i, 0)),
        state=pl.BlockSpec((None, None, e, bf), lambda i, j, n: (i, j, 0, n)),
        qk_partial=pl.BlockSpec((None, None, t, None, e), lambda i, j, n: (n, i, 0, j, 0)),
        token_partial=pl.BlockSpec((None, None, None, t), lambda i, j, n: (n, i, j, 0)),
    )


# ------------------------------------------------------------------------------------------------ in the kernels

class ChunkDecays(NamedTuple):
    """The decay factors of one chunk of C tokens, G the chunk-local cumulative log decay; each is exp of an
    exponent <= 0 masked before exp (so nothing overflows, whatever the length or the decay):
      pair  [C, C]  exp(G_i - G_j) for j <= i in one document, else 0   (the intra-chunk mask)
      read  [C]     exp(G_i) where token i still sees the state entering the chunk, else 0
      write [C]     exp(G_last - G_j) where token j belongs to the chunk's last document, else 0
      carry []      exp(G_last) if the entering state survives the chunk (no document starts in it), else 0"""
    pair: jax.Array
    read: jax.Array
    write: jax.Array
    carry: jax.Array


def chunk_rows(c, chunk: int):
    return pl.ds(pl.multiple_of(c * chunk, chunk), chunk)


def chunk_decays(g_ref, r_ref, rows) -> ChunkDecays:
    """ChunkDecays from the chunk's log decays (g_ref, float32) and document resets (r_ref: documents started in
    the chunk up to each token, int32; None: one document)."""
    cum = jnp.cumsum(g_ref[rows])
    chunk = cum.shape[0]
    pos = jnp.arange(chunk)
    is_last = pos == chunk - 1
    cum_last = jnp.sum(jnp.where(is_last, cum, 0.0))
    pair, read, write, carry = pos[:, None] >= pos[None, :], None, None, None
    if r_ref is not None:
        r = r_ref[rows]
        r_last = jnp.sum(jnp.where(is_last, r, 0))
        pair &= r[:, None] == r[None, :]
        read, write, carry = r == 0, r == r_last, r_last == 0

    def masked_exp(exponent, keep):
        return jnp.exp(exponent if keep is None else jnp.where(keep, exponent, -jnp.inf))

    return ChunkDecays(pair=masked_exp(cum[:, None] - cum[None, :], pair), read=masked_exp(cum, read),
                       write=masked_exp(cum_last - cum, write), carry=masked_exp(cum_last, carry))


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (a^T, b^T when asked) with float32 accumulation; float32 inputs get IEEE dots (not TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def scale_rows(x, factor):
    """x [C, D] times factor [C] per row, in float32, back in x's dtype: decays go into the operands before the
    cast to the input dtype of the tensor-core dots."""
    return (x.astype(jnp.float32) * factor[:, None]).astype(x.dtype)
