"""Linear attention (linear_attention / retnet / simple_gla / lightning / based) specifics, packed documents
included; the registry-wide contract is in test_mixer_contract.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.layers import apply_rope, taylor2_features
from attnzoo.mixers.base import ForwardContext

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
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "taylor2":  # Based: [1, x / d^(1/4), x (x) x / sqrt(2 d)]
        d = x.shape[-1]
        outer = np.einsum("...i,...j->...ij", x, x).reshape(*x.shape[:-1], d * d)
        return np.concatenate([np.ones_like(x[..., :1]), x / d**0.25, outer / np.sqrt(2 * d)], axis=-1)
    return x


def reference_log_decay(mixer, x, *, decay, gate_normalizer=1.0, layer_depth=None):
    """[B, T, H] log decays from the papers' formulas, float64."""
    b, t, _ = x.shape
    if decay == "fixed":  # RetNet: gamma_h = 1 - 2^(-5-h)
        per_head = np.log(1 - 2.0 ** (-5.0 - np.arange(H)))
    elif decay == "alibi":  # Lightning: lambda_h = exp(-s_h), s_h = 2^(-8h/H) for h = 1..H (H a power of 2)
        per_head = -(2.0 ** (-8.0 * np.arange(1, H + 1) / H))
        if layer_depth is not None:  # TransNormerLLM: s_h (1 - l / (L - 1) + 1e-5)
            per_head = per_head * (1 - layer_depth + 1e-5)
    elif decay == "learned":
        per_head = -softplus(np.asarray(mixer.decay_logit[...], np.float64))
    elif decay == "data":  # FLA: logsigmoid(x W + b) / gate_logit_normalizer
        z = x @ np.asarray(mixer.decay_proj.kernel[...], np.float64) + np.asarray(mixer.decay_proj.bias[...],
                                                                                  np.float64)
        return -softplus(-z) / gate_normalizer
    else:
        per_head = np.zeros(H)
    return np.broadcast_to(per_head, (b, t, H))


def reference_forward(mixer, x_BTD, *, feature_map, decay, normalize, rope, kv_heads, output_norm="rms",
                      output_gate=None, gate_normalizer=1.0, layer_depth=None):
    """o_t = sum_{s<=t} prod_{s<r<=t} gamma_r (phi(q_t).phi(k_s)) v_s, normalised by the same sum without v, or put
    through the output norm, then gated; quadratic and float64."""
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
    log_gamma = reference_log_decay(mixer, x, decay=decay, gate_normalizer=gate_normalizer, layer_depth=layer_depth)
    cum = np.cumsum(log_gamma, axis=1)  # [B, T, H]
    causal = np.tril(np.ones((t, t), bool))
    decay_BHTS = np.where(causal, np.exp(np.moveaxis(cum, 1, 2)[..., :, None] - np.moveaxis(cum, 1, 2)[..., None, :]),
                          0.0)
    weights_BHTS = np.einsum("bthp,bshp->bhts", phi_q, phi_k) * decay_BHTS
    o = np.einsum("bhts,bshf->bthf", weights_BHTS, v)
    eps = 1e-6  # the test model's norm_eps
    if normalize:
        o = o / (np.einsum("bhts->bth", weights_BHTS)[..., None] + 1e-6)
    else:
        o = o * (1.0 if feature_map == "taylor2" else E**-0.5)
        norm = mixer.out_norm
        if output_norm == "rms":  # per head, one scale shared by the heads (FLA)
            o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + eps) * np.asarray(norm.scale[...])
        elif output_norm == "group":  # GroupNorm, one group per head, affine per channel (RetNet)
            o = o - o.mean(-1, keepdims=True)
            o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + eps)
            o = o * np.asarray(norm.scale[...]) + np.asarray(norm.bias[...])
        else:  # SRMSNorm over all heads, no parameters (TransNormerLLM)
            o = o / np.sqrt(np.mean(o * o, axis=(-2, -1), keepdims=True) + eps)
    o = o.reshape(b, t, -1)
    if output_gate is not None:
        g = x @ p(mixer.g_proj)
        o = o * {"swish": g / (1 + np.exp(-g)), "sigmoid": 1 / (1 + np.exp(-g)), "identity": g}[output_gate]
    return o @ p(mixer.o_proj)


