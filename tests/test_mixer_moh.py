"""MoH (Mixture-of-Head attention, arXiv 2410.11842) specifics; the registry-wide contract is in
test_mixer_contract.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import ForwardContext, LanguageModel, ModelConfig, parse_plan
from attnzoo.attention import attention
from attnzoo.layers import apply_rope

D, H, KV, E = 32, 8, 2, 4


def first_mixer(plan: str, **fields):
    """Layer 0's mixer of a small model (D, H query heads, KV kv heads)."""
    cfg = ModelConfig(**{**dict(vocab_size=50, d_model=D, n_layers=len(parse_plan(plan)), n_heads=H, n_kv_heads=KV,
                                plan=plan, kernels={"flash_attention": "xla"}), **fields})
    return LanguageModel(cfg, rngs=nnx.Rngs(0)).blocks[0].mixer


def full_context(b: int, t: int, diagnostics: bool = False) -> ForwardContext:
    return ForwardContext("full", jnp.broadcast_to(jnp.arange(t), (b, t)), diagnostics=diagnostics)


def run(mixer, x_BTD, diagnostics: bool = False):
    """The mixer's MixerOutput on x in "full" mode, jitted (far quicker on CPU than op-by-op)."""
    ctx = full_context(*x_BTD.shape[:2], diagnostics=diagnostics)
    return nnx.jit(lambda mixer: mixer(x_BTD, ctx))(mixer)


def softmax(z):
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def kernel(module) -> np.ndarray:
    return np.asarray(module.kernel[...], np.float64)


def reference_heads(mixer, x_BTD) -> np.ndarray:
    """Every head's causal attention output [B, T, H, E], dense, in float64."""
    b, t, _ = x_BTD.shape
    x = np.asarray(x_BTD, np.float64)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))

    def rope(a):
        return np.asarray(apply_rope(jnp.asarray(a, jnp.float32), positions, base=10_000.0), np.float64)

    q = rope((x @ kernel(mixer.q_proj)).reshape(b, t, H, E))
    k = rope((x @ kernel(mixer.k_proj)).reshape(b, t, KV, E))
    v = (x @ kernel(mixer.v_proj)).reshape(b, t, KV, E)
    heads = np.zeros((b, t, H, E))
    causal = np.tril(np.ones((t, t), bool))
    for bi in range(b):
        for h in range(H):
            kv = h // (H // KV)
            logits = np.where(causal, q[bi, :, h] @ k[bi, :, kv].T / np.sqrt(E), -np.inf)
            heads[bi, :, h] = softmax(logits) @ v[bi, :, kv]
    return heads


def reference_moh(mixer, x_BTD, *, n_shared, top_k, two_stage, scaling):
    """Dense per-head causal attention, then an explicit per-token top-k routing and the weighted sum of head outputs
    (Eqs. 5-7 or the released code's scaling), in float64. Returns (y [B, T, D], L_b)."""
    b, t, _ = x_BTD.shape
    x = np.asarray(x_BTD, np.float64)
    heads = reference_heads(mixer, x_BTD)
    n_routed = H - n_shared
    gates = np.zeros((b, t, H))
    probs = softmax(x @ kernel(mixer.router_routed))
    chosen = np.zeros_like(probs)
    for bi in range(b):
        for ti in range(t):
            top = np.argsort(-probs[bi, ti])[:top_k]
            chosen[bi, ti, top] = 1
            routed = probs[bi, ti, top]
            shared = softmax(x[bi, ti] @ kernel(mixer.router_shared)) if n_shared > 1 else np.ones(n_shared)
            a1, a2 = softmax(x[bi, ti] @ kernel(mixer.router_stage)) if two_stage and n_shared else (1.0, 1.0)
            if scaling == "code":
                a1, a2 = (2 * a1, 2 * a2) if two_stage and n_shared else (a1, a2)
                shared, routed = shared * n_shared, routed / routed.sum() * top_k
            gates[bi, ti, :n_shared] = a1 * shared
            gates[bi, ti, n_shared + top] = a2 * routed
    y = (gates[..., None] * heads).reshape(b, t, H * E) @ kernel(mixer.o_proj)
    balance = np.sum(probs.mean(axis=(0, 1)) * chosen.mean(axis=(0, 1)))
    return y, balance * (n_routed if scaling == "code" else 1)


