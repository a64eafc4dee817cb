"""The contract every registered mixer passes, parameterised over the registry (new mixers are covered with no
edit here). What a mixer supports comes from its `supports` declaration, not from skip lists."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig, get_mixer, registered

VOCAB, T = 61, 12
# Every registered mixer with its defaults, plus option combinations that change the computation.
MIXERS = registered() + ("gqa(window=4,qk_norm=true)", "mqa(logits_soft_cap=5.0,rope=false)")


def tiny_model(mixer: str, **overrides) -> LanguageModel:
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                  plan=f"{mixer}*2", kernels={"flash_attention": "xla", "decode_attention": "xla"})
    return LanguageModel(ModelConfig(**{**fields, **overrides}), rngs=nnx.Rngs(0))


def supports(mixer: str):
    return get_mixer(mixer.split("(")[0]).cls.supports


def random_tokens(seed: int, shape) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


@pytest.mark.parametrize("mixer", MIXERS)
def test_causality(mixer):
    model = tiny_model(mixer)
    tokens = random_tokens(1, (2, T))
    for t in (0, 5, T - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % VOCAB)
        a, b = model(tokens).logits_BTV, model(changed).logits_BTV
        np.testing.assert_array_equal(a[:, :t], b[:, :t])
        assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-6, "changing token t must change outputs at t"


def first_then_slow(mixers, key=lambda cls: cls):
    """The first name per key(mixer class) runs in the default suite, the others (aliases, option variants: the
    same code) with `-m slow`, which keeps the suite's cost bounded as the registry grows."""
    seen = set()
    for mixer in mixers:
        group = key(get_mixer(mixer.split("(")[0]).cls)
        yield pytest.param(mixer, marks=() if group not in seen else pytest.mark.slow)
        seen.add(group)


def prefill(model, tokens, prompt_lengths):
    """Prefill right-padded prompts (padding filled with a token that must not matter)."""
    padded = jnp.where(jnp.arange(tokens.shape[1])[None] < prompt_lengths[:, None], tokens, 5)
    return model(padded, caches=model.init_caches(tokens.shape[0], T), lengths_B=prompt_lengths, mode="prefill")


@pytest.mark.parametrize("mixer", [m for m in MIXERS if supports(m).decode])
def test_decode_with_cache_equals_full_forward(mixer):
    model = tiny_model(mixer)
    tokens = random_tokens(2, (3, T))
    full = model(tokens).logits_BTV
    prompt_lengths = jnp.array([3, 7, 1], jnp.int32)  # batched, different prompt lengths (right-padded)
    out = prefill(model, tokens, prompt_lengths)
    for b, n in enumerate(prompt_lengths.tolist()):
        np.testing.assert_allclose(out.logits_BTV[b, :n], full[b, :n], rtol=1e-4, atol=1e-4)
    caches = out.caches
    # Feed each sequence its own next true token; compare with the full forward at that position.
    for step in range(T - int(prompt_lengths.max())):
        pos = prompt_lengths + step
        out = model(tokens[jnp.arange(3), pos][:, None], caches=caches, mode="decode")
        caches = out.caches
        np.testing.assert_array_equal(caches.lengths_B, pos + 1)
        np.testing.assert_allclose(out.logits_BTV[:, 0], full[jnp.arange(3), pos], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer", first_then_slow(m for m in MIXERS
                                                          if supports(m).decode and supports(m).multi_token_decode))
def test_multi_token_decode_equals_full_forward(mixer):
    model = tiny_model(mixer)
    tokens = random_tokens(4, (2, T))
    full = model(tokens).logits_BTV
    prompt_lengths = jnp.array([2, 5], jnp.int32)
    caches = prefill(model, tokens, prompt_lengths).caches
    chunk = 3  # three tokens per decode call, each sequence at its own offset
    pos_BC = prompt_lengths[:, None] + jnp.arange(chunk)
    out = model(jnp.take_along_axis(tokens, pos_BC, axis=1), caches=caches, mode="decode")
    np.testing.assert_allclose(out.logits_BTV, jnp.take_along_axis(full, pos_BC[..., None], axis=1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer", first_then_slow(m for m in MIXERS if supports(m).decode))
def test_decode_past_capacity_raises(mixer):
    model = tiny_model(mixer)
    tokens = random_tokens(5, (1, T))
    caches = prefill(model, tokens, jnp.array([T], jnp.int32)).caches  # full: T of T slots
    with pytest.raises(ValueError, match="cache capacity of 12"):
        model(tokens[:, :1], caches=caches, mode="decode")
    decode = nnx.jit(lambda model, tokens, caches: model(tokens, caches=caches, mode="decode").logits_BTV)
    with pytest.raises(Exception, match="cache capacity of 12"):  # traced lengths: raised when it runs
        jax.block_until_ready(decode(model, tokens[:, :1], caches))


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_finite_and_nonzero(mixer):
    model = tiny_model(mixer)
    tokens = random_tokens(3, (2, T))

    def loss(model):
        out = model(tokens[:, :-1])
        logp = jax.nn.log_softmax(out.logits_BTV)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean() + out.aux_loss

    grads = nnx.grad(loss)(model)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    mixer_grads = jax.tree.leaves(nnx.state(grads.blocks[0].mixer, nnx.Param))
    assert sum(float(jnp.abs(g).sum()) for g in mixer_grads) > 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_accounting_is_consistent(mixer):
    model = tiny_model(mixer)
    s = model.summary(seq_len=T)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert s.total_params == n_params == sum(count for _, count in s.rows)
    if supports(mixer).decode:
        # Cache bytes per token == the measured growth of the decode state per extra token of capacity.
        def cache_bytes(max_len):
            return sum(x.nbytes for x in jax.tree.leaves(model.init_caches(1, max_len).layers))
        assert cache_bytes(T + 1) - cache_bytes(T) == s.kv_cache_bytes_per_token
    assert s.flops_per_token > 2 * (n_params - VOCAB * 32)  # at least 2 FLOPs per non-embedding weight


# Interpreted kernels are the suite's costliest check: once per mixer file (sibling classes share their kernel calls).
@pytest.mark.parametrize("mixer", first_then_slow((m for m in MIXERS if supports(m).kernel_ops),
                                                  key=lambda cls: cls.__module__))
def test_pallas_kernels_match_xla_in_the_mixer(mixer):
    """Every kernel op the mixer declares, through the Triton kernels (interpreted on CPU) == through XLA."""
    ops = supports(mixer).kernel_ops
    one_layer = dict(n_layers=1, plan=mixer)  # the interpreted kernels dominate the cost: one layer exercises them
    xla = tiny_model(mixer, kernels={op: "xla" for op in ops}, **one_layer)
    triton = tiny_model(mixer, kernels={op: "triton" for op in ops}, **one_layer)
    tokens = random_tokens(6, (2, 9))

    def loss(model):
        logp = jax.nn.log_softmax(model(tokens[:, :-1]).logits_BTV)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    (xla_loss, xla_grads), (triton_loss, triton_grads) = (nnx.value_and_grad(loss)(m) for m in (xla, triton))
    np.testing.assert_allclose(triton_loss, xla_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(triton_grads, nnx.Param)),
                    jax.tree.leaves(nnx.state(xla_grads, nnx.Param)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if supports(mixer).decode and "decode_attention" in ops:
        lengths = jnp.array([4, 2], jnp.int32)
        outs = []
        for model in (xla, triton):
            caches = prefill(model, tokens, lengths).caches
            outs.append(model(tokens[:, 5:6], caches=caches, mode="decode").logits_BTV)
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)
