"""flash_attention(implementation="mosaic_gpu"): the Hopper FA3-style Mosaic GPU forward, run on the CPU in the Mosaic
GPU interpreter (which simulates SMEM, TMA, mbarriers and wgmma, and fails on unobserved barrier phases), against the
float32 reference, with gradients through its Triton backward; unwritten output tiles; race detection; CUDA
cross-lowering of the GPU code path (wgmma with P in registers, in-place accumulator)."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import (
    MOSAIC_CALL,
    TOL,
    TRITON_CALL,
    FlashAttentionTestBase,
    FlashProblem,
    assert_close,
    flash_problems,
    lower_value_and_grad,
)
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import flash_attention
from pallas_kernels.common import lower_for_cuda
from pallas_kernels.flash_attention import flash_attention_reference, pallas_mosaic_gpu

# The jax 0.11.2 Mosaic GPU interpreter runs each warpgroup as a host thread whose barrier waits block inside
# io_callbacks; XLA:CPU runs some of those callbacks on a thread pool sized to the host's cores, so with 2 cores the
# kernel's call, 1 blocked waiter and 1 starved warpgroup deadlock at random (seen here: warpgroup 1 never starts
# while warpgroups 0 and 2 wait at phase 0). It needs 1 + 3 threads at once, so these tests carry their own marker,
# left out of the default run (2-core CI) and run with `pytest -m mosaic_interpret` on a host with >= 4 cores.
needs_interpreter = pytest.mark.mosaic_interpret


@needs_interpreter
class TestMosaicGpu(FlashAttentionTestBase):
    implementation = "mosaic_gpu"
    examples = 4
    test_random_problems_sweep = None  # `-m slow` stays off the interpreter (it can deadlock on a 2-core host)
    problems = flash_problems(max_seq=300, dtypes=(jnp.bfloat16, jnp.float16), head_dims=(64, 128), other_dvs=(),
                              masks=("none", "cross", "causal"), soft_caps=(None,), gates=(False,),
                              block_qs=(None, 64), block_ks=(None, 64))
    named_cases = {
        # T=S=256: two CTAs of 2 x 64 rows, 2 KV blocks of 128 (both pipeline slots filled, no refill)
        "bf16-d64": FlashProblem(seq_q=256, seq_k=256, heads_q=1, heads_kv=1, dtype=jnp.bfloat16),
        # block_k 64: wg 0 of each CTA skips the CTA's last KV block (the drain loop), 4 steps > 2 slots (refills)
        "bf16-causal-gqa-bk64": FlashProblem(seq_q=256, seq_k=256, heads_q=2, heads_kv=1, dtype=jnp.bfloat16,
                                             causal=True, block_k=64),
        # odd length: padded queries sliced off, padded keys masked in the last block; fp16
        "fp16-causal-odd": FlashProblem(seq_q=200, seq_k=200, heads_q=2, heads_kv=2, dtype=jnp.float16, causal=True),
        "bf16-causal-gqa-odd": FlashProblem(seq_q=130, seq_k=130, heads_q=4, heads_kv=2, dtype=jnp.bfloat16,
                                            causal=True),
        # cross attention, odd lengths, MQA (4 q heads on 1 kv head), batch 2
        "bf16-cross-odd-mqa": FlashProblem(batch=2, seq_q=70, seq_k=300, heads_q=4, heads_kv=1,
                                           dtype=jnp.bfloat16),
        "fp16-cross-odd": FlashProblem(seq_q=60, seq_k=150, heads_q=2, heads_kv=1, dtype=jnp.float16),
        "fp16-d128-causal": FlashProblem(seq_q=128, seq_k=128, heads_q=1, heads_kv=1, dqk=128, dv=128,
                                         dtype=jnp.float16, causal=True),
        "bf16-d256": FlashProblem(seq_q=128, seq_k=128, heads_q=1, heads_kv=1, dqk=256, dv=256, dtype=jnp.bfloat16),
    }
    merge_problem = FlashProblem(seq_q=48, seq_k=80, heads_q=4, heads_kv=2, dtype=jnp.bfloat16, seed=1)


def forward(problem: FlashProblem):
    q, k, v, *_ = problem.inputs()
    out, lse = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=problem.causal, return_lse=True,
                                                       implementation="mosaic_gpu"))(q, k, v)
    return out, lse, flash_attention_reference(q, k, v, causal=problem.causal)


@needs_interpreter
def test_unwritten_tile_cannot_pass(monkeypatch):
    """The interpreter starts outputs as NaN: a kernel whose first q tile never copies its O and lse out fails."""
    copy = plgpu.copy_smem_to_gmem

    def copy_except_first_tile(src, dst, *args, **kwargs):
        pl.when(jax.lax.axis_index("q_tiles") != 0)(lambda: copy(src, dst, *args, **kwargs))

    proxy = types.SimpleNamespace(**{n: getattr(plgpu, n) for n in dir(plgpu) if not n.startswith("__")})
    proxy.copy_smem_to_gmem = copy_except_first_tile
    monkeypatch.setattr(pallas_mosaic_gpu, "plgpu", proxy)
    out, lse, ref_out = forward(FlashProblem(seq_q=256, seq_k=256, heads_q=1, heads_kv=1, dtype=jnp.bfloat16,
                                             causal=True))
    assert np.isnan(np.asarray(out[:, :128], np.float32)).all() and np.isnan(np.asarray(lse[..., :128])).all()
    assert_close(out[:, 128:], ref_out[:, 128:], TOL[jnp.bfloat16], "out of the written tile")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(out, ref_out, TOL[jnp.bfloat16], "out")


@needs_interpreter
def test_no_races_detected():
    """The interpreter's happens-before race detector (TMA copies, SMEM stores, barriers) finds nothing."""
    problem = FlashProblem(seq_q=256, seq_k=256, heads_q=1, heads_kv=1, dtype=jnp.bfloat16, causal=True)
    q, k, v, *_ = problem.inputs()
    cfg = pallas_mosaic_gpu.Config(scale=0.125, causal=True, seq_k=256, group=1, block_q=64, block_kv=64,
                                   num_stages=2, p_in_smem=True, acc_in_place=False, interpret=False)
    with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams(detect_races=True)):
        out, _ = pallas_mosaic_gpu.forward(q, k, v, cfg)
        out = np.asarray(out, np.float32)
    assert not gpu_callbacks.get_races().races_found
    assert_close(out, flash_attention_reference(q, k, v, causal=True), TOL[jnp.bfloat16], "out")


