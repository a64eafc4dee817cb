"""decode_attention(implementation="triton"): the split-K Pallas kernel (interpret mode) against the float32
reference, its launch heuristics, and CUDA lowering of the default configurations."""

import functools

import jax
import jax.numpy as jnp
import pytest
from harness import TRITON_CALL, DecodeAttentionTestBase

from pallas_kernels import decode_attention
from pallas_kernels.common import column_chunks, lower_for_cuda
from pallas_kernels.decode_attention import pallas_triton


class TestTriton(DecodeAttentionTestBase):
    examples = 4  # interpreted kernels: the 40-problem sweep runs with -m slow
    implementation = "triton"


def test_heuristics():
    assert column_chunks(576) == ((0, 512), (512, 64))
    assert column_chunks(72) == ((0, 64), (64, 16))
    assert column_chunks(128) == ((0, 128),)
    assert column_chunks(192) == ((0, 128), (128, 64))
    assert pallas_triton.default_block_k(128, 128, 131072, 2) == 128
    assert pallas_triton.default_block_k(576, 512, 4096, 2) == 32
    assert pallas_triton.default_block_m(1 * 4, 128) == 16
    assert pallas_triton.default_block_m(4 * 128, 512) == 16
    for programs, s in [(64, 4096), (64, 131072), (8, 16384), (256, 65536)]:
        splits = pallas_triton.default_num_splits(programs, s, 128)
        assert programs * splits >= pallas_triton.NUM_SMS or splits == s // (4 * 128), (programs, s, splits)
    assert pallas_triton.default_num_splits(64, 256, 128) == 1  # a short cache is never split below 4 tiles


@pytest.mark.parametrize("b, s, tq, hq, hkv, dqk, dv, dtype, kwargs", [
    (8, 4096, 1, 32, 8, 128, 128, jnp.bfloat16, {}),                      # GQA decode
    (8, 16384, 4, 32, 8, 128, 128, jnp.bfloat16, {}),                     # speculative decode, 4 tokens
    (4, 8192, 1, 16, 16, 64, 64, jnp.bfloat16, {}),                       # MHA, D64
    (2, 131072, 1, 32, 8, 128, 128, jnp.bfloat16, {}),                    # long cache
    (4, 4096, 1, 128, 1, 576, 512, jnp.bfloat16, {}),                     # absorbed MLA, 128 heads
    (2, 1000, 3, 12, 4, 72, 40, jnp.float32, dict(sliding_window=100, logits_soft_cap=30.0)),
])
def test_lowers_to_triton_for_cuda(b, s, tq, hq, hkv, dqk, dv, dtype, kwargs):
    fn = functools.partial(decode_attention, implementation="triton", interpret=False, **kwargs)
    sds = jax.ShapeDtypeStruct
    text = lower_for_cuda(fn, sds((b, tq, hq, dqk), dtype), sds((b, s, hkv, dqk), dtype), sds((b, s, hkv, dv), dtype),
                          sds((b,), jnp.int32))
    assert TRITON_CALL in text