def randomize_norm(mixer, seed=3):
    """Output-norm parameters away from their init (ones, zeros), so a comparison checks where they enter."""
    rng = np.random.default_rng(seed)
    for name in ("scale", "bias"):
        param = getattr(mixer.out_norm, name, None)
        if param is not None:
            param.value = jnp.asarray(rng.normal(1.0 if name == "scale" else 0.0, 0.5, param.shape), param.dtype)


def mixer_and_reference(plan, **reference):
    """(the mixer's output, the float64 reference's) on one random input; output norms randomised first, so the
    comparison sees where their parameters enter."""
    mixer = one_layer(plan).blocks[0].mixer
    if mixer.out_norm is not None:
        randomize_norm(mixer)
    x_BTD = jnp.asarray(np.random.default_rng(0).normal(size=(2, T, D)), jnp.float32)
    ctx = ForwardContext("full", jnp.broadcast_to(jnp.arange(T), (2, T)))
    return np.asarray(mixer(x_BTD, ctx).y_BTD), reference_forward(mixer, x_BTD, **reference)


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
    got, want = mixer_and_reference(f"linear_attention({opts})", feature_map=feature_map, decay=decay,
                                    normalize=normalize, rope=rope, kv_heads=kv_heads)
    assert np.abs(want).max() > 1e-3  # the comparison is not vacuous
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("plan, reference", [
    # RetNet: Y = GroupNorm_h(retention(X W_Q, X W_K, X W_V), gamma_h, rotated q/k), out = (swish(X W_G) * Y) W_O
    ("retnet(n_kv_heads=2,chunk_size=16)",
     dict(feature_map="identity", decay="fixed", rope=True, output_norm="group", output_gate="swish")),
    # FLA simple_gla: g = logsigmoid(x W_gk + b) / 16, o = RMSNorm_h(o) * swish(x W_g)
    ("simple_gla(chunk_size=16)",
     dict(feature_map="identity", decay="data", gate_normalizer=16.0, rope=False, output_norm="rms",
          output_gate="swish")),
    # TransNormerLLM / Lightning: silu(q), silu(k), ALiBi-slope decays, o = SRMSNorm(o) * (x W_u)
    ("lightning(chunk_size=16)",
     dict(feature_map="silu", decay="alibi", rope=False, output_norm="srms", output_gate="identity")),
    ("lightning(chunk_size=16,layer_depth=0.5)",
     dict(feature_map="silu", decay="alibi", layer_depth=0.5, rope=False, output_norm="srms",
          output_gate="identity")),
    ("linear_attention(feature_map=silu,decay=data,gate_normalizer=4,normalize=false,output_norm=group,"
     "output_gate=sigmoid,chunk_size=16)",
     dict(feature_map="silu", decay="data", gate_normalizer=4.0, rope=False, output_norm="group",
          output_gate="sigmoid")),
    ("linear_attention(output_gate=swish,n_kv_heads=1,chunk_size=16)",
     dict(feature_map="elu1", decay="none", normalize=True, rope=False, kv_heads=1, output_gate="swish")),
])
def test_presets_match_their_papers(plan, reference):
    got, want = mixer_and_reference(plan, **{"normalize": False, "kv_heads": 2 if "n_kv_heads=2" in plan else H}
                                    | reference)
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
                                  "retnet(n_kv_heads=1)", "lightning", "based(feature_dim=4)"])
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
    gated = plan.startswith(("simple_gla", "retnet", "lightning"))  # W_g [D, H E]
    norm_params = {"retnet": 2 * H * E, "simple_gla": E, "lightning": 0}.get(plan.split("(")[0], 0)
    projections = D * H * qk + D * kv * qk + D * kv * E + H * E * D
    mixer_params = (projections + (D * H + H if data_decay else 0) + (H if "learned" in plan else 0)
                    + (D * H * E if gated else 0) + norm_params)  # data-decay proj, learned decay, gate, out norm
    assert s.total_params == vocab * D + layers * (mixer_params + 3 * D * mlp + 2 * D) + D + D * vocab
    assert s.kv_cache_bytes_per_token == 0  # constant-size state
    mixer_flops = (2 * projections + (2 * D * H * E if gated else 0) + (2 * D * H if data_decay else 0)
                   + 4 * H * phi * (E + normalized))
    assert s.flops_per_token == layers * (mixer_flops + 2 * 3 * D * mlp) + 2 * D * vocab


