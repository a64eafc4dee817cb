"""Titans (arXiv 2501.00663) specifics: lmm, titans_mag, titans_mac (the registry-wide contract is in
test_mixer_contract.py). The chunked memory against a token-by-token recurrence written here with autodiff inner
gradients (Eqs. 13-15 with gradients at the chunk-start weights, section 3.2), at chunk sizes that do and do not
divide the sequence; how the chunk size changes the result; the linear memory through the shared kernel; decode ==
full forward at chunk size 1 and across segment / chunk boundaries; the persistent prefix of MAG against an explicit
softmax; MAL as a plan; linear growth of a training step's memory; closed-form accounting; bad configs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import test_mixer_contract as contract
from model_checks import greedy_by_rescoring, train_losses
from ssm_reference import BASE, build_mixer, positions

from attnzoo import LanguageModel, ModelConfig, generate
from attnzoo.mixers.base import ForwardContext, average_context
from attnzoo.mixers.titans_memory import Gates, MemoryState, memory_layer_widths, scan_memory

B, T, H, E = 2, 13, 2, 8


def mlp(weights, x):
    for i, w in enumerate(weights):
        x = x @ w
        if i < len(weights) - 1:
            x = jax.nn.gelu(x)
    return x


def reference_memory(weights0, q, k, v, theta, eta, alpha, chunk, read_after=False):
    """Per sequence and head, one token at a time: y_t = M_{t-1}(q_t) (the memory before token t's update; M_t(q_t)
    with read_after), u_t = grad of ||M(k_t) - v_t||^2 at the weights of the chunk's start (jax.grad),
    S_t = eta_t S_{t-1} - theta_t u_t, M_t = (1 - alpha_t) M_{t-1} + S_t.
    q, k, v [B, T, H, E]; gates [B, T, H] (eta None: no momentum)."""
    def one_head(w0, q, k, v, theta, eta, alpha):
        def step(carry, xs):
            start, weights, momentum = carry
            t, q_t, k_t, v_t, theta_t, eta_t, alpha_t = xs
            start = jax.lax.cond(t % chunk == 0, lambda: weights, lambda: start)
            read_before = mlp(weights, q_t)
            grads = jax.grad(lambda w: jnp.sum((mlp(w, k_t) - v_t) ** 2))(start)
            momentum = [eta_t * s - theta_t * g for s, g in zip(momentum, grads)]
            weights = [(1 - alpha_t) * w + s for w, s in zip(weights, momentum)]
            return (start, weights, momentum), mlp(weights, q_t) if read_after else read_before

        xs = (jnp.arange(q.shape[0]), q, k, v, theta, eta, alpha)
        return jax.lax.scan(step, (w0, w0, [jnp.zeros_like(w) for w in w0]), xs)[1]

    eta = jnp.zeros_like(theta) if eta is None else eta
    per_head = jax.vmap(one_head, in_axes=(0, 1, 1, 1, 1, 1, 1), out_axes=1)  # heads
    return jax.jit(jax.vmap(per_head, in_axes=(None, 0, 0, 0, 0, 0, 0)))(weights0, q, k, v, theta, eta, alpha)


def random_memory_problem(seed, depth, momentum=True):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    def unit(x):
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    weights0 = [normal(H, p, q, scale=p**-0.5) for p, q in memory_layer_widths(E, depth, 2)]
    q, k, v = unit(normal(B, T, H, E)), unit(normal(B, T, H, E)), normal(B, T, H, E)
    theta = jnp.asarray(rng.uniform(0.025, 0.25, (B, T, H)), jnp.float32)
    eta = jnp.asarray(rng.uniform(0.3, 0.8, (B, T, H)), jnp.float32) if momentum else None
    alpha = jnp.asarray(rng.uniform(0.0, 0.2, (B, T, H)), jnp.float32)
    return weights0, q, k, v, theta, eta, alpha


def chunked_memory(weights0, q, k, v, theta, eta, alpha, chunk, use_kernel=False, implementation="xla",
                   lengths=None, **read):
    weights = tuple(jnp.broadcast_to(w, (B, *w.shape)) for w in weights0)
    state = MemoryState(weights, weights, tuple(jnp.zeros_like(w) for w in weights) if eta is not None else ())
    gates = Gates(theta, None if eta is None else jnp.log(eta), jnp.log1p(-alpha))
    return scan_memory(state, q, k, v, gates, lengths, chunk=chunk, track_start=lengths is not None,
                       implementation=implementation, use_kernel=use_kernel, **read)


@pytest.mark.parametrize("depth, momentum, chunks, read_after", [
    (2, True, (1, 4), False),  # the recurrence itself (the default read); 4 does not divide T = 13
    (2, True, (4,), True),
    (1, False, (5,), False),
    pytest.param(3, True, (3, T + 3), False, marks=pytest.mark.slow),  # one chunk longer than T
])
def test_chunked_memory_matches_token_by_token_recurrence(depth, momentum, chunks, read_after):
    problem = random_memory_problem(depth, depth, momentum)
    read = {"read_after": True} if read_after else {}  # the default reads before the update
    for chunk in chunks:
        expected = reference_memory(*problem, chunk, read_after=read_after)
        y, _ = chunked_memory(*problem, chunk, **read)
        np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-5, err_msg=f"chunk_size={chunk}")


def test_a_token_cannot_read_its_own_value():
    """The leak, closed: y_t reads the memory before token t is written, so changing v_t leaves y_0..y_t as they
    were and changes y_{t+1}; reading after the update (read_after), y_t moves with v_t."""
    weights0, q, k, v, theta, eta, alpha = random_memory_problem(5, 2)
    t, chunk = 5, 4  # t inside the second chunk

    @jax.jit
    def reads(values):  # (before, after the update)
        return tuple(chunked_memory(weights0, q, k, values, theta, eta, alpha, chunk, **read)[0]
                     for read in ({}, {"read_after": True}))

    (before, after), (before_changed, after_changed) = reads(v), reads(v.at[:, t].add(1.0))
    np.testing.assert_array_equal(before_changed[:, :t + 1], before[:, :t + 1])
    assert float(jnp.abs(before_changed[:, t + 1] - before[:, t + 1]).max()) > 1e-3
    assert float(jnp.abs(after_changed[:, t] - after[:, t]).max()) > 1e-3


def test_theta_is_the_step_size_on_the_squared_error():
    """One token into a matrix memory without momentum or decay: W_1 = W_0 - theta grad ||k W_0 - v||^2
    = W_0 - 2 theta k^T (k W_0 - v), written out (no factor 1/2 in the loss), through both chunk paths."""
    weights0, q, k, v, theta, _, alpha = random_memory_problem(11, 1, momentum=False)
    w0 = np.asarray(weights0[0], np.float64)
    k1, v1, theta1 = (np.asarray(x[:, 0], np.float64) for x in (k, v, theta))
    expected = w0[None] - 2 * theta1[..., None, None] * np.einsum(
        "bhp,bhq->bhpq", k1, np.einsum("bhp,hpq->bhq", k1, w0) - v1)
    for use_kernel in (False, True):
        _, state = chunked_memory(weights0, q[:, :1], k[:, :1], v[:, :1], theta[:, :1], None, alpha[:, :1] * 0, 1,
                                  use_kernel=use_kernel)
        np.testing.assert_allclose(state.weights[0], expected, rtol=1e-5, atol=1e-6, err_msg=f"kernel={use_kernel}")


def test_chunk_size_trades_gradient_freshness_for_parallelism():
    """The paper's trade-off, shown: inside a chunk every gradient is taken at the chunk's start weights, so outputs
    agree with the fully recurrent memory (chunk 1) only while the memory holds no more than the chunk's first token,
    and the memory fits the sequence's own pairs worse as chunks grow (staler gradients); the gap is reported, not
    hidden."""
    weights0, q, k, v, theta, eta, alpha = random_memory_problem(7, 2)
    y = {chunk: chunked_memory(weights0, q, k, v, theta, eta, alpha, chunk)[0] for chunk in (1, 4, 13)}
    for chunk in (4, 13):  # y_0 reads M_0 and y_1 holds token 0's gradient at M_0 either way; later reads differ
        np.testing.assert_allclose(y[chunk][:, :2], y[1][:, :2], rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(y[chunk][:, 2:] - y[1][:, 2:]).max()) > 1e-2

    def fit_loss(chunk):  # how well the final memory maps the sequence's keys to its values
        _, state = chunked_memory(weights0, k, k, v, theta, None, alpha * 0, chunk)
        return float(jnp.mean((jax.vmap(lambda w, x: jax.vmap(mlp, (0, 1), 1)(w, x))(state.weights, k) - v) ** 2))

    losses = [fit_loss(chunk) for chunk in (1, 4, 13)]
    assert losses[0] < losses[1] < losses[2], losses


def test_linear_memory_runs_through_the_shared_kernel():
    """memory_depth=1 without momentum: chunked_linear_attention (xla, and the Triton kernel interpreted) == the
    pure-JAX chunk, including the state left by right-padded lengths."""
    problem = random_memory_problem(3, 1, momentum=False)
    lengths = jnp.array([T, 6], jnp.int32)
    y, state = chunked_memory(*problem, 16, lengths=lengths)
    for implementation in ("xla", "triton"):
        y_kernel, state_kernel = chunked_memory(*problem, 16, use_kernel=True, implementation=implementation,
                                                lengths=lengths)
        np.testing.assert_allclose(y_kernel[0], y[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(y_kernel[1, :6], y[1, :6], rtol=1e-4, atol=1e-5)
        for a, b in zip(jax.tree.leaves(state_kernel), jax.tree.leaves(state)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    expected = reference_memory(*problem, 16)
    np.testing.assert_allclose(y[0], expected[0], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("mixer", [
    "lmm(chunk_size=1)",  # the fully recurrent memory
    "titans_mac(chunk_size=4,n_persistent=2)",  # prompts and decode steps cross segment boundaries
    pytest.param("titans_mag(chunk_size=5,window=3,memory_depth=1,momentum=false)", marks=pytest.mark.slow),
    pytest.param("lmm(chunk_size=5,memory_depth=3,d_conv=none,weight_decay=false)", marks=pytest.mark.slow),
])
def test_decode_equals_full_forward_across_chunks(mixer):
    assert contract.T > int(re.search(r"chunk_size=(\d+)", mixer).group(1)), "decode must cross a chunk boundary"
    contract.test_decode_with_cache_equals_full_forward(mixer)


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["titans_mac(chunk_size=4,n_persistent=2)", "titans_mag(chunk_size=3,window=2)"])
def test_multi_token_decode_across_chunks(mixer):
    assert contract.T > int(re.search(r"chunk_size=(\d+)", mixer).group(1)), "decode must cross a chunk boundary"
    contract.test_multi_token_decode_equals_full_forward(mixer)


def test_mag_attention_is_a_window_plus_persistent_prefix():
    """MAG's attention branch == softmax over [p (always visible) ; the last `window` tokens], written out."""
    mixer = build_mixer("titans_mag(window=3,n_persistent=2,rope=false)")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 32)), jnp.float32)
    got, _ = nnx.jit(lambda m, x: m.attend(x, ForwardContext("full", positions(2, 9)), None))(mixer, x)
    attn = mixer.attention
    q, k, v = attn.project(x)
    _, k_p, v_p = attn.project(mixer.persistent[...][None])
    k_all = jnp.concatenate([jnp.broadcast_to(k_p, (2, *k_p.shape[1:])), k], axis=1)
    v_all = jnp.concatenate([jnp.broadcast_to(v_p, (2, *v_p.shape[1:])), v], axis=1)
    group = attn.n_heads // attn.n_kv_heads
    k_all, v_all = jnp.repeat(k_all, group, axis=2), jnp.repeat(v_all, group, axis=2)
    logits = jnp.einsum("bthe,bshe->bhts", q, k_all) / np.sqrt(8)
    t, s = np.arange(9)[:, None], np.arange(-2, 9)[None, :]
    visible = (s < 0) | ((s <= t) & (s > t - 3))
    o = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), -1), v_all)
    np.testing.assert_allclose(got, attn.output(o), rtol=1e-5, atol=1e-6)


