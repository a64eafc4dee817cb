"""What the FlashAttention-2 Pallas Triton forward (`pallas_triton.py`) and backward (`pallas_triton_bwd.py`) share:
the static call config and its tiles, column-chunked tile loads and dots, the one masking helper, and the block
specs of the kernels gridded over q blocks.

Triton wants every loaded tile a power of 2 (and >= 16 for tl.dot): blocks are powers of 2 >= 16, sequences are
padded to a multiple of the blocks (padded keys masked, padded queries sliced off), and head dims are padded to a
multiple of 16 and split into power-of-2 column chunks (192 = 128 + 64, 576 = 512 + 64), so no FLOPs are spent on
power-of-2 padding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import LOG2E, MASK_VALUE, column_chunks, next_power_of_2, round_up


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call (hashable, so it is a `nondiff_argnums` of the custom VJP).

    Blocks are (block_q, block_k) per kernel. `seq_k` is the real key length; the arrays the kernels see are
    padded to multiples of the blocks."""
    scale: float
    causal: bool
    window: int | None
    soft_cap: float | None
    seq_k: int
    seq_k_padded: int
    group: int  # q heads per kv head
    fwd_blocks: tuple[int, int]
    dq_blocks: tuple[int, int]
    dkv_blocks: tuple[int, int]
    num_warps: int
    num_stages: int
    interpret: bool


def default_blocks(head_dim: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Untuned (block_q, block_k) for (forward, dQ, dK/dV) that keep the tiles of one program (plus Triton's
    2-stage K/V pipeline) inside an H100/H200's ~228 KB of shared memory and the register file."""
    if head_dim <= 128:
        return (128, 64), (64, 32), (32, 64)
    if head_dim <= 256:
        return (64, 64), (32, 32), (32, 32)
    return (32, 32), (16, 32), (32, 16)


def make_config(q_shape, k_shape, dv: int, *, causal: bool, sliding_window: int | None, scale: float,
                logits_soft_cap: float | None, block_q: int | None, block_k: int | None, interpret: bool):
    """Config of one call plus its padded sizes (t_pad, s_pad, dqk_pad, dv_pad)."""
    _, t, hq, dqk = q_shape
    s, hkv = k_shape[1], k_shape[2]
    dqk_pad, dv_pad = round_up(dqk, 16), round_up(dv, 16)
    fit_q, fit_k = max(16, next_power_of_2(t)), max(16, next_power_of_2(s))
    blocks = [(block_q or min(bq, fit_q), block_k or min(bk, fit_k))
              for bq, bk in default_blocks(max(dqk_pad, dv_pad))]
    t_pad = round_up(t, max(bq for bq, _ in blocks))
    s_pad = round_up(s, max(bk for _, bk in blocks))
    cfg = Config(scale=scale, causal=causal, window=sliding_window, soft_cap=logits_soft_cap, seq_k=s,
                 seq_k_padded=s_pad, group=hq // hkv, fwd_blocks=blocks[0], dq_blocks=blocks[1],
                 dkv_blocks=blocks[2], num_warps=4 if max(dqk_pad, dv_pad) <= 64 else 8, num_stages=2,
                 interpret=interpret)
    return cfg, t_pad, s_pad, dqk_pad, dv_pad


def compiler_params(cfg: Config):
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ------------------------------------------------------------------------------------------------ tile helpers

def load(ref, *index, d: int) -> list[jax.Array]:
    """The tile ref[*index, :d] as power-of-2 column chunks."""
    return [ref[(*index, pl.ds(start, width))] for start, width in column_chunks(d)]


def store(ref, chunks: list[jax.Array]) -> None:
    d = sum(c.shape[-1] for c in chunks)
    for (start, width), c in zip(column_chunks(d), chunks):
        ref[:, pl.ds(start, width)] = c.astype(ref.dtype)


def zeros(rows: int, d: int) -> list[jax.Array]:
    """f32 accumulators matching `load`'s column chunks of width d."""
    return [jnp.zeros((rows, width), jnp.float32) for _, width in column_chunks(d)]


def dot(a, b, *, trans_a=False, trans_b=False):
    """Tile matmul with f32 accumulation; f32 inputs get full f32 precision (not TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plt.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def dot_nt(a_chunks, b_chunks):
    """sum over column chunks of a @ b.T: [m, d] x [n, d] -> f32 [m, n]."""
    return functools.reduce(jnp.add, [dot(a, b, trans_b=True) for a, b in zip(a_chunks, b_chunks)])


def logits(q, k, q_start, k_start, seg_ref, cfg: Config):
    """Masked logits of one [block_q, block_k] tile in the log2 domain, and d(capped)/d(uncapped) (None without
    a soft cap). This is the only place the kernels mask."""
    block_q, block_k = q[0].shape[0], k[0].shape[0]
    s = dot_nt(q, k)
    dcap = None
    if cfg.soft_cap is None:
        s = s * (cfg.scale * LOG2E)
    else:
        t = jnp.tanh(s * (cfg.scale / cfg.soft_cap))
        s, dcap = t * (cfg.soft_cap * LOG2E), 1.0 - t * t
    rows = q_start + jnp.arange(block_q)[:, None]
    cols = k_start + jnp.arange(block_k)[None, :]
    conds = []
    if cfg.seq_k_padded != cfg.seq_k:
        conds.append(cols < cfg.seq_k)
    if cfg.causal:
        conds.append(cols <= rows)
    if cfg.window is not None:
        conds.append(cols > rows - cfg.window)
    if seg_ref is not None:
        conds.append(seg_ref[pl.ds(q_start, block_q)][:, None] == seg_ref[pl.ds(k_start, block_k)][None, :])
    if conds:
        s = jnp.where(functools.reduce(jnp.logical_and, conds), s, MASK_VALUE)
    return s, dcap


def kv_block_range(q_start, block_q: int, block_k: int, cfg: Config):
    """[lo, hi) of the KV blocks that queries q_start .. q_start + block_q - 1 can see."""
    hi = cfg.seq_k_padded // block_k
    if cfg.causal:
        hi = jnp.minimum(hi, lax.div(q_start + block_q + block_k - 1, block_k))
    lo = 0
    if cfg.window is not None:
        lo = lax.div(jnp.maximum(q_start - cfg.window + 1, 0), block_k)
    return lo, hi


def per_query_block_specs(q_BTHE, k_BSKE, v_BSKF, gate_BTH, seg_BL, block_q: int, group: int) -> list:
    """In-specs of the kernels gridded over (q block i, batch b, q head h): q's block, all of its kv head's K and V
    (GQA through the index map), segment ids and the gate's block."""
    dqk, s, dv = q_BTHE.shape[3], k_BSKE.shape[1], v_BSKF.shape[3]
    return [
        pl.BlockSpec((None, block_q, None, dqk), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, s, None, dqk), lambda i, b, h: (b, 0, h // group, 0)),
        pl.BlockSpec((None, s, None, dv), lambda i, b, h: (b, 0, h // group, 0)),
        None if seg_BL is None else pl.BlockSpec((None, seg_BL.shape[1]), lambda i, b, h: (b, 0)),
        None if gate_BTH is None else pl.BlockSpec((None, block_q, None), lambda i, b, h: (b, i, h)),
    ]
