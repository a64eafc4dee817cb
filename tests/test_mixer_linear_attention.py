"""Linear attention (linear_attention / retnet / simple_gla / based) specifics, packed documents included; the
registry-wide contract is in test_mixer_contract.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.layers import apply_rope
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.linear_attention import taylor2_features

D, H, E, T = 32, 4, 8, 21  # T crosses a chunk boundary (chunk_size=16 below)


def one_layer(plan: str, **overrides) -> LanguageModel:
    fields = dict(vocab_size=50, d_model=D, n_layers=1, n_heads=H, plan=plan,
                  kernels={"chunked_linear_attention": "xla"})
    return LanguageModel(ModelConfig(**{**fields, **overrides}), rngs=nnx.Rngs(0))


def softplus(x):
    return np.logaddexp(0.0, x)


def reference_phi(name, x):
    if name == "elu1":
        return np.where(x > 0, x + 1, np.exp(x))
    if name == "taylor2":  # Based: [1, x / d^(1/4), x (x) x / sqrt(2 d)]
        d = x.shape[-1]
        outer = np.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], d * d)
        return np.concatenate([np.ones_like(x[..., :1]), x / d**0.25, outer / np.sqrt(2 * d)], axis=-1)
    return x


def reference_forward(mixer, x_BTD, *, feature_map, decay, normalize, rope, kv_heads):
    """o_t = sum_{s<=t} prod_{s<r<=t} gamma_r (phi(q_t).phi(k_s)) v_s, normalised by the same sum without v, or
    RMSNorm'd per head; quadratic and float64."""
    def p(module):
        return np.asarray(module.kernel[...], np.float64)

    x = np.asarray(x_BTD, np.float64)
    b, t, _ = x.shape
    q, k, v = x @ p(mixer.q_proj), x @ p(mixer.k_proj), x @ p(mixer.v_proj)
    q, k, v = q.reshape(b, t, H, -1), k.reshape(b, t, kv_heads, -1), v.reshape(b, t, kv_heads, -1)
    if rope:
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        q = np.asarray(apply_rope(jnp.asarray(q, jnp.float32), positions, base=10_000.0), np.float64)
        k = np.asarray(apply_rope(jnp.asarray(k, jnp.float32), positions, base=10_000.0), np.float64)
    group = H // kv_heads
    phi_q, phi_k = reference_phi(feature_map, q), np.repeat(reference_phi(feature_map, k), group, axis=2)
    v = np.repeat(v, group, axis=2)
    if decay == "fixed":
        log_gamma = np.broadcast_to(np.log(1 - 2.0 ** (-5.0 - np.arange(H))), (b, t, H))
    elif decay == "learned":
        log_gamma = np.broadcast_to(-softplus(np.asarray(mixer.decay_logit[...], np.float64)), (b, t, H))
    elif decay == "data":
        log_gamma = -softplus(x @ p(mixer.decay_proj) + np.asarray(mixer.decay_proj.bias[...], np.float64))
    else:
        log_gamma = np.zeros((b, t, H))
    cum = np.cumsum(log_gamma, axis=1)  # [B, T, H]
    causal = np.tril(np.ones((t, t), bool))
    decay_BHTS = np.where(causal, np.exp(np.moveaxis(cum, 1, 2)[..., :, None] - np.moveaxis(cum, 1, 2)[..., None, :]),
                          0.0)
    weights_BHTS = np.einsum("bthp,bshp->bhts", phi_q, phi_k) * decay_BHTS
    o = np.einsum("bhts,bshf->bthf", weights_BHTS, v)
    if normalize:
        o = o / (np.einsum("bhts->bth", weights_BHTS)[..., None] + 1e-6)
    else:
        o = o * (1.0 if feature_map == "taylor2" else E**-0.5)
        o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + 1e-6) * np.asarray(mixer.out_norm.scale[...])
    return o.reshape(b, t, -1) @ p(mixer.o_proj)


@pytest.mark.parametrize("feature_map, decay, normalize, rope, kv_heads", [
    ("identity", "none", False, False, H),
    ("identity", "fixed", False, True, 2),
    ("elu1", "none", True, False, H),
    ("elu1", "learned", True, False, 2),
    ("elu1", "data", False, False, 1),
    ("taylor2", "none", True, False, H),
    ("taylor2", "data", True, True, 2),
    ("taylor2", "fixed", False, False, H),
])
def test_forward_matches_quadratic_reference(feature_map, decay, normalize, rope, kv_heads):
    opts = (f"feature_map={feature_map},decay={decay},normalize={str(normalize).lower()},rope={str(rope).lower()},"
            f"n_kv_heads={kv_heads},chunk_size=16")
    if feature_map == "taylor2":
        opts += ",feature_dim=4"
    mixer = one_layer(f"linear_attention({opts})").blocks[0].mixer
    x_BTD = jnp.asarray(np.random.default_rng(0).normal(size=(2, T, D)), jnp.float32)
    ctx = ForwardContext("full", jnp.broadcast_to(jnp.arange(T), (2, T)))
    got = mixer(x_BTD, ctx).y_BTD
    want = reference_forward(mixer, x_BTD, feature_map=feature_map, decay=decay, normalize=normalize, rope=rope,
                             kv_heads=kv_heads)
    assert np.abs(want).max() > 1e-3  # the comparison is not vacuous
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_taylor2_inner_product_is_second_order_exp():
    rng = np.random.default_rng(1)
    d = 8
    q, k = rng.normal(size=(50, d)), rng.normal(size=(50, d))
    phi_q, phi_k = (np.asarray(taylor2_features(jnp.asarray(a, jnp.float32)), np.float64) for a in (q, k))
    assert phi_q.shape == (50, 1 + d + d * d)
    s = np.sum(q * k, -1) / np.sqrt(d)
    np.testing.assert_allclose(np.sum(phi_q * phi_k, -1), 1 + s + s**2 / 2, rtol=1e-5, atol=1e-5)
    # ... hence within the Taylor remainder of exp(s) for small s.
    small_q, small_k = 0.2 * q, 0.2 * k
    phi_small = [np.asarray(taylor2_features(jnp.asarray(a, jnp.float32)), np.float64) for a in (small_q, small_k)]
    s_small = np.sum(small_q * small_k, -1) / np.sqrt(d)
    error = np.abs(np.sum(phi_small[0] * phi_small[1], -1) - np.exp(s_small))
    assert np.all(error <= np.abs(s_small) ** 3 / 6 * np.exp(np.abs(s_small)) + 1e-6)