def test_mag_memory_reads_the_persistent_tokens_first():
    """MAG's two branches both run over [p || x] (Eqs. 26-28): the mixer equals its gate over the window attention
    and the memory run over the explicit concatenation, p's rows dropped, so token 0 already reads a memory that
    holds p (chunks of 4 counted from p's first row)."""
    mixer = build_mixer("titans_mag(window=3,n_persistent=2,chunk_size=4,memory_depth=1)")
    b, t, n_p = 2, 9, 2
    x = jnp.asarray(np.random.default_rng(1).normal(size=(b, t, 32)), jnp.float32)

    def explicit(mixer, x):
        y, _ = mixer.attend(x, ForwardContext("full", positions(b, t)), None)
        x_tilde = jnp.concatenate([jnp.broadcast_to(mixer.persistent[...], (b, n_p, 32)), x], axis=1)
        memory = mixer.memory(x_tilde, ForwardContext("full", positions(b, n_p + t))).y_BTD[:, n_p:]
        return mixer.combine(y, memory)

    got, expected = nnx.jit(lambda mixer, x: (mixer(x, ForwardContext("full", positions(b, t))).y_BTD,
                                              explicit(mixer, x)))(mixer, x)  # one compile
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_mal_plan_and_the_three_variants_generate():
    """MAL is a plan (the memory layer, then sliding-window attention); with MAG and MAC in one stack, generate()
    runs through the mixed caches (chunks and segments of 4 crossed) exactly as greedy re-scoring does."""
    plan = "lmm(chunk_size=4)[mlp=none],gqa(window=4),titans_mag(chunk_size=4,window=3),titans_mac(chunk_size=4)"
    cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, plan=plan,
                      kernels={"flash_attention": "xla", "decode_attention": "xla"})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    prompts = [[1, 2, 3, 4, 5], [6]]
    assert generate(model, prompts, max_new_tokens=5) == [greedy_by_rescoring(model, p, 5) for p in prompts]


