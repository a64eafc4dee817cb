"""MLA specifics (the registry-wide contract is in test_mixer_contract.py): an independent implementation of
DeepSeek-V2's equations, absorbed decode == naive decode == full forward, the DeepSeek-shape decode kernel call,
closed-form accounting and config errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig
from attnzoo.mixers import mla
from attnzoo.mixers.base import ForwardContext

XLA = {"flash_attention": "xla", "decode_attention": "xla"}
# Every width different from the others, so a swapped split or reshape cannot pass.
ODD_SHAPE = "q_lora_rank=12,kv_lora_rank=16,qk_nope_head_dim=6,qk_rope_head_dim=4,v_head_dim=10,n_heads=3"


def make_model(plan: str, **overrides) -> LanguageModel:
    fields = dict(vocab_size=61, d_model=32, n_layers=1, n_heads=4, max_seq_len=64, plan=plan, kernels=XLA)
    return LanguageModel(ModelConfig(**{**fields, **overrides}), rngs=nnx.Rngs(0))


def _rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_BT_R, positions_BT, base=10_000.0):
    """Rotate-half RoPE on the last axis, x [B, T, ..., R]."""
    half = x_BT_R.shape[-1] // 2
    angle = positions_BT[..., None].astype(np.float64) * base ** (-np.arange(half) / half)
    angle = angle.reshape(angle.shape[:2] + (1,) * (x_BT_R.ndim - 3) + (half,))
    x1, x2 = x_BT_R[..., :half], x_BT_R[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def reference_mla(mixer, x_BTD, positions_BT):
    """DeepSeek-V2 Eqs. 9-19 in float64 from the mixer's weights: explicit q^C, q^R, k^C, k^R, v^C, dense softmax.
    Returns (u [B,T,D], probabilities [B,H,T,S], scaled logits [B,H,T,S])."""
    def weight(linear):
        return np.asarray(linear.kernel[...], np.float64)  # [in, out]: y = x @ W

    d = mixer.dims
    x = np.asarray(x_BTD, np.float64)
    if d.q_lora:
        c_q = _rms_norm(x @ weight(mixer.q_a_proj), np.asarray(mixer.q_a_layernorm.scale[...]))
        w_q = weight(mixer.q_b_proj).reshape(d.q_lora, d.n_heads, d.nope + d.rope)
    else:
        c_q = x
        w_q = weight(mixer.q_proj).reshape(-1, d.n_heads, d.nope + d.rope)
    w_uq, w_qr = w_q[..., :d.nope], w_q[..., d.nope:]
    q_c = np.einsum("btc,chn->bthn", c_q, w_uq)
    q_r = _rope(np.einsum("btc,chr->bthr", c_q, w_qr), positions_BT)
    w_a = weight(mixer.kv_a_proj_with_mqa)
    w_dkv, w_kr = w_a[:, :d.kv_lora], w_a[:, d.kv_lora:]
    c_kv = _rms_norm(x @ w_dkv, np.asarray(mixer.kv_a_layernorm.scale[...]))
    k_r = _rope(x @ w_kr, positions_BT)  # one head shared by all query heads
    w_b = weight(mixer.kv_b_proj).reshape(d.kv_lora, d.n_heads, d.nope + d.v)
    k_c = np.einsum("bsc,chn->bshn", c_kv, w_b[..., :d.nope])
    v_c = np.einsum("bsc,chv->bshv", c_kv, w_b[..., d.nope:])
    logits = (np.einsum("bthn,bshn->bhts", q_c, k_c) + np.einsum("bthr,bsr->bhts", q_r, k_r)) / np.sqrt(
        d.nope + d.rope)
    t = x.shape[1]
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", p, v_c)
    return o.reshape(*x.shape[:2], -1) @ weight(mixer.o_proj), p, logits


@pytest.mark.parametrize("plan", ["mla", f"mla({ODD_SHAPE})"])
def test_full_forward_and_diagnostics_match_reference_equations(plan):
    mixer = make_model(plan).blocks[0].mixer
    b, t = 2, 9
    x_BTD = jnp.asarray(np.random.default_rng(0).normal(size=(b, t, 32)), jnp.float32)
    positions_BT = jnp.broadcast_to(jnp.arange(t) + 5, (b, t))  # an offset, so RoPE is not the identity at 0
    out = mixer(x_BTD, ForwardContext("full", positions_BT, diagnostics=True))
    u, p, logits = reference_mla(mixer, x_BTD, np.asarray(positions_BT))
    np.testing.assert_allclose(out.y_BTD, u, rtol=1e-4, atol=1e-5)
    visible = np.isfinite(logits)
    entropy = -np.sum(np.where(visible, p * np.log(np.where(visible, p, 1.0)), 0.0), -1)
    np.testing.assert_allclose(out.metrics["entropy"], entropy.mean(), rtol=1e-4)
    np.testing.assert_allclose(out.metrics["sink_share"], p[..., 0].mean(), rtol=1e-4)
    np.testing.assert_allclose(out.metrics["max_logit"], np.abs(np.where(visible, logits, 0)).max(), rtol=1e-4)
    assert mixer(x_BTD, ForwardContext("full", positions_BT)).metrics == {}


def test_absorbed_decode_equals_naive_decode_equals_full_forward():
    plan = f"mla({ODD_SHAPE},decode={{}})*2"
    models = {path: make_model(plan.format(path), n_layers=2) for path in ("absorbed", "naive")}
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (3, 12)), jnp.int32)
    full = models["absorbed"](tokens).logits_BTV
    np.testing.assert_array_equal(models["naive"](tokens).logits_BTV, full)  # same weights, same training path
    prompt_lengths = jnp.array([2, 6, 1], jnp.int32)  # batched, different prompt lengths (right-padded)
    padded = jnp.where(jnp.arange(12)[None] < prompt_lengths[:, None], tokens, 7)
    rows = jnp.arange(3)
    decoded = {}
    for path, model in models.items():
        caches = model(padded, caches=model.init_caches(3, 12), lengths_B=prompt_lengths, mode="prefill").caches
        step_logits = []
        for step in range(3):  # token by token, each sequence at its own offset
            out = model(tokens[rows, prompt_lengths + step][:, None], caches=caches, mode="decode")
            caches = out.caches
            step_logits.append(out.logits_BTV[:, 0])
        pos_BC = prompt_lengths[:, None] + 3 + jnp.arange(3)  # then three tokens in one call
        chunk = model(jnp.take_along_axis(tokens, pos_BC, 1), caches=caches, mode="decode").logits_BTV
        decoded[path] = jnp.concatenate([jnp.stack(step_logits, 1), chunk], axis=1)
    positions_BC = prompt_lengths[:, None] + jnp.arange(6)
    expected = jnp.take_along_axis(full, positions_BC[..., None], axis=1)
    np.testing.assert_allclose(decoded["absorbed"], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(decoded["naive"], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(decoded["absorbed"], decoded["naive"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["absorbed", "naive"])
def test_deepseek_shape_kernel_calls(path, monkeypatch):
    """DeepSeek-V2/V3 widths (kv_lora 512, rope 64, nope 128, v 128): prefill runs MHA at 192 / 128; absorbed
    decode is one latent head at 576 / 512, naive decode per-head 192 / 128; the scale is 1/sqrt(192) in each."""
    calls = []

    def spy(function):
        def record(q, k, v, *args, scale, **kwargs):
            calls.append((function.__name__, q.shape, k.shape, v.shape, scale))
            return function(q, k, v, *args, scale=scale, **kwargs)
        return record

    monkeypatch.setattr(mla, "attention", spy(mla.attention))
    monkeypatch.setattr(mla, "cached_attention", spy(mla.cached_attention))
    model = make_model(f"mla(n_heads=2,kv_lora_rank=512,qk_rope_head_dim=64,qk_nope_head_dim=128,"
                       f"v_head_dim=128,decode={path})")
    caches = model(jnp.array([[1, 2, 3]]), caches=model.init_caches(1, 4), mode="prefill").caches
    assert caches.layers[0].latent_BSKE.shape == (1, 4, 1, 576)
    model(jnp.array([[4]]), caches=caches, mode="decode")
    decode_shapes = {"absorbed": ((1, 1, 2, 576), (1, 4, 1, 576), (1, 4, 1, 512)),
                     "naive": ((1, 1, 2, 192), (1, 4, 2, 192), (1, 4, 2, 128))}[path]
    assert calls == [("attention", (1, 3, 2, 192), (1, 3, 2, 192), (1, 3, 2, 128), 192**-0.5),
                     ("cached_attention", *decode_shapes, 192**-0.5)]


@pytest.mark.parametrize("options, q_lora, dtype", [("", 0, "float32"),
                                                     ("(q_lora_rank=24,v_head_dim=12)", 24, "float32"),
                                                     ("", 0, "bfloat16")])
def test_summary_matches_closed_form(options, q_lora, dtype):
    d, h, hd, layers, vocab, mlp, seq = 64, 4, 16, 2, 97, 192, 32
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=h, mlp_hidden=mlp, dtype=dtype,
                      plan=f"mla{options}*{layers}", tie_embeddings=False)
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    # Defaults from the head width 16: d_c = 4 * 16, d_h = 16, d_h^R = 8, d_v = 16 unless given.
    kv_lora, nope, rope, v = 4 * hd, hd, hd // 2, 12 if "v_head_dim" in options else hd
    q_weights = d * q_lora + q_lora * h * (nope + rope) if q_lora else d * h * (nope + rope)
    weights = q_weights + d * (kv_lora + rope) + kv_lora * h * (nope + v) + h * v * d
    attn_params = weights + q_lora + kv_lora  # + the RMSNorm scales of c^Q (if any) and c^KV
    assert s.total_params == vocab * d + layers * (attn_params + 3 * d * mlp + 2 * d) + d + d * vocab
    dtype_bytes = {"float32": 4, "bfloat16": 2}[dtype]
    assert s.kv_cache_bytes_per_token == layers * (kv_lora + rope) * dtype_bytes
    avg_ctx = (seq + 1) / 2
    attend = 2 * h * (nope + rope) * avg_ctx + 2 * h * v * avg_ctx
    flops = layers * (2 * weights + attend + 2 * 3 * d * mlp) + 2 * d * vocab
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)


@pytest.mark.parametrize("options, q_lora, v", [("", 0, 16), ("q_lora_rank=24,v_head_dim=12", 24, 12)])
def test_decode_flops_match_closed_form(options, q_lora, v):
    """One decoded token over S cached ones. Absorbed: projections + 2 h d_c (d_h + d_v) + 2 h ((d_c + d_h^R) + d_c) S;
    naive: projections + 2 S d_c h (d_h + d_v) + 2 h ((d_h + d_h^R) + d_v) S."""
    d, h, hd = 64, 4, 16
    kv_lora, nope, rope = 4 * hd, hd, hd // 2
    fields = dict(vocab_size=61, d_model=d, n_layers=1, n_heads=h, kernels=XLA)
    def layer(plan):  # shapes only: the count needs no values
        return nnx.eval_shape(lambda: LanguageModel(ModelConfig(**fields, plan=plan), rngs=nnx.Rngs(0))).blocks[0].mixer

    absorbed = layer(f"mla({options})")
    naive = layer(f"mla({options + ',' if options else ''}decode=naive)")
    q_weights = d * q_lora + q_lora * h * (nope + rope) if q_lora else d * h * (nope + rope)
    projections = 2 * (q_weights + d * (kv_lora + rope) + h * v * d)
    for s in (1, 37, 4096):
        absorbed_flops = projections + 2 * h * kv_lora * nope + 2 * h * kv_lora * v + 2 * h * (kv_lora + rope) * s \
            + 2 * h * kv_lora * s
        naive_flops = projections + 2 * s * kv_lora * h * (nope + v) + 2 * h * (nope + rope) * s + 2 * h * v * s
        assert absorbed.decode_flops_per_token(s) == naive.decode_flops_per_token(s, "absorbed") == absorbed_flops
        assert naive.decode_flops_per_token(s) == absorbed.decode_flops_per_token(s, "naive") == naive_flops
    with pytest.raises(ValueError, match="path='fast' must be 'absorbed' or 'naive'"):
        absorbed.decode_flops_per_token(8, "fast")


def test_default_cache_is_gqa_with_two_and_a_quarter_groups():
    """V2 Table 1: with d_c = 4 d_h and d_h^R = d_h / 2, MLA caches as much as GQA with 2.25 KV heads."""
    base = dict(vocab_size=61, d_model=64, n_layers=1, n_heads=4)
    mla_bytes = LanguageModel(ModelConfig(plan="mla", **base), rngs=nnx.Rngs(0)).summary().kv_cache_bytes_per_token
    mha_bytes = LanguageModel(ModelConfig(plan="mha", **base), rngs=nnx.Rngs(0)).summary().kv_cache_bytes_per_token
    assert mla_bytes * 4 == mha_bytes * 2.25


@pytest.mark.parametrize("options, names", [
    ("", {"q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"}),
    ("(q_lora_rank=8)", {"q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                         "kv_b_proj", "o_proj"}),
])
def test_parameter_names_follow_deepseek_checkpoints(options, names):
    mixer = make_model(f"mla{options}").blocks[0].mixer
    assert {path[0] for path, _ in nnx.to_flat_state(nnx.state(mixer, nnx.Param))} == names
    assert mixer.kv_a_proj_with_mqa.kernel.shape == (32, 32 + 4)  # d -> kv_lora + rope (head width 8)
    assert mixer.kv_b_proj.kernel.shape == (32, 4 * (8 + 8))  # kv_lora -> n_heads * (nope + v)


@pytest.mark.parametrize("options, message", [
    ("kv_lora_rank=0", r"kv_lora_rank=0 must be a positive integer"),
    ("kv_lora_rank=-8", r"kv_lora_rank=-8 must be a positive integer"),
    ("qk_rope_head_dim=5", r"qk_rope_head_dim=5 must be even"),
    ("q_lora_rank=-1", r"q_lora_rank=-1 must be >= 0"),
    ("v_head_dim=0", r"v_head_dim=0 must be a positive integer"),
    ("decode=fast", r"decode='fast' must be one of 'absorbed', 'naive'"),
])
def test_bad_config_fails_at_model_config(options, message):
    with pytest.raises(ValueError, match=r"plan: layer 0 \(mla\(.*\)\): .*" + message):
        ModelConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, plan=f"mla({options})")


def test_bf16_absorbed_decode_is_as_accurate_as_the_bf16_forward():
    """In bfloat16 the absorbed decode reassociates the products (q W_UK^T against the latent instead of q against
    decompressed keys), so it cannot equal the bf16 full forward bit for bit; what it must not do is lose accuracy:
    against the float32 model its error stays within twice the bf16 full forward's own error (measured 0.6 - 1.2x
    over three seeds; upcasting the absorbed products to float32 did not shrink it, so they stay in the compute
    dtype)."""
    plan = f"mla({ODD_SHAPE},decode=absorbed)*2"
    exact = make_model(plan, n_layers=2)
    bf16 = make_model(plan, n_layers=2, dtype="bfloat16")  # the same float32 parameters, bf16 compute
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 61, (4, 14)), jnp.int32)
    reference = np.asarray(exact(tokens).logits_BTV, np.float64)
    full_error = np.abs(np.asarray(bf16(tokens).logits_BTV, np.float64) - reference)[:, 6:].max()
    caches = bf16(tokens[:, :6], caches=bf16.init_caches(4, 14), mode="prefill").caches
    steps = []
    for position in range(6, 14):
        out = bf16(tokens[:, position:position + 1], caches=caches, mode="decode")
        caches = out.caches
        steps.append(np.asarray(out.logits_BTV[:, 0], np.float64))
    decode_error = np.abs(np.stack(steps, 1) - reference[:, 6:]).max()
    assert 0 < full_error and decode_error <= 2 * full_error, (decode_error, full_error)