def reference_query_norm_moh(mixer, x_BTD, *, n_shared, top_k):
    """MoH-LLaMA3's parameter-free router written out: each routed head's query norm over their unbiased std across
    routed heads, softmax, top-k; gates 1 (shared), 0/1 (routed). Returns (y, L_b with the code's scale R)."""
    b, t, _ = x_BTD.shape
    x = np.asarray(x_BTD, np.float64)
    q = (x @ kernel(mixer.q_proj)).reshape(b, t, H, E)[:, :, n_shared:]
    norms = np.sqrt(np.sum(q * q, axis=-1))
    n_routed = H - n_shared
    spread = np.sqrt(np.sum((norms - norms.mean(-1, keepdims=True)) ** 2, axis=-1, keepdims=True) / (n_routed - 1))
    probs = softmax(norms / spread)
    chosen = np.zeros_like(probs)
    for bi in range(b):
        for ti in range(t):
            chosen[bi, ti, np.argsort(-probs[bi, ti])[:top_k]] = 1
    gates = np.concatenate([np.ones((b, t, n_shared)), chosen], axis=-1)
    y = (gates[..., None] * reference_heads(mixer, x_BTD)).reshape(b, t, H * E) @ kernel(mixer.o_proj)
    return y, n_routed * np.sum(probs.mean(axis=(0, 1)) * chosen.mean(axis=(0, 1)))


def random_input(seed: int, b: int = 2, t: int = 7) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, D)), jnp.float32)


SPLITS = [(3, 2, True), (1, 3, True), (0, 2, True), (2, 4, False)]  # (n_shared_heads, top_k, two_stage)


@pytest.mark.parametrize("scaling", ["code", "paper"])
@pytest.mark.parametrize("n_shared, top_k, two_stage", SPLITS)
def test_matches_reference(scaling, n_shared, top_k, two_stage):
    mixer = first_mixer(f"moh(n_shared_heads={n_shared},top_k={top_k},two_stage={str(two_stage).lower()},"
                        f"scaling={scaling},balance_coef=0.03)")
    x = random_input(1)
    out = run(mixer, x)
    y_ref, balance_ref = reference_moh(mixer, x, n_shared=n_shared, top_k=top_k, two_stage=two_stage,
                                       scaling=scaling)
    np.testing.assert_allclose(out.y_BTD, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.aux_loss, 0.03 * balance_ref, rtol=1e-5)  # one MoH layer: the mean is L_b


@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_balance_loss_leaves_out_padding(router):
    """Right-padded sequences (ctx.lengths_B in "full" mode): P_i and f_i average over the real tokens only. Routing
    is per token, so that equals the loss of the real tokens alone, whatever the padding holds."""
    mixer = first_mixer(f"moh(n_shared_heads=3,top_k=2,router={router})")
    x = random_input(6, b=2, t=7)
    lengths = jnp.array([7, 3], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))

    def aux(x_BTD, lengths_B):
        ctx = ForwardContext("full", positions, lengths_B=lengths_B, diagnostics=True)
        out = nnx.jit(lambda m: m(x_BTD, ctx))(mixer)
        return out.aux_loss, out.metrics["head_load_max"]

    real_only = run(mixer, jnp.concatenate([x[0], x[1, :3]])[None], diagnostics=True)
    padded = aux(x, lengths)
    np.testing.assert_allclose(padded[0], real_only.aux_loss, rtol=1e-5)
    np.testing.assert_allclose(padded[1], real_only.metrics["head_load_max"], rtol=1e-6)
    garbage = x.at[1, 3:].set(100 * random_input(7, b=1, t=4)[0])
    np.testing.assert_allclose(aux(garbage, lengths)[0], padded[0], rtol=1e-5)
    # Counting the padding would change the loss (so the equality above is not a coincidence).
    assert abs(float(run(mixer, garbage).aux_loss) - float(padded[0])) > 1e-3 * float(padded[0])