@pytest.mark.slow
def test_mal_plan_trains():
    plan = "lmm(chunk_size=4)[mlp=none],gqa(window=4)"
    cfg = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, plan=plan)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 48, (4, 17)), jnp.int32)
    losses = train_losses(LanguageModel(cfg, rngs=nnx.Rngs(0)), tokens, 6)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def temp_bytes_of_memory_training(seq_len: int, chunk: int = 16) -> int:
    """Peak temporary memory of the gradient of a loss through the chunked memory (depth 2, momentum, decay), from
    XLA's compiled memory analysis: compiled, never run."""
    b, h, e = 1, 2, 8
    widths = memory_layer_widths(e, 2, 4)
    spec = jax.ShapeDtypeStruct

    def loss(weights, q, k, v, gates):
        state = MemoryState(weights, weights, tuple(jnp.zeros_like(w) for w in weights))
        y, _ = scan_memory(state, q, k, v, gates, None, chunk=chunk, track_start=False, implementation="xla",
                           use_kernel=True)
        return jnp.sum(y**2)

    weights = tuple(spec((b, h, p, q), jnp.float32) for p, q in widths)
    tokens = spec((b, seq_len, h, e), jnp.float32)
    gates = Gates(*(spec((b, seq_len, h), jnp.float32) for _ in range(3)))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(weights, tokens, tokens, tokens, gates).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_training_memory_grows_linearly_with_length():
    """At a fixed chunk size, doubling the sequence about doubles the peak temporary memory of a training step
    through the memory (each chunk is rematerialised, so only the carried state is kept per chunk): the increments
    64 -> 128 -> 256 tokens grow 2x (quadratic growth would be 4x)."""
    sizes = [temp_bytes_of_memory_training(t) for t in (64, 128, 256)]
    first, second = sizes[1] - sizes[0], sizes[2] - sizes[1]
    assert first > 0 and 1.6 < second / first < 2.4, sizes


