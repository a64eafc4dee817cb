"""Split-K decode attention (Flash-Decoding) as a Pallas Triton kernel: the "triton" implementation of decode_attention.

Flash-Decoding (Dao, Haziza, Massa, Sizov 2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html): with
few query tokens the work is one long pass over the KV cache, so the cache length is split across programs to fill
the GPU; each split writes a partial output with its running max and sum, and an exact log-sum-exp combine in JAX
merges them.

Grid (batch, kv head x row block, split). One program owns `block_m` query rows of one GQA group: the rows are
(query token, q head of the group) pairs, so each K/V tile is loaded once for all Tq * group rows. Its loop runs
over the split's tiles below the sequence's length (read in the kernel), so splits past the length do no work; with
a sliding window the tiles before the first query's window are skipped too.

Triton loads power-of-2 tiles only: head dims are covered by power-of-2 column chunks (576 = 512 + 64), the rows
are padded to >= 16 for the dot, and K/V rows past the length are masked loads (never copied or padded in HBM).
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import LOG2E, MASK_VALUE, cdiv, column_chunks, next_power_of_2, round_up
from pallas_kernels.decode_attention.reference import soft_cap, visible

NUM_SMS = 132                 # H200 (and H100 SXM) streaming multiprocessors
KV_TILE_BYTES = 80 * 1024     # one pipeline stage of K + V tiles; two stages stay well under 227 KiB of SMEM
ACC_ELEMENTS = 64 * 128       # f32 accumulator per program (block_m x Dv): 32 KiB of registers
MIN_SPLIT_TILES = 4           # a split gets at least this many KV tiles, so the combine stays negligible
MIN_WAVE_EFFICIENCY = 0.85    # smallest split count whose last wave of programs is at least this full
MAX_SPLITS = 64


def default_block_k(dqk: int, dv: int, seq_len: int, itemsize: int) -> int:
    """Largest power-of-2 KV tile (16..128 keys) whose K + V bytes fit KV_TILE_BYTES, and not above the cache."""
    fit = KV_TILE_BYTES // ((round_up(dqk, 16) + round_up(dv, 16)) * itemsize)
    block_k = 1 << max(4, fit.bit_length() - 1)
    return max(16, min(block_k, 128, next_power_of_2(seq_len)))


def default_block_m(rows: int, dv: int) -> int:
    """Query rows per program: the whole padded GQA group when its f32 accumulator fits ACC_ELEMENTS."""
    cap = max(16, 1 << ((ACC_ELEMENTS // round_up(dv, 16)).bit_length() - 1))
    return min(max(16, next_power_of_2(rows)), cap)


def default_num_splits(programs: int, seq_len: int, block_k: int) -> int:
    """Fewest splits that give >= one program per SM with the last wave >= MIN_WAVE_EFFICIENCY full."""
    max_splits = max(1, min(MAX_SPLITS, seq_len // (MIN_SPLIT_TILES * block_k)))
    for splits in range(1, max_splits + 1):
        total = programs * splits
        if total >= NUM_SMS and total / (NUM_SMS * cdiv(total, NUM_SMS)) >= MIN_WAVE_EFFICIENCY:
            return splits
    return max_splits


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of one call: row tiles per GQA group, KV tile, split length and count, warps."""
    block_m: int
    row_blocks: int
    block_k: int
    split_len: int
    num_splits: int
    num_warps: int