def test_the_model_passes_padded_lengths_to_the_balance_loss():
    """LanguageModel(tokens, lengths_B=...) in "full" mode: the aux loss ignores what the padding holds (and the
    real tokens' logits do not depend on it)."""
    plan = "moh(n_shared_heads=3,top_k=2)*2"
    cfg = ModelConfig(vocab_size=50, d_model=D, n_layers=2, n_heads=H, n_kv_heads=KV, plan=plan,
                      kernels={"flash_attention": "xla"})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)), jnp.int32)
    other_padding = tokens.at[1, 4:].set((tokens[1, 4:] + 17) % 50)
    lengths = jnp.array([9, 4], jnp.int32)
    padded, changed = (model(x, lengths_B=lengths) for x in (tokens, other_padding))
    np.testing.assert_allclose(changed.aux_loss, padded.aux_loss, rtol=1e-6)
    np.testing.assert_allclose(changed.logits_BTV[1, :4], padded.logits_BTV[1, :4], rtol=1e-6)
    assert abs(float(model(other_padding).aux_loss) - float(model(tokens).aux_loss)) > 1e-6  # padding would count


@pytest.mark.parametrize("n_shared, top_k", [(4, 2), (2, 3), (0, 6)])
def test_query_norm_router_matches_reference(n_shared, top_k):
    """router=query_norm (MoH-LLaMA3): no router weights, 0/1 gates from the routed heads' query norms."""
    mixer = first_mixer(f"moh(n_shared_heads={n_shared},top_k={top_k},router=query_norm,balance_coef=0.02)")
    assert mixer.router_routed is None and mixer.router_shared is None and mixer.router_stage is None
    x = random_input(8)
    out = run(mixer, x)
    y_ref, balance_ref = reference_query_norm_moh(mixer, x, n_shared=n_shared, top_k=top_k)
    np.testing.assert_allclose(out.y_BTD, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.aux_loss, 0.02 * balance_ref, rtol=1e-5)
    q_BTHE = mixer.project(x)[0]
    gates = np.asarray(nnx.jit(lambda m: m.route_by_query_norm(q_BTHE).weights_BTH)(mixer))
    assert set(np.unique(gates)) <= {0.0, 1.0} and np.all(gates.sum(-1) == n_shared + top_k)


def test_query_norm_router_gradient_is_straight_through():
    """The hard 0/1 gates pass the task loss's gradient to p (g = m + p - sg(p)), so it reaches W_q through the
    routing too: equal to a hand-written straight-through version, and different from frozen gates."""
    mixer = first_mixer("moh(n_shared_heads=4,top_k=2,router=query_norm,balance_coef=0.0)")
    x = random_input(9)
    ctx = full_context(*x.shape[:2])
    probe = jnp.asarray(np.random.default_rng(10).normal(size=x.shape), jnp.float32)

    def by_hand(mixer, straight_through: bool):
        q, k, v = mixer.project(x)
        norms = jnp.sqrt(jnp.sum(q[:, :, 4:] ** 2, axis=-1))
        spread = jnp.sqrt(jnp.sum((norms - norms.mean(-1, keepdims=True)) ** 2, -1, keepdims=True) / 3)
        p = jax.nn.softmax(norms / spread, axis=-1)
        hard = (p >= jnp.sort(p, axis=-1)[..., -2:-1]).astype(jnp.float32)  # top-2 of 4 (no ties here)
        routed = hard + p - jax.lax.stop_gradient(p) if straight_through else hard
        gates = jnp.concatenate([jnp.ones_like(p), routed], axis=-1)
        q, k = mixer.position_qk(q, k, ctx.positions_BT)
        o = attention(q, k, v, causal=True, implementation="xla") * gates[..., None]
        return jnp.sum(mixer.o_proj(o.reshape(*x.shape[:2], -1)) * probe)

    grads = [nnx.jit(nnx.grad(f))(mixer).q_proj.kernel[...] for f in (
        lambda m: jnp.sum(m(x, ctx).y_BTD * probe), lambda m: by_hand(m, True), lambda m: by_hand(m, False))]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(grads[0] - grads[2]).max()) > 1e-3 * float(jnp.abs(grads[0]).max())


def test_query_norm_router_decode_equals_full_forward():
    cfg = ModelConfig(vocab_size=50, d_model=D, n_layers=2, n_heads=H, n_kv_heads=KV, max_seq_len=16,
                      plan="moh(router=query_norm)*2", kernels={"flash_attention": "xla", "decode_attention": "xla"})
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(11).integers(0, 50, (2, 8)), jnp.int32)
    full = model(tokens).logits_BTV
    lengths = jnp.array([3, 5], jnp.int32)
    state = model(tokens, caches=model.init_caches(2, 8), lengths_B=lengths, mode="prefill").caches
    for chunk in (2, 1):
        pos_BC = state.lengths_B[:, None] + jnp.arange(chunk)
        out = model(jnp.take_along_axis(tokens, pos_BC, axis=1), caches=state, mode="decode")
        np.testing.assert_allclose(out.logits_BTV, jnp.take_along_axis(full, pos_BC[..., None], axis=1),
                                   rtol=1e-4, atol=1e-4)
        state = out.caches


