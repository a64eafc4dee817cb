"""block_sparse_attention(implementation="triton"): the Pallas Triton kernels (interpret mode on CPU) against the
dense float32 oracle, forward and every gradient (random lists with empty and full rows, GQA, permuted positions,
bf16, blocks larger than the kernels' tiles); poisoned (unwritten) tiles; CUDA cross-lowering of the forward, dQ and
dK/dV kernels."""

import jax
import jax.numpy as jnp
import pytest
from harness import TRITON_CALL, lower_value_and_grad
from harness_block_sparse import (
    BlockSparseAttentionTestBase,
    BlockSparseProblem,
    block_sparse_mismatches,
    block_sparse_problems,
)
from jax.experimental import pallas as pl

from pallas_kernels import block_sparse_attention
from pallas_kernels.block_sparse_attention import pallas_triton, pallas_triton_bwd


class TestTriton(BlockSparseAttentionTestBase):
    implementation = "triton"
    examples = 1  # interpret mode compiles three kernels per problem: the sweep (every layout) runs with -m slow
    problems = block_sparse_problems(layouts=("cross",))  # non-causal, T != S: the paths the named case skips
    named_cases = {
        # 64-token blocks split into the dQ (64 x 32) and dK/dV (32 x 64) tiles; GQA 2, permuted order, bf16
        "bf16-gqa-permuted-subtiles": BlockSparseProblem(seq_q=128, seq_k=128, heads_q=2, heads_kv=1, dqk=64, dv=64,
                                                         dtype=jnp.bfloat16, block_q=64, block_k=64, max_blocks=2,
                                                         permuted=True, seed=11),
    }
    test_sparse_and_local_branches_merge_exactly = pytest.mark.slow(
        BlockSparseAttentionTestBase.test_sparse_and_local_branches_merge_exactly)


KERNELS = {"dkv": (pallas_triton_bwd, "_dkv_kernel", 10),
           "fwd": pytest.param(pallas_triton, "_fwd_kernel", 7, marks=pytest.mark.slow),
           "dq": pytest.param(pallas_triton_bwd, "_dq_kernel", 10, marks=pytest.mark.slow)}


@pytest.mark.parametrize("module, kernel, num_inputs", KERNELS.values(), ids=KERNELS.keys())
def test_unwritten_tile_cannot_pass(module, kernel, num_inputs, monkeypatch):
    """Interpret mode starts every output as NaN: if a kernel never stored the tiles of its first program (here:
    their prior contents are put back after it ran), the checks must fail."""
    original = getattr(module, kernel)

    def forgets_first_tile(*refs, **kwargs):
        outputs = [r for r in refs[num_inputs:] if r is not None]
        before = [r[...] for r in outputs]
        first = (pl.program_id(0) == 0) & (pl.program_id(1) == 0) & (pl.program_id(2) == 0)
        original(*refs, **kwargs)
        for r, old in zip(outputs, before):
            r[...] = jnp.where(first, old, r[...])

    problem = BlockSparseProblem(batch=2, seq_q=32, seq_k=48, heads_q=2, heads_kv=1, causal=False, shared_batch=True,
                                 shared_heads=True)
    monkeypatch.setattr(module, kernel, forgets_first_tile)
    found = block_sparse_mismatches(problem, "triton")
    assert any("non-finite" in why for why in found), found


def test_blocks_off_the_tile_rule_are_refused():
    q = jnp.zeros((1, 16, 1, 16))
    lists, counts = jnp.zeros((1, 1, 2, 1), jnp.int32), jnp.ones((1, 1, 2), jnp.int32)
    with pytest.raises(ValueError, match="block_q=8 .*powers of 2 >= 16"):
        block_sparse_attention(q, q, q, lists, counts, block_q=8, block_k=16, implementation="triton")


CROSS_LOWERING_CASES = {
    "d128-gqa-blocks-64": dict(heads_q=8, heads_kv=2, dqk=128, dv=128, block=64),
    "d64-permuted-shared-lists-blocks-128": dict(heads_q=4, heads_kv=2, dqk=64, dv=64, block=128, permuted=True,
                                                 shared=True),
    "d72-blocks-16": pytest.param(dict(heads_q=2, heads_kv=1, dqk=72, dv=72, block=16), marks=pytest.mark.slow),
    "mla-192-128-fp32": pytest.param(dict(heads_q=4, heads_kv=4, dqk=192, dv=128, block=64, dtype=jnp.float32),
                                     marks=pytest.mark.slow),
}


@pytest.mark.parametrize("case", CROSS_LOWERING_CASES.values(), ids=CROSS_LOWERING_CASES.keys())
def test_kernels_cross_lower_to_triton(case):
    """Forward, dQ and dK/dV kernels with the default tiles pass Triton's lowering rules (causal, 5 list slots: a
    non-power-of-2 index table read by scalar loads; bf16 unless stated)."""
    b, t, block, dtype = 2, 2048, case["block"], case.get("dtype", jnp.bfloat16)
    sds = jax.ShapeDtypeStruct
    lists_b, lists_k = (1, 1) if case.get("shared") else (b, case["heads_kv"])
    args = (sds((b, t, case["heads_q"], case["dqk"]), dtype), sds((b, t, case["heads_kv"], case["dqk"]), dtype),
            sds((b, t, case["heads_kv"], case["dv"]), dtype), sds((lists_b, lists_k, t // block, 5), jnp.int32),
            sds((lists_b, lists_k, t // block), jnp.int32),
            sds((b, t), jnp.int32) if case.get("permuted") else None)

    def attend(q, k, v, lists, counts, positions):
        return block_sparse_attention(q, k, v, lists, counts, block_q=block, block_k=block,
                                      q_positions_BT=positions, kv_positions_BS=positions, return_lse=True,
                                      implementation="triton", interpret=False)

    text = lower_value_and_grad(attend, *args)
    assert text.count(TRITON_CALL) == 3
    for name in ("block_sparse_fwd", "block_sparse_dq", "block_sparse_dkv"):
        assert name in text
