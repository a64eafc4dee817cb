"""Mamba (S6) specifics (the registry-wide contract is in test_mixer_contract.py): both scan forms (values and
gradients) and the layer against a step-by-step recurrence written here (arXiv 2312.00752 / state-spaces/mamba
`mamba_simple.py`), the CPU's choice of form, the reference's initialisations, packed documents, prefill + decode
with several chunks, an MLP-free stack that trains, a 4k-token sequence with extreme dt, the closed-form accounting
and bad configs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_checks import train_losses
from ssm_reference import BASE, build_mixer, causal_conv1d, linear, mixer_forward, positions

from attnzoo import LanguageModel, ModelConfig
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.mamba import chunked_scan, selective_scan, sequential_scan


def randomize_dynamics(mixer, seed: int):
    """Move A, dt and D off their initial values so decays far from 1 (and D) are exercised."""
    rng = np.random.default_rng(seed)
    mixer.A_log[...] = mixer.A_log[...] + jnp.asarray(rng.normal(0, 0.5, mixer.A_log.shape), jnp.float32)
    mixer.dt_proj.bias[...] = jnp.asarray(rng.normal(-0.5, 1.0, mixer.dt_proj.bias.shape), jnp.float32)
    mixer.D[...] = jnp.asarray(rng.normal(1.0, 0.5, mixer.D.shape), jnp.float32)
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias[...] = jnp.asarray(rng.normal(0, 0.3, mixer.conv1d.bias.shape), jnp.float32)


def reference_forward(mixer, x_BTD):
    """The paper's layer written out token by token, from the module's parameters: PyTorch Conv1d semantics
    (weight [I, 1, K], left zero padding), then a plain lax.scan over t of h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,
    y_t = C_t h_t + D x_t, from h = 0. Returns (output [B,T,D], the state after each token [B,T,I,N])."""
    b, t, _ = x_BTD.shape
    i, n, r = mixer.d_inner, mixer.d_state, mixer.dt_rank
    xz = linear(mixer.in_proj, x_BTD)
    x, z = xz[..., :i], xz[..., i:]
    x = jax.nn.silu(causal_conv1d(x, mixer.conv1d))
    x_dbl = x @ mixer.x_proj.kernel[...]
    dt = jax.nn.softplus(linear(mixer.dt_proj, x_dbl[..., :r]))
    B, C = x_dbl[..., r:r + n], x_dbl[..., r + n:]
    A = -jnp.exp(mixer.A_log[...])

    def step(h, inputs):  # h [B, I, N]
        x_t, dt_t, B_t, C_t = inputs
        h = jnp.exp(dt_t[..., None] * A) * h + (dt_t * x_t)[..., None] * B_t[:, None, :]
        return h, (jnp.einsum("bin,bn->bi", h, C_t), h)

    _, (y, states) = jax.lax.scan(step, jnp.zeros((b, i, n)), tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)))
    y = jnp.moveaxis(y, 0, 1) + mixer.D[...] * x
    return linear(mixer.out_proj, y * jax.nn.silu(z)), jnp.moveaxis(states, 0, 1)


@pytest.mark.parametrize("options, chunks", [
    ("", (1, 5, 32)),  # the recurrence itself, a chunk that does not divide T = 13, one past it; same parameters
    ("d_state=4,d_conv=2,dt_rank=3,bias=true", (4,)),
    ("d_conv=1,conv_bias=false,expand=1", (13,)),
])
def test_chunked_scan_matches_sequential_recurrence(options, chunks):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 13, 32)), jnp.float32)
    expected = None
    for chunk in chunks:
        mixer = build_mixer(f"mamba({options + ',' if options else ''}chunk_size={chunk})")
        randomize_dynamics(mixer, seed=2)
        if expected is None:
            expected, _ = reference_forward(mixer, x)
        y = mixer_forward(mixer, x, ForwardContext("full", positions(2, 13)))
        np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5, err_msg=f"chunk_size={chunk}")


def step_by_step_scan(x_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h_BIN, segment_ids_BT):
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t, one token at a time; h restarts from 0 at each token
    whose segment id differs from the previous token's."""
    starts_BT = jnp.pad(segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1], [(0, 0), (1, 0)])

    def step(h_BIN, inputs):
        x_BI, dt_BI, B_BN, C_BN, start_B = inputs
        h_BIN = jnp.where(start_B[:, None, None], 0.0, h_BIN)
        h_BIN = jnp.exp(dt_BI[..., None] * A_IN) * h_BIN + (dt_BI * x_BI)[..., None] * B_BN[:, None]
        return h_BIN, jnp.einsum("bin,bn->bi", h_BIN, C_BN)

    h_BIN, y_TBI = jax.lax.scan(step, h_BIN, tuple(jnp.moveaxis(a, 1, 0) for a in
                                                   (x_BTI, dt_BTI, B_BTN, C_BTN, starts_BT)))
    return jnp.moveaxis(y_TBI, 0, 1), h_BIN


