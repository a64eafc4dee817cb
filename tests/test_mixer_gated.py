"""Gated attention specifics (Qiu et al., arXiv 2505.06708); the registry-wide contract is in test_mixer_contract.py.

The reference below is written from the paper's equations: dense softmax attention by einsum, with the gate
act(X W_θ) applied by hand at the stated position (G1 SDPA output, G2 values, G3 keys, G4 queries, G5 dense
output), scores head-major ([heads, head_dim] in that order)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnzoo.mixers.gqa as gqa_module
from attnzoo import LanguageModel, ModelConfig
from attnzoo.layers import apply_rope
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.gated import GatedAttention
from attnzoo.mixers.gqa import GQAttention

B, T, D, H, K, E = 2, 7, 32, 4, 2, 8
VOCAB = 50


def config(plan: str, **overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, d_model=D, n_layers=1, n_heads=H, n_kv_heads=K, plan=plan,
                  kernels={"flash_attention": "xla", "decode_attention": "xla"})
    return ModelConfig(**{**fields, **overrides})


def build(plan: str, seed: int = 0, **overrides):
    cfg = config(plan, **overrides)
    mixer_cls = GatedAttention if plan.startswith("gated") else GQAttention
    return mixer_cls(cfg, cfg.layer_options[0], rngs=nnx.Rngs(seed)), cfg


def full_context(diagnostics: bool = False) -> ForwardContext:
    return ForwardContext("full", jnp.broadcast_to(jnp.arange(T), (B, T)), diagnostics=diagnostics)


def inputs(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, T, D))


ACT = {"sigmoid": lambda s: 1 / (1 + jnp.exp(-s)), "ns_sigmoid": lambda s: 0.5 + 0.5 / (1 + jnp.exp(-s)),
       "silu": lambda s: s / (1 + jnp.exp(-s)), "identity": lambda s: s}


def reference(mixer: GatedAttention, cfg: ModelConfig, x):
    opts = cfg.layer_options[0]
    weight = {name: getattr(mixer, name).kernel[...] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    score = mixer.gate_logits[...] if not opts.input_dependent else x @ mixer.gate_proj.kernel[...]
    g = ACT[opts.activation](score)

    def gate(y, heads):
        if opts.position == "G5":
            shaped = g
        elif opts.granularity == "headwise":
            shaped = g.reshape(g.shape[:-1] + (heads, 1))
        elif not opts.head_specific:
            shaped = g[..., None, :]
        else:
            shaped = g.reshape(g.shape[:-1] + (heads, E))
        return y + shaped if opts.additive else y * shaped

    def rms(y):
        return y / jnp.sqrt(jnp.mean(y * y, axis=-1, keepdims=True) + cfg.norm_eps) if opts.qk_norm else y

    q = (x @ weight["q_proj"]).reshape(B, T, H, E)
    k = (x @ weight["k_proj"]).reshape(B, T, K, E)
    v = (x @ weight["v_proj"]).reshape(B, T, K, E)
    q = gate(q, H) if opts.position == "G4" else q
    k = gate(k, K) if opts.position == "G3" else k
    v = gate(v, K) if opts.position == "G2" else v
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    q = apply_rope(rms(q), positions, base=cfg.rope_base)
    k = apply_rope(rms(k), positions, base=cfg.rope_base)
    k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    logits = jnp.einsum("bthe,bshe->bhts", q, k) / math.sqrt(E)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    visible = (j <= i) & (True if opts.window is None else j > i - opts.window)
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    o = jnp.einsum("bhts,bshe->bthe", probs, v)
    o = gate(o, H) if opts.position == "G1" else o
    y = o.reshape(B, T, H * E) @ weight["o_proj"]
    return gate(y, None) if opts.position == "G5" else y


CASES = ["", "granularity=headwise", "head_specific=false", "activation=silu", "activation=silu,additive=false",
         "activation=ns_sigmoid,window=3", "activation=identity", "input_dependent=false",
         "position=G2,granularity=headwise", "position=G2,head_specific=false", "position=G3,qk_norm=false",
         "position=G4,granularity=headwise,qk_norm=false", "position=G4,activation=silu", "position=G5",
         "qk_norm=false"]


@pytest.mark.parametrize("options", CASES)
def test_matches_reference_gate_at_each_position(options):
    mixer, cfg = build(f"gated({options})")
    if mixer.gate_logits is not None:  # away from the zero init, so the gate is not a constant 0.5
        mixer.gate_logits[...] = jax.random.normal(jax.random.key(2), mixer.gate_logits.shape)
    x = inputs()
    got = mixer(x, full_context()).y_BTD
    want = reference(mixer, cfg, x)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_paper_defaults_and_pairing():
    opts = config("gated").layer_options[0]
    assert (opts.position, opts.granularity, opts.head_specific, opts.activation, opts.additive,
            opts.input_dependent) == ("G1", "elementwise", True, "sigmoid", False, True)
    # Every model in the paper has QK-norm; GQA's own default stays off.
    assert opts.qk_norm and config("gated_headwise").layer_options[0].qk_norm
    assert not config("gqa").layer_options[0].qk_norm
    mixer, _ = build("gated")
    assert mixer.q_norm is not None and mixer.k_norm is not None
    assert config("gated(activation=silu)").layer_options[0].additive  # the paper's Y + SiLU(X W)
    assert config("gated_headwise").layer_options[0].granularity == "headwise"


@pytest.mark.parametrize("options, std", [("", 0.02), ("granularity=headwise,gate_init_std=0.05", 0.05),
                                         ("gate_init_std=none", 256**-0.5)])
def test_gate_weight_init_is_the_released_codes_normal_002(options, std):
    """The released code's gate is extra columns of q_proj, initialised N(0, 0.02^2) (initializer_range), not
    fan-in; gate_init_std=none gives attnzoo's fan-in 1/sqrt(D)."""
    cfg = config(f"gated({options})", d_model=256, n_heads=8, n_kv_heads=2)
    mixer = GatedAttention(cfg, cfg.layer_options[0], rngs=nnx.Rngs(0))
    kernel = np.asarray(mixer.gate_proj.kernel[...])
    assert abs(kernel.mean()) < 0.1 * std
    assert kernel.std() == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("options, in_kernel", [("granularity=headwise", True), ("", False),
                                                ("granularity=headwise,activation=silu", False)])
