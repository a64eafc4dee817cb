"""Layer plans, the registry, parameter sharing, auxiliary losses, accounting and generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnzoo import LanguageModel, LayerSpec, ModelConfig, generate, get_preset, parse_plan, registered


def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                  attn_implementation="xla")
    return ModelConfig(**{**fields, **overrides})


# -- plans and registry ----------------------------------------------------------------------------------------

def test_plan_string_and_spec_list_resolve_to_the_same_layers():
    text = parse_plan("gqa(window=4,qk_norm=true)*2,mqa")
    listed = parse_plan([{"mixer": "gqa", "options": {"qk_norm": True, "window": 4}},
                         LayerSpec("gqa", {"window": 4, "qk_norm": True}), "mqa"])
    assert text == listed
    assert text[0].kwargs == {"window": 4, "qk_norm": True}
    assert small_config(plan="gqa(window=4,qk_norm=true)*2,mqa").plan == "gqa(qk_norm=true,window=4)*2,mqa"


def test_config_round_trips_through_dict():
    cfg = small_config(plan="gqa@a,mqa,gqa@a")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.layers == cfg.layers


@pytest.mark.parametrize("kwargs, match", [
    (dict(plan="nosuchmixer*3"), "registered mixers: .*gqa"),
    (dict(plan="gqa*2"), "plan: 'gqa\\*2' has 2 layers but n_layers=3"),
    (dict(plan="gqa*4"), "has 4 layers but n_layers=3"),
    (dict(n_heads=5), "n_heads=5 must divide d_model=32"),
    (dict(n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
    (dict(plan="gqa(bogus=1)*3"), "no option bogus; allowed: .*window"),
    (dict(dtype="float8"), "dtype='float8' is not one of"),
    (dict(attn_implementation="fast"), "attn_implementation='fast' is not one of auto, xla, cudnn, pallas"),
])
def test_bad_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LanguageModel(small_config(**kwargs), rngs=nnx.Rngs(0))


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="preset='huge' is not one of tiny, small, gpt2-small"):
        get_preset("huge")


def test_builtin_mixers_registered():
    assert {"mha", "gqa", "mqa"} <= set(registered())


# -- sharing and auxiliary losses ------------------------------------------------------------------------------

def _train(model, tokens, steps=5):
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    def loss_fn(model):
        out = model(tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits_BTV, tokens[:, 1:]).mean()
        return ce + out.aux_loss, (ce, out.aux_loss)

    @nnx.jit
    def step(model, opt):
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt)) for _ in range(steps)]


def test_shared_block_has_its_parameters_once_and_trains():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 17)), jnp.int32)
    shared = LanguageModel(small_config(plan="gqa@a,mqa,gqa@a"), rngs=nnx.Rngs(0))
    unshared = LanguageModel(small_config(plan="gqa,mqa,gqa"), rngs=nnx.Rngs(0))
    assert shared.blocks[0] is shared.blocks[2]
    n_shared = sum(x.size for x in jax.tree.leaves(nnx.state(shared, nnx.Param)))
    n_unshared = sum(x.size for x in jax.tree.leaves(nnx.state(unshared, nnx.Param)))
    block = sum(x.size for x in jax.tree.leaves(nnx.state(unshared.blocks[2], nnx.Param)))
    assert n_unshared - n_shared == block
    assert shared.summary().total_params == n_shared
    before = np.asarray(shared.blocks[0].mixer.q_proj.kernel[...])
    losses = _train(shared, tokens)
    assert losses[-1] < losses[0]
    assert not np.allclose(before, shared.blocks[2].mixer.q_proj.kernel[...])  # one object, updated once


def test_shared_dictionary_and_aux_loss_reach_the_training_loss():
    cfg = small_config(plan="toy_shared_dict(aux_weight=0.5),gqa,toy_shared_dict(aux_weight=0.5)")
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    atoms = model.shared["toy_atoms"]
    assert model.blocks[0].mixer.dictionary is atoms is model.blocks[2].mixer.dictionary
    s = model.summary()
    assert dict(s.rows)["shared"] == atoms.atoms.size
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 9)), jnp.int32)
    out = model(tokens)
    expected = sum(0.5 * jnp.mean(model.blocks[i].mixer.coeffs[...] ** 2) for i in (0, 2))
    np.testing.assert_allclose(out.aux_loss, expected, rtol=1e-6)
    assert set(out.metrics) == {"layer0/coeff_norm", "layer2/coeff_norm"}
    # The aux loss's gradient reaches the mixer coefficients: d(aux)/dc = 2 * 0.5 * c / N_ATOMS.
    grads = nnx.grad(lambda m: m(tokens).aux_loss)(model)
    c = model.blocks[0].mixer.coeffs[...]
    np.testing.assert_allclose(grads.blocks[0].mixer.coeffs[...], c / c.size, rtol=1e-5)
    losses = _train(model, tokens)
    assert losses[-1] < losses[0]


def test_skip_layers_equals_a_model_without_them():
    model = LanguageModel(small_config(), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (2, 8)), jnp.int32)
    skipped = model(tokens, skip_layers=(1,)).logits_BTV
    model.blocks = nnx.List([model.blocks[0], model.blocks[2]])
    np.testing.assert_allclose(skipped, model(tokens).logits_BTV, rtol=1e-6, atol=1e-6)


# -- accounting ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer, kv_heads", [("mha", 8), ("gqa", 2), ("mqa", 1)])
def test_summary_matches_closed_form(mixer, kv_heads):
    d, h, hd, layers, vocab, mlp, seq = 64, 8, 8, 2, 97, 192, 32
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=h, n_kv_heads=2, mlp_hidden=mlp,
                      plan=f"{mixer}*{layers}", tie_embeddings=False)
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    attn = d * h * hd + 2 * d * kv_heads * hd + h * hd * d
    per_layer = attn + 3 * d * mlp + 2 * d
    assert s.total_params == vocab * d + layers * per_layer + d + d * vocab
    assert s.kv_cache_bytes_per_token == layers * 2 * kv_heads * hd * 4
    avg_ctx = (seq + 1) / 2
    flops = layers * (2 * attn + 4 * h * hd * avg_ctx + 2 * 3 * d * mlp) + 2 * d * vocab
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)
    assert "total parameters" in s.table()


def test_window_reduces_attention_flops():
    base = dict(vocab_size=50, d_model=32, n_layers=1, n_heads=4)
    full = LanguageModel(ModelConfig(plan="gqa", **base), rngs=nnx.Rngs(0)).summary(seq_len=64)
    windowed = LanguageModel(ModelConfig(plan="gqa(window=8)", **base), rngs=nnx.Rngs(0)).summary(seq_len=64)
    avg_full, avg_win = 65 / 2, (8 * 9 / 2 + 56 * 8) / 64
    assert full.flops_per_token - windowed.flops_per_token == pytest.approx(4 * 32 * (avg_full - avg_win), abs=1)


# -- generation ------------------------------------------------------------------------------------------------

def _greedy_by_full_forward(model, prompt, n):
    """Greedy continuation by re-scoring the whole sequence each step (padding after it is invisible: causal)."""
    forward = nnx.jit(lambda model, tokens: model(tokens).logits_BTV)
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.zeros((1, len(prompt) + n), jnp.int32).at[0, : len(seq)].set(jnp.asarray(seq))
        seq.append(int(jnp.argmax(forward(model, padded)[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_generate_greedy_batched_matches_full_forward():
    model = LanguageModel(small_config(plan="gqa,mqa,gqa(window=3)"), rngs=nnx.Rngs(3))
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    out = generate(model, prompts, max_new_tokens=6)
    assert out == [_greedy_by_full_forward(model, p, 6) for p in prompts]


def test_generate_sampling_is_seeded_and_respects_top_k():
    model = LanguageModel(small_config(), rngs=nnx.Rngs(4))
    a = generate(model, [[1, 2]], 20, temperature=1.0, top_k=1, seed=0)
    assert a == generate(model, [[1, 2]], 20)  # top-1 sampling is greedy
    b = generate(model, [[1, 2]] * 2, 20, temperature=2.0, seed=1)
    assert b == generate(model, [[1, 2]] * 2, 20, temperature=2.0, seed=1)
    assert b[0] != b[1]  # rows draw different random numbers


def test_generate_rejects_bad_arguments():
    model = LanguageModel(small_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 3, temperature=-1.0)