@pytest.mark.parametrize("scaling, factor", [("paper", 1), ("code", 4)])
def test_balance_loss_on_a_known_routing(scaling, factor):
    # 4 shared + top-2 of 4 routed heads; W_r reads the first 4 input features, so they are the router logits.
    plan = f"moh(n_shared_heads=4,top_k=2,scaling={scaling}),gqa,moh(n_shared_heads=4,top_k=2,scaling={scaling})"
    mixer = first_mixer(plan)
    mixer.router_routed.kernel[...] = jnp.eye(D, 4)
    logits_TR = np.array([[3.0, 2.0, 0.0, 0.0], [2.0, 3.0, 0.0, 0.0], [0.0, 1.0, 3.0, 0.0]])
    x = jnp.zeros((1, 3, D)).at[0, :, :4].set(logits_TR)
    # Tokens pick heads {0, 1}, {0, 1}, {1, 2}: f = (2/3, 1, 1/3, 0), P = the mean router probabilities.
    load_R = np.array([2 / 3, 1.0, 1 / 3, 0.0])
    balance = factor * np.sum(softmax(logits_TR).mean(axis=0) * load_R)
    out = run(mixer, x, diagnostics=True)
    # beta = 0.01 times the mean over the model's two MoH layers: this layer adds half of beta L_b.
    np.testing.assert_allclose(out.aux_loss, 0.01 * balance / 2, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["balance_loss"], balance, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["head_load_max"], 1.0)
    np.testing.assert_allclose(out.metrics["head_load_min"], 0.0)
    np.testing.assert_allclose(out.metrics["head_load_cv"], np.std(load_R) / np.mean(load_R), rtol=1e-5)
    assert {"sink_share", "entropy", "max_logit", "router_entropy", "shared_weight"} <= set(out.metrics)
    assert run(mixer, x).metrics == {}


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_gate_epilogue_equals_multiplying_afterwards(implementation):
    mixer = first_mixer("moh(n_shared_heads=3,top_k=2)", kernels={"flash_attention": implementation})
    x = random_input(2)
    ctx = full_context(*x.shape[:2])
    probe = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

    def gated(mixer):
        return jnp.sum(mixer(x, ctx).y_BTD * probe)

    def multiplied_afterwards(mixer):
        q, k, v = mixer.project(x)
        q, k = mixer.position_qk(q, k, ctx.positions_BT)
        o_BTHE = attention(q, k, v, causal=True, implementation=implementation)
        o_BTHE = o_BTHE * mixer.route(x).weights_BTH[..., None]
        return jnp.sum(mixer.o_proj(o_BTHE.reshape(*x.shape[:2], -1)) * probe)

    (a, grads_a), (b, grads_b) = (nnx.jit(nnx.value_and_grad(f))(mixer) for f in (gated, multiplied_afterwards))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for name in ("router_routed", "router_shared", "router_stage"):  # the task loss trains every router
        assert float(jnp.abs(getattr(grads_a, name).kernel[...]).max()) > 0
    for ga, gb in zip(jax.tree.leaves(nnx.state(grads_a, nnx.Param)), jax.tree.leaves(nnx.state(grads_b, nnx.Param)),
                      strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6)


def test_balance_loss_gradient_reaches_only_the_routed_router():
    mixer = first_mixer("moh(n_shared_heads=3,top_k=2)")
    x = random_input(4)
    grads = nnx.jit(nnx.grad(lambda m: m(x, full_context(*x.shape[:2])).aux_loss))(mixer)
    assert float(jnp.abs(grads.router_routed.kernel[...]).max()) > 0  # through P_i (f_i is a count)
    for name in ("router_shared", "router_stage", "q_proj", "o_proj"):  # L_b reads only W_r
        assert float(jnp.abs(getattr(grads, name).kernel[...]).max()) == 0