def memory_size(e, depth, expansion):
    return sum(p * q for p, q in memory_layer_widths(e, depth, expansion))


def memory_flops(e, depth, expansion, chunk, momentum):
    """Per head and token: key forward 2|M|, key backward 2(|M| - |M_1|), h W 2|M|, intra-chunk 2 b sum(P + Q),
    fold 2|M|; with momentum h S and the fold into S 4|M|, gamma 2 b^2 + 2 b."""
    widths = memory_layer_widths(e, depth, expansion)
    size = memory_size(e, depth, expansion)
    flops = 2 * size + 2 * (size - e * widths[0][1]) + 2 * size + 2 * chunk * sum(p + q for p, q in widths) + 2 * size
    return flops + (4 * size + 2 * chunk**2 + 2 * chunk if momentum else 0)


@pytest.mark.parametrize("options, depth, expansion, chunk, momentum, decay, conv", [
    ("", 2, 4, 16, True, True, 4),
    ("memory_depth=1,chunk_size=4,momentum=false,weight_decay=false,d_conv=none", 1, 4, 4, False, False, 0),
    pytest.param("memory_depth=3,memory_expansion=2,d_conv=2", 3, 2, 16, True, True, 2, marks=pytest.mark.slow),
])
def test_summary_matches_closed_form(options, depth, expansion, chunk, momentum, decay, conv):
    """d = 32, H = 4 heads of E = 8 (K = 2 kv heads), one MLP-free layer, V = 61 (tied). lmm parameters:
    q, k, v, out-gate and o_proj 5 D H E, gates n_g H (D + 1), conv 3 H E (w + 1), M_0 H |M|, norm E. MAG adds GQA's
    D E (H + 2 K) + H E D, the N_p D persistent tokens and the gate's 2 D + D^2; MAC the same, its conv over H E
    channels only. FLOPs as docs/mixers/titans_memory.md and titans.md write them; the cache: MAG's KV per token, none for lmm / MAC."""
    d, h, e, kv, vocab, n_p, window = 32, 4, 8, 2, 61, 4, 64
    n_gates = 1 + momentum + decay
    size = memory_size(e, depth, expansion)
    he = h * e
    lmm_params = 5 * d * he + n_gates * h * (d + 1) + 3 * he * (conv + 1) * (conv > 0) + h * size + e
    attention_params = d * e * (h + 2 * kv) + he * d
    hybrid_extra = attention_params + n_p * d + 2 * d + d * d
    mac_params = lmm_params - 2 * he * (conv + 1) * (conv > 0) + hybrid_extra
    for seq in (8, 200):
        b = min(chunk, seq)
        projections = 2 * d * he * 4 + 2 * he * d + 2 * d * n_gates * h
        lmm_flops = projections + 2 * 3 * he * conv + h * memory_flops(e, depth, expansion, b, momentum)
        gqa_flops = 2 * d * e * (2 * h + 2 * kv) + 4 * he * average_context(seq, window)
        mag_flops = lmm_flops + gqa_flops + 4 * he * n_p + 2 * d * d
        n = n_p + 2 * b
        attend = n / b * (2 * d * e * (h + 2 * kv) + 4 * he * average_context(n, None))
        mac_flops = (projections + 2 * he * conv + h * memory_flops(e, depth, expansion, b, momentum) + 2 * d * he
                     + 2 * h * size + 4 * d * he + attend + 2 * he * d + 2 * d * d)
        for name, params, flops, cache in (("lmm", lmm_params, lmm_flops, 0),
                                           ("titans_mag", lmm_params + hybrid_extra, mag_flops, 2 * kv * e * 4),
                                           ("titans_mac", mac_params, mac_flops, 0)):
            plan = f"{name}({options})[mlp=none]" if options else f"{name}[mlp=none]"
            cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=1, n_heads=h, n_kv_heads=kv, plan=plan)
            s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
            assert dict(s.rows)[f"layer0 mixer ({cfg.layers[0]})"] == params, name
            assert s.flops_per_token == int(round(flops)) + 2 * d * vocab, name
            assert s.kv_cache_bytes_per_token == cache, name


