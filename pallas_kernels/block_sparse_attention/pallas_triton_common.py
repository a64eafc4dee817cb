"""What the block-sparse Pallas Triton forward (`pallas_triton.py`) and backward (`pallas_triton_bwd.py`) share: the
static call config, the one masking helper, and the index-table / position block specs.

The sparsity blocks (block_q, block_k) are semantic; each kernel computes in tiles (tq, tk) that divide them
(forward 128 x 64, dQ 64 x 32, dK/dV 32 x 64 at head dims <= 128, flash_attention's register/shared-memory budget),
so a 128-token block never forces a 128 x 128 backward tile. Column chunking of odd head dims, the dots and tile
loads come from flash_attention's Triton helpers.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import LOG2E, MASK_VALUE, round_up
from pallas_kernels.flash_attention import pallas_triton_common as flash_tiles


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable: a `nondiff_argnums` of the custom VJP)."""
    scale: float
    causal: bool
    group: int  # q heads per kv head
    block_q: int
    block_k: int
    fwd_tiles: tuple[int, int]  # (tq, tk), dividing (block_q, block_k)
    dq_tiles: tuple[int, int]
    dkv_tiles: tuple[int, int]
    num_warps: int
    num_stages: int
    interpret: bool


def make_config(q_shape, k_shape, dv: int, *, block_q: int, block_k: int, causal: bool, scale: float,
                interpret: bool) -> tuple[Config, int, int]:
    """Config of one call plus the padded head dims (dqk_pad, dv_pad)."""
    hq, dqk = q_shape[2], q_shape[3]
    dqk_pad, dv_pad = round_up(dqk, 16), round_up(dv, 16)
    tiles = [(min(tq, block_q), min(tk, block_k)) for tq, tk in flash_tiles.default_blocks(max(dqk_pad, dv_pad))]
    cfg = Config(scale=scale, causal=causal, group=hq // k_shape[2], block_q=block_q, block_k=block_k,
                 fwd_tiles=tiles[0], dq_tiles=tiles[1], dkv_tiles=tiles[2],
                 num_warps=4 if max(dqk_pad, dv_pad) <= 64 else 8, num_stages=2, interpret=interpret)
    return cfg, dqk_pad, dv_pad


def compiler_params(cfg: Config):
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def logits(q, k, q_pos, kv_pos, cfg: Config):
    """Scaled logits of one [tq, tk] tile in the log2 domain, and the visibility mask (None without causal). Masked
    logits are finite (MASK_VALUE) so no NaN arises; callers zero masked probabilities where a row may have no
    visible key yet. The only place the kernels mask."""
    s = flash_tiles.dot_nt(q, k) * (cfg.scale * LOG2E)
    if not cfg.causal:
        return s, None
    visible = q_pos[:, None] >= kv_pos[None, :]
    return jnp.where(visible, s, MASK_VALUE), visible


def positions(pos_ref, start, size: int, cfg: Config):
    """Positions start .. start + size - 1 of the causal mask (None without causal)."""
    return pos_ref[pl.ds(start, size)] if cfg.causal else None


def broadcast_index(size: int, index):
    """Index into an axis that is either full (index) or broadcast (size 1: 0)."""
    return index if size != 1 else 0


def table_spec(table, batch_of, head_of):
    """BlockSpec giving each program the whole [rows, ...] index table of its (batch row, kv head); `batch_of` /
    `head_of` map grid indices to the batch row / kv head (size-1 axes broadcast)."""
    bsize, ksize, *rest = table.shape
    return pl.BlockSpec((None, None, *rest), lambda *g: (broadcast_index(bsize, batch_of(*g)),
                                                         broadcast_index(ksize, head_of(*g)), *([0] * len(rest))))


def position_spec(pos_BL, batch_of):
    """BlockSpec of one batch row's whole position array (None when there is none)."""
    if pos_BL is None:
        return None
    return pl.BlockSpec((None, pos_BL.shape[1]), lambda *g: (broadcast_index(pos_BL.shape[0], batch_of(*g)), 0))


def listed_tile_start(table_ref, row, n, block: int, tile: int):
    """Start token of the n-th tile of the blocks listed in table_ref[row, :], each block split into block // tile
    tiles: tile n % per of block table_ref[row, n // per]. Loop n over [0, count * per)."""
    per = block // tile
    if per == 1:
        return pl.multiple_of(table_ref[row, n] * block, block)
    return pl.multiple_of(table_ref[row, lax.div(n, per)] * block + lax.rem(n, per) * tile, tile)
