"""Layer plans, the registry, parameter sharing, auxiliary losses, accounting and generation."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_checks import greedy_by_rescoring, train_losses

from attnzoo import ForwardContext, LanguageModel, LayerSpec, ModelConfig, generate, get_preset, parse_plan, registered


def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                  kernels={"flash_attention": "xla", "decode_attention": "xla"})
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
    (dict(plan="gqa(bogus=1)*3"), "layer 0 .*no option bogus; allowed: .*window"),
    (dict(plan="gqa,gqa,gqa(window=0)"), "layer 2 \\(gqa\\(window=0\\)\\): .*window=0 must be a positive integer"),
    (dict(plan="gqa(window=wide)*3"), "window='wide' must be an integer or none"),
    (dict(plan="gqa(qk_norm=1)*3"), "qk_norm=1 must be true or false"),
    (dict(plan="gqa(logits_soft_cap=-1.0)*3"), "logits_soft_cap=-1.0 must be > 0"),
    (dict(plan="gqa(n_kv_heads=3)*3"), "n_kv_heads=3 must divide n_heads=4"),
    (dict(plan="gqa[mlp=moe]*3"), "block: option mlp='moe' must be one of 'swiglu' or none"),
    (dict(plan="gqa[norm=none]*3"), "block has no option norm; allowed: mlp, mlp_hidden"),
    (dict(plan="gqa@a,mqa@a,gqa"), "tagged @a share one block and must be identical"),
    (dict(head_dim=7), "head_dim=7 must be even for rotary embeddings"),
    (dict(plan="gqa(head_dim=5,rope=false)*3", head_dim=7), None),  # no rotary embedding: any width
    (dict(dtype="float8"), "dtype='float8' is not one of"),
    (dict(kernels={"flash_attention": "fast"}), "kernels: .*'fast'.*'xla'"),
    (dict(kernels={"flash_attn": "xla"}), "kernels: .*flash_attn.*flash_attention"),
])
def test_bad_config_errors_name_the_field_when_the_config_is_built(kwargs, match):
    if match is None:
        small_config(**kwargs)
        return
    with pytest.raises(ValueError, match=match):
        small_config(**kwargs)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="preset='huge' is not one of tiny, small, gpt2-small"):
        get_preset("huge")


def test_builtin_mixers_registered():
    assert {"mha", "gqa", "mqa"} <= set(registered())


NEW_MIXER_FILE = '''
import dataclasses
import jax.numpy as jnp
from attnzoo import Mixer, MixerOutput, register


@dataclasses.dataclass(frozen=True)
class ShiftOptions:
    gain: float = 1.0

    def __post_init__(self):
        if self.gain <= 0:
            raise ValueError(f"gain={self.gain} must be > 0")


@register("throwaway_shift", options=ShiftOptions, gain=2.0)
class ShiftMixer(Mixer):
    """y_t = gain * x_{t-1} (the previous token's input; zeros at t = 0)."""

    def __init__(self, config, options, *, shared, rngs):
        self.gain = options.gain

    def __call__(self, x_BTD, ctx, cache=None):
        if ctx.mode == "decode":
            prev = jnp.concatenate([cache[:, None], x_BTD[:, :-1]], axis=1)
            cache = x_BTD[:, -1]
        else:
            prev = jnp.pad(x_BTD[:, :-1], ((0, 0), (1, 0), (0, 0)))
            if ctx.mode == "prefill":
                cache = x_BTD[jnp.arange(x_BTD.shape[0]), ctx.lengths_B - 1]
        return MixerOutput(self.gain * prev, cache)

    def init_cache(self, batch, max_len):
        return jnp.zeros((batch, self.d_model))

    def flops_per_token(self, seq_len):
        return 0
'''


def test_a_new_mixer_is_one_file(tmp_path, monkeypatch, request):
    """A mixer module dropped into the mixer package's path is discovered, validated at config time, and passes
    the registry-wide contract with no other edit."""
    import test_mixer_contract as contract

    import attnzoo.mixers
    from attnzoo import registry

    (tmp_path / "throwaway_shift.py").write_text(NEW_MIXER_FILE.replace("self.d_model", "32"))
    monkeypatch.setattr(attnzoo.mixers, "__path__", [*attnzoo.mixers.__path__, str(tmp_path)])
    # The registration ends with the test: later tests in this process see only the shipped mixers.
    monkeypatch.setattr(registry, "_MIXERS", dict(registry._MIXERS))
    monkeypatch.setattr(registry, "_INDEX", dict(registry._INDEX))
    request.addfinalizer(lambda: sys.modules.pop("attnzoo.mixers.throwaway_shift", None))
    assert "throwaway_shift" in registered()
    assert small_config(plan="throwaway_shift*3").layer_options[0].gain == 2.0  # the alias default
    with pytest.raises(ValueError, match="layer 1 .*gain=-1.0 must be > 0"):
        small_config(plan="gqa,throwaway_shift(gain=-1.0),gqa")
    with pytest.raises(ValueError, match="throwaway_shift' has no option window; allowed: gain"):
        small_config(plan="throwaway_shift(window=3)*3")
    for check in (contract.test_causality, contract.test_decode_with_cache_equals_full_forward,
                  contract.test_multi_token_decode_equals_full_forward, contract.test_decode_past_capacity_raises):
        check("throwaway_shift")


# -- block layouts and model-level inputs ----------------------------------------------------------------------

def test_block_options_remove_or_resize_the_mlp():
    plan = "gqa[mlp=none],gqa[mlp_hidden=96],gqa"
    cfg = small_config(plan=plan)
    assert cfg.plan == plan and parse_plan(cfg.plan) == cfg.layers
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    assert model.blocks[0].mlp is None and model.blocks[0].mlp_norm is None
    assert model.blocks[1].mlp.up_proj.out_features == 96
    assert model.blocks[2].mlp.up_proj.out_features == cfg.mlp_width
    rows = dict(model.summary().rows)
    assert rows["layer0 mlp+norms"] == 32  # the mixer's norm only
    assert rows["layer1 mlp+norms"] == 2 * 32 + 3 * 32 * 96
    # A block without an MLP is x + mixer(norm(x)) exactly.
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 6)), jnp.int32)
    x = model.embed(tokens)
    ctx = ForwardContext("full", jnp.arange(6)[None])
    y, _ = model.blocks[0](x, ctx)
    np.testing.assert_allclose(y, x + model.blocks[0].mixer(model.blocks[0].mixer_norm(x), ctx).y_BTD, rtol=1e-6)


def test_mixers_see_the_input_embeddings_and_a_side_stream():
    model = LanguageModel(small_config(plan="toy_side_inputs*3"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 7)), jnp.int32)
    side = jnp.asarray(np.random.default_rng(1).integers(0, 50, (1, 5)), jnp.int32)
    plain = model(tokens).logits_BTV
    with_side = model(tokens, side_tokens_BS=side).logits_BTV
    assert float(jnp.abs(with_side - plain).max()) > 1e-4
    # By hand: run the side stream through the stack and feed its normalised hidden state to each layer.
    x, s = model.embed(tokens), model.embed(side)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    side_positions = jnp.arange(5)[None]
    for block in model.blocks:
        ctx = ForwardContext("full", positions, input_embeddings_BTD=model.embed(tokens),
                             side_BSD=block.mixer_norm(s))
        x, _ = block(x, ctx)
        s, _ = block(s, ForwardContext("full", side_positions, input_embeddings_BTD=model.embed(side)))
    np.testing.assert_allclose(with_side, model._logits(model.final_norm(x)), rtol=1e-5, atol=1e-5)


# -- sharing and auxiliary losses ------------------------------------------------------------------------------

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
    losses = train_losses(shared, tokens, 5)
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
    losses = train_losses(model, tokens, 5)
    assert losses[-1] < losses[0]


def test_skip_layers_equals_a_model_without_them():
    model = LanguageModel(small_config(), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (2, 8)), jnp.int32)
    skipped = model(tokens, skip_layers=(1,)).logits_BTV
    model.blocks = nnx.List([model.blocks[0], model.blocks[2]])
    np.testing.assert_allclose(skipped, model(tokens).logits_BTV, rtol=1e-6, atol=1e-6)


# -- generation ------------------------------------------------------------------------------------------------

def test_generate_greedy_batched_matches_full_forward():
    model = LanguageModel(small_config(plan="gqa,mqa,gqa(window=3)"), rngs=nnx.Rngs(3))
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    out = generate(model, prompts, max_new_tokens=6)
    assert out == [greedy_by_rescoring(model, p, 6) for p in prompts]


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