@pytest.mark.parametrize("plan", ["linear_attention", "linear_attention(decay=learned,n_kv_heads=2)", "simple_gla",
                                  "retnet(n_kv_heads=1)", "based(feature_dim=4)"])
def test_summary_matches_closed_form(plan):
    layers, vocab, mlp, seq = 2, 97, 64, 32
    cfg = ModelConfig(vocab_size=vocab, d_model=D, n_layers=layers, n_heads=H, mlp_hidden=mlp,
                      plan=f"{plan}*{layers}", tie_embeddings=False)
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    kv = 2 if "n_kv_heads=2" in plan else 1 if "n_kv_heads=1" in plan else H
    qk = 4 if plan.startswith("based") else E  # q/k width per head
    phi = 1 + 4 + 16 if plan.startswith("based") else E  # feature width
    normalized = plan.startswith(("linear_attention", "based"))
    data_decay = plan == "simple_gla"
    projections = D * H * qk + D * kv * qk + D * kv * E + H * E * D
    mixer_params = (projections + (D * H + H if data_decay else 0) + (H if "learned" in plan else 0)
                    + (0 if normalized else E))  # data-decay proj, learned decay, output RMSNorm scale
    assert s.total_params == vocab * D + layers * (mixer_params + 3 * D * mlp + 2 * D) + D + D * vocab
    assert s.kv_cache_bytes_per_token == 0  # constant-size state
    mixer_flops = 2 * projections + (2 * D * H if data_decay else 0) + 4 * H * phi * (E + normalized)
    assert s.flops_per_token == layers * (mixer_flops + 2 * 3 * D * mlp) + 2 * D * vocab


def test_aliases_are_linear_attention_with_fixed_options():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)), jnp.int32)
    for alias, explicit in (("retnet", "linear_attention(feature_map=identity,decay=fixed,normalize=false)"),
                            ("simple_gla", "linear_attention(feature_map=identity,decay=data,normalize=false)"),
                            ("based", "linear_attention(feature_map=taylor2,normalize=true)")):
        np.testing.assert_array_equal(one_layer(alias)(tokens).logits_BTV, one_layer(explicit)(tokens).logits_BTV)


def test_decays_start_at_retnet_gammas():
    gammas = 1 - 2.0 ** (-5.0 - np.arange(H))
    learned = one_layer("linear_attention(decay=learned)").blocks[0].mixer
    np.testing.assert_allclose(np.exp(-softplus(np.asarray(learned.decay_logit[...], np.float64))), gammas,
                               rtol=1e-6)
    data = one_layer("simple_gla").blocks[0].mixer
    np.testing.assert_allclose(np.exp(-softplus(np.asarray(data.decay_proj.bias[...], np.float64))), gammas,
                               rtol=1e-6)


@pytest.mark.parametrize("plan, message", [
    ("linear_attention(feature_map=softmax)", "feature_map"),
    ("linear_attention(decay=cosine)", "decay"),
    ("based(feature_dim=0)", "feature_dim=0"),
    ("linear_attention(feature_dim=4)", "feature_dim=4 .*taylor2"),
    ("linear_attention(feature_map=identity)", "normalize=true .*elu1 or taylor2"),
    ("linear_attention(chunk_size=24)", "chunk_size=24 .*power of 2"),
    ("linear_attention(n_kv_heads=3)", "n_kv_heads=3 must divide n_heads=4"),
    ("based(feature_dim=3,rope=true)", "must be even"),
])
def test_bad_config_fails_at_construction(plan, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=50, d_model=D, n_layers=1, n_heads=H, plan=plan)


@pytest.mark.parametrize("plan", ["linear_attention", "retnet(rope=true)", "simple_gla", "based(feature_dim=4)"])
def test_packed_documents_equal_separate_runs(plan):
    """Two documents packed in one row (segment ids, positions restarting at the second) give the model's logits of
    each document run alone; the second crosses a chunk boundary."""
    model = one_layer(plan.replace(")", ",chunk_size=16)") if "(" in plan else f"{plan}(chunk_size=16)")
    split = 9
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (1, T)), jnp.int32)
    segments = jnp.asarray(np.repeat([5, 2], [split, T - split])[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(split), np.arange(T - split)])[None])
    logits = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw).logits_BTV)  # one compile per call, not per op
    packed = logits(model, tokens, segment_ids_BT=segments, positions_BT=positions)
    # Each document alone, right-padded into one batch (padding after a causal sequence changes none of its logits).
    docs = jnp.stack([jnp.pad(tokens[0, :split], (0, T - 2 * split)), tokens[0, split:]])
    separate = logits(model, docs)
    np.testing.assert_allclose(packed[0, :split], separate[0, :split], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[0, split:], separate[1], rtol=1e-5, atol=1e-5)
