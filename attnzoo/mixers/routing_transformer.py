"""Routing Transformer (Roy, Saffar, Vaswani, Grangier; TACL 2021, arXiv 2003.05997): online k-means routing heads
beside local-attention heads, made causal.

Routed heads (the first `routed_heads` of n_heads), per head with C = `clusters` centroids mu_c (official code,
routing_transformer/utils.py):

    x_t = LayerNorm(x W_q)_t            (no scale or bias; shared QK: the head's keys ARE its queries)
    c(t) = argmax_c < x_t, mu_c >       (the nearest centroid, dist = -<x, mu>; router inputs stop-gradient)
    o_t = softmax_{s in V(t)}( l_ts ) v_s,     V(t) = { s <= t : c(s) = c(t), s within the cluster window }
    l_ts = RoPE(x)_t . RoPE(x)_s / sqrt(E),   except l_tt = -5e4 with self_match="mask" (the default)
    aux loss = commitment * mean || x - sg(mu_{c(x)}) ||^2              (beta = 1e-4; MixerOutput.aux_loss)
    EMA k-means, training steps only, outside the gradient (VQ-VAE style, lambda = decay = 0.999, eps = 1e-5):
      count_c <- lambda count_c + (1 - lambda) |{x -> c}|,    sum_c <- lambda sum_c + (1 - lambda) sum_{x -> c} x
      mu_c = sum_c / ((count_c + eps) / (n + C eps) n),       n = sum_c count_c        (Laplace smoothing)
    (counts start at 1 and sums at the initial means, so the first updates average into LN(randn) means)

Local heads (the others): each query block of `block_size` tokens attends its own and the `local_blocks` previous
blocks, causally (the paper's local attention, memory flange = local_blocks = 1).

What differs from the paper: its clusters take the w tokens nearest to them over the whole sequence (balanced, but
non-causal); here each token joins its own nearest centroid and a query attends the members of its cluster within
the last `cluster_window` tokens of that cluster's members (a window in member ranks, which only past tokens set).
The self match, the largest logit a shared-QK head can produce, is masked by default (as Reformer and the PyTorch
port; the official TF code keeps it: self_match="keep"). Centroids (`Centroids`, not parameters) are updated only in
training mode (`model.train()`), and travel with the training step's state and the checkpoints.

More in docs/mixers/routing_transformer.md: why the self match is masked, why the balanced clusters are not causal,
the training-only updates, and how routed and local heads and the decode run through
`pallas_kernels.block_sparse_attention`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from attnzoo.block_routing import NEVER, block_aligned_groups, decode_block_attention, routed_context
from attnzoo.cache import KVCache, write_at
from attnzoo.config import ModelConfig
from attnzoo.layers import apply_rope, dense
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports, dtype_bytes
from attnzoo.registry import register

LAPLACE_EPS = 1e-5
NORM_EPS = 1e-6


class Centroids(nnx.Variable):
    """Online k-means state of the routed heads (means, EMA counts, EMA sums): updated by EMA outside the gradient,
    never by the optimizer; carried through the training step and checkpointed with the parameters."""


@dataclasses.dataclass(frozen=True)
class RoutingTransformerOptions:
    """n_heads, head_dim: default the model's (every head has its own values; MHA, as the paper).

    routed_heads: heads that route by k-means, 1..n_heads (default n_heads // 2, the paper's 4+4 / 8+8 splits);
      the others are local heads.
    clusters: C, centroids per routed head (the paper: 8-48, with C w = sequence length).
    cluster_window: tokens of its cluster's most recent members a routed query may attend, a multiple of
      block_size (the paper's balanced window w = 256-512); none: every earlier member.
    local_blocks: previous blocks a local query block attends besides its own (the paper's memory flange = 1 block).
    block_size: kernel block in tokens (a power of 2; the Triton kernel needs >= 16).
    commitment: beta of the commitment loss (1e-4). decay: lambda of the EMA k-means (0.999).
    rope: rotary positions on the attention queries and keys (routing uses the unrotated normalised queries).
    self_match: what a routed query does with its own key (its query: shared QK): "mask" (default, as Reformer and
      the PyTorch port) attends itself only when no other key is visible; "keep" (the official TF code) scores it
      like any other key, which draws almost all the weight (docs/mixers/routing_transformer.md).
    """

    n_heads: int | None = None
    head_dim: int | None = None
    routed_heads: int | None = None
    clusters: int = 4
    cluster_window: int | None = None
    local_blocks: int = 1
    block_size: int = 16
    commitment: float = 1e-4
    decay: float = 0.999
    rope: bool = True
    self_match: Literal["mask", "keep"] = "mask"

    def __post_init__(self):
        if self.self_match not in ("mask", "keep"):
            raise ValueError(f"self_match={self.self_match!r} must be 'mask' or 'keep'")
        for name in ("n_heads", "head_dim", "routed_heads", "clusters", "cluster_window", "block_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of 2 (the block-sparse kernel's tiles)")
        if self.cluster_window is not None and self.cluster_window % self.block_size:
            raise ValueError(f"cluster_window={self.cluster_window} must be a multiple of block_size="
                             f"{self.block_size}")
        if self.local_blocks < 0:
            raise ValueError(f"local_blocks={self.local_blocks} must be >= 0")
        if not 0 < self.decay < 1:
            raise ValueError(f"decay={self.decay} must be in (0, 1) (0.999 in the paper)")
        if self.commitment < 0:
            raise ValueError(f"commitment={self.commitment} must be >= 0 (1e-4 in the paper)")


def _geometry(options: RoutingTransformerOptions, config: ModelConfig) -> tuple[int, int, int]:
    """(heads, routed heads, head dim) after the defaults."""
    n_heads = options.n_heads or config.n_heads
    routed = options.routed_heads if options.routed_heads is not None else max(1, n_heads // 2)
    return n_heads, routed, options.head_dim or config.dim_per_head


def layer_norm(x):
    """LayerNorm over the last axis without scale or bias, float32 (the official `LayerNorm(scaling=False)`)."""
    x = x.astype(jnp.float32)
    centred = x - x.mean(-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, -1, keepdims=True) + NORM_EPS)


def local_lists(block_BX, local_blocks: int):
    """The band of blocks [i - local_blocks, i] of each row's block i: (ids [..., local_blocks + 1], counts)."""
    counts = jnp.minimum(block_BX, local_blocks) + 1
    ids = block_BX[..., None] - counts[..., None] + 1 + jnp.arange(local_blocks + 1)
    return jnp.minimum(ids, block_BX[..., None]).astype(jnp.int32), counts.astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoutingCache:
    """Local heads' keys/values, routed heads' (rotated, shared) keys/values, each cached token's cluster and rank
    among its cluster's members per routed head, and the cluster sizes so far."""

    local: KVCache
    routed: KVCache
    cluster_BSR: jax.Array
    rank_BSR: jax.Array
    sizes_BRC: jax.Array


@register("routing_transformer", options=RoutingTransformerOptions)
class RoutingTransformerAttention(Mixer):
    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=("block_sparse_attention",))

    @classmethod
    def check(cls, options: RoutingTransformerOptions, config: ModelConfig) -> None:
        n_heads, routed, head_dim = _geometry(options, config)
        if routed > n_heads:
            raise ValueError(f"routed_heads={routed} must be in 1..n_heads={n_heads}")
        if options.rope and head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings (or set rope=false)")

    def __init__(self, config: ModelConfig, options: RoutingTransformerOptions, *,
                 shared: SharedParams | None = None, rngs: nnx.Rngs):
        self.n_heads, self.n_routed, self.head_dim = _geometry(options, config)
        self.n_local = self.n_heads - self.n_routed
        self.clusters, self.block = options.clusters, options.block_size
        self.window_blocks = None if options.cluster_window is None else options.cluster_window // options.block_size
        self.local_blocks = options.local_blocks
        self.mask_self = options.self_match == "mask"
        self.commitment, self.decay = options.commitment, options.decay
        self.rope_base = config.rope_base if options.rope else None
        self.sparse_implementation = config.kernel("block_sparse_attention")
        self.dtype = self.cache_dtype = jnp.dtype(config.dtype)
        self.use_running_average = True  # False (model.train()): the forward updates the centroids
        d, e, h = config.d_model, self.head_dim, self.n_heads
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
        self.q_proj = dense(d, h * e, **kw)
        self.k_proj = dense(d, self.n_local * e, **kw) if self.n_local else None  # routed heads share QK
        self.v_proj = dense(d, h * e, **kw)
        self.o_proj = dense(h * e, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)
        means = layer_norm(jax.random.normal(rngs.params(), (self.n_routed, self.clusters, e)))
        self.means = Centroids(means)
        self.ema_count = Centroids(jnp.ones((self.n_routed, self.clusters), jnp.float32))
        self.ema_sum = Centroids(means)

    # -- routing ---------------------------------------------------------------------------------------------
    def assign(self, x_BTRE):
        """Each token's nearest centroid per routed head: int32 [B, T, R]."""
        scores = jnp.einsum("btre,rce->btrc", jax.lax.stop_gradient(x_BTRE), self.means[...],
                            precision=jax.lax.Precision.HIGHEST)
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)

    def _update_centroids(self, x_BTRE, cluster_BTR) -> None:
        """One EMA k-means step from this batch's assignments (outside the gradient)."""
        x = jax.lax.stop_gradient(x_BTRE)
        onehot = jax.nn.one_hot(cluster_BTR, self.clusters, dtype=jnp.float32)
        lam = self.decay
        count = lam * self.ema_count[...] + (1 - lam) * onehot.sum((0, 1))
        total = lam * self.ema_sum[...] + (1 - lam) * jnp.einsum("btrc,btre->rce", onehot, x,
                                                                  precision=jax.lax.Precision.HIGHEST)
        n = count.sum(-1, keepdims=True)
        smoothed = (count + LAPLACE_EPS) / (n + self.clusters * LAPLACE_EPS) * n
        self.ema_count.value, self.ema_sum.value = count, total
        self.means.value = total / smoothed[..., None]

    def _rope(self, x_BTXE, positions_BT):
        if self.rope_base is None:
            return x_BTXE
        return apply_rope(x_BTXE, positions_BT, base=self.rope_base)

    def project(self, x_BTD, positions_BT):
        """(normalised routed queries [B,T,R,E] f32, rotated routed q=k, routed v, local q, k, v)."""
        b, t, _ = x_BTD.shape
        dtype = self.dtype
        q_BTHE = self.q_proj(x_BTD).reshape(b, t, self.n_heads, self.head_dim)
        v_BTHE = self.v_proj(x_BTD).reshape(b, t, self.n_heads, self.head_dim)
        x_BTRE = layer_norm(q_BTHE[:, :, :self.n_routed])
        qk_BTRE = self._rope(x_BTRE, positions_BT).astype(dtype)
        local = None
        if self.n_local:
            k_BTLE = self.k_proj(x_BTD).reshape(b, t, self.n_local, self.head_dim)
            local = (self._rope(q_BTHE[:, :, self.n_routed:], positions_BT).astype(dtype),
                     self._rope(k_BTLE, positions_BT).astype(dtype), v_BTHE[:, :, self.n_routed:])
        return x_BTRE, qk_BTRE, v_BTHE[:, :, :self.n_routed], local

    # -- attention -------------------------------------------------------------------------------------------
    def _routed_full(self, qk_BTRE, v_BTRE, cluster_BTR):
        """Causal attention within clusters over whole sequences, through block-aligned cluster runs."""
        b, t, r, e = qk_BTRE.shape

        def fold(x):  # [B, T, R, ...] -> [B * R, T, ...]
            return jnp.moveaxis(x, 2, 1).reshape(b * r, t, *x.shape[3:])

        layout = block_aligned_groups(fold(cluster_BTR), self.clusters, self.block)
        valid_NM = layout.row_BM >= 0
        rows_NM = jnp.maximum(layout.row_BM, 0)
        qk_perm = jnp.take_along_axis(fold(qk_BTRE), rows_NM[:, :, None], axis=1)[:, :, None]
        v_perm = jnp.take_along_axis(fold(v_BTRE), rows_NM[:, :, None], axis=1)[:, :, None]
        n_blocks = layout.group_BQ.shape[1]
        block_Q = jnp.arange(n_blocks)
        reach = block_Q - layout.first_block_BQ + 1  # blocks of this cluster's run up to this one
        if self.window_blocks is not None:
            reach = jnp.minimum(reach, self.window_blocks)
        counts = jnp.where(layout.group_BQ < self.clusters, reach, 0).astype(jnp.int32)
        maxk = n_blocks if self.window_blocks is None else min(self.window_blocks, n_blocks)
        ids = jnp.minimum(block_Q[:, None] - counts[..., None] + 1 + jnp.arange(maxk), block_Q[:, None])
        # Masking the self match: a query sits one position earlier, so it sees only the keys strictly before it.
        out, lse = pallas_kernels.block_sparse_attention(
            qk_perm, qk_perm, v_perm, jnp.maximum(ids, 0)[:, None].astype(jnp.int32), counts[:, None],
            block_q=self.block, block_k=self.block, causal=True,
            q_positions_BT=jnp.where(valid_NM, layout.row_BM - self.mask_self, -1),
            kv_positions_BS=jnp.where(valid_NM, layout.row_BM, NEVER), return_lse=True,
            implementation=self.sparse_implementation)
        if self.mask_self:  # a query with no other visible key (lse -inf) takes its own value
            out = jnp.where(jnp.isfinite(lse)[..., None], out, v_perm)
        out_NTE = jnp.take_along_axis(out[:, :, 0], layout.slot_BN[:, :, None], axis=1)
        return jnp.moveaxis(out_NTE.reshape(b, r, t, e), 1, 2)

    def _local_full(self, q_BTLE, k_BTLE, v_BTLE):
        t = q_BTLE.shape[1]
        pad = ((0, 0), (0, -t % self.block), (0, 0), (0, 0))
        q_BTLE, k_BTLE, v_BTLE = (jnp.pad(x, pad) for x in (q_BTLE, k_BTLE, v_BTLE))
        ids, counts = local_lists(jnp.arange(q_BTLE.shape[1] // self.block), self.local_blocks)
        out = pallas_kernels.block_sparse_attention(
            q_BTLE, k_BTLE, v_BTLE, ids[None, None], counts[None, None], block_q=self.block, block_k=self.block,
            causal=True, implementation=self.sparse_implementation)
        return out[:, :t]

    def __call__(self, x_BTD, ctx: ForwardContext, cache: RoutingCache | None = None) -> MixerOutput:
        if ctx.segment_ids_BT is not None:
            raise ValueError("routing_transformer does not support packed documents (segment_ids): the block-sparse "
                             "kernel has no segment mask")
        b, t, _ = x_BTD.shape
        x_BTRE, qk_BTRE, v_BTRE, local = self.project(x_BTD, ctx.positions_BT)
        cluster_BTR = self.assign(x_BTRE)
        aux_loss, metrics = 0.0, {}
        if ctx.mode == "decode":
            o_BTHE, cache = self._decode(qk_BTRE, v_BTRE, cluster_BTR, local, ctx, cache)
        else:
            outs = [self._routed_full(qk_BTRE, v_BTRE, cluster_BTR)]
            if local is not None:
                outs.append(self._local_full(*local))
            o_BTHE = jnp.concatenate(outs, axis=2)
            if ctx.mode == "prefill":
                cache = self._prefill(qk_BTRE, v_BTRE, cluster_BTR, local, ctx.lengths_B, cache)
            else:
                nearest_BTRE = self._nearest(cluster_BTR)
                aux_loss = self.commitment * jnp.mean((x_BTRE - jax.lax.stop_gradient(nearest_BTRE)) ** 2)
                if not self.use_running_average:
                    self._update_centroids(x_BTRE, cluster_BTR)
                if ctx.diagnostics:
                    share = jax.nn.one_hot(cluster_BTR, self.clusters).mean((0, 1))
                    metrics["largest_cluster_share"] = share.max(-1).mean()
        y = self.o_proj(o_BTHE.reshape(b, t, self.n_heads * self.head_dim))
        return MixerOutput(y, cache, aux_loss, metrics)

    def _nearest(self, cluster_BTR):
        """mu_{c(t)} per routed head: [B, T, R, E]."""
        means = self.means[...]
        return means[jnp.arange(self.n_routed)[None, None], cluster_BTR]

    # -- decode ----------------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> RoutingCache:
        e, r = self.head_dim, self.n_routed
        zeros = jnp.zeros((batch, max_len, r), jnp.int32)
        return RoutingCache(KVCache.empty(batch, max_len, self.n_local, e, self.cache_dtype),
                            KVCache.empty(batch, max_len, r, e, self.cache_dtype), zeros, zeros,
                            jnp.zeros((batch, r, self.clusters), jnp.int32))

    def _ranks(self, cluster_BTR, sizes_BRC, valid_BT):
        """Each token's rank among its cluster's members (after `sizes` earlier ones) and the new sizes; tokens
        not valid (prompt padding) count for nothing."""
        onehot = jax.nn.one_hot(cluster_BTR, self.clusters, dtype=jnp.int32) * valid_BT[:, :, None, None]
        before = jnp.cumsum(onehot, axis=1) - onehot + sizes_BRC[:, None]
        rank_BTR = jnp.take_along_axis(before, cluster_BTR[..., None], axis=-1)[..., 0]
        return rank_BTR, sizes_BRC + onehot.sum(1)

    def _prefill(self, qk_BTRE, v_BTRE, cluster_BTR, local, lengths_B, cache: RoutingCache) -> RoutingCache:
        b, t = qk_BTRE.shape[:2]
        zeros_B = jnp.zeros((b,), jnp.int32)
        rank_BTR, sizes = self._ranks(cluster_BTR, cache.sizes_BRC, jnp.arange(t) < lengths_B[:, None])
        local_cache = cache.local if local is None else cache.local.write(local[1], local[2], zeros_B)
        return RoutingCache(local_cache, cache.routed.write(qk_BTRE, v_BTRE, zeros_B),
                            write_at(cache.cluster_BSR, cluster_BTR, zeros_B),
                            write_at(cache.rank_BSR, rank_BTR, zeros_B), sizes)

    def _decode(self, qk_BTRE, v_BTRE, cluster_BTR, local, ctx: ForwardContext, cache: RoutingCache):
        b, t, r, e = qk_BTRE.shape
        position_BT = ctx.lengths_B[:, None] + jnp.arange(t)
        rank_BTR, sizes = self._ranks(cluster_BTR, cache.sizes_BRC, jnp.ones((b, t), jnp.int32))
        routed = cache.routed.write(qk_BTRE, v_BTRE, ctx.lengths_B)
        clusters = write_at(cache.cluster_BSR, cluster_BTR, ctx.lengths_B)
        ranks = write_at(cache.rank_BSR, rank_BTR, ctx.lengths_B)
        s = clusters.shape[1]
        pad = -s % self.block
        n_blocks = (s + pad) // self.block

        def fold(x):  # [B, S, R, ...] -> [B * R, S, ...]
            return jnp.moveaxis(x, 2, 1).reshape(b * r, x.shape[1], *x.shape[3:])

        k_fold, v_fold = fold(routed.k_BSKE)[:, :, None], fold(routed.v_BSKE)[:, :, None]
        clusters_NS, ranks_NS = fold(clusters), fold(ranks)
        outs = []
        for i in range(t):  # each new token: its own member mask over the cache
            member_NS = clusters_NS == fold(cluster_BTR[:, i:i + 1])
            if self.window_blocks is not None:
                member_NS &= ranks_NS // self.block >= fold(rank_BTR[:, i:i + 1]) // self.block - self.window_blocks + 1
            member_NS = jnp.pad(member_NS, ((0, 0), (0, pad)))
            has_NJ = member_NS.reshape(b * r, n_blocks, self.block).any(-1)
            ids = jnp.argsort(~has_NJ, axis=-1, stable=True).astype(jnp.int32)  # blocks with members first
            counts = has_NJ.sum(-1, dtype=jnp.int32)
            positions_N = jnp.repeat(position_BT[:, i], r) - self.mask_self  # as in _routed_full
            kv_positions = jnp.where(member_NS, jnp.arange(s + pad), NEVER)
            out_NE = decode_block_attention(
                fold(qk_BTRE[:, i:i + 1])[:, :, None], jnp.pad(k_fold, ((0, 0), (0, pad), (0, 0), (0, 0))),
                jnp.pad(v_fold, ((0, 0), (0, pad), (0, 0), (0, 0))), ids[:, None, None], counts[:, None, None],
                positions_N[:, None], block_k=self.block, kv_positions_BS=kv_positions,
                implementation=self.sparse_implementation)[:, 0, 0]
            if self.mask_self:
                has_other_N = (kv_positions <= positions_N[:, None]).any(-1)
                out_NE = jnp.where(has_other_N[:, None], out_NE, fold(v_BTRE[:, i:i + 1])[:, 0])
            outs.append(out_NE)
        o_BTRE = jnp.moveaxis(jnp.stack(outs, 1).reshape(b, r, t, e), 1, 2)
        local_cache, outs = cache.local, [o_BTRE]
        if local is not None:
            local_cache = cache.local.write(local[1], local[2], ctx.lengths_B)
            ids, counts = local_lists(position_BT // self.block, self.local_blocks)
            outs.append(decode_block_attention(local[0], local_cache.k_BSKE, local_cache.v_BSKE, ids[:, None],
                                               counts[:, None], position_BT, block_k=self.block,
                                               implementation=self.sparse_implementation))
        return jnp.concatenate(outs, axis=2), RoutingCache(local_cache, routed, clusters, ranks, sizes)

    # -- accounting ------------------------------------------------------------------------------------------
    def cache_bytes_per_token(self) -> int:
        """Keys and values of every head (routed heads cache their shared QK once) + cluster and rank (int32)."""
        kv = (2 * self.n_local + 2 * self.n_routed) * self.head_dim * dtype_bytes(self.cache_dtype)
        return kv + 2 * 4 * self.n_routed

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, centroid distances (2 R C E), and attention: local heads over their band of blocks, routed
        heads over their cluster's earlier members within the window (block-granular), counted at a balanced split
        (ceil(seq_len / C) members per cluster, the paper's C w = n)."""
        d, e, h, r = self.q_proj.in_features, self.head_dim, self.n_heads, self.n_routed
        proj = 2 * d * e * (h + self.n_local + h) + 2 * h * e * d
        route = 2 * r * self.clusters * e
        local_context = routed_context(seq_len, self.block, self.local_blocks)
        # A member of rank p attends the members of its window's blocks up to itself.
        rank = np.arange(-(-seq_len // self.clusters))
        window = rank // self.block if self.window_blocks is None else self.window_blocks - 1
        members_context = float(np.mean(rank % self.block + 1 + self.block * np.minimum(window, rank // self.block)))
        attend = 4 * e * (self.n_local * local_context + r * members_context)
        return int(round(proj + route + attend))