def test_all_routed_heads_with_a_uniform_router_is_mha():
    """Code scaling, K = R and zero router weights: every head gets weight 2 * 1/2 * 1 = 1 (the released code's
    MHA-preserving scale), so MoH is the GQA layer with the same projections. (The paper's scaling gives weights
    a1 / h_s and a2 / R instead, so it is not MHA there.)"""
    mixer = first_mixer("moh(n_shared_heads=3,top_k=5)")
    gqa = first_mixer("gqa")
    for router in (mixer.router_routed, mixer.router_shared, mixer.router_stage):
        router.kernel[...] = jnp.zeros_like(router.kernel[...])
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(gqa, name).kernel[...] = getattr(mixer, name).kernel[...]
    x = random_input(5)
    np.testing.assert_allclose(nnx.jit(lambda m: m.route(x).weights_BTH)(mixer), 1.0, rtol=1e-6)
    np.testing.assert_allclose(run(mixer, x).y_BTD, run(gqa, x).y_BTD, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_shared, top_k, two_stage, router_outputs, router",
                         [(3, 2, True, 5 + 3 + 2, "learned"), (1, 3, True, 7 + 2, "learned"),
                          (0, 2, True, 8, "learned"), (3, 2, False, 5 + 3, "learned"), (3, 2, True, 0, "query_norm")])
def test_summary_matches_closed_form(n_shared, top_k, two_stage, router_outputs, router):
    d, h, hd, kv, layers, vocab, mlp, seq = 64, 8, 8, 2, 2, 97, 192, 32
    plan = f"moh(n_shared_heads={n_shared},top_k={top_k},two_stage={str(two_stage).lower()},router={router})*{layers}"
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=h, n_kv_heads=kv, mlp_hidden=mlp,
                      plan=plan, tie_embeddings=False)
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    # W_r [d, R], W_s [d, h_s] only when h_s > 1, W_h [d, 2] only with shared heads and two-stage routing.
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d + d * router_outputs
    assert s.total_params == vocab * d + layers * (attn + 3 * d * mlp + 2 * d) + d + d * vocab
    assert s.kv_cache_bytes_per_token == layers * 2 * kv * hd * 4  # every head's K/V is cached
    avg_ctx = (seq + 1) / 2
    # Every head is computed (unrouted ones are zero-weighted): MHA/GQA FLOPs plus the routers (the parameter-free
    # one: the routed heads' query norms).
    norms = 2 * (h - n_shared) * hd if router == "query_norm" else 0
    flops = layers * (2 * attn + norms + 4 * h * hd * avg_ctx + 2 * 3 * d * mlp) + 2 * d * vocab
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)


@pytest.mark.parametrize("n_heads, shared, top_k", [(4, 2, 1), (8, 4, 2), (12, 6, 3)])
def test_default_split_is_75_percent_active(n_heads, shared, top_k):
    mixer = first_mixer("moh", n_heads=n_heads, n_kv_heads=None, head_dim=E)
    assert (mixer.n_shared, mixer.top_k, mixer.n_routed) == (shared, top_k, n_heads - shared)


@pytest.mark.parametrize("plan, message", [
    ("moh(top_k=5)", r"top_k=5 must be in 1\.\.4, the routed heads \(n_heads=8 - n_shared_heads=4\)"),
    ("moh(n_shared_heads=8)", r"n_shared_heads=8 must be in 0\.\.7"),
    ("moh(n_shared_heads=-1)", r"n_shared_heads=-1 must be >= 0"),
    ("moh(top_k=0)", r"top_k=0 must be >= 1"),
    ("moh(balance_coef=-0.1)", r"balance_coef=-0.1 must be >= 0"),
    ("moh(scaling=both)", r"scaling='both' must be one of 'code', 'paper'"),
    ("moh(n_kv_heads=3)", r"n_kv_heads=3 must divide n_heads=8"),
    ("moh(router=softmax)", r"router='softmax' must be one of 'learned', 'query_norm'"),
    ("moh(router=query_norm,n_shared_heads=7,top_k=1)", r"router=query_norm .* needs at least 2 routed heads"),
    ("moh(router=query_norm,two_stage=false)", r"two_stage=false has no effect with router=query_norm"),
])
def test_bad_config_fails_when_the_config_is_built(plan, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=50, d_model=D, n_layers=1, n_heads=H, n_kv_heads=KV, plan=plan)