def test_headwise_output_gate_runs_in_the_kernel_epilogue(monkeypatch, options, in_kernel):
    """A headwise multiplicative G1 gate goes to the flash kernel as gate_BTH (Triton, interpreted on CPU); the
    result equals gating the attention output afterwards (the reference)."""
    seen, attention = [], gqa_module.attention

    def spy(*args, **kwargs):
        seen.append(kwargs["gate_BTH"])
        return attention(*args, **kwargs)

    monkeypatch.setattr(gqa_module, "attention", spy)
    mixer, cfg = build(f"gated({options})", kernels={"flash_attention": "triton" if in_kernel else "xla"})
    x = inputs()
    got = mixer(x, full_context()).y_BTD
    assert (seen[0] is not None) == in_kernel
    if in_kernel:
        np.testing.assert_allclose(seen[0], jax.nn.sigmoid(x @ mixer.gate_proj.kernel[...]), rtol=1e-6)
    np.testing.assert_allclose(got, reference(mixer, cfg, x), rtol=2e-5, atol=2e-5)


def gqa_twin(mixer: GatedAttention) -> GQAttention:
    """Plain GQA (with QK-norm, as the gated default) with the gated mixer's q/k/v/o and norm weights."""
    gqa, _ = build("gqa(qk_norm=true)", seed=7)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(gqa, name).kernel[...] = getattr(mixer, name).kernel[...]
    for name in ("q_norm", "k_norm"):
        nnx.update(getattr(gqa, name), nnx.state(getattr(mixer, name)))
    return gqa


@pytest.mark.parametrize("position", ["G1", "G2", "G3", "G4", "G5"])
def test_a_gate_of_one_is_plain_gqa(position):
    """sigmoid(30) == 1 in float32: the input-independent gate with its logits set by hand to 30 leaves GQA."""
    mixer, _ = build(f"gated(position={position},input_dependent=false)")
    mixer.gate_logits[...] = jnp.full(mixer.gate_logits.shape, 30.0)
    x = inputs()
    np.testing.assert_allclose(mixer(x, full_context()).y_BTD, gqa_twin(mixer)(x, full_context()).y_BTD,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("options, factor", [("", 0.5), ("granularity=headwise", 0.5), ("activation=silu", 1.0)])
def test_zero_gate_weights(options, factor):
    """W_θ = 0: the sigmoid gate halves GQA's output (the paper's 0.5 at init), additive SiLU(0) = 0 leaves it."""
    mixer, _ = build(f"gated({options})")
    mixer.gate_proj.kernel[...] = jnp.zeros_like(mixer.gate_proj.kernel[...])
    x = inputs()
    np.testing.assert_allclose(mixer(x, full_context()).y_BTD,
                               factor * gqa_twin(mixer)(x, full_context()).y_BTD, rtol=1e-6, atol=1e-7)


def test_decode_equals_full_forward_at_every_position():
    """The gate is applied to the new tokens before their keys / values are cached (the contract test covers the
    registered defaults; this stack covers the other positions, one per layer)."""
    plan = ("gated(position=G2),gated(position=G3),gated(position=G4,activation=silu),gated(position=G5),"
            "gated(head_specific=false,window=4)")
    model = LanguageModel(config(plan, n_layers=5), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 9)), jnp.int32)
    full = model(tokens).logits_BTV
    lengths = jnp.array([3, 5], jnp.int32)
    state = model(tokens, caches=model.init_caches(2, 9), lengths_B=lengths, mode="prefill").caches
    for chunk in (2, 1):  # two tokens in one call, then one
        pos_BC = state.lengths_B[:, None] + jnp.arange(chunk)
        out = model(jnp.take_along_axis(tokens, pos_BC, axis=1), caches=state, mode="decode")
        np.testing.assert_allclose(out.logits_BTV, jnp.take_along_axis(full, pos_BC[..., None], axis=1),
                                   rtol=1e-4, atol=1e-4)
        state = out.caches


