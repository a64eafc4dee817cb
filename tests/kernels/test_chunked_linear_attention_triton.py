"""chunked_linear_attention(implementation="triton"): the Pallas kernel (interpret mode) against the token-by-token
recurrence (forward, final state, gradients through its custom VJP), what it declines, and CUDA lowering."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import chunked_linear_attention
from pallas_kernels.common import lower_for_cuda

from harness import TRITON_CALL, ChunkedLinearAttentionTestBase, LinearProblem, linear_problems


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


@pytest.mark.parametrize("b, t, kh, h, e, f, dtype, options", [
    (8, 4096, 1, 32, 128, 64, jnp.bfloat16, {}),                                 # Mamba-2: 1 group, N 128, P 64
    (4, 8192, 16, 16, 128, 128, jnp.bfloat16, {}),                               # Lightning / RetNet, D128
    (2, 1000, 2, 8, 40, 24, jnp.float32, dict(state=True, lengths=True, chunk_size=32)),  # ragged everything
])
def test_lowers_to_triton_for_cuda(b, t, kh, h, e, f, dtype, options):
    """The forward kernel, and the value and every gradient (the custom VJP's XLA backward), lower for an H200."""
    sds = jax.ShapeDtypeStruct
    state = sds((b, h, e, f), jnp.float32) if options.get("state") else None
    lengths = sds((b,), jnp.int32) if options.get("lengths") else None

    def loss(q, k, v, log_decay, state, lengths):
        o, s = chunked_linear_attention(q, k, v, log_decay, initial_state_BHEF=state, lengths_B=lengths,
                                        chunk_size=options.get("chunk_size", 64), return_final_state=True,
                                        implementation="triton", interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    argnums = (0, 1, 2, 3) + ((4,) if state is not None else ())
    text = lower_for_cuda(jax.value_and_grad(loss, argnums=argnums), sds((b, t, kh, e), dtype),
                          sds((b, t, kh, e), dtype), sds((b, t, h, f), dtype), sds((b, t, h), jnp.float32), state,
                          lengths)
    assert TRITON_CALL in text
