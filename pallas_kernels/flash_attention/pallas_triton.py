"""FlashAttention-2 forward and backward as Pallas Triton kernels (Dao, https://arxiv.org/abs/2307.08691).

Layout [batch, seq, heads, head_dim]. Three kernels behind one `jax.custom_vjp`:

  forward  grid (q blocks, B, Hq):  online softmax over the visible KV blocks; writes out (gated in the epilogue)
                                    and the natural-log lse [B, Hq, T] that the backward and branch merges need.
  dQ       grid (q blocks, B, Hq):  loops over the visible KV blocks.
  dK/dV    grid (kv blocks, B, Hkv): loops over the q heads of its GQA group and their visible q blocks, so dK/dV
                                    are written once per kv head with no extra reduction.

delta = rowsum(dO * O) runs in XLA. GQA/MQA: q head h reads kv head h // group through the BlockSpec index maps.
Softmax runs in base 2 (logits prescaled by log2(e), then exp2). Causal and sliding-window loops skip fully masked
blocks with dynamic fori_loop bounds; one masking helper serves all three kernels.

Triton wants every loaded tile a power of 2 (and >= 16 for tl.dot): blocks are powers of 2 >= 16, sequences are
padded to a multiple of the blocks (padded keys masked, padded queries sliced off), and head dims are padded to a
multiple of 16 and split into power-of-2 column chunks (192 = 128 + 64, 576 = 512 + 64), so no FLOPs are spent on
power-of-2 padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.common import MASK_VALUE, next_power_of_2, round_up

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


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


def column_chunks(d: int) -> tuple[tuple[int, int], ...]:
    """(start, width) power-of-2 column tiles covering d (a multiple of 16), largest first: 192 -> 128 + 64."""
    assert d % 16 == 0, d
    chunks, start = [], 0
    for bit in reversed(range(d.bit_length())):
        if d & (1 << bit):
            chunks.append((start, 1 << bit))
            start += 1 << bit
    return tuple(chunks)


# ----------------------------------------------------------------------------------------------- shared helpers

def _load(ref, *index, d: int) -> list[jax.Array]:
    """The tile ref[*index, :d] as power-of-2 column chunks."""
    return [ref[(*index, pl.ds(start, width))] for start, width in column_chunks(d)]


def _store(ref, chunks: list[jax.Array]) -> None:
    d = sum(c.shape[-1] for c in chunks)
    for (start, width), c in zip(column_chunks(d), chunks):
        ref[:, pl.ds(start, width)] = c.astype(ref.dtype)


def _dot(a, b, *, trans_a=False, trans_b=False):
    """Tile matmul with f32 accumulation; f32 inputs get full f32 precision (not TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plt.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _dot_nt(a_chunks, b_chunks):
    """sum over column chunks of a @ b.T: [m, d] x [n, d] -> f32 [m, n]."""
    return functools.reduce(jnp.add, [_dot(a, b, trans_b=True) for a, b in zip(a_chunks, b_chunks)])


def _load_do(do_ref, gate_ref, *index, d: int) -> list[jax.Array]:
    """dO tile with the output gate folded in (the cotangent of the ungated attention output)."""
    do = _load(do_ref, *index, d=d)
    if gate_ref is None:
        return do
    gate = gate_ref[index].astype(jnp.float32)[:, None]
    return [(c.astype(jnp.float32) * gate).astype(c.dtype) for c in do]


def _logits(q, k, q_start, k_start, seg_ref, cfg: Config):
    """Masked logits of one [block_q, block_k] tile in the log2 domain, and d(capped)/d(uncapped) (None without
    a soft cap). This is the only place the kernels mask."""
    block_q, block_k = q[0].shape[0], k[0].shape[0]
    s = _dot_nt(q, k)
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


def _probs_and_dlogits(q, k, v, do, lse, delta, q_start, k_start, seg_ref, cfg: Config):
    """Backward of one tile: P = softmax probabilities and dS = d loss / d(q.k) (without the softmax scale)."""
    s, dcap = _logits(q, k, q_start, k_start, seg_ref, cfg)
    p = jnp.exp2(s - (lse * LOG2E)[:, None])
    ds = p * (_dot_nt(do, v) - delta[:, None])
    return p, ds if dcap is None else ds * dcap


def _kv_block_range(q_start, block_q: int, block_k: int, cfg: Config):
    """[lo, hi) of the KV blocks that queries q_start .. q_start + block_q - 1 can see."""
    hi = cfg.seq_k_padded // block_k
    if cfg.causal:
        hi = jnp.minimum(hi, lax.div(q_start + block_q + block_k - 1, block_k))
    lo = 0
    if cfg.window is not None:
        lo = lax.div(jnp.maximum(q_start - cfg.window + 1, 0), block_k)
    return lo, hi


def _q_block_range(k_start, block_q: int, block_k: int, seq_q_padded: int, cfg: Config):
    """[lo, hi) of the q blocks whose queries can see keys k_start .. k_start + block_k - 1."""
    lo = lax.div(k_start, block_q) if cfg.causal else 0
    hi = seq_q_padded // block_q
    if cfg.window is not None:
        hi = jnp.minimum(hi, lax.div(k_start + block_k + cfg.window - 2 + block_q, block_q))
    return lo, hi


# ------------------------------------------------------------------------------------------------------ kernels

def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, gate_ref, o_ref, lse_ref, o_ungated_ref=None, *, cfg: Config):
    # q_ref [bq, Dqk]; k_ref [S, Dqk], v_ref [S, Dv] (whole sequence of one kv head); seg_ref [L]; gate_ref [bq]
    # o_ref, o_ungated_ref [bq, Dv]; lse_ref [bq]
    block_q, block_k = cfg.fwd_blocks
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    q_start = pl.program_id(0) * block_q
    q = _load(q_ref, slice(None), d=dqk)

    def body(j, carry):
        acc, m, l = carry
        k_start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        s, _ = _logits(q, _load(k_ref, keys, d=dqk), q_start, k_start, seg_ref, cfg)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = _load(v_ref, keys, d=dv)
        acc = [alpha[:, None] * a + _dot(p.astype(vc.dtype), vc) for a, vc in zip(acc, v)]
        return acc, m_new, alpha * l + p.sum(axis=-1)

    init = ([jnp.zeros((block_q, w), jnp.float32) for _, w in column_chunks(dv)],
            jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(*_kv_block_range(q_start, block_q, block_k, cfg), body, init)
    inv_l = (1.0 / l)[:, None]  # l >= 1: the row maximum contributes exp2(0)
    out = [a * inv_l for a in acc]
    if o_ungated_ref is not None:
        _store(o_ungated_ref, out)
    if gate_ref is not None:
        gate = gate_ref[...].astype(jnp.float32)[:, None]
        out = [o * gate for o in out]
    _store(o_ref, out)
    lse_ref[...] = (m + jnp.log2(l)) * LN2


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, gate_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: Config):
    # q_ref, dq_ref [bq, Dqk]; do_ref [bq, Dv]; lse_ref, delta_ref, gate_ref [bq]; k_ref/v_ref [S, D] of the kv head
    block_q, block_k = cfg.dq_blocks
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    q_start = pl.program_id(0) * block_q
    q = _load(q_ref, slice(None), d=dqk)
    do = _load_do(do_ref, gate_ref, slice(None), d=dv)
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        k_start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        k = _load(k_ref, keys, d=dqk)
        _, ds = _probs_and_dlogits(q, k, _load(v_ref, keys, d=dv), do, lse, delta, q_start, k_start, seg_ref, cfg)
        ds = ds.astype(k[0].dtype)
        return [a + _dot(ds, kc) for a, kc in zip(dq, k)]

    init = [jnp.zeros((block_q, w), jnp.float32) for _, w in column_chunks(dqk)]
    dq = lax.fori_loop(*_kv_block_range(q_start, block_q, block_k, cfg), body, init)
    _store(dq_ref, [a * cfg.scale for a in dq])


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, gate_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cfg: Config):
    # q_ref [T, G, Dqk], do_ref [T, G, Dv], gate_ref [T, G]: the G q heads of this kv head over the whole sequence;
    # lse_ref, delta_ref [G, T]; k_ref, dk_ref [bk, Dqk]; v_ref, dv_ref [bk, Dv]
    block_q, block_k = cfg.dkv_blocks
    dqk, dv = q_ref.shape[-1], v_ref.shape[-1]
    k_start = pl.program_id(0) * block_k
    k = _load(k_ref, slice(None), d=dqk)
    v = _load(v_ref, slice(None), d=dv)
    lo, hi = _q_block_range(k_start, block_q, block_k, q_ref.shape[0], cfg)

    def head(h, carry):
        def body(i, carry):
            dk, dv_acc = carry
            q_start = pl.multiple_of(i * block_q, block_q)
            rows = pl.ds(q_start, block_q)
            q = _load(q_ref, rows, h, d=dqk)
            do = _load_do(do_ref, gate_ref, rows, h, d=dv)
            p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[h, rows], delta_ref[h, rows], q_start, k_start,
                                       seg_ref, cfg)
            p, ds = p.astype(do[0].dtype), ds.astype(q[0].dtype)
            return ([a + _dot(ds, qc, trans_a=True) for a, qc in zip(dk, q)],
                    [a + _dot(p, dc, trans_a=True) for a, dc in zip(dv_acc, do)])
        return lax.fori_loop(lo, hi, body, carry)

    init = ([jnp.zeros((block_k, w), jnp.float32) for _, w in column_chunks(dqk)],
            [jnp.zeros((block_k, w), jnp.float32) for _, w in column_chunks(dv)])
    dk, dv_acc = lax.fori_loop(0, cfg.group, head, init)
    _store(dk_ref, [a * cfg.scale for a in dk])
    _store(dv_ref, dv_acc)


