"""Deconstructing Attention's variants (arXiv 2510.11602; the registry-wide contract is in test_mixer_contract.py):
each mixer against an independent float64 NumPy implementation of its equation, the Taylor map's quadratic and
recurrent forms, the model's fixed side stream, parameter matching and closed-form accounting, config errors."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.decon_approx import taylor_features, taylor_scores
from attnzoo.mixers.decon_fixed_qk import FIXED_TEXT, DeconFixedQK, fixed_text_tokens
from attnzoo.mixers.base import SIDE_STREAM

D, H, E, B, T, VOCAB = 32, 4, 8, 2, 10, 300


def model_of(plan: str, n_layers: int = 1, **fields) -> LanguageModel:
    config = dict(vocab_size=VOCAB, d_model=D, n_layers=n_layers, n_heads=H, max_seq_len=16, plan=plan,
                  kernels={"flash_attention": "xla", "decode_attention": "xla"})
    return LanguageModel(ModelConfig(**{**config, **fields}), rngs=nnx.Rngs(0))


def random(seed: int, *shape) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def full_ctx(b=B, t=T, **fields) -> ForwardContext:
    return ForwardContext("full", jnp.broadcast_to(jnp.arange(t), (b, t)), **fields)


def weights(linear) -> np.ndarray:
    return np.asarray(linear.kernel[...], np.float64)


def heads_of(x_BTD, linear) -> np.ndarray:
    """x W split into heads, [B, T, H, E], float64."""
    return (np.asarray(x_BTD, np.float64) @ weights(linear)).reshape(*x_BTD.shape[:2], H, E)


def output_of(o_BTHE, mixer) -> np.ndarray:
    return o_BTHE.reshape(*o_BTHE.shape[:2], H * E) @ weights(mixer.o_proj)


def softmax_attention(q_BTHE, k_BTHE, v_BTHE) -> np.ndarray:
    """Causal softmax(q k^T / sqrt(E)) v, float64."""
    t = q_BTHE.shape[1]
    logits = np.einsum("bthe,bshe->bhts", q_BTHE, k_BTHE) / math.sqrt(E)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshe->bthe", p / p.sum(-1, keepdims=True), v_BTHE)


def rms_norm(x, eps=1e-6):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)


# -- MLP -------------------------------------------------------------------------------------------------------
def test_mlp_is_a_position_wise_gated_mlp_with_attention_matched_parameters():
    model = model_of("decon_mlp")
    mixer = model.blocks[0].mixer
    x = random(0, B, T, D)
    mlp = mixer.mlp
    h = np.asarray(x, np.float64)
    gate = h @ weights(mlp.gate_proj)
    expected = (gate / (1 + np.exp(-gate)) * (h @ weights(mlp.up_proj))) @ weights(mlp.down_proj)
    np.testing.assert_allclose(mixer(jnp.asarray(x), full_ctx()).y_BTD, expected, rtol=2e-5, atol=2e-6)
    # Eq. 4-5's width matched to MHA's 4 d^2 weights: 3 d w within 3 d / 2 of it (w = round(4 d / 3)).
    assert mixer.hidden == round(4 * D / 3)
    mha_params = model_of("mha").summary(T).rows[1][1]
    mlp_params = model.summary(T).rows[1][1]
    assert mha_params == 4 * D * D and abs(mlp_params - mha_params) <= 3 * D / 2


# -- Non-approximate -------------------------------------------------------------------------------------------
def test_nonapprox_is_a_causal_cumulative_softmax_over_per_token_scores():
    mixer = model_of("decon_nonapprox").blocks[0].mixer
    x = random(1, B, T, D) * 30  # scores in the hundreds: exp overflows float32 without the running max
    q, k, v = (heads_of(x, p) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    s = np.sum(q / (1 + np.exp(-q)) * k, -1) / math.sqrt(E)  # [B, T, H]
    assert np.abs(s).max() > 100
    expected = np.zeros_like(v)
    for i in range(T):  # o_i = sum_{j<=i} e^{s_j} v_j / sum_{j<=i} e^{s_j}, shifted by the max over j <= i
        w = np.exp(s[:, :i + 1] - s[:, :i + 1].max(1, keepdims=True))[..., None]
        expected[:, i] = (w * v[:, :i + 1]).sum(1) / w.sum(1)
    y = mixer(jnp.asarray(x), full_ctx()).y_BTD
    np.testing.assert_allclose(y, output_of(expected, mixer), rtol=1e-4, atol=1e-4 * np.abs(y).max())
    a, _ = mixer.attention_map(jnp.asarray(x), full_ctx())
    np.testing.assert_allclose(np.einsum("bhts,bshe->bthe", a, v), expected, rtol=1e-4, atol=1e-4)


# -- Approximate -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["separate", "joint"])
def test_approx_matches_the_taylor_equations(normalization):
    mixer = model_of(f"decon_approx(normalization={normalization},rope=false)").blocks[0].mixer
    x = random(2, B, T, D)
    q, k, v = (heads_of(x, p) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    causal = np.tril(np.ones((T, T)))
    s = np.einsum("bthe,bshe->bhts", q, k) / math.sqrt(E)

    def normalised(a_BHTS):
        a_BHTS = a_BHTS * causal
        return np.einsum("bhts,bshe->bthe", a_BHTS, v) / np.swapaxes(a_BHTS.sum(-1), 1, 2)[..., None]

    if normalization == "joint":  # Based: 1 + s + s^2 / 2, normalised once
        expected = normalised(1 + s + s**2 / 2)
    else:  # Appx. I: o0 + o1 + o2, each normalised on its own; o2 with elementwise squares q^2 / sqrt2, k^2 / sqrt2
        second = np.einsum("bthe,bshe->bhts", q**2 / math.sqrt(2), k**2 / math.sqrt(2)) / E
        expected = normalised(np.ones_like(s)) + normalised(s) + normalised(second)
    np.testing.assert_allclose(mixer(jnp.asarray(x), full_ctx()).y_BTD, output_of(expected, mixer),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("normalization", ["separate", "joint"])
def test_approx_recurrent_form_equals_quadratic_form(normalization):
    # Features: phi(q) . phi(k) is each group's score.
    q, k = jnp.asarray(random(3, B, T, H, E)), jnp.asarray(random(4, B, T, H, E))
    for phi_q, phi_k, scores in zip(taylor_features(q, normalization), taylor_features(k, normalization),
                                    taylor_scores(q, k, normalization)):
        np.testing.assert_allclose(jnp.einsum("bthp,bshp->bhts", phi_q, phi_k), scores, rtol=1e-4, atol=1e-4)
    # The mixer: token-by-token recurrent decode from an empty state == the quadratic full forward.
    mixer = model_of(f"decon_approx(normalization={normalization})").blocks[0].mixer
    x = jnp.asarray(random(5, B, T, D))
    full = mixer(x, full_ctx()).y_BTD
    cache = mixer.init_cache(B, T)
    for t in range(T):
        ctx = ForwardContext("decode", jnp.full((B, 1), t), lengths_B=jnp.full((B,), t))
        out = mixer(x[:, t:t + 1], ctx, cache)
        cache = out.cache
        np.testing.assert_allclose(out.y_BTD[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


# -- StaticEmbQK -----------------------------------------------------------------------------------------------
def test_static_emb_qk_takes_queries_and_keys_from_the_input_embeddings():
    mixer = model_of("decon_static_emb_qk(rope=false)").blocks[0].mixer
    x, e = random(6, B, T, D), random(7, B, T, D)
    q, k = heads_of(rms_norm(e), mixer.q_proj), heads_of(rms_norm(e), mixer.k_proj)  # norm weight starts at 1
    expected = output_of(softmax_attention(q, k, heads_of(x, mixer.v_proj)), mixer)
    y = mixer(jnp.asarray(x), full_ctx(input_embeddings_BTD=jnp.asarray(e))).y_BTD
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


# -- RndEmbQK / FixedSeqQK -------------------------------------------------------------------------------------
def test_fixed_qk_map_comes_from_the_side_stream_and_is_shared_by_every_sequence():
    mixer = model_of("decon_rnd_emb_qk(rope=false)").blocks[0].mixer
    x, side = random(8, B, T, D), random(9, 1, 16, D)  # the stream is longer than the sequence: rows 0..T-1
    q, k = heads_of(side[:, :T], mixer.q_proj), heads_of(side[:, :T], mixer.k_proj)
    expected = output_of(softmax_attention(np.repeat(q, B, 0), np.repeat(k, B, 0), heads_of(x, mixer.v_proj)),
                         mixer)
    ctx = full_ctx(side_BSD=jnp.asarray(side))
    np.testing.assert_allclose(mixer(jnp.asarray(x), ctx).y_BTD, expected, rtol=1e-4, atol=1e-5)
    a, _ = mixer.attention_map(jnp.asarray(x), ctx)
    np.testing.assert_array_equal(a[0], a[1])  # one map for every input
    np.testing.assert_array_equal(a, mixer.attention_map(jnp.asarray(x) + 1, ctx)[0])


def test_model_feeds_its_fixed_stream_as_a_constant():
    text = model_of("decon_fixed_seq_qk,mha", n_layers=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (B, T)), jnp.int32)
    stream = fixed_text_tokens(16, VOCAB)
    np.testing.assert_array_equal(stream[0], np.frombuffer(FIXED_TEXT[:16].encode(), np.uint8))
    # The model runs its own stream: the same as handing it the text tokens.
    np.testing.assert_allclose(text(tokens).logits_BTV, text(tokens, side_tokens_BS=jnp.asarray(stream)).logits_BTV,
                               rtol=1e-6, atol=1e-6)
    # Constants, not parameters: the counts equal MHA's; random streams depend on the option seed only.
    assert text.summary(T).total_params == model_of("mha,mha", n_layers=2).summary(T).total_params
    noise = []
    for seed, rng in ((0, 0), (0, 1), (1, 0)):
        config = ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=1, n_heads=H, max_seq_len=16,
                             plan=f"decon_rnd_emb_qk(seed={seed})")
        stream = DeconFixedQK.make_shared(config, config.layer_options[0], nnx.Rngs(rng))[SIDE_STREAM]
        noise.append(stream.embeddings_1SD[...])
    np.testing.assert_array_equal(noise[0], noise[1])
    assert not np.allclose(noise[0], noise[2]) and abs(float(np.std(noise[0])) - 0.02) < 0.002
    # W_Q and W_K learn only through the stream: their gradients are not zero.
    grads = nnx.grad(lambda m: jnp.mean(m(tokens).logits_BTV ** 2))(text)
    assert float(jnp.abs(grads.blocks[0].mixer.q_proj.kernel[...]).sum()) > 0
    with pytest.raises(ValueError, match="exceeds the fixed side stream's 16 positions"):
        text.init_caches(1, 17)


# -- accounting and config errors ------------------------------------------------------------------------------
def test_summaries_match_closed_forms():
    seq = 12
    proj = 2 * D * E * 4 * H  # q, k, v and output projections, MHA
    flops = {
        "decon_mlp": 2 * 3 * D * round(4 * D / 3),
        "decon_nonapprox": proj + 2 * H * E + 2 * H * E,
        "decon_approx": proj + 4 * H * (1 + 2 * E) * (E + 1),
        "decon_approx(normalization=joint)": proj + 4 * H * (1 + E + E * E) * (E + 1),
        "decon_rnd_emb_qk": proj + 4 * H * E * (seq + 1) / 2,
        "decon_static_emb_qk": proj + 4 * H * E * (seq + 1) / 2,
    }
    cache = {"decon_rnd_emb_qk": 2 * H * E * 4, "decon_static_emb_qk": 2 * H * E * 4}
    mlp = 3 * D * 64 * -(-(8 * D // 3) // 64)
    for plan, mixer_flops in flops.items():
        s = model_of(plan).summary(seq)
        assert s.flops_per_token == pytest.approx(mixer_flops + 2 * mlp + 2 * D * VOCAB, abs=1), plan
        assert s.kv_cache_bytes_per_token == cache.get(plan, 0), plan


@pytest.mark.parametrize("plan, match", [
    ("decon_approx(normalization=both)", "normalization='both' must be one of 'separate', 'joint'"),
    ("decon_mlp(hidden=0)", "hidden=0 must be a positive integer"),
    ("decon_rnd_emb_qk(sigma=0.0)", "sigma=0.0 must be > 0"),
    ("decon_fixed_seq_qk(source=file)", "source='file' must be one of 'random', 'text'"),
    ("decon_rnd_emb_qk,decon_fixed_seq_qk", "one fixed side stream"),
    ("decon_rnd_emb_qk(seed=1),decon_rnd_emb_qk", "one fixed side stream"),
])
def test_bad_configs_fail_when_the_config_is_built(plan, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=plan.count(",") + 1, n_heads=H, plan=plan)
