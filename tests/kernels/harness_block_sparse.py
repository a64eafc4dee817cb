"""block_sparse_attention test harness: random problems (index lists with empty and full rows, junk past the counts,
unsorted order, broadcast batch/head axes, GQA, permuted positions, bf16), a dense masked-softmax float32 oracle
written independently of both implementations (it never gathers: a [B, K, T, S] token mask from the lists), and the
comparison of outputs, lse and gradients. Subclasses of `BlockSparseAttentionTestBase` set `implementation`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from harness import LSE_TOL, TOL, ReferenceComparisonBase, mismatch
from hypothesis import strategies as st

from pallas_kernels import block_sparse_attention


@dataclasses.dataclass(frozen=True)
class BlockSparseProblem:
    batch: int = 1
    seq_q: int = 64
    seq_k: int = 64
    heads_q: int = 4
    heads_kv: int = 2
    dqk: int = 32
    dv: int = 32
    dtype: type = jnp.float32
    block_q: int = 16
    block_k: int = 16
    max_blocks: int = 3  # MAXK
    causal: bool = True
    permuted: bool = False  # random per-row token order: q/kv positions are a permutation (Routing Transformer)
    shared_batch: bool = False  # index lists with a size-1 batch axis
    shared_heads: bool = False  # ... and / or a size-1 kv-head axis
    seed: int = 0

    @property
    def q_blocks(self) -> int:
        return self.seq_q // self.block_q

    @property
    def kv_blocks(self) -> int:
        return self.seq_k // self.block_k

    def index_lists(self):
        """(kv_block_indices, kv_block_counts) int32: random distinct ids in random order, junk (out-of-range and
        repeated values) past each count; the first list of every (b, k) is empty and the last is as full as MAXK
        allows."""
        rng = np.random.default_rng(self.seed + 1)
        lead = (1 if self.shared_batch else self.batch, 1 if self.shared_heads else self.heads_kv, self.q_blocks)
        most = min(self.max_blocks, self.kv_blocks)
        counts = rng.integers(0, most + 1, lead)
        counts[..., 0], counts[..., -1] = 0, most
        indices = rng.choice([-3, 0, 10**6], (*lead, self.max_blocks)).astype(np.int32)
        for where in np.ndindex(*lead):
            indices[where][:counts[where]] = rng.permutation(self.kv_blocks)[:counts[where]]
        return jnp.asarray(indices), jnp.asarray(counts.astype(np.int32))

    def positions(self):
        """(q_positions_BT, kv_positions_BS), None unless permuted (then one random order per row for both)."""
        if not self.permuted:
            return None, None
        rng = np.random.default_rng(self.seed + 2)
        order = jnp.asarray(np.stack([rng.permutation(self.seq_q) for _ in range(self.batch)]).astype(np.int32))
        return order, order

    def inputs(self):
        """Fresh random (q, k, v, d_out, d_lse)."""
        ks = jax.random.split(jax.random.key(self.seed), 5)
        b, t, s = self.batch, self.seq_q, self.seq_k
        q = jax.random.normal(ks[0], (b, t, self.heads_q, self.dqk), self.dtype)
        k = jax.random.normal(ks[1], (b, s, self.heads_kv, self.dqk), self.dtype)
        v = jax.random.normal(ks[2], (b, s, self.heads_kv, self.dv), self.dtype)
        d_out = jax.random.normal(ks[3], (b, t, self.heads_q, self.dv), jnp.float32)
        d_lse = jax.random.normal(ks[4], (b, t, self.heads_q), jnp.float32)
        return q, k, v, d_out, d_lse


def dense_block_sparse_attention(q_BTHE, k_BSKE, v_BSKF, kv_block_indices, kv_block_counts, *, block_q, block_k,
                                 causal=True, q_positions_BT=None, kv_positions_BS=None, scale=None,
                                 return_lse=False):
    """The op's semantics as a dense masked softmax over all S keys in float32 (quadratic: tests only)."""
    b, t, h, e = q_BTHE.shape
    s, kh = k_BSKE.shape[1], k_BSKE.shape[2]
    nkb = s // block_k
    scale = e ** -0.5 if scale is None else scale
    used = jnp.arange(kv_block_indices.shape[-1]) < kv_block_counts[..., None]
    block_mask = (jax.nn.one_hot(kv_block_indices, nkb, dtype=jnp.int32) * used[..., None]).max(-2) > 0
    mask_BKTS = jnp.broadcast_to(jnp.repeat(jnp.repeat(block_mask, block_q, axis=2), block_k, axis=3), (b, kh, t, s))
    if causal:
        q_pos = jnp.broadcast_to(jnp.arange(t) if q_positions_BT is None else q_positions_BT, (b, t))
        kv_pos = jnp.broadcast_to(jnp.arange(s) if kv_positions_BS is None else kv_positions_BS, (b, s))
        mask_BKTS &= (q_pos[:, :, None] >= kv_pos[:, None, :])[:, None]
    mask = jnp.repeat(mask_BKTS, h // kh, axis=1)  # [B, H, T, S]
    k_BSHE = jnp.repeat(k_BSKE.astype(jnp.float32), h // kh, axis=2)
    v_BSHF = jnp.repeat(v_BSKF.astype(jnp.float32), h // kh, axis=2)
    logits = jnp.einsum("bthe,bshe->bhts", q_BTHE.astype(jnp.float32), k_BSHE,
                        precision=jax.lax.Precision.HIGHEST) * scale
    any_visible = mask.any(-1)
    row_max = jax.lax.stop_gradient(jnp.where(any_visible, jnp.where(mask, logits, -jnp.inf).max(-1), 0.0))
    weights = jnp.where(mask, jnp.exp(jnp.where(mask, logits, row_max[..., None]) - row_max[..., None]), 0.0)
    total = jnp.where(any_visible, weights.sum(-1), 1.0)
    out = jnp.einsum("bhts,bshf->bthf", weights / total[..., None], v_BSHF, precision=jax.lax.Precision.HIGHEST)
    out = out.astype(q_BTHE.dtype)
    if not return_lse:
        return out
    return out, jnp.where(any_visible, row_max + jnp.log(total), -jnp.inf).transpose(0, 2, 1)


def block_sparse_value_and_grads(fn, problem: BlockSparseProblem, *, cast=None):
    """out, lse and the gradients of sum(out * dO) + sum(finite lse * dlse) w.r.t. q, k, v, jitted as one program."""
    q, k, v, d_out, d_lse = problem.inputs()
    diff = [x if cast is None else x.astype(cast) for x in (q, k, v)]
    indices, counts = problem.index_lists()
    q_pos, kv_pos = problem.positions()

    def loss(diff, d_out, d_lse):
        out, lse = fn(*diff, indices, counts, block_q=problem.block_q, block_k=problem.block_k,
                      causal=problem.causal, q_positions_BT=q_pos, kv_positions_BS=kv_pos, return_lse=True)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(finite_lse * d_lse), (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(diff, d_out, d_lse)
    return out, lse, grads


@functools.cache  # the xla and triton classes share problems: run the dense oracle once per problem and process
def _dense_value_and_grads(problem: BlockSparseProblem):
    return block_sparse_value_and_grads(dense_block_sparse_attention, problem, cast=jnp.float32)


def block_sparse_mismatches(problem: BlockSparseProblem, implementation) -> list[str]:
    """Every way `implementation`'s out, lse (-inf exactly where no key is visible) and gradients differ from the
    dense float32 oracle (empty: none)."""
    op = functools.partial(block_sparse_attention, implementation=implementation)
    out, lse, grads = block_sparse_value_and_grads(op, problem)
    ref_out, ref_lse, ref_grads = _dense_value_and_grads(problem)
    found = [f"{name}: dtype {x.dtype} != {problem.dtype}"
             for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads)) if x.dtype != problem.dtype]
    empty, ref_empty = np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(ref_lse))
    if (empty != ref_empty).any():
        found.append(f"lse: -inf at {int((empty != ref_empty).sum())} rows where the oracle differs")
    tol = TOL[problem.dtype]
    checks = [(out, ref_out, tol, "out"),
              (np.where(ref_empty, 0.0, lse), np.where(ref_empty, 0.0, ref_lse), LSE_TOL[problem.dtype], "lse")]
    checks += [(g, ref_g, tol, name) for name, g, ref_g in zip(("dq", "dk", "dv"), grads, ref_grads)]
    return found + [why for check in checks if (why := mismatch(*check)) is not None]


@st.composite
def block_sparse_problems(draw, max_blocks_per_seq=4, dtypes=(jnp.float32, jnp.bfloat16),
                          head_dims=(16, 32, 72), blocks=(16, 32), layouts=("causal", "permuted", "cross")):
    """Random problems: block sizes, causal / permuted-causal / non-causal cross attention, GQA groups, MAXK below and
    above the number of kv blocks, broadcast index axes."""
    block_q, block_k = draw(st.sampled_from(blocks)), draw(st.sampled_from(blocks))
    layout = draw(st.sampled_from(layouts))
    seq_q = draw(st.integers(1, max_blocks_per_seq)) * max(block_q, block_k)
    seq_k = draw(st.integers(1, max_blocks_per_seq)) * block_k if layout == "cross" else seq_q
    heads_kv, group = draw(st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2), (1, 3)]))
    dqk = draw(st.sampled_from(head_dims))
    return BlockSparseProblem(
        batch=draw(st.integers(1, 2)), seq_q=seq_q, seq_k=seq_k, heads_q=heads_kv * group, heads_kv=heads_kv,
        dqk=dqk, dv=draw(st.sampled_from([dqk, 16])), dtype=draw(st.sampled_from(dtypes)), block_q=block_q,
        block_k=block_k, max_blocks=draw(st.integers(1, seq_k // block_k + 1)), causal=layout != "cross",
        permuted=layout == "permuted", shared_batch=draw(st.booleans()), shared_heads=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)))