@pytest.mark.parametrize("options, gate_width, gate_params", [
    ("", H * E, None), ("granularity=headwise", H, None), ("head_specific=false", E, None),
    ("position=G2", K * E, None), ("position=G3,granularity=headwise,qk_norm=false", K, None),
    ("position=G4", H * E, None), ("position=G5", D, None), ("input_dependent=false", 0, H * E)])
def test_summary_matches_closed_form(options, gate_width, gate_params):
    """GQA's closed form plus the gate: D x width weights and 2 D width FLOPs per token (input-independent: width
    parameters, no matmul FLOPs), and the QK-norm scales (2 E) where on."""
    layers, mlp, seq = 2, 96, 32
    cfg = config(f"gated({options})*{layers}", n_layers=layers, mlp_hidden=mlp, tie_embeddings=False)
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    attn = D * H * E + 2 * D * K * E + H * E * D
    gate = D * gate_width if gate_params is None else gate_params
    qk_norm = 0 if "qk_norm=false" in options else 2 * E
    assert s.total_params == (VOCAB * D + layers * (attn + gate + qk_norm + 3 * D * mlp + 2 * D) + D
                              + D * VOCAB)
    assert s.kv_cache_bytes_per_token == layers * 2 * K * E * 4
    flops = layers * (2 * (attn + D * gate_width) + 4 * H * E * (seq + 1) / 2 + 2 * 3 * D * mlp) + 2 * D * VOCAB
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)


@pytest.mark.parametrize("options, published_millions", [("", 201), ("granularity=headwise", 1.6),
                                                         ("position=G2", 25), ("position=G2,granularity=headwise",
                                                                               0.2), ("position=G5", 100)])
def test_added_parameters_match_table_1(options, published_millions):
    """The 15A2B MoE of Table 1 (24 layers, d 2048, 32 q / 4 kv heads of 128): 'added' parameters, in millions."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=2048, n_layers=1, n_heads=32, n_kv_heads=4, head_dim=128,
                      plan=f"gated({options})")

    def mixer_params(mixer_cls):
        abstract = nnx.eval_shape(lambda: mixer_cls(cfg, cfg.layer_options[0], rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))

    added = 24 * (mixer_params(GatedAttention) - mixer_params(GQAttention)) / 1e6
    assert added == pytest.approx(published_millions, rel=0.05, abs=0.01)


def test_diagnostics_report_gate_statistics_only_when_asked():
    mixer, _ = build("gated")
    x = inputs()
    gate = jax.nn.sigmoid(x @ mixer.gate_proj.kernel[...])
    metrics = mixer(x, full_context(diagnostics=True)).metrics
    assert set(metrics) == {"gate_mean", "gate_below_half", "sink_share", "entropy", "max_logit"}
    np.testing.assert_allclose(metrics["gate_mean"], gate.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["gate_below_half"], (gate < 0.5).mean(), rtol=1e-6)
    assert 0 < float(metrics["gate_below_half"]) < 1
    assert mixer(x, full_context()).metrics == {}
    silu, _ = build("gated(activation=silu)")
    assert "gate_below_half" not in silu(x, full_context(diagnostics=True)).metrics  # unbounded: no 0.5 threshold


@pytest.mark.parametrize("options, message", [
    ("position=G7", "position='G7' must be one of 'G1', 'G2', 'G3', 'G4', 'G5'"),
    ("granularity=channel", "granularity='channel' must be one of 'elementwise', 'headwise'"),
    ("activation=relu", "activation='relu' must be one of 'sigmoid', 'ns_sigmoid', 'silu', 'identity'"),
    ("activation=sigmoid,additive=true", "additive gates take activation silu or identity"),
    ("activation=identity,additive=false", "multiplicative gates take activation sigmoid or ns_sigmoid or silu"),
    ("granularity=headwise,head_specific=false", "head_specific=false .* needs granularity=elementwise"),
    ("position=G5,granularity=headwise", "position=G5 .* needs granularity=elementwise and head_specific=true"),
    ("position=G3,granularity=headwise,qk_norm=true", "RMSNorm would cancel"),
    ("position=G4,granularity=headwise", r"qk_norm=true \(the default\).*RMSNorm would cancel"),
    ("gate_init_std=0.0", r"gate_init_std=0.0 must be > 0"),
    ("input_dependent=false,gate_init_std=none", r"gate_init_std=None has no effect with input_dependent=false"),
    ("head_dim=7", "head_dim=7 must be even"),
])
def test_bad_config_fails_when_the_config_is_built(options, message):
    with pytest.raises(ValueError, match=message):
        config(f"gated({options})")