def scan_problem():
    """Inputs of a small scan with three packed documents across chunk boundaries, an initial state and large
    decays: one channel at dt A ~ -20..-300 per step (the state forgotten at every step), one with sudden jumps of
    that size among near-1 decays (where differences of cumulative sums would lose precision); and weights that make
    a scalar loss of both outputs."""
    b, t, i, n = 2, 13, 6, 4
    rng = np.random.default_rng(10)
    dt = np.log1p(np.exp(rng.normal(-0.5, 1.0, (b, t, i))))
    dt[..., 0] = 20.0
    dt[..., 1] = np.where(rng.random((b, t)) < 0.3, 20.0, 1e-3)
    A_IN = -np.exp(np.log(np.arange(1, n + 1))[None] + rng.normal(0, 0.5, (i, n)))
    args = tuple(jnp.asarray(a, jnp.float32) for a in (rng.normal(size=(b, t, i)), dt, A_IN, rng.normal(size=(b, t, n)),
                                                       rng.normal(size=(b, t, n)), rng.normal(size=(b, i, n))))
    segment_ids_BT = jnp.asarray([[0] * 4 + [1] * 6 + [2] * 3, [3] * 13])
    weights = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, i), (b, i, n)))
    return args, segment_ids_BT, weights


def scan_values_and_gradients(scan, problem):
    """(y, final h) and the gradients of sum(w_y y) + sum(w_h h) with respect to x, dt, A, B, C and h0."""
    args, segment_ids_BT, (y_weights, h_weights) = problem

    def loss(*args):
        y_BTI, h_BIN = scan(*args, segment_ids_BT=segment_ids_BT)
        return jnp.sum(y_BTI * y_weights) + jnp.sum(h_BIN * h_weights), (y_BTI, h_BIN)

    (_, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))(*args)
    return outputs + grads


@pytest.fixture(scope="module")
def scan_reference():
    problem = scan_problem()
    return problem, scan_values_and_gradients(step_by_step_scan, problem)


@pytest.mark.parametrize("scan, chunk", [
    (sequential_scan, 5),  # a chunk that does not divide T = 13
    (chunked_scan, 5),
    pytest.param(sequential_scan, 16, marks=pytest.mark.slow),  # one chunk past T
    pytest.param(chunked_scan, 16, marks=pytest.mark.slow),
    pytest.param(chunked_scan, 1, marks=pytest.mark.slow),  # the recurrence itself
], ids=lambda p: getattr(p, "__name__", p))
def test_scan_values_and_gradients_match_step_by_step(scan_reference, scan, chunk):
    """Both scan forms (`selective_scan` picks one per backend) against the recurrence: outputs and the gradients of
    every input, with packed documents, an initial state and large decays (`scan_problem`)."""
    problem, expected = scan_reference
    got = scan_values_and_gradients(lambda *a, **kw: scan(*a, chunk_size=chunk, **kw), problem)
    for name, value, want in zip(("y", "h", "dx", "ddt", "dA", "dB", "dC", "dh0"), got, expected):
        # A few float32 ulps of the largest entry: tight enough to fail decays from differences of cumsums (~1e-5).
        np.testing.assert_allclose(value, want, rtol=0, atol=2e-6 * float(jnp.abs(want).max()), err_msg=name)


