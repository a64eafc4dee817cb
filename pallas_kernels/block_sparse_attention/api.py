"""`block_sparse_attention`: softmax attention over per-(batch, kv head, query block) lists of selected key blocks,
over the op's table of implementations (`ops.py`), plus the index-list helpers every implementation and router
shares (`check_block_indices`, `transpose_block_indices`).

Light: imports jax only; the backends (pallas_triton.py, reference.py) are imported on first use.

The index format: for each batch row b, kv head k and query block i,
`kv_block_indices[b, k, i, :kv_block_counts[b, k, i]]` are the kv blocks its queries attend (distinct ids in
[0, S // block_k); ascending order recommended for locality, the result does not depend on it); entries at or past
the count are ignored, so pad with any value. The H // K query heads of kv head k share its lists (GQA), and a
size-1 batch or head axis broadcasts. A causal token mask (q_position >= kv_position) applies inside every selected
block, so the diagonal block is simply listed like any other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import ops
from pallas_kernels.common import check_attention_inputs, default_interpret, on_gpu


@dataclasses.dataclass(frozen=True)
class BlockSparseCall:
    """One validated block_sparse_attention call as every backend's `unsupported_reason(call)` and `run(call)` see
    it. Index lists keep their (possibly size-1) batch and head axes; positions are None (arange) or [B or 1, T/S]
    int32, given only with causal."""
    q_BTHE: jax.Array
    k_BSKE: jax.Array
    v_BSKF: jax.Array
    kv_block_indices: jax.Array  # int32 [B or 1, K or 1, T // block_q, MAXK]
    kv_block_counts: jax.Array  # int32 [B or 1, K or 1, T // block_q]
    block_q: int
    block_k: int
    causal: bool
    q_positions_BT: jax.Array | None
    kv_positions_BS: jax.Array | None
    scale: float
    return_lse: bool
    interpret: bool  # Pallas interpret mode


def block_sparse_attention(q_BTHE, k_BSKE, v_BSKF, kv_block_indices, kv_block_counts, *, block_q: int,
                           block_k: int, causal: bool = True, q_positions_BT=None, kv_positions_BS=None,
                           scale: float | None = None, return_lse: bool = False,
                           implementation: str | Sequence[str] = "auto", interpret: bool | None = None):
    """Block-sparse softmax attention, differentiable w.r.t. q, k and v.

    Args:
      q_BTHE [B, T, H, E]; k_BSKE [B, S, K, E]; v_BSKF [B, S, K, F]; H % K == 0 (query head h reads kv head
        h // (H // K)); bf16, fp16 or fp32, one dtype; accumulation is fp32.
      kv_block_indices: int [B or 1, K or 1, T // block_q, MAXK]: per batch row, kv head (shared by its H // K query
        heads) and query block, the kv block ids it attends; entries at or past the count are ignored.
      kv_block_counts: int [B or 1, K or 1, T // block_q], each in [0, MAXK].
      block_q, block_k: query / key block sizes; T % block_q == 0 and S % block_k == 0. The Triton kernels need
        powers of 2 >= 16.
      causal: mask keys whose position is after the query's, token by token, inside every selected block.
      q_positions_BT [B or 1, T], kv_positions_BS [B or 1, S]: int positions the causal mask compares (default
        arange): permuted or clustered token orders (e.g. the Routing Transformer) keep exact causality. Only with
        causal=True.
      scale: logit scale, default 1/sqrt(E).
      return_lse: also return lse [B, T, H] float32 (natural log) of the visible scaled logits; a query with no
        visible key gets output 0 and lse -inf, so branches merge exactly: out = sum_i exp(lse_i - lse) out_i with
        lse = logaddexp over the branches.
      implementation: "auto", one of `ops.implementations("block_sparse_attention")` or a sequence of them tried in
        order: "triton" (Pallas Triton forward / dQ / dK-dV kernels, interpreted off GPU), "xla" (a gather of the
        selected blocks, cost linear in MAXK). "auto" is xla (triton on GPU once verified there, see
        `ops.PALLAS_IN_AUTO`).
      interpret: Pallas interpret mode; default: off GPU.

    Index lists are checked (ids in range, no duplicate ids within a list, counts in [0, MAXK]) when they are
    concrete arrays. Under jit they are tracers and are NOT checked: an out-of-range id is clamped into range and a
    duplicated id is attended twice in the forward (wrong weights); validate them with `check_block_indices`.

    Returns:
      out [B, T, H, F] in q.dtype, or (out, lse [B, T, H] float32) with `return_lse`.
    """
    check_attention_inputs(q_BTHE, k_BSKE, v_BSKF, k_name="k_BSKE", v_name="v_BSKF")
    b, t, _, e = q_BTHE.shape
    s, kh = k_BSKE.shape[1], k_BSKE.shape[2]
    for name, block, length, axis in (("block_q", block_q, t, "T"), ("block_k", block_k, s, "S")):
        if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 1:
            raise ValueError(f"{name} must be an int >= 1, got {block!r}")
        if length % block:
            raise ValueError(f"{name}={block} must divide the sequence length {axis}={length}")
    _check_index_shapes(kv_block_indices, kv_block_counts, b, kh, t // block_q)
    if not isinstance(kv_block_indices, jax.core.Tracer) and not isinstance(kv_block_counts, jax.core.Tracer):
        check_block_indices(kv_block_indices, kv_block_counts, num_kv_blocks=s // block_k)
    positions = {"q_positions_BT": (q_positions_BT, t), "kv_positions_BS": (kv_positions_BS, s)}
    for name, (pos, length) in positions.items():
        if pos is None:
            continue
        if not causal:
            raise ValueError(f"{name} is only used by the causal mask; pass causal=True or drop it")
        if pos.ndim != 2 or pos.shape[0] not in (1, b) or pos.shape[1] != length or not jnp.issubdtype(
                pos.dtype, jnp.integer):
            raise ValueError(f"{name} must be int [{b} or 1, {length}], got {pos.dtype}{pos.shape}")
    call = BlockSparseCall(
        q_BTHE=q_BTHE, k_BSKE=k_BSKE, v_BSKF=v_BSKF, kv_block_indices=jnp.asarray(kv_block_indices, jnp.int32),
        kv_block_counts=jnp.asarray(kv_block_counts, jnp.int32), block_q=int(block_q), block_k=int(block_k),
        causal=bool(causal), q_positions_BT=None if q_positions_BT is None else q_positions_BT.astype(jnp.int32),
        kv_positions_BS=None if kv_positions_BS is None else kv_positions_BS.astype(jnp.int32),
        scale=1.0 / math.sqrt(e) if scale is None else float(scale), return_lse=return_lse,
        interpret=default_interpret() if interpret is None else interpret)
    _, backend = ops.select("block_sparse_attention", implementation, call, gpu=on_gpu())
    return backend.run(call)


def _check_index_shapes(indices, counts, batch: int, kv_heads: int, q_blocks: int) -> None:
    for name, x, ndim in (("kv_block_indices", indices, 4), ("kv_block_counts", counts, 3)):
        if not hasattr(x, "dtype") or x.ndim != ndim or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array of rank {ndim}, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}{getattr(x, 'shape', '')}")
        if x.shape[0] not in (1, batch) or x.shape[1] not in (1, kv_heads) or x.shape[2] != q_blocks:
            raise ValueError(f"{name} must have shape [{batch} or 1, {kv_heads} or 1, T // block_q = {q_blocks}"
                             f"{', MAXK' if ndim == 4 else ''}], got {x.shape}")
    if indices.shape[3] < 1:
        raise ValueError(f"kv_block_indices needs MAXK >= 1 slots, got shape {indices.shape}")


# ------------------------------------------------------------------------------------------- index-list helpers

def _slots_in_use(kv_block_indices, kv_block_counts):
    """[..., MAXK] bool: the slots before each list's count."""
    return jnp.arange(kv_block_indices.shape[-1]) < kv_block_counts[..., None]


def block_index_problems(kv_block_indices, kv_block_counts, *, num_kv_blocks: int) -> dict[str, jax.Array]:
    """Traceable checks of index lists: {problem: bool [..., T // block_q], True where that list has it}, for
    "count outside [0, MAXK]", "id outside [0, num_kv_blocks)" and "duplicate id". Usable under jit (e.g. with
    `jax.experimental.checkify.check(~problem.any(), ...)` inside `checkify.checkify`)."""
    maxk = kv_block_indices.shape[-1]
    counts = jnp.asarray(kv_block_counts)
    used = _slots_in_use(kv_block_indices, counts)
    ids = jnp.where(used, kv_block_indices, -1)
    in_use_sorted = jnp.sort(jnp.where(used, kv_block_indices, jnp.iinfo(jnp.int32).max), axis=-1)
    repeats = (in_use_sorted[..., 1:] == in_use_sorted[..., :-1]) & (in_use_sorted[..., 1:] != jnp.iinfo(
        jnp.int32).max)
    return {
        f"count outside [0, MAXK={maxk}]": (counts < 0) | (counts > maxk),
        f"id outside [0, num_kv_blocks={num_kv_blocks})": (used & ((ids < 0) | (ids >= num_kv_blocks))).any(-1),
        "duplicate id": repeats.any(-1),
    }


def check_block_indices(kv_block_indices, kv_block_counts, *, num_kv_blocks: int) -> jax.Array:
    """Validate index lists: returns a bool scalar, True when every list is valid (counts in [0, MAXK], ids in
    [0, num_kv_blocks), no duplicate id among a list's first `count` entries).

    With concrete arrays an invalid list raises ValueError naming the problem and the first offending
    [batch, kv head, q block]; under jit nothing can raise, so use the returned flag (or `block_index_problems`)."""
    problems = block_index_problems(kv_block_indices, kv_block_counts, num_kv_blocks=num_kv_blocks)
    if not any(isinstance(x, jax.core.Tracer) for x in problems.values()):
        for what, where in problems.items():
            where = np.asarray(where)
            if where.any():
                first = tuple(int(i) for i in np.argwhere(where)[0])
                b, k, i = first
                raise ValueError(
                    f"kv_block_indices/kv_block_counts: {what} in the list of [batch {b}, kv head {k}, q block {i}] "
                    f"(count {int(np.asarray(kv_block_counts)[first])}, ids "
                    f"{np.asarray(kv_block_indices)[first].tolist()}) and {int(where.sum()) - 1} more lists")
    return ~jnp.stack([p.any() for p in problems.values()]).any()


def transpose_block_indices(kv_block_indices, kv_block_counts, *, num_kv_blocks: int):
    """The transposed lists the dK/dV pass needs: for every kv block, the query blocks that select it.

    kv_block_indices int32 [..., NQB, MAXK], kv_block_counts int32 [..., NQB] (valid lists) ->
    (q_block_indices int32 [..., num_kv_blocks, NQB], q_block_counts int32 [..., num_kv_blocks]), each list
    ascending, entries past the count 0. Built on device without atomics, deterministically: scatter to a bitmap
    [..., NQB, NKB], then a stable argsort compacts each column's set bits to the front (QMAX = NQB static)."""
    nqb = kv_block_indices.shape[-2]
    used = _slots_in_use(kv_block_indices, kv_block_counts)
    ids = jnp.where(used, jnp.clip(kv_block_indices, 0, num_kv_blocks - 1), num_kv_blocks)  # unused: dropped
    lead = kv_block_indices.shape[:-1]
    bitmap = jnp.zeros((*lead, num_kv_blocks), jnp.bool_)
    lead_index = tuple(jnp.arange(n).reshape((-1,) + (1,) * (len(lead) - axis)) for axis, n in enumerate(lead))
    bitmap = bitmap.at[(*lead_index, ids)].set(True, mode="drop")  # [..., NQB, NKB]
    selected_by = jnp.swapaxes(bitmap, -1, -2)  # [..., NKB, NQB]
    q_block_counts = selected_by.sum(-1, dtype=jnp.int32)
    order = jnp.argsort(~selected_by, axis=-1, stable=True).astype(jnp.int32)  # set bits first, ascending
    q_block_indices = jnp.where(jnp.arange(nqb) < q_block_counts[..., None], order, 0)
    return q_block_indices, q_block_counts
