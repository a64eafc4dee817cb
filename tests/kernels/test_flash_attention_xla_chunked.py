"""flash_attention(implementation="xla_chunked"): the query-blocked XLA backend against the float32 reference
(forward, lse and every gradient, through its custom VJP); its blocks skip the keys the mask hides; "auto" runs it
off GPU, and a tiny model's logits and gradients under "auto" equal those under "xla"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from harness import FlashAttentionTestBase, FlashProblem, flash_problems

from attnzoo import LanguageModel, ModelConfig
from pallas_kernels import flash_attention
from pallas_kernels.flash_attention import api as flash_api
from pallas_kernels.flash_attention import xla_chunked

# Each query block is compiled on its own, so the default run keeps to a few blocks (block_q 32 on <= 100 tokens).
BLOCKS = (None, 32)


class TestXlaChunked(FlashAttentionTestBase):
    implementation = "xla_chunked"
    examples = 3
    problems = flash_problems(max_seq=100, block_qs=BLOCKS, block_ks=(None,))
    sweep_problems = flash_problems(max_seq=300, block_qs=(None, 16, 32, 64), block_ks=(None,))
    named_cases = {
        # GQA 4 with Dv != Dqk, a ragged last block, the gate and the lse gradient
        "causal-gqa4-mla-dims": FlashProblem(seq_q=100, seq_k=100, heads_q=8, heads_kv=2, dqk=48, dv=32,
                                             causal=True, gate=True, block_q=32),
        # key ranges that start inside the sequence (the window), packed documents across blocks, soft cap, bf16
        "window-segments-cap-bf16": FlashProblem(batch=2, seq_q=90, seq_k=90, heads_q=6, heads_kv=2, dqk=32, dv=32,
                                                 dtype=jnp.bfloat16, causal=True, sliding_window=21, segments=True,
                                                 soft_cap=2.0, block_q=32, seed=5),
    }


@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=True, sliding_window=20)],
                         ids=["causal", "window"])
def test_blocks_compute_only_their_visible_key_ranges(options):
    """The compiled forward's FLOPs, relative to the unmasked call's, are the share of the T x S square that the
    blocks' key ranges cover (the matmuls dominate): hidden key blocks are never computed."""
    t, block = 128, 32
    q = jnp.ones((1, t, 2, 32))

    def flops(**kw):
        attend = jax.jit(lambda q: flash_attention(q, q, q, implementation="xla_chunked", block_q=block, **kw))
        cost = attend.lower(q).compile().cost_analysis()
        return (cost if isinstance(cost, dict) else cost[0])["flops"]

    ranges = xla_chunked.block_ranges(t, t, block, causal=True, sliding_window=options.get("sliding_window"))
    covered = sum((t1 - t0) * (k1 - k0) for t0, t1, k0, k1 in ranges) / t**2
    assert covered < 0.7
    assert flops(**options) / flops() == pytest.approx(covered, abs=0.05)


def test_default_query_block():
    """One block when the whole square's logits fit BLOCK_LOGITS_BYTES; else blocks that fit, at most MAX_BLOCKS."""
    assert xla_chunked.query_block(2, 64, 64, 4, None) == 64
    block = xla_chunked.query_block(8, 256, 256, 8, None)  # the tiny-Llama training shape
    assert 256 // block > 1 and 4 * 8 * 8 * block * 256 <= xla_chunked.BLOCK_LOGITS_BYTES
    assert -(-2048 // xla_chunked.query_block(1, 2048, 2048, 8, None)) == xla_chunked.MAX_BLOCKS


def test_auto_runs_it_off_gpu_and_a_model_matches_xla(monkeypatch):
    """A tiny GQA model under "auto" (xla_chunked, forced into two blocks) has the logits and gradients of the
    same model under "xla"."""
    monkeypatch.setattr(flash_api, "on_gpu", lambda: False)  # the off-GPU choice, on any backend
    runs = []
    monkeypatch.setattr(xla_chunked, "run", lambda call, run=xla_chunked.run: runs.append(call) or run(call))
    monkeypatch.setattr(xla_chunked, "BLOCK_LOGITS_BYTES", 0)  # blocks of T / MAX_BLOCKS = 32 queries
    monkeypatch.setattr(xla_chunked, "MAX_BLOCKS", 2)  # each block costs compile time
    tokens = jax.random.randint(jax.random.key(0), (2, 65), 0, 61)

    def logits_and_grads(kernel):
        cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64,
                          kernels={"flash_attention": kernel})
        graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)))

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens[:, :-1]).logits_BTV
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, jax.tree.leaves(grads)

    logits, grads = logits_and_grads("auto")
    assert len(runs) == 1
    ref_logits, ref_grads = logits_and_grads("xla")
    assert len(runs) == 1
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for g, ref_g in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-6)