@pytest.mark.parametrize("backend, chunked", [("cpu", False), ("gpu", True)])
def test_scan_form_follows_the_backend(backend, chunked, monkeypatch):
    """On CPU the layer's scan is the step-by-step form: no [B, Q, S, I, N] decays and no cumsum (XLA:CPU lowers a
    cumsum to a reduce-window, O(Q) adds per output), which made the chunked form ~30x slower there; elsewhere the
    chunked form."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # read when the scan is traced
    args, segment_ids_BT, _ = scan_problem()
    jaxpr = str(jax.make_jaxpr(lambda *a: selective_scan(*a, chunk_size=4, segment_ids_BT=segment_ids_BT))(*args))
    assert ("cumsum" in jaxpr) == chunked and "scan" in jaxpr


def test_initialisation_follows_the_reference():
    mixer = build_mixer("mamba(d_state=8,dt_min=0.01,dt_max=0.2)", d_model=64)
    i = 128
    assert mixer.dt_rank == math.ceil(64 / 16) == 4
    np.testing.assert_allclose(-jnp.exp(mixer.A_log[...]), -jnp.broadcast_to(jnp.arange(1, 9.0), (i, 8)), rtol=1e-6)
    assert mixer.A_log.dtype == mixer.D.dtype == jnp.float32
    np.testing.assert_array_equal(mixer.D[...], jnp.ones(i))
    dt = np.asarray(jax.nn.softplus(mixer.dt_proj.bias[...]))
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.2 * (1 + 1e-5)
    # Log-uniform: the log-dt spread covers most of [log 0.01, log 0.2], its mean near the middle.
    assert np.ptp(np.log(dt)) > 0.8 * math.log(20) and abs(np.log(dt).mean() - math.log(0.01 * 0.2) / 2) < 0.4
    weight, bound = mixer.dt_proj.kernel[...], 4**-0.5  # U(-R^-1/2, R^-1/2): std bound / sqrt(3)
    assert float(jnp.abs(weight).max()) <= bound and float(weight.std()) == pytest.approx(bound / 3**0.5, rel=0.1)
    assert mixer.conv1d.weight.shape == (i, 1, 4) and float(jnp.abs(mixer.conv1d.weight[...]).max()) <= 0.5
    # The floor clamps dt from below: dt_min under the floor gives dt >= floor.
    floored = build_mixer("mamba(dt_min=1e-6,dt_max=2e-6,dt_init_floor=1e-3)")
    np.testing.assert_allclose(jax.nn.softplus(floored.dt_proj.bias[...]), 1e-3, rtol=1e-4)


def assert_uniform(weight, bound):
    """Drawn from U(-bound, bound): inside it, reaching near its ends, with the uniform's std bound / sqrt(3)."""
    weight = np.asarray(weight, np.float64)
    assert np.abs(weight).max() <= bound * (1 + 1e-6) and np.abs(weight).max() > 0.95 * bound
    assert weight.std() == pytest.approx(bound / 3**0.5, rel=0.05)


@pytest.mark.parametrize("plan, branches", [("mamba*3", 6), ("mamba[mlp=none]*3", 3), ("mamba,mamba[mlp=none]*2", 4)])
def test_projections_have_the_reference_init(plan, branches):
    """PyTorch nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for in_proj / x_proj / out_proj with zero biases, out_proj
    divided by sqrt(residual branches: one per layer + one per MLP); rescale_prenorm_residual=false keeps it whole
    (transformers' MambaConfig default); dt_proj U(-s, s) or constant s with s = dt_scale / sqrt(dt_rank)."""
    d, i = 64, 128
    cfg = ModelConfig(**{**BASE, "d_model": d, "n_layers": 3, "plan": plan})
    mixer = LanguageModel(cfg, rngs=nnx.Rngs(0)).blocks[0].mixer
    assert_uniform(mixer.in_proj.kernel[...], d**-0.5)
    assert_uniform(mixer.x_proj.kernel[...], i**-0.5)
    assert_uniform(mixer.out_proj.kernel[...], i**-0.5 / branches**0.5)
    plain = build_mixer("mamba(bias=true,rescale_prenorm_residual=false,dt_scale=2.0)", d_model=d)
    assert_uniform(plain.out_proj.kernel[...], i**-0.5)
    np.testing.assert_array_equal(plain.in_proj.bias[...], 0.0)
    np.testing.assert_array_equal(plain.out_proj.bias[...], 0.0)
    assert_uniform(plain.dt_proj.kernel[...], 2.0 * 4**-0.5)
    constant = build_mixer("mamba(dt_init=constant,dt_scale=0.5)", d_model=d)
    np.testing.assert_array_equal(constant.dt_proj.kernel[...], 0.5 * 4**-0.5)


def test_parameter_names_follow_the_released_checkpoints():
    mixer = build_mixer("mamba")
    names = {".".join(map(str, path)) for path, _ in nnx.state(mixer, nnx.Param).flat_state()}
    assert names == {"in_proj.kernel", "conv1d.weight", "conv1d.bias", "x_proj.kernel", "dt_proj.kernel",
                     "dt_proj.bias", "A_log", "D", "out_proj.kernel"}


