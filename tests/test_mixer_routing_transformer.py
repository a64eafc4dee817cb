"""Routing Transformer ("routing_transformer"): the causal routed + local heads against an independent dense
implementation of the equations (self match masked or kept), the self-match share at initialisation, the EMA
k-means update (training steps only), no-leak audit (and the leak of the paper's expert-choice windows), decode ==
full forward across blocks, centroids through checkpoints and resume, config errors and the closed-form
accounting."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flax import nnx
from test_mixer_contract import test_decode_with_cache_equals_full_forward as check_decode_equals_full
from test_mixer_contract import test_multi_token_decode_equals_full_forward as check_multi_token_decode

import jax
import jax.numpy as jnp

from attnzoo import LanguageModel, ModelConfig
from attnzoo.mixers.base import ForwardContext
from attnzoo.mixers.routing_transformer import Centroids, RoutingTransformerAttention, RoutingTransformerOptions
from attnzoo.train import TrainConfig, train
from attnzoo.train.checkpoint import Checkpointer, prepare_run_dir
from attnzoo.train.trainer import Trainer, run_config

D, H, E = 32, 4, 8


def make_mixer(options: str, seed: int = 0):
    cfg = ModelConfig(vocab_size=61, d_model=D, n_layers=1, n_heads=H, max_seq_len=64,
                      plan=f"routing_transformer({options})", kernels={"block_sparse_attention": "xla"})
    return RoutingTransformerAttention(cfg, cfg.layer_options[0], rngs=nnx.Rngs(seed))


def full_ctx(t: int) -> ForwardContext:
    return ForwardContext("full", jnp.broadcast_to(jnp.arange(t), (2, t)))


def inputs(t: int, seed: int = 1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, t, D)), jnp.float32)


def reference(mixer, x_BTD, *, routed, clusters, block, window, local_blocks, commitment, self_match):
    """Dense masked attention over the causal-RT visibility, in float64 numpy (rope=false): (y, aux loss). With
    self_match="mask" a routed query's logit on itself is -5e4 (the PyTorch port's TOKEN_SELF_ATTN_VALUE)."""
    x = np.asarray(x_BTD, np.float64)
    b, t, _ = x.shape
    q = (x @ np.asarray(mixer.q_proj.kernel[...], np.float64)).reshape(b, t, H, E)
    v = (x @ np.asarray(mixer.v_proj.kernel[...], np.float64)).reshape(b, t, H, E)
    k_local = (x @ np.asarray(mixer.k_proj.kernel[...], np.float64)).reshape(b, t, H - routed, E)
    xr = q[:, :, :routed]
    xr = (xr - xr.mean(-1, keepdims=True)) / np.sqrt(xr.var(-1, keepdims=True) + 1e-6)  # LayerNorm, no scale
    means = np.asarray(mixer.means[...], np.float64)
    cluster = np.einsum("btre,rce->btrc", xr, means).argmax(-1)  # [B, T, R]
    s_idx, t_idx = np.arange(t)[None, :], np.arange(t)[:, None]
    causal = s_idx <= t_idx
    o = np.zeros((b, t, H, E))
    for bi in range(b):
        for h in range(H):
            if h < routed:
                c = cluster[bi, :, h]
                rank = np.array([(c[:i] == c[i]).sum() for i in range(t)])
                visible = causal & (c[None, :] == c[:, None])
                if window is not None:
                    visible &= rank[None, :] // block >= rank[:, None] // block - window // block + 1
                qh, kh = xr[bi, :, h], xr[bi, :, h]  # shared QK
            else:
                visible = causal & (s_idx // block >= t_idx // block - local_blocks)
                qh, kh = q[bi, :, h], k_local[bi, :, h - routed]
            logits = qh @ kh.T / np.sqrt(E)
            if h < routed and self_match == "mask":
                np.fill_diagonal(logits, -5e4)
            logits = np.where(visible, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            o[bi, :, h] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, h]
    y = o.reshape(b, t, H * E) @ np.asarray(mixer.o_proj.kernel[...], np.float64)
    nearest = means[np.arange(routed)[None, None], cluster]
    return y, commitment * np.mean((xr - nearest) ** 2)


def plan_options(mode) -> str:
    text = (f"rope=false,routed_heads={mode['routed']},clusters={mode['clusters']},block_size={mode['block']},"
            f"local_blocks={mode['local_blocks']},self_match={mode['self_match']}")
    return text + (f",cluster_window={mode['window']}" if mode["window"] else "")


MODES = [pytest.param(mode, marks=marks, id=plan_options(mode)) for mode, marks in (
    (dict(routed=3, clusters=4, block=4, window=8, local_blocks=0, self_match="mask"), ()),
    (dict(routed=3, clusters=2, block=4, window=4, local_blocks=0, self_match="keep"), pytest.mark.slow),
    (dict(routed=2, clusters=3, block=4, window=None, local_blocks=1, self_match="mask"), pytest.mark.slow),
    (dict(routed=2, clusters=2, block=4, window=4, local_blocks=1, self_match="mask"), pytest.mark.slow))]


@pytest.mark.parametrize("mode", MODES)
def test_matches_a_dense_implementation_of_the_equations(mode):
    mixer = make_mixer(plan_options(mode) + ",commitment=0.5")
    x = inputs(22)  # not a whole number of blocks
    out = mixer(x, full_ctx(22))
    y, aux = reference(mixer, x, commitment=0.5, **mode)
    np.testing.assert_allclose(out.y_BTD, y, rtol=1e-4, atol=1e-5)
    # Token 0 sees no other key in any head, so its output is its own value (finite, also with the self masked).
    np.testing.assert_allclose(out.y_BTD[:, 0], mixer.o_proj(mixer.v_proj(x[:, :1]))[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.aux_loss, aux, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 16])
def test_masking_the_self_match_frees_the_routed_heads_at_initialisation(head_dim):
    """Shared QK with an unscaled LayerNorm gives the self match the largest logit of all; kept, it draws most of the
    weight. Masked (the default), a query with another visible key puts no weight on itself, and a query with none
    (the first member of its cluster, e.g. token 0) takes exactly its own value."""
    t = 64
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, t, D)), jnp.float32)

    def weights(self_match):  # the routed heads' attention matrices, read off the mixer: [B, R, T(query), T(key)]
        mixer = make_mixer(f"head_dim={head_dim},clusters=4,self_match={self_match}")
        xr, qk, _, _ = mixer.project(x, full_ctx(t).positions_BT)
        cluster = mixer.assign(xr)
        first_unit = jnp.eye(head_dim)[0]
        jac = jax.jit(jax.jacfwd(lambda a: mixer._routed_full(qk, a[..., None] * first_unit, cluster)[..., 0]))(
            jnp.zeros(cluster.shape))  # outputs are linear in the values: d o_t / d v_s = p_ts
        b, r = np.arange(cluster.shape[0])[:, None], np.arange(cluster.shape[2])
        return np.asarray(jac)[b, :, r, b, :, r], np.moveaxis(np.asarray(cluster), 1, 2)

    p_mask, cluster_BRT = weights("mask")
    p_keep, _ = weights("keep")
    earlier_member = np.tril(cluster_BRT[..., :, None] == cluster_BRT[..., None, :], -1)  # (no cluster window)
    has_other = earlier_member.any(-1)
    assert has_other.mean() > 0.9 and not has_other.all()
    self_mask, self_keep = np.diagonal(p_mask, 0, -2, -1), np.diagonal(p_keep, 0, -2, -1)
    assert self_keep[has_other].mean() > 0.5  # the kept self match does draw most of the weight
    assert self_mask[has_other].max() < 1e-6
    np.testing.assert_allclose(self_mask[~has_other], 1.0, rtol=1e-6)
    np.testing.assert_allclose(p_mask.sum(-1), 1.0, rtol=1e-5)
    alone_on_diagonal = np.eye(t, dtype=bool) & ~has_other[..., None]
    np.testing.assert_array_equal(p_mask > 0, earlier_member | alone_on_diagonal)  # every earlier member, no other


def test_ema_kmeans_updates_only_in_training_mode():
    mixer = make_mixer("clusters=3,decay=0.9")
    x = inputs(10)
    before = {name: np.asarray(getattr(mixer, name)[...]) for name in ("means", "ema_count", "ema_sum")}
    mixer(x, full_ctx(10))  # evaluation mode (the default): nothing changes
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(mixer, name)[...], value)
    mixer.train()
    assert mixer.use_running_average is False
    mixer(x, full_ctx(10))
    xr, _, _, _ = mixer.project(x, full_ctx(10).positions_BT)
    xr = np.asarray(xr, np.float64)
    assign = np.einsum("btre,rce->btrc", xr, before["means"]).argmax(-1)
    onehot = np.eye(3)[assign]  # [B, T, R, C]
    count = 0.9 * before["ema_count"] + 0.1 * onehot.sum((0, 1))
    total = 0.9 * before["ema_sum"] + 0.1 * np.einsum("btrc,btre->rce", onehot, xr)
    n = count.sum(-1, keepdims=True)
    np.testing.assert_allclose(mixer.ema_count[...], count, rtol=1e-6)
    np.testing.assert_allclose(mixer.means[...], total / ((count + 1e-5) / (n + 3e-5) * n)[..., None], rtol=1e-5)
    assert not np.allclose(mixer.means[...], before["means"])
    assert set(nnx.state(mixer, Centroids)) == {"means", "ema_count", "ema_sum"}
    assert not set(nnx.state(mixer, nnx.Param)) & {"means", "ema_count", "ema_sum"}  # never trained by the optimizer


def test_no_future_token_changes_assignments_or_outputs_before_it():
    mixer = make_mixer("clusters=3,block_size=4,cluster_window=8")
    t_total = 20
    x, noise = inputs(t_total), inputs(t_total, seed=7)

    def assignments_and_outputs(x_BTD):
        xr, _, _, _ = mixer.project(x_BTD, full_ctx(t_total).positions_BT)
        return mixer.assign(xr), mixer(x_BTD, full_ctx(t_total)).y_BTD

    cluster, y = assignments_and_outputs(x)
    for t in (1, 6, 13):
        changed_cluster, changed_y = assignments_and_outputs(jnp.where(jnp.arange(t_total)[:, None] >= t, noise, x))
        np.testing.assert_array_equal(changed_cluster[:, :t], cluster[:, :t])
        np.testing.assert_array_equal(changed_y[:, :t], y[:, :t])
        assert float(jnp.abs(changed_y[:, t:] - y[:, t:]).max()) > 1e-6
    assert len(np.unique(np.asarray(cluster))) > 1  # tokens really spread over clusters


def test_the_papers_balanced_windows_would_leak():
    """Why the causal variant: with expert-choice top-w per cluster over the whole sequence (the paper's balanced
    routing), changing only tokens after t changes which tokens before t are members of a cluster window."""
    mixer = make_mixer("clusters=4")
    t_total, w, t = 16, 4, 8
    x, noise = inputs(t_total), inputs(t_total, seed=7)

    def members_before_t(x_BTD):
        xr, _, _, _ = mixer.project(x_BTD, full_ctx(t_total).positions_BT)
        scores = jnp.einsum("btre,rce->brct", xr, mixer.means[...])
        _, top = jax.lax.top_k(scores, w)  # the w nearest tokens of each cluster
        return np.sort(np.where(np.asarray(top) < t, np.asarray(top), -1), axis=-1)

    changed = jnp.where(jnp.arange(t_total)[:, None] >= t, noise, x)
    assert not np.array_equal(members_before_t(x), members_before_t(changed))


DECODE_PLANS = [pytest.param(plan, marks=pytest.mark.slow) for plan in (
    "routing_transformer(block_size=4,clusters=3,cluster_window=8)",
    "routing_transformer(block_size=4,clusters=2,cluster_window=4)",  # a one-block window: members alone in it
    "routing_transformer(block_size=4,clusters=2,routed_heads=3,local_blocks=2,self_match=keep)")]


@pytest.mark.parametrize("mixer", DECODE_PLANS)
def test_decode_across_blocks_equals_full_forward(mixer):
    from test_mixer_contract import T
    assert T > 2 * int(re.search(r"block_size=(\d+)", mixer).group(1)), "decode must cross block boundaries"
    check_decode_equals_full(mixer)
    check_multi_token_decode(mixer)


@pytest.mark.parametrize("options, match", [
    ("clusters=0", "clusters=0 must be a positive integer"),
    ("clusters=-2", "clusters=-2 must be a positive integer"),
    ("routed_heads=5", "routed_heads=5 must be in 1..n_heads=4"),
    ("cluster_window=6", "cluster_window=6 must be a multiple of block_size=16"),
    ("block_size=24", "block_size=24 must be a power of 2"),
    ("decay=1.0", r"decay=1.0 must be in \(0, 1\)"),
    ("commitment=-1.0", "commitment=-1.0 must be >= 0"),
    ("self_match=drop", "self_match='drop' must be one of 'mask', 'keep'"),
])
def test_bad_options_fail_when_the_config_is_built(options, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(vocab_size=61, d_model=D, n_layers=1, n_heads=H, max_seq_len=64,
                    plan=f"routing_transformer({options})")


def test_bad_self_match_fails_when_the_options_are_built_directly():
    with pytest.raises(ValueError, match="self_match='drop' must be 'mask' or 'keep'"):
        RoutingTransformerOptions(self_match="drop")


@pytest.mark.parametrize("window", [None, 16])
def test_summary_matches_closed_form(window):
    d, h, routed, layers, vocab, seq, block, clusters, local_blocks = 64, 4, 1, 2, 61, 100, 8, 4, 1
    opts = f"routed_heads={routed},block_size={block},clusters={clusters}" + (f",cluster_window={window}" if window
                                                                              else "")
    cfg = ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=h, max_seq_len=128,
                      plan=f"routing_transformer({opts})*2")
    s = LanguageModel(cfg, rngs=nnx.Rngs(0)).summary(seq_len=seq)
    e, n_local = d // h, h - routed
    local = sum(t % block + 1 + block * min(local_blocks, t // block) for t in range(seq)) / seq
    members = -(-seq // clusters)  # a balanced cluster; a member of rank p sees the earlier members in its window
    reach = [p + 1 if window is None else p % block + 1 + block * min(window // block - 1, p // block)
             for p in range(members)]
    proj = 2 * d * e * (h + n_local + h) + 2 * h * e * d  # q, local k, v, o (routed heads share QK)
    mixer = proj + 2 * routed * clusters * e + 4 * e * (n_local * local + routed * sum(reach) / members)
    flops = layers * (mixer + 2 * 3 * d * cfg.mlp_width) + 2 * d * vocab
    assert s.flops_per_token == pytest.approx(flops, rel=1e-9, abs=layers)
    assert s.kv_cache_bytes_per_token == layers * (2 * h * e * 4 + 2 * 4 * routed)


# -- training: centroids move, survive checkpoints, and a resumed run equals an uninterrupted one ------------

PLAN = "routing_transformer(block_size=8,clusters=3)*2"


def tiny_model():
    cfg = ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, plan=PLAN)
    return LanguageModel(cfg, rngs=nnx.Rngs(0))


def train_config(steps: int = 4) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=0, eval_every=steps,
                       eval_batches=1, log_every=1, ckpt_every=2, keep_checkpoints=5)


def test_centroids_train_checkpoint_and_resume_bit_exactly(tmp_path, dataset):
    quiet = dict(sample_tokens=0, progress=False, echo=lambda _: None)
    config, data = train_config(), {"test": "routing_transformer"}
    initial = nnx.state(tiny_model(), Centroids)

    straight = tiny_model()
    result = train(straight, config, dataset, tmp_path / "straight", data=data, tokenizer=dataset.tokenizer, **quiet)
    assert result.step == 4 and np.isfinite(result.val_loss)
    moved = nnx.state(straight, Centroids)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(initial)))

    # Interrupted after 2 steps, then resumed in a fresh process-like setting (new model, new trainer).
    run_dir = tmp_path / "resumed"
    first, config = tiny_model(), config.replace(schedule_steps=4)  # as train() records it
    prepare_run_dir(run_dir, run_config(first.config, config, data, dataset.tokenizer), resume=False)
    trainer = Trainer(first, config, dataset, run_dir, **quiet)
    trainer.run(until=2)
    at_step_2 = trainer.rest
    trainer.close()
    _, like_params, like_rest = nnx.split(tiny_model(), nnx.Param, ...)
    with Checkpointer(run_dir, create=False) as checkpointer:  # the checkpoint holds the centroids bit for bit
        _, meta, saved = checkpointer.restore_params(like_params, 2, rest_like=like_rest)
    assert meta["step"] == 2
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(at_step_2), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed = tiny_model()
    result = train(resumed, config, dataset, run_dir, data=data, tokenizer=dataset.tokenizer, resume=True, **quiet)
    assert result.step == 4
    for a, b in zip(jax.tree.leaves(nnx.state(resumed)), jax.tree.leaves(nnx.state(straight)), strict=True):
        np.testing.assert_array_equal(a, b)  # parameters and centroids