class BlockSparseAttentionTestBase(ReferenceComparisonBase):
    """block_sparse_attention(implementation=<name>) against the dense float32 oracle: out, lse and dq/dk/dv.
    Subclasses set `implementation` (and `examples`, `named_cases`)."""
    examples = 3
    sweep_examples = 30
    problems = block_sparse_problems()
    sweep_problems = block_sparse_problems(max_blocks_per_seq=8, head_dims=(16, 32, 64, 72, 128))
    named_cases: dict[str, BlockSparseProblem] = {}

    def mismatches(self, problem: BlockSparseProblem) -> list[str]:
        return block_sparse_mismatches(problem, self.implementation)

    def test_sparse_and_local_branches_merge_exactly(self):
        """Routed past blocks (diagonal excluded) and the diagonal block alone, merged through their lse, equal one
        call listing both: the MoBA / NSA composition the routing mixers rely on (the first query block has no
        routed block: its sparse branch is empty, lse -inf)."""
        p = BlockSparseProblem(seq_q=64, seq_k=64, seed=7)
        q, k, v, *_ = p.inputs()
        nqb = p.q_blocks
        diagonal = jnp.arange(nqb, dtype=jnp.int32)[None, None, :, None]  # [1, 1, NQB, 1]
        past = jnp.broadcast_to(jnp.arange(nqb, dtype=jnp.int32), (1, 1, nqb, nqb))  # 0 .. i-1 (.. i with count i+1)
        attend = functools.partial(block_sparse_attention, q, k, v, block_q=p.block_q, block_k=p.block_k,
                                   return_lse=True, implementation=self.implementation)
        counts = lambda first: jnp.arange(first, first + nqb, dtype=jnp.int32)[None, None]
        (out_local, lse_local), (out_past, lse_past), (out_all, lse_all) = jax.jit(lambda: (
            attend(diagonal, jnp.ones((1, 1, nqb), jnp.int32)), attend(past, counts(0)), attend(past, counts(1))))()
        assert np.isneginf(np.asarray(lse_past[:, :p.block_q])).all()
        lse = jnp.logaddexp(lse_local, lse_past)
        merged = (jnp.exp(lse_local - lse)[..., None] * out_local.astype(jnp.float32)
                  + jnp.exp(lse_past - lse)[..., None] * out_past.astype(jnp.float32))
        assert (why := mismatch(merged, out_all, 1e-5, "merged out")) is None, why
        assert (why := mismatch(lse, lse_all, 1e-5, "merged lse")) is None, why