def test_packed_documents_restart_conv_and_state():
    """With segment ids, each document equals the reference run on that document alone."""
    mixer = build_mixer("mamba(chunk_size=4)")
    randomize_dynamics(mixer, seed=3)
    lengths = (6, 2, 5)  # across chunk boundaries, one shorter than the conv window
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, sum(lengths), 32)), jnp.float32)
    segments = jnp.asarray(np.repeat(np.arange(3), lengths))[None]
    y = mixer_forward(mixer, x, ForwardContext("full", positions(1, 13), segment_ids_BT=segments))
    starts = np.cumsum((0,) + lengths[:-1])
    # Each document alone, right-padded into one batch (padding comes after: it cannot change a causal output).
    docs = jnp.stack([jnp.pad(x[0, s:s + n], [(0, max(lengths) - n), (0, 0)]) for s, n in zip(starts, lengths)])
    expected, _ = reference_forward(mixer, docs)
    for doc, (s, n) in enumerate(zip(starts, lengths)):
        np.testing.assert_allclose(y[0, s:s + n], expected[doc, :n], rtol=2e-4, atol=2e-5)


def test_prefill_leaves_each_state_at_its_own_length():
    """The cache after a right-padded prefill holds each sequence's own state and last d_conv - 1 conv inputs."""
    mixer = build_mixer("mamba(chunk_size=3)")
    randomize_dynamics(mixer, seed=5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 10, 32)), jnp.float32)
    lengths = jnp.array([1, 4, 10], jnp.int32)
    ctx = ForwardContext("prefill", positions(3, 10), lengths_B=lengths)
    cache = nnx.jit(lambda mixer, x: mixer(x, ctx, mixer.init_cache(3, 10)).cache)(mixer, x)
    _, states = reference_forward(mixer, x)
    for b, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(cache.ssm_BIN[b], states[b, n - 1], rtol=2e-4, atol=2e-5)
        x_in = linear(mixer.in_proj, x[b, :n])[:, :mixer.d_inner]
        window = jnp.concatenate([jnp.zeros((3, mixer.d_inner)), x_in])[-3:]
        np.testing.assert_allclose(cache.conv_BPI[b], window, rtol=1e-5, atol=1e-6)


def test_decode_over_several_chunks_equals_full_forward():
    """Chunks of 2 (so prefill and multi-token decode cross chunk boundaries), d_conv = 3; prompts shorter and
    longer than the conv window; then 1 and 4 tokens per decode call."""
    model = LanguageModel(ModelConfig(**{**BASE, "plan": "mamba(chunk_size=2,d_conv=3)"}), rngs=nnx.Rngs(0))
    randomize_dynamics(model.blocks[0].mixer, seed=7)
    run = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw), static_argnames="mode")
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 53, (3, 12)), jnp.int32)
    full = run(model, tokens).logits_BTV
    prompt_lengths = jnp.array([1, 5, 7], jnp.int32)
    padded = jnp.where(jnp.arange(12)[None] < prompt_lengths[:, None], tokens, 0)
    out = run(model, padded, caches=model.init_caches(3, 12), lengths_B=prompt_lengths, mode="prefill")
    for b, n in enumerate(prompt_lengths.tolist()):
        np.testing.assert_allclose(out.logits_BTV[b, :n], full[b, :n], rtol=1e-4, atol=1e-4)
    caches, pos = out.caches, prompt_lengths
    for chunk in (1, 4):
        pos_BC = pos[:, None] + jnp.arange(chunk)
        out = run(model, jnp.take_along_axis(tokens, pos_BC, 1), caches=caches, mode="decode")
        np.testing.assert_allclose(out.logits_BTV, jnp.take_along_axis(full, pos_BC[..., None], 1),
                                   rtol=1e-4, atol=1e-4)
        caches, pos = out.caches, pos + chunk


def test_mlp_free_stack_trains():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=32, plan="mamba[mlp=none]*4")
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    assert all(block.mlp is None for block in model.blocks)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, 64, (4, 17)), jnp.int32)
    losses = train_losses(model, tokens, 8)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1