# ------------------------------------------------------------------------------------------------ pallas_calls

def _compiler_params(cfg: Config):
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _per_query_block_specs(q_BTHD, k_BSKD, v_BSKE, gate_BTH, seg_BL, block_q: int, group: int) -> list:
    """In-specs of the kernels gridded over (q block i, batch b, q head h): q's block, all of its kv head's K and V
    (GQA through the index map), segment ids and the gate's block."""
    dqk, s, dv = q_BTHD.shape[3], k_BSKD.shape[1], v_BSKE.shape[3]
    return [
        pl.BlockSpec((None, block_q, None, dqk), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, s, None, dqk), lambda i, b, h: (b, 0, h // group, 0)),
        pl.BlockSpec((None, s, None, dv), lambda i, b, h: (b, 0, h // group, 0)),
        None if seg_BL is None else pl.BlockSpec((None, seg_BL.shape[1]), lambda i, b, h: (b, 0)),
        None if gate_BTH is None else pl.BlockSpec((None, block_q, None), lambda i, b, h: (b, i, h)),
    ]


def forward(q_BTHD, k_BSKD, v_BSKE, gate_BTH, seg_BL, cfg: Config, *, save_ungated: bool):
    """Forward kernel on padded arrays: (out [B,T,Hq,Dv], lse [B,Hq,T] f32, ungated out or None)."""
    b, t, hq, _ = q_BTHD.shape
    dv = v_BSKE.shape[3]
    block_q, _ = cfg.fwd_blocks
    out_shape = [jax.ShapeDtypeStruct((b, t, hq, dv), q_BTHD.dtype), jax.ShapeDtypeStruct((b, hq, t), jnp.float32)]
    o_spec = pl.BlockSpec((None, block_q, None, dv), lambda i, b, h: (b, i, h, 0))
    out_specs = [o_spec, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))]
    if save_ungated:
        out_shape.append(out_shape[0])
        out_specs.append(o_spec)
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(t // block_q, b, hq),
        in_specs=_per_query_block_specs(q_BTHD, k_BSKD, v_BSKE, gate_BTH, seg_BL, block_q, cfg.group),
        out_specs=out_specs, out_shape=out_shape, compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret, name="flash_fwd",
    )(q_BTHD, k_BSKD, v_BSKE, seg_BL, gate_BTH)
    return outs[0], outs[1], outs[2] if save_ungated else None


def backward_dq(q_BTHD, k_BSKD, v_BSKE, gate_BTH, seg_BL, do_BTHE, lse_BHT, delta_BHT, cfg: Config):
    b, t, hq, dqk = q_BTHD.shape
    dv = v_BSKE.shape[3]
    block_q, _ = cfg.dq_blocks
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(t // block_q, b, hq),
        in_specs=[
            *_per_query_block_specs(q_BTHD, k_BSKD, v_BSKE, gate_BTH, seg_BL, block_q, cfg.group),
            pl.BlockSpec((None, block_q, None, dv), lambda i, b, h: (b, i, h, 0)),
            row_spec, row_spec,
        ],
        out_specs=pl.BlockSpec((None, block_q, None, dqk), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype), compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret, name="flash_dq",
    )(q_BTHD, k_BSKD, v_BSKE, seg_BL, gate_BTH, do_BTHE, lse_BHT, delta_BHT)


def backward_dkv(q_BTHD, k_BSKD, v_BSKE, gate_BTH, seg_BL, do_BTHE, lse_BHT, delta_BHT, cfg: Config):
    b, t, _, dqk = q_BTHD.shape
    s, hkv, dv = k_BSKD.shape[1], k_BSKD.shape[2], v_BSKE.shape[3]
    _, block_k = cfg.dkv_blocks
    g = cfg.group
    group_rows = pl.BlockSpec((None, g, t), lambda j, b, kh: (b, kh, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(s // block_k, b, hkv),
        in_specs=[
            pl.BlockSpec((None, t, g, dqk), lambda j, b, kh: (b, 0, kh, 0)),
            pl.BlockSpec((None, block_k, None, dqk), lambda j, b, kh: (b, j, kh, 0)),
            pl.BlockSpec((None, block_k, None, dv), lambda j, b, kh: (b, j, kh, 0)),
            None if seg_BL is None else pl.BlockSpec((None, seg_BL.shape[1]), lambda j, b, kh: (b, 0)),
            None if gate_BTH is None else pl.BlockSpec((None, t, g), lambda j, b, kh: (b, 0, kh)),
            pl.BlockSpec((None, t, g, dv), lambda j, b, kh: (b, 0, kh, 0)),
            group_rows, group_rows,
        ],
        out_specs=[pl.BlockSpec((None, block_k, None, dqk), lambda j, b, kh: (b, j, kh, 0)),
                   pl.BlockSpec((None, block_k, None, dv), lambda j, b, kh: (b, j, kh, 0))],
        out_shape=[jax.ShapeDtypeStruct(k_BSKD.shape, k_BSKD.dtype), jax.ShapeDtypeStruct(v_BSKE.shape, v_BSKE.dtype)],
        compiler_params=_compiler_params(cfg), interpret=cfg.interpret, name="flash_dkv",
    )(q_BTHD, k_BSKD, v_BSKE, seg_BL, gate_BTH, do_BTHE, lse_BHT, delta_BHT)


# ------------------------------------------------------------------------------------------------------ autodiff

@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, gate, seg, cfg: Config):
    out, lse, _ = forward(q, k, v, gate, seg, cfg, save_ungated=False)
    return out, lse


def _attention_fwd(q, k, v, gate, seg, cfg: Config):
    out, lse, o_ungated = forward(q, k, v, gate, seg, cfg, save_ungated=gate is not None)
    return (out, lse), (q, k, v, gate, seg, out if gate is None else o_ungated, lse)


def attention_backward(cfg: Config, res, cotangents):
    """The VJP of `_attention` (also serves the Mosaic GPU forward, which saves the same residuals):
    res = (q, k, v, gate, seg, ungated out, lse) on padded arrays; returns (dq, dk, dv, dgate, None)."""
    q, k, v, gate, seg, o_ungated, lse_BHT = res
    d_out, d_lse_BHT = cotangents
    # rowsum(dOut * O): with a gate this is dgate, and delta = rowsum(gate*dOut * O) = gate * dgate.
    rowsum_BTH = jnp.sum(d_out.astype(jnp.float32) * o_ungated.astype(jnp.float32), axis=-1)
    dgate = None if gate is None else rowsum_BTH.astype(gate.dtype)
    delta_BTH = rowsum_BTH if gate is None else rowsum_BTH * gate.astype(jnp.float32)
    # d lse / d logits = P, so an lse cotangent folds into delta: dS = P * (dP - (delta - d_lse)).
    delta_BHT = jnp.swapaxes(delta_BTH, 1, 2) - d_lse_BHT
    args = (q, k, v, gate, seg, d_out, lse_BHT, delta_BHT, cfg)
    dq = backward_dq(*args)
    dk, dv = backward_dkv(*args)
    return dq, dk, dv, dgate, None


_attention.defvjp(_attention_fwd, attention_backward)


def make_config(q_shape, k_shape, dv: int, *, causal: bool, sliding_window: int | None, scale: float,
                logits_soft_cap: float | None, block_q: int | None, block_k: int | None, interpret: bool,
                seq_multiple: tuple[int, int] = (1, 1)):
    """Config of one call plus its padded sizes (t_pad, s_pad, dqk_pad, dv_pad). `seq_multiple` = (q, k): extra
    power-of-2 multiples the padded sequences must also meet (another forward kernel's tiles)."""
    _, t, hq, dqk = q_shape
    s, hkv = k_shape[1], k_shape[2]
    dqk_pad, dv_pad = round_up(dqk, 16), round_up(dv, 16)
    fit_q, fit_k = max(16, next_power_of_2(t)), max(16, next_power_of_2(s))
    blocks = [(block_q or min(bq, fit_q), block_k or min(bk, fit_k))
              for bq, bk in default_blocks(max(dqk_pad, dv_pad))]
    t_pad = round_up(t, max(seq_multiple[0], *(bq for bq, _ in blocks)))
    s_pad = round_up(s, max(seq_multiple[1], *(bk for _, bk in blocks)))
    cfg = Config(scale=scale, causal=causal, window=sliding_window, soft_cap=logits_soft_cap, seq_k=s,
                 seq_k_padded=s_pad, group=hq // hkv, fwd_blocks=blocks[0], dq_blocks=blocks[1],
                 dkv_blocks=blocks[2], num_warps=4 if max(dqk_pad, dv_pad) <= 64 else 8, num_stages=2,
                 interpret=interpret)
    return cfg, t_pad, s_pad, dqk_pad, dv_pad


def pad_axis(x, axis: int, size: int, value=0):
    """x zero-padded (or `value`-padded) at the end of `axis` to `size`."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def flash_attention_pallas(q_BTHD, k_BSKD, v_BSKE, *, gate_BTH=None, segment_ids_BT=None, causal: bool,
                           sliding_window: int | None, scale: float, logits_soft_cap: float | None,
                           block_q: int | None, block_k: int | None, interpret: bool):
    """Pads to the kernels' tile rules, runs the custom-VJP kernels, and slices back: (out [B,T,Hq,Dv],
    lse [B,Hq,T] f32). Inputs are assumed validated (see api.flash_attention)."""
    _, t, _, dqk = q_BTHD.shape
    dv = v_BSKE.shape[3]
    cfg, t_pad, s_pad, dqk_pad, dv_pad = make_config(
        q_BTHD.shape, k_BSKD.shape, dv, causal=causal, sliding_window=sliding_window, scale=scale,
        logits_soft_cap=logits_soft_cap, block_q=block_q, block_k=block_k, interpret=interpret)
    q = pad_axis(pad_axis(q_BTHD, 3, dqk_pad), 1, t_pad)
    k = pad_axis(pad_axis(k_BSKD, 3, dqk_pad), 1, s_pad)
    v = pad_axis(pad_axis(v_BSKE, 3, dv_pad), 1, s_pad)
    gate = None if gate_BTH is None else pad_axis(gate_BTH, 1, t_pad)
    seg = None if segment_ids_BT is None else pad_axis(segment_ids_BT.astype(jnp.int32), 1, max(t_pad, s_pad), -1)
    out, lse = _attention(q, k, v, gate, seg, cfg)
    return out[:, :t, :, :dv], lse[:, :, :t]
