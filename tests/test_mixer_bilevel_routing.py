"""Bi-level routing attention ("bilevel_routing"): the causal BRA / MoBA routers against an independent dense
implementation of their equations, no-leak audits of every routing mode, decode == full forward with routing
across blocks, BiFormer's 2D form against an independent implementation, config errors, the closed-form FLOPs and
training through attnzoo-train."""

from __future__ import annotations

import re

import json

import numpy as np
import pytest
from flax import nnx
from test_mixer_contract import test_decode_with_cache_equals_full_forward as check_decode_equals_full
from test_mixer_contract import test_multi_token_decode_equals_full_forward as check_multi_token_decode

import jax.numpy as jnp

from attnzoo import LanguageModel, ModelConfig
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.bilevel_routing import BilevelRoutingAttention

D, H, K, E = 32, 4, 2, 8


def make_mixer(options: str, *, n_kv_heads: int = K, max_seq_len: int = 64, seed: int = 0):
    cfg = ModelConfig(vocab_size=61, d_model=D, n_layers=1, n_heads=H, n_kv_heads=n_kv_heads,
                      max_seq_len=max_seq_len, plan=f"bilevel_routing({options})",
                      kernels={"block_sparse_attention": "xla"})
    return BilevelRoutingAttention(cfg, cfg.layer_options[0], rngs=nnx.Rngs(seed))


def full_ctx(t: int) -> ForwardContext:
    return ForwardContext("full", jnp.broadcast_to(jnp.arange(t), (2, t)))


def inputs(t: int, seed: int = 1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, t, D)), jnp.float32)


# -- the causal routers against a dense implementation of their equations ---------------------------------------

