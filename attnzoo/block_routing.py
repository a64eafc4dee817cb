"""Plumbing for mixers that route queries to blocks of keys through `pallas_kernels.block_sparse_attention`
(bilevel_routing, routing_transformer): the block-aligned regrouping of rows by their routed group, the decode call
with one block list per new token, and the mean context of a routed causal query. Beside `attnzoo.attention`, which
is the same for dense softmax attention, so that no mixer imports another for these.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels

# Each decoded token is a query block of its own, padded to the Triton kernel's smallest query tile.
DECODE_ROWS = 16
# A key position no query reaches: the causal mask (q_position >= kv_position) hides such a key.
NEVER = 2**30


class BlockLayout(NamedTuple):
    """Rows grouped by an integer key into runs that each start on a block boundary (see `block_aligned_groups`)."""

    slot_BN: jax.Array  # int32: the slot of each row
    row_BM: jax.Array  # int32: the row in each slot, -1 for padding
    group_BQ: jax.Array  # int32: the group of each block of slots, num_groups for unused blocks
    first_block_BQ: jax.Array  # int32: the first block of that group's run


def block_aligned_groups(group_BN, num_groups: int, block: int) -> BlockLayout:
    """Lay out N rows per batch row so that the rows of each group (ids in [0, num_groups)) are contiguous, in row
    order, in a run that starts on a multiple of `block` (padded to whole blocks), runs in group order. M, the static
    slot count, bounds sum_g ceil(n_g / block) <= ceil(N / block) + min(N, num_groups) - 1 blocks."""
    b, n = group_BN.shape
    m = block * (-(-n // block) + min(n, num_groups) - 1)
    order_BN = jnp.argsort(group_BN, axis=-1, stable=True).astype(jnp.int32)
    sorted_BN = jnp.take_along_axis(group_BN, order_BN, axis=-1)
    counts_BG = jax.vmap(lambda g: jnp.bincount(g, length=num_groups))(group_BN).astype(jnp.int32)
    blocks_BG = -(-counts_BG // block)
    block_start_BG = jnp.cumsum(blocks_BG, axis=-1) - blocks_BG
    row_start_BG = jnp.cumsum(counts_BG, axis=-1) - counts_BG
    rank_BN = jnp.arange(n) - jnp.take_along_axis(row_start_BG, sorted_BN, axis=-1)
    slot_sorted_BN = jnp.take_along_axis(block_start_BG, sorted_BN, axis=-1) * block + rank_BN
    batch = jnp.arange(b)[:, None]
    slot_BN = jnp.zeros((b, n), jnp.int32).at[batch, order_BN].set(slot_sorted_BN)
    row_BM = jnp.full((b, m), -1, jnp.int32).at[batch, slot_sorted_BN].set(order_BN)
    first_row_BQ = row_BM[:, ::block]  # a used block's first slot always holds a row
    group_BQ = jnp.where(first_row_BQ >= 0, jnp.take_along_axis(group_BN, jnp.maximum(first_row_BQ, 0), axis=-1),
                         num_groups)
    first_block_BQ = jnp.take_along_axis(block_start_BG, jnp.minimum(group_BQ, num_groups - 1), axis=-1)
    return BlockLayout(slot_BN, row_BM, group_BQ.astype(jnp.int32), first_block_BQ.astype(jnp.int32))


def decode_block_attention(q_BTHE, k_BSKE, v_BSKF, ids_BKTM, counts_BKT, positions_BT, *, block_k: int,
                           kv_positions_BS=None, implementation="auto"):
    """The T new tokens against the cache, each with its own list of cache blocks (`ids_BKTM[..., :counts]`) and a
    causal mask on `positions_BT` vs `kv_positions_BS` (default: the cache row index; pass NEVER to hide a row).
    Each token is a query block of DECODE_ROWS rows (the others hidden); the cache is padded to whole blocks."""
    b, t, h, e = q_BTHE.shape
    s = k_BSKE.shape[1]
    pad = -s % block_k
    if pad:
        k_BSKE, v_BSKF = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k_BSKE, v_BSKF))
        if kv_positions_BS is not None:  # (by default the padding rows sit after every query)
            kv_positions_BS = jnp.pad(kv_positions_BS, ((0, 0), (0, pad)), constant_values=NEVER)
    q_rows = jnp.zeros((b, t, DECODE_ROWS, h, e), q_BTHE.dtype).at[:, :, 0].set(q_BTHE)
    q_positions = jnp.full((b, t, DECODE_ROWS), -1, jnp.int32).at[:, :, 0].set(positions_BT)
    out = pallas_kernels.block_sparse_attention(
        q_rows.reshape(b, t * DECODE_ROWS, h, e), k_BSKE, v_BSKF, ids_BKTM, counts_BKT, block_q=DECODE_ROWS,
        block_k=block_k, causal=True, q_positions_BT=q_positions.reshape(b, -1), kv_positions_BS=kv_positions_BS,
        implementation=implementation)
    return out.reshape(b, t, DECODE_ROWS, h, -1)[:, :, 0]


def routed_context(seq_len: int, block: int, top_k: int) -> float:
    """Mean keys a causal query attends: its current block up to itself plus min(top_k, past blocks) whole blocks."""
    t = np.arange(seq_len)
    return float(np.mean(t % block + 1 + block * np.minimum(top_k, t // block)))
