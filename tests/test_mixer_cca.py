"""CCA / CCGQA specifics (the registry-wide contract is in test_mixer_contract.py): the module against a direct
implementation of the paper's forward pass (arXiv 2510.04476, App. A listing and the official ZAYA1 code), the
closed-form costs of the paper's Table II, decode with the convolution and value-shift states, bad configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import LanguageModel, ModelConfig, get_mixer
from attnzoo.mixers.base import ForwardContext

BASE = dict(vocab_size=53, d_model=64, n_layers=1, n_heads=8, max_seq_len=32,
            kernels={"flash_attention": "xla", "decode_attention": "xla"})


def build_mixer(plan: str, seed: int = 0):
    cfg = ModelConfig(**BASE, plan=plan)
    mixer = get_mixer(cfg.layers[0].mixer).cls(cfg, cfg.layer_options[0], shared=None, rngs=nnx.Rngs(seed))
    # beta starts at 0; give it values so the key temperature exp(beta) is exercised.
    mixer.temp[...] = jnp.asarray(np.random.default_rng(seed).normal(0, 0.5, mixer.temp.shape), jnp.float32)
    return cfg, mixer


def mixer_forward(mixer, x_BTD, ctx: ForwardContext):
    return nnx.jit(lambda mixer, x_BTD: mixer(x_BTD, ctx).y_BTD)(mixer, x_BTD)  # one compile, not op by op


def reference_forward(mixer, opts, x_BTD, positions_BT, rope_base):
    """The paper's equations written out (PyTorch Conv1d semantics, dense softmax), from the module's weights."""
    b, t, d = x_BTD.shape
    h, k, e = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
    group = h // k
    n = (h + k) * e
    q0 = (x_BTD @ mixer.linear_q.kernel[...]).reshape(b, t, h, e)
    k0 = (x_BTD @ mixer.linear_k.kernel[...]).reshape(b, t, k, e)
    packed = jnp.concatenate([q0.reshape(b, t, h * e), k0.reshape(b, t, k * e)], -1)  # [B, T, N]

    # Conv1d weights in PyTorch's layout [out, in / groups, taps].
    convs = []
    for conv in list(mixer.conv_qk):
        taps, groups, width, _ = conv.weight.shape
        w = np.asarray(conv.weight[...])  # [tap, group, in, out]
        torch_w = np.zeros((n, width, taps), np.float32)
        for g in range(groups):
            for o in range(width):
                torch_w[g * width + o] = w[:, g, :, o].T
        convs.append((jnp.asarray(torch_w), conv.bias[...], width))
    pad = sum(w.shape[-1] - 1 for w, _, _ in convs)
    seq = jnp.concatenate([jnp.zeros((b, pad, n)), packed], axis=1)  # one left pad for both convs
    for w, bias, width in convs:
        taps, groups = w.shape[-1], n // width
        w_GOIJ = w.reshape(groups, width, width, taps)  # output channel g * width + o reads group g's inputs
        seq = jnp.stack([bias + jnp.einsum("bjgi,goij->bgo", seq[:, s:s + taps].reshape(b, taps, groups, width),
                                           w_GOIJ).reshape(b, n)
                         for s in range(seq.shape[1] - taps + 1)], axis=1)
    qc, kc = seq[..., :h * e].reshape(b, t, h, e), seq[..., h * e:].reshape(b, t, k, e)

    q, kk = qc, kc
    if opts.qk_mean:
        mean_q = (q0 + jnp.repeat(k0, group, axis=2)) / 2  # head i pairs with kv head i // group
        mean_k = mean_q.reshape(b, t, k, group, e).mean(3)
        q, kk = qc + mean_q, kc + mean_k

    shifted_x = jnp.pad(x_BTD[:, :-1], ((0, 0), (1, 0), (0, 0))) if opts.value_shift else x_BTD
    v = jnp.concatenate([x_BTD @ mixer.val_proj1.kernel[...], shifted_x @ mixer.val_proj2.kernel[...]], -1)
    v = v.reshape(b, t, k, e)

    q = q * (e**0.5 / jnp.linalg.norm(q, axis=-1, keepdims=True))
    kk = kk * (e**0.5 / jnp.linalg.norm(kk, axis=-1, keepdims=True)) * jnp.exp(mixer.temp[...])[:, None]

    r = round(opts.rope_fraction * e)
    if r:  # HF rotate-half on the first r channels
        inv_freq = 1.0 / rope_base ** (jnp.arange(0, r, 2) / r)
        freqs = positions_BT[..., None].astype(jnp.float32) * inv_freq
        cos, sin = (jnp.concatenate([f(freqs)] * 2, -1)[:, :, None] for f in (jnp.cos, jnp.sin))

        def rope(z):
            z_rot = z[..., :r]
            half = jnp.concatenate([-z_rot[..., r // 2:], z_rot[..., :r // 2]], -1)
            return jnp.concatenate([z_rot * cos + half * sin, z[..., r:]], -1)

        q, kk = rope(q), rope(kk)

    k_rep, v_rep = jnp.repeat(kk, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bthe,bshe->bhts", q, k_rep) / e**0.5
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    o = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(logits, -1), v_rep)
    return o.reshape(b, t, h * e) @ mixer.o_proj.kernel[...]


PLANS = ["cca", "ccgqa", "ccgqa(kv_compression=4)", "cca(convs=1,qk_mean=false,value_shift=false,rope_fraction=1.0)",
         "cca(convs=0,rope_fraction=0.0)", "cca(compression=2,head_dim=16,k_seq=3,k_ch=4)"]


@pytest.mark.parametrize("plan", PLANS)
def test_forward_matches_reference(plan):
    cfg, mixer = build_mixer(plan)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 64)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    y = mixer_forward(mixer, x, ForwardContext("full", positions))
    expected = reference_forward(mixer, cfg.layer_options[0], x, positions, cfg.rope_base)
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=5e-5)


def test_packed_documents_restart_convs_and_value_shift():
    """With segment ids, each document equals the reference run on that document alone (positions restarting)."""
    cfg, mixer = build_mixer("ccgqa(k_seq=3,k_ch=3)", seed=2)
    lengths = (5, 2, 5)  # longer and shorter than the 4 rows of conv history
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, sum(lengths), 64)), jnp.float32)
    segments = jnp.asarray(np.repeat(np.arange(3), lengths))[None]
    positions = jnp.concatenate([jnp.arange(n) for n in lengths])[None]
    y = mixer_forward(mixer, x, ForwardContext("full", positions, segment_ids_BT=segments))
    start = 0
    for n in lengths:
        doc = reference_forward(mixer, cfg.layer_options[0], x[:, start:start + n], positions[:, start:start + n],
                                cfg.rope_base)
        np.testing.assert_allclose(y[:, start:start + n], doc, rtol=2e-4, atol=5e-5)
        start += n


def test_decode_past_prompts_equals_full_forward():
    """Conv states of 5 rows (layer 0) and 2 rows without value shift (layer 1), prompts shorter and longer than
    them; then 1, 3, 1, 1 tokens per decode call."""
    plan = "cca(k_seq=4,k_ch=3),ccgqa(convs=1,k_seq=3,value_shift=false)"
    model = LanguageModel(ModelConfig(**{**BASE, "d_model": 32, "n_heads": 4, "n_layers": 2, "plan": plan}),
                          rngs=nnx.Rngs(0))
    run = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw), static_argnames="mode")
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 53, (3, 12)), jnp.int32)
    full = run(model, tokens).logits_BTV
    prompt_lengths = jnp.array([1, 4, 6], jnp.int32)
    padded = jnp.where(jnp.arange(12)[None] < prompt_lengths[:, None], tokens, 0)
    out = run(model, padded, caches=model.init_caches(3, 12), lengths_B=prompt_lengths, mode="prefill")
    caches, pos = out.caches, prompt_lengths
    for chunk in (1, 3, 1, 1):
        pos_BC = pos[:, None] + jnp.arange(chunk)
        out = run(model, jnp.take_along_axis(tokens, pos_BC, 1), caches=caches, mode="decode")
        np.testing.assert_allclose(out.logits_BTV, jnp.take_along_axis(full, pos_BC[..., None], 1),
                                   rtol=1e-4, atol=1e-4)
        caches, pos = out.caches, pos + chunk


@pytest.mark.parametrize("plan, c1, c2", [("cca", 4, 4), ("cca(compression=2)", 2, 2), ("ccgqa", 2, 8),
                                          ("ccgqa(kv_compression=4)", 2, 4)])
def test_summary_matches_closed_form(plan, c1, c2):
    """Paper Table II per layer (E = d_model): params 2E^2/C1 + 2E^2/C2 + conv, KV cache 2E/C2 per token,
    forward FLOPs (1/C1 + 1/C2) 4E^2 + 4 E ctx / C1 + conv (causal ctx halved), plus beta per kv head."""
    d, hd, layers, vocab, mlp, seq = 64, 8, 2, 97, 192, 32
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=8, mlp_hidden=mlp, plan=f"{plan}*{layers}",
                      tie_embeddings=False)
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    n, kv_heads = d // c1 + d // c2, d // c2 // hd
    conv = (n * 2 + n) + (n * hd * 2 + n)  # depthwise 2 taps + bias, per-head E x E 2 taps + bias (N channels)
    mixer = 2 * d * d // c1 + 2 * d * d // c2 + conv + kv_heads
    assert s.total_params == vocab * d + layers * (mixer + 3 * d * mlp + 2 * d) + d + d * vocab
    assert s.kv_cache_bytes_per_token == layers * 2 * d // c2 * 4
    conv_flops = 2 * (2 * n + n * hd * 2)
    mixer_flops = (1 / c1 + 1 / c2) * 4 * d * d + 4 * d * (seq + 1) / 2 / c1 + conv_flops
    flops = layers * (mixer_flops + 2 * 3 * d * mlp) + 2 * d * vocab
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)


def n_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("c", [2, 4, 8])
def test_cca_divides_kv_cache_and_attention_cost_of_mha_by_c(c):
    base = dict(vocab_size=50, d_model=64, n_layers=1, n_heads=8)
    mha = LanguageModel(ModelConfig(plan="mha", **base), rngs=nnx.Rngs(0)).blocks[0].mixer
    cca = LanguageModel(ModelConfig(plan=f"cca(compression={c})", **base), rngs=nnx.Rngs(0)).blocks[0].mixer
    assert mha.cache_bytes_per_token() == c * cca.cache_bytes_per_token()
    # The attention FLOPs' growth with the context, the projection FLOPs (seq 1: attention 4 D, resp. 4 D / C) and
    # the projection parameters (the convs and beta excluded) all shrink by C.
    growth_mha, growth_cca = (m.flops_per_token(1025) - m.flops_per_token(1) for m in (mha, cca))
    assert growth_mha == c * growth_cca
    conv_flops = 2 * n_params(cca.conv_qk) - 2 * sum(conv.bias.size for conv in cca.conv_qk)
    assert mha.flops_per_token(1) - 4 * 64 == c * (cca.flops_per_token(1) - conv_flops - 4 * 64 // c)
    assert n_params(mha) == c * (n_params(cca) - n_params(cca.conv_qk) - cca.temp.size)


def test_registered_ccgqa_is_the_papers_zaya1_geometry():
    """The registered ccgqa is the paper's MoE CCGQA and ZAYA1's: at D = 2048 with 16 heads of 128, C1 = 2 and
    C2 = 8 -> 8 query / 2 kv heads, projections 5.24M, 512 KV elements per token (8x below MHA's 4096), packed conv
    width 1280 in 10 head groups."""
    cfg = ModelConfig(vocab_size=50, d_model=2048, n_layers=1, n_heads=16, plan="ccgqa")
    mixer = get_mixer("ccgqa").cls(cfg, cfg.layer_options[0], shared=None, rngs=nnx.Rngs(0))
    assert (mixer.n_heads, mixer.n_kv_heads, mixer.head_dim) == (8, 2, 128)
    projections = sum(m.kernel.size for m in (mixer.linear_q, mixer.linear_k, mixer.val_proj1, mixer.val_proj2,
                                              mixer.o_proj))
    assert projections == 5_242_880
    assert mixer.cache_bytes_per_token() // 4 == 512
    assert mixer.conv_qk[1].weight.shape == (2, 10, 128, 128) and mixer.conv_qk[0].bias.shape == (1280,)


@pytest.mark.parametrize("plan, geometry", [("ccgqa", (4, 1, 16)), ("ccgqa(kv_compression=4)", (2, 1, 32)),
                                            ("cca", (1, 1, 32)), ("ccgqa(head_dim=8)", (8, 2, 8))])
def test_head_width_narrows_to_a_kv_latent_smaller_than_a_model_head(plan, geometry):
    """4 heads of 32 at D = 128: ccgqa's kv latent D / 8 = 16 is narrower than a head, so it holds one kv head of
    width 16 (and the query latent D / 2 four of them); where the latent holds whole model heads, E stays 32."""
    cfg = ModelConfig(vocab_size=50, d_model=128, n_layers=1, n_heads=4, plan=plan)
    mixer = get_mixer(cfg.layers[0].mixer).cls(cfg, cfg.layer_options[0], shared=None, rngs=nnx.Rngs(0))
    h, k, e = geometry
    assert (mixer.n_heads, mixer.n_kv_heads, mixer.head_dim) == geometry
    assert mixer.cache_bytes_per_token() == 2 * k * e * 4
    assert mixer.linear_q.kernel.shape == (128, h * e)


def test_diagnostics():
    model = LanguageModel(ModelConfig(**{**BASE, "plan": "ccgqa"}), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 53, (2, 9)), jnp.int32)
    assert model(tokens).metrics == {}
    metrics = model(tokens, diagnostics=True).metrics
    assert set(metrics) == {f"layer0/{k}" for k in ("sink_share", "entropy", "max_logit", "key_temperature")}
    # Logits are sqrt(E) cos(q, k) exp(beta) with beta = 0 at init: bounded by sqrt(E).
    assert 0 < float(metrics["layer0/max_logit"]) <= 8**0.5 + 1e-4
    assert float(metrics["layer0/key_temperature"]) == 1.0
    assert 0 < float(metrics["layer0/entropy"]) <= np.log(9) + 1e-4


@pytest.mark.parametrize("plan, message", [
    ("cca(compression=3)", "compression=3 must split d_model=64 .* allowed: 1, 2, 4, 8"),
    ("cca(head_dim=8,kv_compression=16)", "kv_compression=16 must split d_model=64 .* allowed: 1, 2, 4, 8"),
    ("ccgqa(compression=4,kv_compression=2)", "kv_compression=2 must be a multiple of compression=4"),
    ("cca(k_seq=0)", "k_seq=0 must be an integer >= 1"),
    ("cca(k_ch=-1)", "k_ch=-1 must be an integer >= 1"),
    ("cca(convs=3)", "convs=3 must be one of 0, 1, 2"),
    ("cca(rope_fraction=1.5)", r"rope_fraction=1.5 must lie in \[0, 1\]"),
    ("cca(rope_fraction=0.125)", "rope_fraction=0.125 rotates 1 of head_dim=8 channels; that must be even"),
    ("cca(head_dim=3,compression=16,kv_compression=16,rope_fraction=0.0)", "value_shift=true splits the 3 value"),
])
def test_bad_config_fails_at_config_time(plan, message):
    d_model = 48 if "head_dim=3" in plan else 64
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, "d_model": d_model, "plan": plan})
