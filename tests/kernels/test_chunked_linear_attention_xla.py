"""chunked_linear_attention(implementation="xla"): the chunked (SSD) reference against the token-by-token recurrence
(every chunk size, per-key-dimension decays, a 16k-token sequence), and the API's input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from harness import TOL, ChunkedLinearAttentionTestBase, LinearProblem, assert_close, linear_problems

from pallas_kernels import chunked_linear_attention
from pallas_kernels.chunked_linear_attention import chunked_linear_attention_reference, linear_attention_step_reference


class TestXla(ChunkedLinearAttentionTestBase):
    implementation = "xla"
    examples = 3
    problems = linear_problems(chunk_sizes=(1, 5, 16, 32, 64), per_dim_decays=(False, True))
    # the shared cases run in the Triton tests; here the reference's own per-key-dimension branch, at the extremes
    named_cases = {
        "extreme_decays": ChunkedLinearAttentionTestBase.named_cases["extreme_decays"],
        "per_key_dim_extreme": LinearProblem(seq=45, per_dim_decay=True, decays=(-50.0, -1e-6), initial_state=True,
                                             lengths=(45, 30), seed=8),
    }


def test_chunk_size_does_not_change_the_result():
    """Every chunk size (1: the step recurrence in chunked form) gives the token-by-token result, T off the grid."""
    q, k, v, log_decay, state, *_ = LinearProblem(seq=77, heads=6, groups=3, initial_state=True, seed=10).inputs()
    ref_o, ref_s = linear_attention_step_reference(q, k, v, log_decay, initial_state_BHEF=state)
    chunked = jax.jit(chunked_linear_attention_reference, static_argnames="chunk_size")
    for chunk_size in (1, 16, 32, 64):
        o, s = chunked(q, k, v, log_decay, initial_state_BHEF=state, chunk_size=chunk_size)
        assert_close(o, ref_o, TOL[jnp.float32], f"o, chunk_size {chunk_size}")
        assert_close(s, ref_s, TOL[jnp.float32], f"final state, chunk_size {chunk_size}")


def test_16k_tokens_finite_outputs_and_gradients():
    """16384 tokens with decays at both extremes (1 - 1e-6 accumulates over the whole sequence): the final state
    matches the recurrence, and outputs and every gradient are finite."""
    p = LinearProblem(batch=1, seq=16384, heads=2, groups=1, e=16, f=16, decays=(-1e-6, -50.0), chunk_size=64,
                      initial_state=True, seed=11)
    q, k, v, log_decay, state, *_ = p.inputs()

    def loss(q, k, v, log_decay, state):
        o, s = chunked_linear_attention(q, k, v, log_decay, initial_state_BHEF=state, return_final_state=True,
                                        implementation="xla")
        return jnp.mean(o) + jnp.mean(s), (o, s)

    grads, (o, s) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, log_decay, state)
    assert np.isfinite(np.asarray(o)).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    _, ref_s = jax.jit(linear_attention_step_reference)(q, k, v, log_decay, initial_state_BHEF=state)
    # 1e-3: exp(-1e-6) carries a float32 rounding of ~6e-8 that compounds differently over 16k sequential steps
    # than over 64-token cumulative sums
    assert_close(s, ref_s, 1e-3, "final state")


# ------------------------------------------------------------------------------------------------ input checks

def _inputs(b=1, t=8, kh=1, h=2, e=16, f=16):
    z = functools.partial(jnp.zeros, dtype=jnp.float32)
    return dict(q_BTKE=z((b, t, kh, e)), k_BTKE=z((b, t, kh, e)), v_BTHF=z((b, t, h, f)), log_decay_BTH=z((b, t, h)))


@pytest.mark.parametrize("change, match", [
    (dict(q_BTKE=jnp.zeros((1, 8, 16))), r"q_BTKE must be \[batch, seq, heads, head_dim\]"),
    (dict(v_BTHF=jnp.zeros((1, 8, 2, 16), jnp.bfloat16)), "must share one dtype"),
    (dict(k_BTKE=jnp.zeros((1, 8, 1, 32))), "k_BTKE must have q_BTKE's shape"),
    (dict(v_BTHF=jnp.zeros((1, 9, 2, 16))), "v_BTHF must have q_BTKE's batch and seq"),
    (dict(v_BTHF=jnp.zeros((1, 8, 3, 16)), q_BTKE=jnp.zeros((1, 8, 2, 16)), k_BTKE=jnp.zeros((1, 8, 2, 16))),
     "value heads must be a multiple of q/k heads"),
    (dict(log_decay_BTH=jnp.zeros((1, 8, 1))), r"log_decay_BTH must be a float array \[batch, seq, heads\]"),
    (dict(log_decay_BTH=jnp.zeros((1, 8, 2), jnp.int32)), "log_decay_BTH must be a float array"),
    (dict(log_decay_BTH=jnp.full((1, 8, 2), 0.1)), "log_decay_BTH must be <= 0"),
    (dict(initial_state_BHEF=jnp.zeros((1, 2, 16, 8))), r"initial_state_BHEF must be a float array"),
    (dict(lengths_B=jnp.array([3.0])), r"lengths_B must be an integer array of shape \(1,\)"),
    (dict(chunk_size=0), "chunk_size must be an int >= 1"),
    (dict(chunk_size=16.0), "chunk_size must be an int >= 1"),
    (dict(implementation="cudnn"), "chunked_linear_attention: implementation='cudnn' is not one of 'auto', "
                                   "'triton', 'xla'"),
])
def test_bad_inputs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        chunked_linear_attention(**(_inputs() | change))


def test_positive_log_decay_is_not_checked_under_jit():
    """The value check needs concrete values; under jit the call goes through (documented)."""
    args = _inputs() | dict(log_decay_BTH=jnp.full((1, 8, 2), 0.1))
    assert jax.jit(lambda kw: chunked_linear_attention(**kw))(args).shape == (1, 8, 2, 16)


@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_concrete_log_decay_closed_over_by_jit(as_array):
    """A concrete log_decay used inside jit (a constant the jitted function closes over) is checked on its values
    without turning a traced comparison into a bool: a valid one gives the eager result, a positive one raises."""
    q, k, v = (jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)
               for seed, shape in ((0, (1, 8, 1, 16)), (1, (1, 8, 1, 16)), (2, (1, 8, 2, 16))))

    def jitted(log_decay):
        return jax.jit(lambda q: chunked_linear_attention(q, k, v, log_decay, implementation="xla"))(q)

    log_decay = as_array(np.full((1, 8, 2), -0.1, np.float32))
    np.testing.assert_allclose(jitted(log_decay), chunked_linear_attention(q, k, v, jnp.asarray(log_decay),
                                                                           implementation="xla"), rtol=1e-6)
    with pytest.raises(ValueError, match="log_decay_BTH must be <= 0"):
        jitted(as_array(np.full((1, 8, 2), 0.1, np.float32)))
