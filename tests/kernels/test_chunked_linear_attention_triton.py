"""chunked_linear_attention(implementation="triton"): the Pallas kernels (interpret mode) against the token-by-token
recurrence (forward, final state, and every gradient through the Pallas backward kernels), what they decline and
where that goes, and CUDA lowering of the forward and backward kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import TRITON_CALL, ChunkedLinearAttentionTestBase, LinearProblem, linear_problems

from pallas_kernels import chunked_linear_attention
from pallas_kernels.common import lower_for_cuda

KERNELS = ("chunked_linear_attention_fwd", "chunked_linear_attention_bwd_dq", "chunked_linear_attention_bwd_dkv")


class TestTriton(ChunkedLinearAttentionTestBase):
    implementation = "triton"
    examples = 3
    problems = linear_problems(max_seq=80, chunk_sizes=(16, 32))


@pytest.mark.parametrize("change, reason", [
    (dict(per_dim_decay=True), r"per-key-dimension log_decay \[B, T, H, E\] \(GLA\) is not supported"),
    (dict(chunk_size=8), "chunk_size must be a power of 2 >= 16"),
    (dict(chunk_size=48), "chunk_size must be a power of 2 >= 16"),
])
def test_declines_with_reason_and_names_xla(change, reason):
    p = LinearProblem(**change)
    q, k, v, log_decay, *_ = p.inputs()
    with pytest.raises(ValueError, match=f"implementation='triton' cannot take this call: {reason}.*implementations "
                                         f"that can: 'xla'"):
        chunked_linear_attention(q, k, v, log_decay, chunk_size=p.chunk_size, implementation="triton")


def test_per_key_dim_decay_runs_on_xla_when_asked_in_a_sequence():
    """("triton", "xla") sends per-key-dimension decays to the reference, which "triton" declined."""
    q, k, v, log_decay, *_ = LinearProblem(per_dim_decay=True, seq=20).inputs()
    o = chunked_linear_attention(q, k, v, log_decay, implementation=("triton", "xla"))
    np.testing.assert_array_equal(o, chunked_linear_attention(q, k, v, log_decay, implementation="xla"))


@pytest.mark.parametrize("b, t, kh, h, e, f, dtype, options", [
    (8, 4096, 1, 32, 128, 64, jnp.bfloat16, {}),                                 # Mamba-2: 1 group, N 128, P 64
    (4, 8192, 16, 16, 128, 128, jnp.bfloat16, dict(segments=True)),              # Lightning / RetNet, D128, packed
    (2, 1000, 2, 8, 40, 24, jnp.float32, dict(state=True, lengths=True, segments=True, chunk_size=32)),  # ragged
])
def test_lowers_to_triton_for_cuda(b, t, kh, h, e, f, dtype, options):
    """The value and every gradient lower for an H200 to the three Triton kernels: forward, dQ and dK/dV (the
    backward's d log decay and group sums are XLA)."""
    sds = jax.ShapeDtypeStruct
    state = sds((b, h, e, f), jnp.float32) if options.get("state") else None
    lengths = sds((b,), jnp.int32) if options.get("lengths") else None
    segments = sds((b, t), jnp.int32) if options.get("segments") else None

    def loss(q, k, v, log_decay, state, lengths, segments):
        o, s = chunked_linear_attention(q, k, v, log_decay, initial_state_BHEF=state, lengths_B=lengths,
                                        segment_ids_BT=segments, chunk_size=options.get("chunk_size", 64),
                                        return_final_state=True, implementation="triton", interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    argnums = (0, 1, 2, 3) + ((4,) if state is not None else ())
    text = lower_for_cuda(jax.value_and_grad(loss, argnums=argnums), sds((b, t, kh, e), dtype),
                          sds((b, t, kh, e), dtype), sds((b, t, h, f), dtype), sds((b, t, h), jnp.float32), state,
                          lengths, segments)
    assert text.count(TRITON_CALL) == 3 and all(name in text for name in KERNELS)
