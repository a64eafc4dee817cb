"""Mamba-2 (SSD) specifics (the registry-wide contract is in test_mixer_contract.py): the layer through the shared
chunked op against a step-by-step recurrence written here (arXiv 2405.21060 / state-spaces/mamba `mamba2.py`), the
reference's initialisations and parameter names, the prefill state, packed documents, an MLP-free stack that
trains, a 4k-token sequence with extreme dt, the closed-form accounting and bad configs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from attnzoo import LanguageModel, ModelConfig
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.mamba2 import Mamba2Options
from model_checks import train_losses
from ssm_reference import BASE, build_mixer, causal_conv1d, linear, mixer_forward, positions

def randomize_dynamics(mixer, seed: int):
    """Move A, dt, D, the conv bias and the norm weight off their initial values."""
    rng = np.random.default_rng(seed)

    def normal(mean, std, param):
        return jnp.asarray(rng.normal(mean, std, param.shape), jnp.float32)

    mixer.A_log[...] = mixer.A_log[...] + normal(0, 0.5, mixer.A_log)
    mixer.dt_bias[...] = normal(-1.0, 1.0, mixer.dt_bias)
    mixer.D[...] = normal(1.0, 0.5, mixer.D)
    mixer.norm.weight[...] = normal(1.0, 0.3, mixer.norm.weight)
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias[...] = normal(0, 0.3, mixer.conv1d.bias)


def reference_forward(mixer, x_BTD, dt_limit=(0.0, None)):
    """The paper's layer written out token by token from the module's parameters: in_proj split [z, xBC, dt],
    PyTorch Conv1d semantics over xBC (weight [C, 1, K], left zero padding) + SiLU, dt = softplus(dt + dt_bias)
    clamped into `dt_limit` (the reference's dt_limit; none: no upper bound), then a plain lax.scan over t of
    S_t[h] = exp(dt_t[h] A[h]) S_{t-1}[h] + B_t[g]^T (dt_t[h] x_t[h]), y_t[h] = C_t[g] S_t[h] + D[h] x_t[h] with
    g = h // (H / G), from S = 0; then the grouped RMSNorm of y * SiLU(z) and out_proj.
    Returns (output [B,T,D], the state after each token [B,T,H,N,P])."""
    b, t, _ = x_BTD.shape
    i, g, n, h, p = mixer.d_inner, mixer.n_groups, mixer.d_state, mixer.n_heads, mixer.head_dim
    channels = i + 2 * g * n
    zxbcdt = linear(mixer.in_proj, x_BTD)
    z, xbc, dt_raw = zxbcdt[..., :i], zxbcdt[..., i:i + channels], zxbcdt[..., i + channels:]
    xbc = jax.nn.silu(causal_conv1d(xbc, mixer.conv1d))
    x = xbc[..., :i].reshape(b, t, h, p)
    group_of_head = np.arange(h) // (h // g)
    B = xbc[..., i:i + g * n].reshape(b, t, g, n)[:, :, group_of_head]  # [B, T, H, N]
    C = xbc[..., i + g * n:].reshape(b, t, g, n)[:, :, group_of_head]
    dt = jnp.clip(jax.nn.softplus(dt_raw + mixer.dt_bias[...]), *dt_limit)
    A = -jnp.exp(mixer.A_log[...])

    def step(S, inputs):  # S [B, H, N, P]
        x_t, dt_t, B_t, C_t = inputs
        S = jnp.exp(dt_t * A)[..., None, None] * S + B_t[..., :, None] * (dt_t[..., None] * x_t)[..., None, :]
        return S, (jnp.einsum("bhn,bhnp->bhp", C_t, S, precision="highest"), S)

    _, (y, states) = jax.lax.scan(step, jnp.zeros((b, h, n, p)), tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)))
    y = jnp.moveaxis(y, 0, 1) + mixer.D[...][:, None] * x
    gated = (y.reshape(b, t, i) * jax.nn.silu(z)).reshape(b, t, g, i // g)
    normed = gated / jnp.sqrt(jnp.mean(gated**2, axis=-1, keepdims=True) + 1e-5)
    return linear(mixer.out_proj, normed.reshape(b, t, i) * mixer.norm.weight[...]), jnp.moveaxis(states, 0, 1)


@pytest.mark.parametrize("options, chunks", [
    # The recurrence itself, 5 does not divide T = 13, one past T, the default 256 (far past T).
    ("head_dim=16,d_state=8,n_groups=2", (1, 5, 16, 256)),
    ("head_dim=32,d_state=16,bias=true,conv_bias=false,d_conv=2", (4, 64)),  # n_groups = 1
])
def test_chunked_ssd_matches_sequential_recurrence(options, chunks):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 13, 32)), jnp.float32)
    expected = None
    for chunk in chunks:
        mixer = build_mixer(f"mamba2({options},chunk_size={chunk})")
        randomize_dynamics(mixer, seed=2)
        if expected is None:
            expected, _ = reference_forward(mixer, x)
        y = mixer_forward(mixer, x, ForwardContext("full", positions(2, 13)))
        np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5, err_msg=f"chunk_size={chunk}")


def test_defaults_are_the_papers():
    """d_state 128, chunk 256, no dt clamp (the reference's Mamba2 and transformers' Mamba2Config)."""
    options = Mamba2Options()
    assert (options.d_state, options.chunk_size, options.head_dim, options.expand, options.d_conv) == (128, 256, 64,
                                                                                                      2, 4)
    assert (options.dt_limit_min, options.dt_limit_max) == (0.0, None)


def test_dt_limit_clamps_dt():
    """dt_limit_min / dt_limit_max clamp dt after the softplus (transformers' time_step_limit): the layer equals the
    recurrence with clamped dt (one code path for full, prefill and decode) and differs from the unclamped layer."""
    x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 13, 32)), jnp.float32)
    mixer = build_mixer("mamba2(head_dim=16,d_state=8,chunk_size=4,dt_limit_min=0.2,dt_limit_max=0.6)")
    randomize_dynamics(mixer, seed=12)  # dt_bias ~ N(-1, 1): softplus spans well below 0.2 and above 0.6
    dt = jax.nn.softplus(mixer.dt_bias[...])
    assert float(dt.min()) < 0.2 and float(dt.max()) > 0.6
    expected, _ = reference_forward(mixer, x, dt_limit=(0.2, 0.6))
    unclamped, _ = reference_forward(mixer, x)
    assert float(jnp.abs(expected - unclamped).max()) > 1e-2
    np.testing.assert_allclose(mixer_forward(mixer, x, ForwardContext("full", positions(2, 13))), expected,
                               rtol=2e-4, atol=2e-5)


def test_short_calls_run_a_short_chunk(monkeypatch):
    """With the default chunk of 256, a call of T < 256 tokens runs the op at the smallest power of 2 >= max(T, 16)
    (a 1-token decode step does not pad to 256), longer calls at 256."""
    mixer = build_mixer("mamba2(head_dim=16,d_state=8)")
    assert mixer.chunk_size == 256
    chunks = []
    op = pallas_kernels.chunked_linear_attention

    def spy(*args, chunk_size, **kwargs):
        chunks.append(chunk_size)
        return op(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(pallas_kernels, "chunked_linear_attention", spy)
    for t in (1, 13, 17, 256, 300):
        x = jnp.zeros((1, t, 32), jnp.float32)
        jax.eval_shape(lambda x: mixer(x, ForwardContext("full", positions(1, t))).y_BTD, x)
    assert chunks == [16, 16, 32, 256, 256]
    assert build_mixer("mamba2(head_dim=16,d_state=8,chunk_size=5)").call_chunk_size(3) == 5  # never above it


def test_initialisation_follows_the_reference():
    mixer = build_mixer("mamba2(head_dim=8,d_state=8,n_groups=2,dt_min=0.01,dt_max=0.2)", d_model=128)
    i, h = 256, 32
    assert (mixer.d_inner, mixer.n_heads) == (i, h)
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == jnp.float32
    assert mixer.A_log.shape == mixer.D.shape == mixer.dt_bias.shape == (h,)
    A = np.asarray(jnp.exp(mixer.A_log[...]))  # A ~ U[1, 16]
    assert A.min() >= 1 - 1e-5 and A.max() <= 16 * (1 + 1e-5) and np.ptp(A) > 8
    np.testing.assert_array_equal(mixer.D[...], jnp.ones(h))
    np.testing.assert_array_equal(mixer.norm.weight[...], jnp.ones(i))
    dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.2 * (1 + 1e-5)
    assert np.ptp(np.log(dt)) > 0.6 * math.log(20) and abs(np.log(dt).mean() - math.log(0.01 * 0.2) / 2) < 0.6
    channels = i + 2 * 2 * 8
    assert mixer.conv1d.weight.shape == (channels, 1, 4) and float(jnp.abs(mixer.conv1d.weight[...]).max()) <= 0.5
    assert mixer.in_proj.kernel.shape == (128, i + channels + h)
    floored = build_mixer("mamba2(head_dim=16,dt_min=1e-6,dt_max=2e-6,dt_init_floor=1e-3,A_init_min=2.0,"
                          "A_init_max=2.0)")
    np.testing.assert_allclose(jax.nn.softplus(floored.dt_bias[...]), 1e-3, rtol=1e-4)
    np.testing.assert_allclose(jnp.exp(floored.A_log[...]), 2.0, rtol=1e-6)


def test_parameter_names_follow_the_released_checkpoints():
    mixer = build_mixer("mamba2(head_dim=16)")
    names = {".".join(map(str, path)) for path, _ in nnx.state(mixer, nnx.Param).flat_state()}
    assert names == {"in_proj.kernel", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                     "out_proj.kernel"}


def test_prefill_leaves_each_state_at_its_own_length():
    """The cache after a right-padded prefill (chunks of 4, prompts across chunk boundaries) holds each sequence's
    own ssm state and last d_conv - 1 xBC inputs."""
    mixer = build_mixer("mamba2(head_dim=16,d_state=8,n_groups=2,chunk_size=4)")
    randomize_dynamics(mixer, seed=5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 10, 32)), jnp.float32)
    lengths = jnp.array([1, 6, 10], jnp.int32)
    ctx = ForwardContext("prefill", positions(3, 10), lengths_B=lengths)
    cache = nnx.jit(lambda mixer, x: mixer(x, ctx, mixer.init_cache(3, 10)).cache)(mixer, x)
    _, states = reference_forward(mixer, x)
    channels = mixer.conv_channels
    for b, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(cache.ssm_BHNP[b], states[b, n - 1], rtol=2e-4, atol=2e-5)
        xbc = linear(mixer.in_proj, x[b, :n])[:, mixer.d_inner:mixer.d_inner + channels]
        window = jnp.concatenate([jnp.zeros((3, channels)), xbc])[-3:]
        np.testing.assert_allclose(cache.conv_BWC[b], window, rtol=1e-5, atol=1e-6)


def test_packed_documents_equal_separate_runs():
    """With segment ids (reused: documents are runs), each packed document equals the token-by-token reference run
    on that document alone: neither the conv nor the state crosses a document start."""
    mixer = build_mixer("mamba2(head_dim=16,d_state=8,n_groups=2,chunk_size=4)")
    randomize_dynamics(mixer, seed=3)
    lengths = (6, 2, 5)  # across chunk boundaries, one shorter than the conv window
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, sum(lengths), 32)), jnp.float32)
    segments = jnp.asarray(np.repeat([0, 1, 0], lengths))[None]
    y = mixer_forward(mixer, x, ForwardContext("full", positions(1, 13), segment_ids_BT=segments))
    starts = np.cumsum((0,) + lengths[:-1])
    # Each document alone, right-padded into one batch (padding comes after: it cannot change a causal output).
    docs = jnp.stack([jnp.pad(x[0, s:s + n], [(0, max(lengths) - n), (0, 0)]) for s, n in zip(starts, lengths)])
    expected, states = reference_forward(mixer, docs)
    for doc, (s, n) in enumerate(zip(starts, lengths)):
        np.testing.assert_allclose(y[0, s:s + n], expected[doc, :n], rtol=2e-4, atol=2e-5)
    # A packed prefill whose prompt (8 tokens) ends in the 2-token document keeps that document's state and conv
    # window only (its first row is before the document: zero), so decoding continues that document alone.
    ctx = ForwardContext("prefill", positions(1, 13), segment_ids_BT=segments, lengths_B=jnp.array([8]))
    cache = nnx.jit(lambda mixer, x: mixer(x, ctx, mixer.init_cache(1, 13)).cache)(mixer, x)
    np.testing.assert_allclose(cache.ssm_BHNP[0], states[1, 1], rtol=2e-4, atol=2e-5)
    xbc = linear(mixer.in_proj, x[0, 6:8])[:, mixer.d_inner:mixer.d_inner + mixer.conv_channels]
    np.testing.assert_allclose(cache.conv_BWC[0], jnp.concatenate([jnp.zeros_like(xbc[:1]), xbc]), rtol=1e-5,
                               atol=1e-6)


def test_mlp_free_stack_trains():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=32,
                      plan="mamba2(head_dim=16,d_state=16,chunk_size=16)[mlp=none]*4")
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    assert all(block.mlp is None for block in model.blocks)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, 64, (4, 17)), jnp.int32)
    losses = train_losses(model, tokens, 8)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1


def test_long_sequence_with_extreme_dt_is_finite():
    """4096 tokens; half the heads at dt ~ 2e-9 (decay 1: the state sums every input), half at dt ~ 20
    (decay exp(-20 A) underflows to 0)."""
    mixer = build_mixer("mamba2(head_dim=8,d_state=8,chunk_size=64)", d_model=16)
    h = mixer.n_heads
    mixer.dt_bias[...] = jnp.where(jnp.arange(h) < h // 2, -20.0, 20.0)
    t = 4096
    x = jnp.asarray(np.random.default_rng(9).normal(size=(1, t, 16)), jnp.float32)
    ctx = ForwardContext("full", positions(1, t))

    def loss(mixer, x):
        return jnp.mean(mixer(x, ctx).y_BTD ** 2)

    value, (grads, grad_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(mixer, x)
    assert np.isfinite(float(value)) and float(value) > 0
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(bool(jnp.isfinite(g).all()) for g in leaves) and bool(jnp.isfinite(grad_x).all())
    assert float(jnp.abs(grads.in_proj.kernel[...]).sum()) > 0 and float(jnp.abs(grads.A_log[...]).sum()) > 0


@pytest.mark.parametrize("plan, n, conv, expand, p, g, chunk, bias, conv_bias", [
    ("mamba2", 128, 4, 2, 64, 1, 256, False, True),
    ("mamba2(d_state=8,d_conv=2,expand=3,head_dim=16,n_groups=3,chunk_size=16,bias=true,conv_bias=false)",
     8, 2, 3, 16, 3, 16, True, False),
])
def test_summary_matches_closed_form(plan, n, conv, expand, p, g, chunk, bias, conv_bias):
    """Per layer, I = expand d, H = I / P, C = I + 2 G N: params d (I + C + H) (+ I + C + H) + C K (+ C) + 3 H
    + I + I d (+ d); FLOPs 2 d (I + C + H) + 2 C K + 2 I d + 2 G Q N + 2 Q I + 4 N I + 2 I with
    Q = min(chunk, seq); no per-token cache."""
    d, layers, vocab, mlp = 64, 2, 97, 192
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=4, mlp_hidden=mlp,
                      plan=f"{plan}*{layers}", tie_embeddings=False)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    i = expand * d
    h, c = i // p, i + 2 * g * n
    mixer = d * (i + c + h) + bias * (i + c + h) + c * conv + conv_bias * c + 3 * h + i + i * d + bias * d
    for seq in (8, 32, 4096):
        s = model.summary(seq_len=seq)
        assert dict(s.rows)["layer0 mixer (" + str(cfg.layers[0]) + ")"] == mixer
        assert s.total_params == vocab * d + layers * (mixer + 3 * d * mlp + 2 * d) + d + d * vocab
        assert s.kv_cache_bytes_per_token == 0
        q = min(chunk, seq)
        mixer_flops = 2 * d * (i + c + h) + 2 * c * conv + 2 * i * d + 2 * g * q * n + 2 * q * i + 4 * n * i + 2 * i
        assert s.flops_per_token == layers * (mixer_flops + 2 * 3 * d * mlp) + 2 * d * vocab
    # The decode state: d_conv - 1 xBC rows (float32 here) and the float32 ssm state, whatever the capacity.
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(model.init_caches(1, 7).layers))
    assert state_bytes == sum(x.nbytes for x in jax.tree.leaves(model.init_caches(1, 700).layers))
    assert state_bytes == layers * ((conv - 1) * c + h * n * p) * 4


@pytest.mark.parametrize("plan, message", [
    ("mamba2(d_state=0)", "d_state=0 must be an integer >= 1"),
    ("mamba2(d_conv=0)", "d_conv=0 must be an integer >= 1"),
    ("mamba2(expand=0)", "expand=0 must be an integer >= 1"),
    ("mamba2(head_dim=0)", "head_dim=0 must be an integer >= 1"),
    ("mamba2(n_groups=0)", "n_groups=0 must be an integer >= 1"),
    ("mamba2(chunk_size=0)", "chunk_size=0 must be an integer >= 1"),
    ("mamba2(head_dim=24)", r"head_dim=24 must divide d_inner = expand \* d_model = 64"),
    ("mamba2(head_dim=16,n_groups=3)", "n_groups=3 must divide the number of heads d_inner / head_dim = 4"),
    ("mamba2(dt_min=0.1,dt_max=0.01)", "dt_min=0.1 and dt_max=0.01 must satisfy 0 < dt_min < dt_max"),
    ("mamba2(dt_init_floor=-1.0)", "dt_init_floor=-1.0 must be >= 0"),
    ("mamba2(A_init_min=0.0)", "A_init_min=0.0 and A_init_max=16.0 must satisfy 0 < A_init_min <= A_init_max"),
    ("mamba2(A_init_min=4.0,A_init_max=2.0)", "A_init_min=4.0 and A_init_max=2.0 must satisfy"),
    ("mamba2(expand=1.5)", "expand=1.5 must be an integer"),
    ("mamba2(dt_limit_min=-0.1)", r"dt_limit_min=-0.1 and dt_limit_max=None must satisfy 0 <= dt_limit_min < "
                                  r"dt_limit_max"),
    ("mamba2(dt_limit_min=0.5,dt_limit_max=0.5)", "dt_limit_min=0.5 and dt_limit_max=0.5 must satisfy"),
])
def test_bad_config_fails_at_config_time(plan, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, "plan": plan})