def reference_causal(mixer, x_BTD, *, router, block, top_k, route_all, lce_kernel):
    """Dense masked softmax attention over the blocks the equations select, in float64 numpy."""
    q, k, v = mixer.project(x_BTD)
    q, k = mixer.position_qk(q, k, full_ctx(x_BTD.shape[1]).positions_BT)
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, e = q.shape
    kv, g = k.shape[2], h // k.shape[2]
    n_full = t // block
    kbar = k[:, :n_full * block].reshape(b, n_full, block, kv, e).mean(2)  # [B, J, K, E]
    qsum = q.reshape(b, t, kv, g, e).sum(3)  # query heads of each kv head summed: [B, T, K, E]
    visible = np.zeros((b, h, t, t), bool)
    for bi in range(b):
        for ti in range(t):
            i = ti // block
            if router == "bra":  # block i routes with the mean query of block i - 1
                desc = qsum[bi, (i - 1) * block:i * block].mean(0) if i else np.zeros((kv, e))
            else:
                desc = qsum[bi, ti]
            scores = np.einsum("ke,jke->kj", desc, kbar[bi, :i])  # [K, i]
            if route_all:
                scores = np.broadcast_to(scores.sum(0, keepdims=True), scores.shape)
            for hi in range(h):
                chosen = np.argsort(-scores[hi // g])[:top_k]
                keys = np.arange(ti + 1)
                visible[bi, hi, ti, keys] = (keys // block == i) | np.isin(keys // block, chosen)
    logits = np.einsum("bthe,bshe->bhts", q, np.repeat(k, g, axis=2)) / np.sqrt(e)
    logits = np.where(visible, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshe->bthe", p, np.repeat(v, g, axis=2))
    if lce_kernel:
        w = np.asarray(mixer.lce.weight[...], np.float64)[:, 0]  # [K E, taps]; the last tap reads the current row
        v_rows = np.concatenate([np.zeros((b, lce_kernel - 1, kv * e)), v.reshape(b, t, kv * e)], 1)
        conv = sum(v_rows[:, tap:tap + t] * w[:, tap] for tap in range(lce_kernel)) + np.asarray(mixer.lce.bias[...])
        o = o + np.repeat(conv.reshape(b, t, kv, 1, e), g, axis=3).reshape(b, t, h, e)
    return o.reshape(b, t, h * e) @ np.asarray(mixer.o_proj.kernel[...], np.float64)


def plan_options(mode) -> str:
    text = f"router={mode['router']},block_size={mode['block']},top_k={mode['top_k']}"
    text += ",route_heads=all" if mode["route_all"] else ""
    return text + (f",lce_kernel={mode['lce_kernel']}" if mode["lce_kernel"] else "")


CAUSAL_MODES = [
    dict(router="bra", block=4, top_k=2, route_all=False, lce_kernel=None),
    dict(router="bra", block=4, top_k=1, route_all=True, lce_kernel=3),
    dict(router="moba", block=4, top_k=2, route_all=False, lce_kernel=None),
    dict(router="moba", block=4, top_k=1, route_all=True, lce_kernel=3),
]
# The default suite compares one mode per router (the other two with -m slow); the no-leak audit runs them all.
REFERENCE_MODES = [pytest.param(mode, marks=() if i in (1, 2) else pytest.mark.slow, id=plan_options(mode))
                   for i, mode in enumerate(CAUSAL_MODES)]


@pytest.mark.parametrize("mode", REFERENCE_MODES)
def test_causal_routers_match_a_dense_implementation_of_the_equations(mode):
    mixer = make_mixer(plan_options(mode))
    x = inputs(18)  # not a whole number of blocks: the mixer pads
    y = mixer(x, full_ctx(18)).y_BTD
    np.testing.assert_allclose(y, reference_causal(mixer, x, **mode), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", CAUSAL_MODES, ids=plan_options)
def test_no_future_token_changes_routing_or_outputs_before_it(mode):
    """Perturbing tokens t.. changes no routing decision of a row (query block for "bra", token for "moba") that
    holds a token before t, and no output before t (bit for bit)."""
    mixer = make_mixer(plan_options(mode))
    t_total, block = 20, mode["block"]
    x = inputs(t_total)
    noise = inputs(t_total, seed=7)

    def decisions_and_outputs(x_BTD):
        q, k, v = mixer.project(x_BTD)
        q, k = mixer.position_qk(q, k, full_ctx(t_total).positions_BT)
        return mixer.routing(q, k), mixer(x_BTD, full_ctx(t_total)).y_BTD

    routing, y = decisions_and_outputs(x)
    for t in (1, 5, 8, 13):
        changed_routing, changed_y = decisions_and_outputs(jnp.where(jnp.arange(t_total)[:, None] >= t, noise, x))
        rows = -(-t // block) if mode["router"] == "bra" else t  # rows holding a token before t
        np.testing.assert_array_equal(changed_routing.lists[:, :, :rows], routing.lists[:, :, :rows])
        np.testing.assert_array_equal(changed_routing.counts[:, :, :rows], routing.counts[:, :, :rows])
        np.testing.assert_array_equal(changed_y[:, :t], y[:, :t])
        assert float(jnp.abs(changed_y[:, t:] - y[:, t:]).max()) > 1e-6
    # Routing really selects: some late row leaves out a past block (else every mode would be dense attention).
    assert int((routing.counts[:, :, -1] - 1).min()) == mode["top_k"] < (t_total - 1) // block


# -- decode ------------------------------------------------------------------------------------------------------

# Slow (eager decode, ~30 s each): the contract's default decode checks stay within one 16-token block.
DECODE_PLANS = [pytest.param("bilevel_routing(block_size=4,top_k=1,lce_kernel=3)", marks=pytest.mark.slow),
                pytest.param("bilevel_routing(router=moba,block_size=4,top_k=2,route_heads=all)",
                             marks=pytest.mark.slow)]


@pytest.mark.parametrize("mixer", DECODE_PLANS)
def test_decode_across_blocks_equals_full_forward(mixer):
    """The contract's decode checks with blocks of 4 over 12 tokens: summaries complete during prefill and decode,
    routing recomputed over them, token by token and 3 tokens per call."""
    from test_mixer_contract import T
    assert T > 2 * int(re.search(r"block_size=(\d+)", mixer).group(1)), "decode must cross block boundaries"
    check_decode_equals_full(mixer)
    check_multi_token_decode(mixer)


# -- BiFormer's 2D form ----------------------------------------------------------------------------------------

def reference_biformer(mixer, x_BTD, *, side, regions, top_k, lce_kernel):
    """BRA as bra.py writes it (NHWC, regions, region affinity over all channels, top-k, gather, dense attention,
    LePE conv), non-causal, in float64 numpy; MHA heads."""
    q, k, v = (np.asarray(a, np.float64) for a in mixer.project(x_BTD))  # rope=false: no positions
    b, t, h, e = q.shape
    w = side // regions

    def region_tokens(i):  # raster indices of region i
        ri, rj = divmod(i, regions)
        rows, cols = np.meshgrid(np.arange(ri * w, ri * w + w), np.arange(rj * w, rj * w + w), indexing="ij")
        return (rows * side + cols).ravel()

    q_win = np.stack([q[:, region_tokens(i)].reshape(b, w * w, h * e).mean(1) for i in range(regions**2)], 1)
    k_win = np.stack([k[:, region_tokens(i)].reshape(b, w * w, h * e).mean(1) for i in range(regions**2)], 1)
    affinity = np.einsum("bic,bjc->bij", q_win, k_win)
    o = np.zeros_like(q)
    for bi in range(b):
        for i in range(regions**2):
            chosen = np.argsort(-affinity[bi, i])[:top_k]
            keys = np.concatenate([region_tokens(j) for j in chosen])
            queries = region_tokens(i)
            logits = np.einsum("qhe,khe->hqk", q[bi, queries], k[bi, keys]) / np.sqrt(e)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o[bi, queries] = np.einsum("hqk,khe->qhe", p, v[bi, keys])
    kernel = np.asarray(mixer.lce.kernel[...], np.float64)[:, :, 0]  # [taps, taps, C]
    pad = lce_kernel // 2
    v_img = np.pad(v.reshape(b, side, side, h * e), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    lepe = sum(v_img[:, a:a + side, c:c + side] * kernel[a, c] for a in range(lce_kernel) for c in range(lce_kernel))
    o = o + (lepe + np.asarray(mixer.lce.bias[...])).reshape(b, t, h, e)
    return o.reshape(b, t, h * e) @ np.asarray(mixer.o_proj.kernel[...], np.float64)


def test_image_form_matches_biformer_equations():
    side, regions, top_k, taps = 8, 4, 3, 3
    mixer = make_mixer(f"image_side={side},regions_per_side={regions},top_k={top_k},lce_kernel={taps},"
                       f"route_heads=all,rope=false,n_kv_heads=all", n_kv_heads=H)
    x = inputs(side * side)
    y = mixer(x, full_ctx(side * side)).y_BTD
    np.testing.assert_allclose(y, reference_biformer(mixer, x, side=side, regions=regions, top_k=top_k,
                                                     lce_kernel=taps), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no cached decoding"):
        mixer.init_cache(1, side * side)


# -- configuration errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ("top_k=4", "top_k=4 exceeds the 3 complete past blocks a query sees at max_seq_len=64 with block_size=16"),
    ("block_size=12", "block_size=12 must be a power of 2"),
    ("top_k=0", "top_k=0 must be a positive integer"),
    ("router=dense", "router='dense' must be one of 'bra', 'moba'"),
    ("image_side=8,regions_per_side=3", "regions_per_side=3 must divide image_side=8"),
    ("image_side=8,regions_per_side=2,router=moba", "router='moba': the image form"),
    ("image_side=8,regions_per_side=2,lce_kernel=4", "lce_kernel=4 must be odd"),
    ("image_side=8,regions_per_side=2,top_k=5", "top_k=5 must be <= the 4 regions"),
    ("image_side=9,regions_per_side=3", "image_side=9 needs 81 tokens > max_seq_len=64"),
])
def test_bad_options_fail_when_the_config_is_built(options, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(vocab_size=61, d_model=D, n_layers=1, n_heads=H, max_seq_len=64,
                    plan=f"bilevel_routing({options})")


# -- accounting ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["bra", "moba"])
def test_summary_matches_closed_form(router):
    d, h, kv, layers, vocab, seq, block, top_k, taps = 64, 4, 2, 2, 61, 100, 8, 3, 5
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=h, n_kv_heads=kv, max_seq_len=128,
                      plan=f"bilevel_routing(router={router},block_size={block},top_k={top_k},lce_kernel={taps})*2")
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    e = d // h
    # Keys a query attends: its block up to itself + min(top_k, past blocks) whole blocks.
    context = sum(t % block + 1 + block * min(top_k, t // block) for t in range(seq)) / seq
    n_blocks = -(-seq // block)
    if router == "bra":  # one kv-head score per (block, past block) pair
        route = 2 * kv * e * n_blocks * (n_blocks - 1) / 2 / seq
    else:  # one per (token, past block) pair
        route = 2 * kv * e * sum(t // block for t in range(seq)) / seq
    mixer = 2 * d * e * (2 * h + 2 * kv) + 4 * h * e * context + route + 2 * kv * e * taps
    flops = layers * (mixer + 2 * 3 * d * cfg.mlp_width) + 2 * d * vocab
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)
    assert s.kv_cache_bytes_per_token == layers * 2 * kv * e * 4


def test_packed_documents_are_refused():
    mixer = make_mixer("block_size=4,top_k=1")
    ctx = ForwardContext("full", full_ctx(8).positions_BT, segment_ids_BT=jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        mixer(inputs(8), ctx)


# -- training ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("router", [pytest.param(r, marks=pytest.mark.slow) for r in ("bra", "moba")])
def test_trains_through_attnzoo_train(tmp_path, dataset, router):
    """A few steps of the training loop (attnzoo-train's `train`) on a tiny routed model lower the loss."""
    from attnzoo.train import TrainConfig, train

    cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      plan=f"bilevel_routing(router={router},block_size=4,top_k=2,lce_kernel=3)*2")
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    config = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=0, eval_every=6, eval_batches=1,
                         log_every=1, ckpt_every=6)
    result = train(model, config, dataset, tmp_path / "run", data={"test": router}, tokenizer=dataset.tokenizer,
                   sample_tokens=0, progress=False, echo=lambda _: None)
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert result.step == 6 and np.isfinite(result.val_loss) and losses[-1] < losses[0]