def test_long_sequence_with_extreme_dt_is_finite():
    """4096 tokens; half the channels at dt ~ 2e-9 (decay 1: the state sums every input), half at dt ~ 20
    (decay exp(-20 n) underflows to 0)."""
    mixer = build_mixer("mamba(d_state=8,chunk_size=32)", d_model=16)
    i = mixer.d_inner
    mixer.dt_proj.bias[...] = jnp.where(jnp.arange(i) < i // 2, -20.0, 20.0)
    t = 4096
    x = jnp.asarray(np.random.default_rng(9).normal(size=(1, t, 16)), jnp.float32)
    ctx = ForwardContext("full", positions(1, t))

    def loss(mixer, x):
        return jnp.mean(mixer(x, ctx).y_BTD ** 2)

    value, (grads, grad_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(mixer, x)
    assert np.isfinite(float(value)) and float(value) > 0
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert all(bool(jnp.isfinite(g).all()) for g in leaves) and bool(jnp.isfinite(grad_x).all())
    assert float(jnp.abs(grads.x_proj.kernel[...]).sum()) > 0 and float(jnp.abs(grads.A_log[...]).sum()) > 0


@pytest.mark.parametrize("plan, n, conv, expand, rank, bias, conv_bias", [
    ("mamba", 16, 4, 2, 4, False, True),
    ("mamba(d_state=8,d_conv=2,expand=3,dt_rank=7,bias=true,conv_bias=false)", 8, 2, 3, 7, True, False),
])
def test_summary_matches_closed_form(plan, n, conv, expand, rank, bias, conv_bias):
    """Per layer, I = expand d: params 2dI (+2I) + I K (+I) + I (R + 2N) + R I + I + I N + I + I d (+d);
    FLOPs 2 (2dI + I K + I (R + 2N) + R I + I d) + 9 I N + 2 I (scan, D skip, z gate); no per-token cache."""
    d, layers, vocab, mlp, seq = 64, 2, 97, 192, 32
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=4, mlp_hidden=mlp,
                      plan=f"{plan}*{layers}", tie_embeddings=False)
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    s = model.summary(seq_len=seq)
    i = expand * d
    mixer = (2 * d * i + bias * 2 * i + i * conv + conv_bias * i + i * (rank + 2 * n) + rank * i + i + i * n + i
             + i * d + bias * d)
    assert dict(s.rows)["layer0 mixer (" + str(cfg.layers[0]) + ")"] == mixer
    assert s.total_params == vocab * d + layers * (mixer + 3 * d * mlp + 2 * d) + d + d * vocab
    assert s.kv_cache_bytes_per_token == 0
    mixer_flops = 2 * (2 * d * i + i * conv + i * (rank + 2 * n) + rank * i + i * d) + 9 * i * n + 2 * i
    assert s.flops_per_token == layers * (mixer_flops + 2 * 3 * d * mlp) + 2 * d * vocab
    assert model.summary(seq_len=4096).flops_per_token == s.flops_per_token  # linear time: no context term
    # The decode state: d_conv - 1 conv rows (float32 here) and the float32 ssm state, whatever the capacity.
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(model.init_caches(1, 7).layers))
    assert state_bytes == sum(x.nbytes for x in jax.tree.leaves(model.init_caches(1, 700).layers))
    assert state_bytes == layers * ((conv - 1) * i + i * n) * 4


@pytest.mark.parametrize("plan, message", [
    ("mamba(d_state=0)", "d_state=0 must be an integer >= 1"),
    ("mamba(d_conv=0)", "d_conv=0 must be an integer >= 1"),
    ("mamba(expand=0)", "expand=0 must be an integer >= 1"),
    ("mamba(chunk_size=0)", "chunk_size=0 must be an integer >= 1"),
    ("mamba(dt_rank=0)", "dt_rank=0 must be an integer >= 1 or 'auto'"),
    ("mamba(dt_rank=full)", "dt_rank='full' must be an integer or one of 'auto'"),
    ("mamba(dt_min=0.1,dt_max=0.01)", "dt_min=0.1 and dt_max=0.01 must satisfy 0 < dt_min < dt_max"),
    ("mamba(dt_min=0.0)", "dt_min=0.0 and dt_max=0.1 must satisfy"),
    ("mamba(dt_init_floor=-1.0)", "dt_init_floor=-1.0 must be >= 0"),
    ("mamba(expand=1.5)", "expand=1.5 must be an integer"),
    ("mamba(dt_scale=0.0)", "dt_scale=0.0 must be > 0"),
    ("mamba(dt_init=normal)", "dt_init='normal' must be one of 'random', 'constant'"),
])
def test_bad_config_fails_at_config_time(plan, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**BASE, "plan": plan})
