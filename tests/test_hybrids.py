"""Hybrids are plans, with no new code: Jamba-, Samba-, Mamba-2-paper- and Zamba-style stacks build, train a few
steps, and generate through mixed KV caches and recurrent states exactly as greedy re-scoring does."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model_checks import greedy_by_rescoring, train_losses

from attnzoo import LanguageModel, ModelConfig, generate, parse_plan

SMALL_MAMBA2 = "mamba2(head_dim=16,d_state=16,chunk_size=16)"
HYBRIDS = {
    # Jamba (arXiv 2403.19887): one attention layer in eight, the rest Mamba (MoE MLPs aside).
    "jamba": f"{'mamba,' * 4}gqa,{'mamba,' * 2}mamba",
    # Samba (arXiv 2406.07522): Mamba and sliding-window attention alternating.
    "samba": "mamba,gqa(window=8),mamba,gqa(window=8)",
    # Mamba-2 paper's hybrid: a few attention layers among SSD layers (about 10%), MLP-free SSD blocks.
    "mamba2_hybrid": f"{SMALL_MAMBA2}[mlp=none]*3,gqa,{SMALL_MAMBA2}[mlp=none]*2",
    # Zamba (arXiv 2405.16712): one attention block shared (@tag) at several depths of a Mamba stack.
    "zamba": f"{SMALL_MAMBA2}[mlp=none],gqa@shared_attn,{SMALL_MAMBA2}[mlp=none],gqa@shared_attn",
}


def hybrid_model(plan: str, seed: int = 0) -> LanguageModel:
    cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=len(parse_plan(plan)), n_heads=4, n_kv_heads=2,
                      max_seq_len=64, plan=plan, kernels={"flash_attention": "xla", "decode_attention": "xla"})
    return LanguageModel(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_plan_trains_and_generates_through_mixed_caches(name):
    model = hybrid_model(HYBRIDS[name])
    if name == "zamba":
        assert model.blocks[1] is model.blocks[3]  # one attention block, two depths
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (4, 17)), jnp.int32)
    losses = train_losses(model, tokens, 6)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8]]
    new = generate(model, prompts, max_new_tokens=4)
    assert new == [greedy_by_rescoring(model, prompt, 4) for prompt in prompts]