CROSS_LOWERING_CASES = {
    "d64-gqa": dict(heads_q=8, heads_kv=2, d=64, causal=False),
    "d64-gqa-causal": dict(heads_q=8, heads_kv=2, d=64, causal=True),
    "d128-gqa": dict(heads_q=8, heads_kv=2, d=128, causal=False),
    "d128-causal-odd-seq": dict(heads_q=4, heads_kv=4, d=128, causal=True, seq=1000),
    "d256-mqa-causal": dict(heads_q=4, heads_kv=1, d=256, causal=True),
    "d128-fp16-interpreter-path": dict(heads_q=4, heads_kv=2, d=128, causal=True, dtype=jnp.float16,
                                       p_in_smem=True, acc_in_place=False),
}


@pytest.mark.parametrize("case", CROSS_LOWERING_CASES.values(), ids=CROSS_LOWERING_CASES.keys())
def test_cross_lowers_for_cuda(case):
    """Forward (Mosaic GPU: layout inference, SMEM budget) and backward (Triton tile rules) lower for an H200 on
    the CPU; the forward is the GPU code path (P in registers, in-place accumulator) unless stated."""
    b, t, d, dtype = 2, case.get("seq", 2048), case["d"], case.get("dtype", jnp.bfloat16)
    q = jax.ShapeDtypeStruct((b, t, case["heads_q"], d), dtype)
    k = jax.ShapeDtypeStruct((b, t, case["heads_kv"], d), dtype)
    text = lower_value_and_grad(lambda q, k, v: pallas_mosaic_gpu.flash_attention_mosaic_gpu(
        q, k, v, causal=case["causal"], scale=d**-0.5, interpret=False, p_in_smem=case.get("p_in_smem"),
        acc_in_place=case.get("acc_in_place")), q, k, k)
    assert len(re.findall(MOSAIC_CALL, text)) >= 1
    assert text.count(TRITON_CALL) == 2  # dQ and dK/dV
    assert "flash_fwd_mosaic" in text


def test_smem_overflow_fails_to_lower():
    """Proves the Mosaic GPU cross-lowering check is live: tiles over the 227 KiB SMEM budget are rejected."""
    x = jax.ShapeDtypeStruct((1, 2048, 2, 256), jnp.bfloat16)
    cfg = pallas_mosaic_gpu.Config(scale=0.0625, causal=False, seq_k=2048, group=1, block_q=128, block_kv=256,
                                   num_stages=3, p_in_smem=False, acc_in_place=True, interpret=False)
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower_for_cuda(lambda q, k, v: pallas_mosaic_gpu.forward(q, k, v, cfg), x, x, x)


def test_tiles_not_multiple_of_64_raise():
    x = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_q must be a multiple of 64"):
        pallas_mosaic_gpu.flash_attention_mosaic_gpu(x, x, x, causal=False, scale=0.125, block_q=32, interpret=True)
