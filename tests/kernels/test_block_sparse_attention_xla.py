"""block_sparse_attention(implementation="xla") and the op's API: the gather reference against the dense masked
softmax oracle (out, lse, gradients), full lists == dense causal flash attention, cost linear in the selected
blocks (no [T, S] intermediate), input validation, `check_block_indices` under jit, `transpose_block_indices`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import assert_close
from harness_block_sparse import BlockSparseAttentionTestBase, BlockSparseProblem

from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import block_index_problems, check_block_indices, transpose_block_indices
from pallas_kernels.flash_attention import flash_attention_reference


class TestXla(BlockSparseAttentionTestBase):
    implementation = "xla"
    examples = 1  # plus the named case; the sweep runs with -m slow
    named_cases = {
        "bf16-gqa3-permuted": BlockSparseProblem(batch=2, seq_q=96, seq_k=96, heads_q=6, heads_kv=2, dqk=48, dv=24,
                                                 dtype=jnp.bfloat16, block_q=32, block_k=16, max_blocks=4,
                                                 permuted=True, seed=3),
    }


@pytest.mark.slow  # a second independent oracle; the dense masked softmax of the harness is the default one
def test_full_lists_equal_dense_causal_attention():
    p = BlockSparseProblem(batch=2, seq_q=64, seq_k=64, heads_q=4, heads_kv=1, block_q=16, block_k=32, seed=5)
    q, k, v, *_ = p.inputs()
    lists = jnp.broadcast_to(jnp.arange(p.kv_blocks, dtype=jnp.int32), (1, 1, p.q_blocks, p.kv_blocks))
    counts = jnp.full((1, 1, p.q_blocks), p.kv_blocks, jnp.int32)
    (out, lse), (ref_out, ref_lse) = jax.jit(lambda q, k, v: (
        block_sparse_attention(q, k, v, lists, counts, block_q=p.block_q, block_k=p.block_k, return_lse=True,
                               implementation="xla"),
        flash_attention_reference(q, k, v, causal=True, return_lse=True)))(q, k, v)
    assert_close(out, ref_out, 1e-5, "out")
    assert_close(lse, jnp.swapaxes(ref_lse, 1, 2), 1e-6, "lse")


def test_xla_cost_is_linear_in_selected_blocks():
    """At T = S = 4096 with 2 selected 16-token blocks per query block, no intermediate of the forward and backward
    holds more than 2 * 16 keys per query: the reference never materialises [T, S]."""
    b, t, h, e, block, maxk = 1, 4096, 2, 16, 16, 2
    q = jax.ShapeDtypeStruct((b, t, h, e), jnp.float32)
    lists = jax.ShapeDtypeStruct((b, h, t // block, maxk), jnp.int32)
    counts = jax.ShapeDtypeStruct((b, h, t // block), jnp.int32)

    def loss(q, k, v, lists, counts):
        return block_sparse_attention(q, k, v, lists, counts, block_q=block, block_k=block, implementation="xla").sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q, lists, counts)
    largest = max(np.prod(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars)
    assert largest <= b * h * t * maxk * block, largest


def _inputs(t=64, s=64):
    q = jnp.zeros((1, t, 2, 16))
    k = jnp.zeros((1, s, 1, 16))
    return q, k, k


BAD_INPUTS = {
    "T not a multiple of block_q": (dict(t=48), dict(block_q=32), "block_q=32 must divide the sequence length T=48"),
    "S not a multiple of block_k": (dict(s=40), dict(block_k=16), "block_k=16 must divide the sequence length S=40"),
    "list rows != T // block_q": ({}, dict(indices=np.zeros((1, 1, 3, 2), np.int32)), "kv_block_indices must have"),
    "float counts": ({}, dict(counts=np.zeros((1, 1, 4), np.float32)), "kv_block_counts must be an int array"),
    "duplicate id": ({}, dict(indices=np.array([[[[1, 1]] * 4]], np.int32)), "duplicate id .* q block 0"),
    "id out of range": ({}, dict(indices=np.array([[[[0, 4]] * 4]], np.int32)), r"id outside \[0, num_kv_blocks=4\)"),
    "negative id": ({}, dict(indices=np.array([[[[-1, 0]] * 4]], np.int32)), r"id outside"),
    "count above MAXK": ({}, dict(counts=np.full((1, 1, 4), 3, np.int32)), r"count outside \[0, MAXK=2\]"),
    "positions without causal": ({}, dict(causal=False, q_positions_BT=np.arange(64)[None]), "only used by the causal"),
    "positions of the wrong length": ({}, dict(kv_positions_BS=np.arange(32)[None]), r"kv_positions_BS must be int"),
}


@pytest.mark.parametrize("shapes, options, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_naming_the_argument(shapes, options, match):
    q, k, v = _inputs(**shapes)
    block_q, block_k = options.pop("block_q", 16), options.pop("block_k", 16)
    indices = options.pop("indices", np.array([[[[0, 1]] * (q.shape[1] // block_q)]], np.int32))
    counts = options.pop("counts", np.full((1, 1, q.shape[1] // block_q), 2, np.int32))
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, jnp.asarray(indices), jnp.asarray(counts), block_q=block_q, block_k=block_k,
                               implementation="xla", **options)


def test_check_block_indices_gives_a_flag_under_jit():
    """Under jit nothing can raise: the traced check returns False for a duplicate, True for valid lists, and
    block_index_problems says which list has which problem."""
    counts = jnp.array([[[2, 1]]], jnp.int32)
    check = jax.jit(lambda ids: check_block_indices(ids, counts, num_kv_blocks=4))
    assert bool(check(jnp.array([[[[3, 1], [2, 2]]]], jnp.int32)))  # the second list's slot 1 is past its count
    assert not bool(check(jnp.array([[[[1, 1], [2, 2]]]], jnp.int32)))
    problems = jax.jit(lambda ids: block_index_problems(ids, counts, num_kv_blocks=4))(
        jnp.array([[[[1, 5], [2, 0]]]], jnp.int32))
    assert {what.split(" ")[0]: np.asarray(where).tolist() for what, where in problems.items()} == {
        "count": [[[False, False]]], "id": [[[True, False]]], "duplicate": [[[False, False]]]}


def test_transpose_block_indices_lists_the_selecting_query_blocks():
    rng = np.random.default_rng(0)
    lead, nqb, nkb, maxk = (2, 3), 7, 5, 3
    counts = rng.integers(0, maxk + 1, (*lead, nqb)).astype(np.int32)
    indices = np.full((*lead, nqb, maxk), 99, np.int32)  # junk past the counts
    for where in np.ndindex(*lead, nqb):
        indices[where][:counts[where]] = rng.permutation(nkb)[:counts[where]]
    q_indices, q_counts = jax.jit(lambda i, c: transpose_block_indices(i, c, num_kv_blocks=nkb))(indices, counts)
    for where in np.ndindex(*lead):
        for j in range(nkb):
            expected = [i for i in range(nqb) if j in indices[where][i, :counts[where][i]]]
            assert q_counts[where][j] == len(expected)
            assert q_indices[where][j].tolist() == expected + [0] * (nqb - len(expected))
