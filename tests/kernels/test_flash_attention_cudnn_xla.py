"""flash_attention(implementation="xla" / "cudnn") against the float32 reference: the XLA path passes every option
through; cuDNN's runs where a GPU is (skipped elsewhere), and the window convention it is given matches ours."""

import jax
import jax.numpy as jnp
from harness import FlashAttentionTestBase, FlashProblem, assert_close, flash_problems

from pallas_kernels.flash_attention import flash_attention_reference


class TestXla(FlashAttentionTestBase):
    implementation = "xla"
    examples = 1  # the XLA path is the reference: these check that the API passes every option through
    test_random_problems_sweep = None
    test_lse_is_logsumexp_and_branches_merge_exactly = None  # a property of the reference itself
    named_cases = {
        "all-options-gqa3": FlashProblem(batch=2, seq_q=37, seq_k=37, heads_q=6, heads_kv=2, dqk=48, dv=32,
                                         causal=True, sliding_window=9, segments=True, soft_cap=3.0, gate=True,
                                         seed=3),
    }


class TestCudnn(FlashAttentionTestBase):
    implementation = "cudnn"
    requires_gpu = True
    returns_lse = False
    problems = flash_problems(dtypes=(jnp.bfloat16, jnp.float16), head_dims=(32, 64, 72, 128, 256), other_dvs=(),
                              masks=("none", "cross", "causal", "window"), soft_caps=(None,))
    sweep_problems = flash_problems(max_seq=300, dtypes=(jnp.bfloat16, jnp.float16),
                                    head_dims=(32, 64, 72, 128, 256), other_dvs=(),
                                    masks=("none", "cross", "causal", "window"), soft_caps=(None,))
    named_cases = {
        "window-gate-gqa": FlashProblem(seq_q=130, seq_k=130, heads_q=4, heads_kv=2, dqk=128, dv=128,
                                        dtype=jnp.bfloat16, causal=True, sliding_window=33, gate=True),
    }


def test_reference_window_matches_jax_nn():
    """The window convention (the last W tokens) equals jax.nn's local_window_size=(W-1, 0), which is what the
    cuDNN path passes."""
    q, k, v, *_ = FlashProblem(seq_q=50, seq_k=50, heads_q=4, heads_kv=2, dqk=32, dv=32, seed=4).inputs()
    ours = flash_attention_reference(q, k, v, causal=True, sliding_window=7)
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(6, 0), implementation="xla")
    assert_close(ours, theirs, 1e-5, "windowed attention")