@pytest.mark.parametrize("plan, message", [
    ("lmm(chunk_size=0)", "chunk_size=0 must be an integer >= 1"),
    ("lmm(memory_depth=0)", "memory_depth=0 must be an integer >= 1"),
    ("lmm(memory_expansion=0)", "memory_expansion=0 must be an integer >= 1"),
    ("lmm(max_lr=0.0)", "max_lr=0.0 must be > 0"),
    ("lmm(d_conv=0)", "d_conv=0 must be a positive integer"),
    ("titans_mag(window=0)", "window=0 must be an integer >= 1"),
    ("titans_mac(n_persistent=-1)", "n_persistent=-1 must be an integer >= 0"),
    ("titans_mac(chunk_size=-4)", "chunk_size=-4 must be an integer >= 1"),
    ("titans_mag(memory_depth=2.5)", "memory_depth=2.5 must be an integer"),
    ("titans_mac(segment=4)", "has no option segment"),
])
def test_bad_options_fail_when_the_config_is_built(plan, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig(**{**BASE, "plan": plan})


def test_odd_attention_head_dim_with_rope_fails_at_config_time():
    with pytest.raises(ValueError, match="head_dim=9 must be even"):
        ModelConfig(**{**BASE, "head_dim": 9, "plan": "titans_mac"})
    ModelConfig(**{**BASE, "head_dim": 9, "plan": "titans_mac(rope=false)"})
