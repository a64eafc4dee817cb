"""flash_attention(implementation="triton"): the Pallas Triton kernels (interpret mode on CPU) against the float32
reference, forward and every gradient; lse and branch merging; poisoned (unwritten) tiles; CUDA cross-lowering of
every default kernel config."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from harness import TRITON_CALL, FlashAttentionTestBase, FlashProblem, flash_mismatches, lower_value_and_grad
from jax.experimental import pallas as pl

from pallas_kernels import flash_attention
from pallas_kernels.common import lower_for_cuda
from pallas_kernels.flash_attention import pallas_triton, pallas_triton_bwd, pallas_triton_common


class TestTriton(FlashAttentionTestBase):
    implementation = "triton"
    examples = 4  # interpreted kernels, ~5 s a problem: the 40-problem sweep runs with -m slow
    named_cases = {
        "mla-192-128-mqa": FlashProblem(seq_q=100, seq_k=100, heads_q=8, heads_kv=1, dqk=192, dv=128, causal=True,
                                        gate=True, block_q=32, block_k=16),  # MLA head dims, MQA, skipped blocks
        "mla-576-512-bf16": FlashProblem(seq_q=40, seq_k=40, heads_q=2, heads_kv=1, dqk=576, dv=512,
                                         dtype=jnp.bfloat16, causal=True),  # absorbed MLA, 576 = 512 + 64 chunks
        "window-default-blocks-fp16": FlashProblem(seq_q=130, seq_k=130, heads_q=2, heads_kv=2, dtype=jnp.float16,
                                                   causal=True, sliding_window=33),
        "segments-gqa3-d72": FlashProblem(batch=2, seq_q=77, seq_k=77, heads_q=6, heads_kv=2, dqk=72, dv=72,
                                          dtype=jnp.bfloat16, segments=True, soft_cap=2.0, gate=True, block_q=16,
                                          block_k=32),  # odd head dim, GQA 3, packed segments
        "d256-cross": FlashProblem(seq_q=20, seq_k=90, heads_q=2, heads_kv=1, dqk=256, dv=256),  # default blocks
    }


@pytest.mark.parametrize("module, kernel, num_inputs", [(pallas_triton, "_fwd_kernel", 5),
                                                        (pallas_triton_bwd, "_dq_kernel", 8),
                                                        (pallas_triton_bwd, "_dkv_kernel", 8)])
def test_unwritten_tile_cannot_pass(module, kernel, num_inputs, monkeypatch):
    """Interpret mode starts every output as NaN: if a kernel never stored the tiles of its first program (here:
    their prior contents are put back after it ran), the checks must fail."""
    original = getattr(module, kernel)

    def forgets_first_tile(*refs, **kwargs):
        outputs = [r for r in refs[num_inputs:] if r is not None]
        before = [r[...] for r in outputs]
        first = pl.program_id(0) == 0
        original(*refs, **kwargs)
        for r, old in zip(outputs, before):
            r[...] = jnp.where(first, old, r[...])

    monkeypatch.setattr(module, kernel, forgets_first_tile)
    found = flash_mismatches(FlashProblem(seq_q=48, seq_k=48, block_q=16, block_k=16, causal=True), "triton")
    assert any("non-finite" in why for why in found), found


CROSS_LOWERING_CASES = {
    "d64-gqa": dict(heads_q=8, heads_kv=2, dqk=64, dv=64),
    "d128-gqa": dict(heads_q=8, heads_kv=2, dqk=128, dv=128),
    "d128-all-options": dict(heads_q=8, heads_kv=2, dqk=128, dv=128, window=128, segments=True, cap=30.0, gate=True),
    "mla-192-128": dict(heads_q=8, heads_kv=8, dqk=192, dv=128),
    "d256-mqa": dict(heads_q=8, heads_kv=1, dqk=256, dv=256),
    "mla-576-512": dict(heads_q=16, heads_kv=1, dqk=576, dv=512),
    "d72-odd-seq": dict(heads_q=6, heads_kv=3, dqk=72, dv=72, seq=1000),
    "d128-fp32": dict(heads_q=4, heads_kv=4, dqk=128, dv=128, dtype=jnp.float32),
    "d64-fp16": dict(heads_q=4, heads_kv=2, dqk=64, dv=64, dtype=jnp.float16),
}


@pytest.mark.parametrize("case", CROSS_LOWERING_CASES.values(), ids=CROSS_LOWERING_CASES.keys())
def test_default_kernels_cross_lower_to_triton(case):
    """Forward, dQ and dK/dV kernels with the default tiles pass Triton's lowering rules (causal; bf16 unless
    stated)."""
    b, t, hq, hkv, dtype = 2, case.get("seq", 2048), case["heads_q"], case["heads_kv"], case.get("dtype", jnp.bfloat16)
    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, hq, case["dqk"]), dtype), sds((b, t, hkv, case["dqk"]), dtype),
            sds((b, t, hkv, case["dv"]), dtype), sds((b, t, hq), dtype) if case.get("gate") else None,
            sds((b, t), jnp.int32) if case.get("segments") else None)

    def attend(q, k, v, gate, segment_ids):
        return flash_attention(q, k, v, causal=True, sliding_window=case.get("window"), gate=gate,
                               segment_ids=segment_ids, logits_soft_cap=case.get("cap"), return_lse=True,
                               implementation="triton", interpret=False)

    text = lower_value_and_grad(attend, *args)
    assert text.count(TRITON_CALL) == 3
    for name in ("flash_fwd", "flash_dq", "flash_dkv"):
        assert name in text


def test_non_power_of_2_tile_fails_to_lower():
    """Proves the cross-lowering check is live: the same forward kernel with a 48-row tile is rejected."""
    cfg = pallas_triton_common.Config(scale=0.125, causal=True, window=None, soft_cap=None, seq_k=192,
                                      seq_k_padded=192, group=1, fwd_blocks=(64, 64), dq_blocks=(64, 64),
                                      dkv_blocks=(64, 64), num_warps=4, num_stages=2, interpret=False)
    x = jax.ShapeDtypeStruct((1, 192, 2, 64), jnp.bfloat16)
    forward = lambda cfg: lambda q, k, v: pallas_triton.forward(q, k, v, None, None, cfg, save_ungated=False)[0]
    assert TRITON_CALL in lower_for_cuda(forward(cfg), x, x, x)
    with pytest.raises(ValueError, match="power of 2"):
        lower_for_cuda(forward(dataclasses.replace(cfg, fwd_blocks=(48, 64))), x, x, x)