def decode_config(b: int, s: int, tq: int, hq: int, hkv: int, dqk: int, dv: int, itemsize: int, *,
                  num_splits: int | None = None, block_k: int | None = None) -> DecodeConfig:
    """The heuristics above, with `num_splits` / `block_k` overrides. The split count is recomputed from the split
    length (a multiple of block_k), so it can come out below the one asked for."""
    rows = tq * (hq // hkv)
    block_m = default_block_m(rows, dv)
    row_blocks = cdiv(rows, block_m)
    block_k = default_block_k(dqk, dv, s, itemsize) if block_k is None else block_k
    if num_splits is None:
        num_splits = default_num_splits(b * hkv * row_blocks, s, block_k)
    split_len = round_up(cdiv(s, num_splits), block_k)
    return DecodeConfig(block_m=block_m, row_blocks=row_blocks, block_k=block_k, split_len=split_len,
                        num_splits=cdiv(s, split_len), num_warps=4 if round_up(dqk, 16) <= 128 else 8)


def _load_tile(ref, start, size: int, off: int, width: int, rows_ok, d: int):
    """[size, width] tile at (start, off); rows with rows_ok False and columns >= d read as 0."""
    mask = rows_ok[:, None]
    if off + width > d:
        mask = mask & (off + jnp.arange(width) < d)[None, :]
    return plt.load(ref.at[pl.ds(start, size), pl.ds(off, width)], mask=mask, other=0)


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, cfg: DecodeConfig, scale,
                   logits_soft_cap, sliding_window, num_queries, group, qk_chunks, v_chunks, dqk, dv, precision):
    # len_ref: [] ; q_ref: [block_m, Dqk_pad] ; k_ref: [split_len, Dqk_pad] ; v_ref: [split_len, Dv_pad]
    # o_ref: [block_m, Dv_pad] f32 ; m_ref, l_ref: [block_m] f32 (base-2 running max and sum of this split)
    block_m, block_k, split_len = cfg.block_m, cfg.block_k, cfg.split_len
    split_start = pl.program_id(2) * split_len
    length = len_ref[...]
    rows = (pl.program_id(1) % cfg.row_blocks) * block_m + jnp.arange(block_m)
    # Row r is query token r // group; the padding rows past the group copy the last token's position.
    q_pos = length - num_queries + jnp.minimum(rows // group, num_queries - 1)
    lo = split_start
    if sliding_window is not None:  # keys before the first query's window are seen by no row
        lo = jnp.maximum(lo, length - num_queries - sliding_window + 1)
    first_tile = jnp.maximum(lo - split_start, 0) // block_k
    end_tile = jnp.minimum(pl.cdiv(length - split_start, block_k), split_len // block_k)
    q_chunks = [q_ref[:, pl.ds(off, width)] for off, width in qk_chunks]
    dims = (((1,), (1,)), ((), ()))  # contract the head dim of both: q @ k.T

    def body(t, carry):
        accs, m, l = carry
        start = t * block_k
        k_pos = split_start + start + jnp.arange(block_k)
        in_cache = k_pos < length
        s = functools.reduce(operator.add, (
            lax.dot_general(qc, _load_tile(k_ref, start, block_k, off, width, in_cache, dqk), dims,
                            precision=precision, preferred_element_type=jnp.float32)
            for qc, (off, width) in zip(q_chunks, qk_chunks)))
        if logits_soft_cap is None:
            s = s * (scale * LOG2E)
        else:
            s = soft_cap(s * scale, logits_soft_cap) * LOG2E
        mask = visible(q_pos[:, None], k_pos[None, :], sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # While a row has seen no key, m_new == MASK_VALUE and its masked p are 1: that finite junk is wiped by
        # alpha == 0 at its first visible key, and a split where it saw none gets weight 0 in the combine.
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        accs = tuple(alpha[:, None] * acc + jnp.dot(
            p.astype(v_ref.dtype), _load_tile(v_ref, start, block_k, off, width, in_cache, dv),
            precision=precision, preferred_element_type=jnp.float32)
            for acc, (off, width) in zip(accs, v_chunks))
        return accs, m_new, alpha * l + p.sum(axis=-1)

    init = (tuple(jnp.zeros((block_m, width), jnp.float32) for _, width in v_chunks),
            jnp.full((block_m,), MASK_VALUE, jnp.float32), jnp.zeros((block_m,), jnp.float32))
    accs, m, l = lax.fori_loop(first_tile, end_tile, body, init)
    for acc, (off, width) in zip(accs, v_chunks):
        o_ref[:, pl.ds(off, width)] = acc
    m_ref[...] = m
    l_ref[...] = l


def decode_attention_triton(q_BTHE, k_cache_BSKE, v_cache_BSKF, lengths_B, *, scale: float,
                            sliding_window: int | None, logits_soft_cap: float | None, num_splits: int | None,
                            block_k: int | None, interpret: bool) -> jax.Array:
    """Split-K decode kernel plus the log-sum-exp combine. Inputs are validated (and jitted) by
    `api.decode_attention`; lengths are already clipped to [Tq, S]."""
    b, tq, hq, dqk = q_BTHE.shape
    s, hkv, dv = k_cache_BSKE.shape[1], k_cache_BSKE.shape[2], v_cache_BSKF.shape[3]
    group = hq // hkv
    rows = tq * group
    qk_chunks, v_chunks = column_chunks(dqk), column_chunks(dv)
    dqk_pad, dv_pad = round_up(dqk, 16), round_up(dv, 16)
    cfg = decode_config(b, s, tq, hq, hkv, dqk, dv, k_cache_BSKE.dtype.itemsize, num_splits=num_splits,
                        block_k=block_k)
    block_m, row_blocks, num_splits = cfg.block_m, cfg.row_blocks, cfg.num_splits

    # Rows of one kv head's group, token-major: [B, Hkv, Tq * group (padded), Dqk (padded)]. q is small; the
    # caches are never copied.
    q = q_BTHE.reshape(b, tq, hkv, group, dqk).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, dqk)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, row_blocks * block_m - rows), (0, dqk_pad - dqk)))
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(
        _decode_kernel, cfg=cfg, scale=scale, logits_soft_cap=logits_soft_cap, sliding_window=sliding_window,
        num_queries=tq, group=group, qk_chunks=qk_chunks, v_chunks=v_chunks, dqk=dqk, dv=dv, precision=precision)

    def head(hr):  # grid axis 1 is (kv head, row block)
        return hr // row_blocks

    def rblk(hr):
        return hr % row_blocks

    partial_shape = (b, hkv, num_splits, row_blocks * block_m)
    o_part, m_part, l_part = pl.pallas_call(
        kernel,
        grid=(b, hkv * row_blocks, num_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda i, hr, j: (i,)),
            pl.BlockSpec((None, None, block_m, dqk_pad), lambda i, hr, j: (i, head(hr), rblk(hr), 0)),
            pl.BlockSpec((None, cfg.split_len, None, dqk_pad), lambda i, hr, j: (i, j, head(hr), 0)),
            pl.BlockSpec((None, cfg.split_len, None, dv_pad), lambda i, hr, j: (i, j, head(hr), 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_m, dv_pad), lambda i, hr, j: (i, head(hr), j, rblk(hr), 0)),
            pl.BlockSpec((None, None, None, block_m), lambda i, hr, j: (i, head(hr), j, rblk(hr))),
            pl.BlockSpec((None, None, None, block_m), lambda i, hr, j: (i, head(hr), j, rblk(hr))),
        ],
        out_shape=[jax.ShapeDtypeStruct((*partial_shape, dv_pad), jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32),
                   jax.ShapeDtypeStruct(partial_shape, jnp.float32)],
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=2),
        interpret=interpret,
        name="decode_attention_split_k",
    )(lengths_B, q, k_cache_BSKE, v_cache_BSKF)

    # Exact combine over splits (base 2). Every real row sees at least its own key, so its total weight is >= 1.
    m_max = m_part.max(axis=2, keepdims=True)
    w = jnp.exp2(m_part - m_max)
    o = (w[..., None] * o_part).sum(axis=2) / (w * l_part).sum(axis=2)[..., None]
    o = o[:, :, :rows, :dv].reshape(b, hkv, tq, group, dv).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, tq, hq, dv).astype(q_BTHE.dtype)


def unsupported_reason(call) -> None:
    """The split-K kernel takes every call the API accepts (off GPU in interpret mode)."""
    return None


def run(call):
    return decode_attention_triton(call.q_BTHE, call.k_cache_BSKE, call.v_cache_BSKF, call.lengths_B,
                                   scale=call.scale, sliding_window=call.sliding_window,
                                   logits_soft_cap=call.logits_soft_cap, num_splits=call.num_splits,
                                   block_k=call.block_k, interpret=call.interpret)