def test_aliases_are_linear_attention_with_fixed_options():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)), jnp.int32)
    for alias, explicit in (
            ("retnet", "linear_attention(feature_map=identity,rope=true,decay=fixed,normalize=false,output_norm=group,"
                       "output_gate=swish)"),
            ("simple_gla", "linear_attention(feature_map=identity,decay=data,gate_normalizer=16,normalize=false,"
                           "output_norm=rms,output_gate=swish)"),
            ("lightning", "linear_attention(feature_map=silu,decay=alibi,normalize=false,output_norm=srms,"
                          "output_gate=identity)"),
            ("based", "linear_attention(feature_map=taylor2,normalize=true)")):
        np.testing.assert_array_equal(one_layer(alias)(tokens).logits_BTV, one_layer(explicit)(tokens).logits_BTV)


def test_decays_start_at_retnet_gammas():
    gammas = 1 - 2.0 ** (-5.0 - np.arange(H))
    learned = one_layer("linear_attention(decay=learned)").blocks[0].mixer
    np.testing.assert_allclose(np.exp(-softplus(np.asarray(learned.decay_logit[...], np.float64))), gammas,
                               rtol=1e-6)
    for plan, tau in (("simple_gla", 16.0), ("linear_attention(decay=data)", 1.0)):  # exp(logsigmoid(b) / tau)
        bias = np.asarray(one_layer(plan).blocks[0].mixer.decay_proj.bias[...], np.float64)
        np.testing.assert_allclose(np.exp(-softplus(-bias) / tau), gammas, rtol=1e-6)


@pytest.mark.parametrize("n_heads, slopes", [
    (4, [2**-2, 2**-4, 2**-6, 2**-8]),  # 2^(-8h/H), h = 1..H
    (8, [2.0**-h for h in range(1, 9)]),
    (6, [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]),  # ALiBi's non-power-of-2 rule: H=4's, then H=8's odd ones
])
def test_lightning_decays_are_alibi_slopes(n_heads, slopes):
    """lambda_h = exp(-s_h); TransNormerLLM's layer l of L scales s_h by 1 - l / (L - 1) + 1e-5."""
    x_BTD = jnp.zeros((1, 3, 48))
    for depth, factor in ((None, 1.0), (0.0, 1 + 1e-5), (0.25, 0.75 + 1e-5), (1.0, 1e-5)):
        plan = "lightning" if depth is None else f"lightning(layer_depth={depth})"
        mixer = one_layer(plan, d_model=48, n_heads=n_heads).blocks[0].mixer
        np.testing.assert_allclose(np.exp(mixer.log_decay(x_BTD)[0, 0]), np.exp(-np.array(slopes) * factor),
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
    ("linear_attention(feature_map=silu)", "normalize=true .*with silu"),
    ("linear_attention(output_norm=group)", "output_norm=group .*normalize=false"),
    ("linear_attention(normalize=false,output_norm=layer)", "output_norm='layer' must be one of 'rms', 'group'"),
    ("linear_attention(output_gate=relu)", "output_gate='relu' must be one of 'swish', 'sigmoid', 'identity'"),
    ("retnet(layer_depth=0.5)", "layer_depth=0.5 .*decay=alibi"),
    ("lightning(layer_depth=1.5)", r"layer_depth=1.5 .*\[0, 1\]"),
    ("simple_gla(decay=learned)", "gate_normalizer=16.0 .*decay=data"),
    ("simple_gla(gate_normalizer=0)", "gate_normalizer=0 .*> 0"),
])
def test_bad_config_fails_at_construction(plan, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=50, d_model=D, n_layers=1, n_heads=H, plan=plan)


@pytest.mark.parametrize("plan", ["linear_attention", "retnet", "simple_gla", "lightning", "based(feature_dim=4)"])
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
