"""Bi-level routing attention in a causal LM: BiFormer's BRA (Zhu et al., CVPR 2023, arXiv 2303.08810) ported to
1D causal blocks, with MoBA's per-token gate (Lu et al., arXiv 2502.13189) as a second router, and BiFormer's own
non-causal 2D region form for image-shaped inputs.

Causal form. Tokens fall in blocks of B = block_size; per kv head k (its G query heads share one routing, as in NSA;
route_heads="all" shares one across every head, as BiFormer does) and with q, k after QK-norm and RoPE:

    pooled keys       kbar_j = mean_{s in block j} k_s                                  (MoBA's mean pooling)
    router="bra"      block i routes once, with the mean query of the PREVIOUS block (lagged: only tokens before i)
                      A[i, j] = sum_{h in group} < mean_{s in block i-1} q_{s,h}, kbar_j >,      j < i
                      R_i = top_k_j A[i, j]                              (shared by every query of block i)
    router="moba"     every token routes itself:  s_t[j] = sum_{h in group} < q_{t,h}, kbar_j >,   j < block(t)
                      R_t = top_k_j s_t[j]
    attention         o_t = softmax_{s in blocks R u {block(t)}, s <= t}( q_t . k_s / sqrt(E) ) v_s
    LCE (lce_kernel)  o_t += DWConv1d_causal(v)_t   (BiFormer's LePE; left padding only)

Router inputs are stop-gradient, scores float32; top_k counts routed PAST blocks only (the current block is always
attended, token-level causal: MoBA's k = top_k + 1).

What differs from the papers: BiFormer routes region i with the mean query of region i itself, which would see the
future in a causal LM, so "bra" routes with the mean query of block i - 1; only blocks complete before t are
candidates. The image form (image_side=n: non-causal, no decode) scales logits by 1/sqrt(head_dim) (BiFormer: the
full qk_dim) and uses the zoo's GQA projections. Packed documents (segment_ids) are not supported: the block-sparse
kernel has no segment mask.

More in docs/mixers/bilevel_routing.md: why this is causal, the image form, and how each router and the decode run
through `pallas_kernels.block_sparse_attention` (the MoBA path's block-aligned regrouping of (token, block) pairs).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from attnzoo.block_routing import block_aligned_groups, decode_block_attention, routed_context
from attnzoo.cache import KVCache, write_at
from attnzoo.config import ModelConfig
from attnzoo.layers import DepthwiseConv1d
from attnzoo.mixers.base import ForwardContext, MixerOutput, SharedParams, Supports, dtype_bytes, reject_unused
from attnzoo.mixers.gqa import GQAOptions, GQAttention
from attnzoo.registry import register


@dataclasses.dataclass(frozen=True)
class BilevelRoutingOptions:
    """n_heads, n_kv_heads ("all": MHA), head_dim, qk_norm, rope: GQA's head layout (default the model's).

    router: "bra" (per query block, routed with the previous block's mean query) or "moba" (per token).
    block_size: tokens per block (a power of 2; the Triton kernel needs >= 16). Small models default to 16; MoBA
      uses 512-4096, NSA 64.
    top_k: routed past blocks per query block ("bra") or token ("moba"), besides the always-attended current block;
      at most the complete blocks before the last position of max_seq_len (image form: at most the regions).
    route_heads: "kv_head" (one routing per kv head, shared by its query heads) or "all" (one for every head, as
      BiFormer's region affinity over all channels).
    lce_kernel: taps of the local context enhancement, a depthwise conv on V added to the output (none: off;
      BiFormer's side_dwconv=5); causal 1D in the LM form, 'same' 2D (odd taps) in the image form.
    image_side: none (the causal LM form) or n: BiFormer's non-causal 2D form on n x n token grids (T = n^2).
    regions_per_side: BiFormer's n_win, the regions per image side (7 there); must divide image_side.
    """

    n_heads: int | None = None
    n_kv_heads: int | Literal["all"] | None = None
    head_dim: int | None = None
    qk_norm: bool = False
    rope: bool = True
    router: Literal["bra", "moba"] = "bra"
    block_size: int = 16
    top_k: int = 2
    route_heads: Literal["kv_head", "all"] = "kv_head"
    lce_kernel: int | None = None
    image_side: int | None = None
    regions_per_side: int = 7

    def __post_init__(self):
        for name in ("block_size", "top_k", "regions_per_side", "lce_kernel", "image_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of 2 (the block-sparse kernel's tiles; "
                             f"the Triton kernel needs >= 16)")
        if self.image_side is None:
            reject_unused(self, ("regions_per_side",), "without image_side (the causal form routes blocks)")
        else:
            reject_unused(self, ("block_size",), "with image_side (the image form routes regions)")
            if self.router != "bra":
                raise ValueError(f"router={self.router!r}: the image form (image_side) is BiFormer's region routing; "
                                 f"use router='bra'")
            if self.image_side % self.regions_per_side:
                raise ValueError(f"regions_per_side={self.regions_per_side} must divide image_side={self.image_side}")
            if self.lce_kernel is not None and self.lce_kernel % 2 == 0:
                raise ValueError(f"lce_kernel={self.lce_kernel} must be odd in the image form ('same' padding)")

    def gqa(self) -> GQAOptions:
        return GQAOptions(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                          qk_norm=self.qk_norm, rope=self.rope)


def select_past_blocks(scores_BKXJ, current_BKX, top_k: int):
    """Top-k of the blocks j < current (scores of others ignored), then the current block: (lists [B, K, X,
    min(top_k, J) + 1] int32 ascending, counts [B, K, X]). Lists are padded with the current block."""
    past = jnp.arange(scores_BKXJ.shape[-1]) < current_BKX[..., None]
    values, ids = jax.lax.top_k(jnp.where(past, scores_BKXJ, -jnp.inf), min(top_k, scores_BKXJ.shape[-1]))
    chosen = jnp.isfinite(values)
    current = jnp.broadcast_to(current_BKX[..., None], ids.shape[:-1] + (1,)).astype(jnp.int32)
    lists = jnp.sort(jnp.concatenate([jnp.where(chosen, ids, current), current], axis=-1), axis=-1)
    return lists, chosen.sum(-1, dtype=jnp.int32) + 1


def pool_blocks(x_BSKE, block: int):
    """Float32 mean of each block of `block` rows: [B, S, ...] -> [B, S // block, ...]."""
    b, s = x_BSKE.shape[:2]
    return x_BSKE.astype(jnp.float32).reshape(b, s // block, block, *x_BSKE.shape[2:]).mean(axis=2)


class Routing(NamedTuple):
    """Routing decisions: rows are query blocks ("bra") or tokens ("moba"); lists [B, K or 1, rows, MAXK]."""

    lists: jax.Array
    counts: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockRoutingCache:
    """The KV cache plus block summaries: pooled keys of completed blocks ([B, blocks, K, E] float32) and, for "bra",
    the group-summed mean queries of completed blocks and the running query sum of the open block ([B, K, E])."""

    kv: KVCache
    k_pooled_BNKE: jax.Array
    q_pooled_BNKE: jax.Array  # [B, 0, K, E] for "moba"
    q_open_BKE: jax.Array


@register("bilevel_routing", options=BilevelRoutingOptions)
class BilevelRoutingAttention(GQAttention):
    """GQA's projections and RoPE, attention over routed blocks through the block-sparse kernel."""

    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=("block_sparse_attention",))

    @classmethod
    def check(cls, options: BilevelRoutingOptions, config: ModelConfig) -> None:
        GQAttention.check(options.gqa(), config)
        if options.image_side is not None:
            tokens, regions = options.image_side**2, options.regions_per_side**2
            if tokens > config.max_seq_len:
                raise ValueError(f"image_side={options.image_side} needs {tokens} tokens > max_seq_len="
                                 f"{config.max_seq_len}")
            if options.top_k > regions:
                raise ValueError(f"top_k={options.top_k} must be <= the {regions} regions (regions_per_side="
                                 f"{options.regions_per_side})")
            return
        past_blocks = (config.max_seq_len - 1) // options.block_size
        if options.top_k > past_blocks:
            raise ValueError(f"top_k={options.top_k} exceeds the {past_blocks} complete past blocks a query sees at "
                             f"max_seq_len={config.max_seq_len} with block_size={options.block_size}; use top_k <= "
                             f"{past_blocks} or a smaller block_size")

    def __init__(self, config: ModelConfig, options: BilevelRoutingOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        super().__init__(config, options.gqa(), shared=shared, rngs=rngs)
        self.router, self.block, self.top_k = options.router, options.block_size, options.top_k
        self.route_all_heads = options.route_heads == "all"
        self.image_side, self.regions_per_side = options.image_side, options.regions_per_side
        self.lce_kernel = options.lce_kernel
        self.sparse_implementation = config.kernel("block_sparse_attention")
        channels = self.n_kv_heads * self.head_dim
        param_dtype = jnp.dtype(config.param_dtype)
        if options.lce_kernel is None:
            self.lce = None
        elif options.image_side is None:
            self.lce = DepthwiseConv1d(channels, options.lce_kernel, use_bias=True, param_dtype=param_dtype,
                                       rngs=rngs)
        else:
            self.lce = nnx.Conv(channels, channels, (options.lce_kernel,) * 2, padding="SAME",
                                feature_group_count=channels, dtype=jnp.dtype(config.dtype), param_dtype=param_dtype,
                                rngs=rngs)

    # -- routing -----------------------------------------------------------------------------------------------
    def _scores(self, a_BXKE, kbar_BJKE):
        """sum over the query heads of each kv head (and over kv heads with route_heads="all") of <a, kbar>:
        [B, K or 1, X, J] float32; `a` is the group-summed query, router inputs are stop-gradient."""
        scores = jnp.einsum("bxke,bjke->bkxj", jax.lax.stop_gradient(a_BXKE),
                            jax.lax.stop_gradient(kbar_BJKE), precision=jax.lax.Precision.HIGHEST)
        return scores.sum(axis=1, keepdims=True) if self.route_all_heads else scores

    def _group_sum(self, q_BTHE):
        b, t = q_BTHE.shape[:2]
        return q_BTHE.astype(jnp.float32).reshape(b, t, self.n_kv_heads, -1, self.head_dim).sum(axis=3)

    def routing(self, q_BTHE, k_BTKE) -> Routing:
        """The causal routing of a whole sequence (T a multiple of block_size)."""
        b, t = q_BTHE.shape[:2]
        kbar_BJKE = pool_blocks(k_BTKE, self.block)
        n_blocks = t // self.block
        q_sum_BTKE = self._group_sum(q_BTHE)
        if self.router == "bra":
            qbar_BJKE = pool_blocks(q_sum_BTKE, self.block)
            lagged_BJKE = jnp.pad(qbar_BJKE, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]  # block i: mean q of i - 1
            scores = self._scores(lagged_BJKE, kbar_BJKE)
            current = jnp.arange(n_blocks)
        else:
            scores = self._scores(q_sum_BTKE, kbar_BJKE)
            current = jnp.arange(t) // self.block
        return Routing(*select_past_blocks(scores, jnp.broadcast_to(current, scores.shape[:-1]), self.top_k))

    # -- attention ---------------------------------------------------------------------------------------------
    def _attend_moba(self, q_BTHE, k_BTKE, v_BTKE, routing: Routing):
        """Per-token lists through the kernel: (token, block) pairs regrouped by block (see
        docs/mixers/bilevel_routing.md, "Compute")."""
        b, t, h, e = q_BTHE.shape
        kr = routing.lists.shape[1]  # routings: K or 1
        slots = routing.lists.shape[-1]
        n_blocks = t // self.block

        def fold(x_BTXE):  # [B, T, X, E] -> [B * kr, T, X // kr, E]: one routing per folded batch row
            x = x_BTXE.reshape(b, t, kr, -1, x_BTXE.shape[-1])
            return jnp.moveaxis(x, 2, 1).reshape(b * kr, t, -1, x_BTXE.shape[-1])

        in_use = jnp.arange(slots) < routing.counts[..., None]
        pair_group = jnp.where(in_use, routing.lists, n_blocks).reshape(b * kr, t * slots)  # n_blocks: unused pair
        layout = block_aligned_groups(pair_group, n_blocks + 1, self.block)
        token_BM = jnp.where(layout.row_BM >= 0, layout.row_BM // slots, 0)
        q_fold = fold(q_BTHE)
        q_rows = jnp.take_along_axis(q_fold, token_BM[:, :, None, None], axis=1)
        q_positions = jnp.where(layout.row_BM >= 0, token_BM, -1)
        ids = jnp.minimum(layout.group_BQ, n_blocks - 1)[:, None, :, None]
        counts = (layout.group_BQ < n_blocks).astype(jnp.int32)[:, None, :]
        out_rows, lse_rows = pallas_kernels.block_sparse_attention(
            q_rows, fold(k_BTKE), fold(v_BTKE), ids, counts, block_q=self.block, block_k=self.block, causal=True,
            q_positions_BT=q_positions, return_lse=True, implementation=self.sparse_implementation)
        out_pairs = jnp.take_along_axis(out_rows, layout.slot_BN[:, :, None, None], axis=1)
        lse_pairs = jnp.take_along_axis(lse_rows, layout.slot_BN[:, :, None], axis=1)
        g = out_pairs.shape[2]
        weights = jax.nn.softmax(lse_pairs.reshape(b * kr, t, slots, g), axis=2)  # exact merge through the lse
        o = jnp.einsum("ntsg,ntsgf->ntgf", weights, out_pairs.reshape(b * kr, t, slots, g, -1).astype(jnp.float32))
        return jnp.moveaxis(o.reshape(b, kr, t, g, -1), 1, 2).reshape(b, t, h, -1).astype(q_BTHE.dtype)

    def _attend_full(self, q_BTHE, k_BTKE, v_BTKE):
        """Causal routed attention over a whole sequence: (o [B, T, H, E], routing)."""
        t = q_BTHE.shape[1]
        pad = -t % self.block
        q_BTHE, k_BTKE, v_BTKE = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_BTHE, k_BTKE, v_BTKE))
        routing = self.routing(q_BTHE, k_BTKE)
        if self.router == "moba":
            o_BTHE = self._attend_moba(q_BTHE, k_BTKE, v_BTKE, routing)
        else:
            o_BTHE = pallas_kernels.block_sparse_attention(
                q_BTHE, k_BTKE, v_BTKE, routing.lists, routing.counts, block_q=self.block, block_k=self.block,
                causal=True, implementation=self.sparse_implementation)
        return o_BTHE[:, :t], routing

    def _local_context(self, v_rows_BSKE, t: int):
        """LCE of the last t rows (the rows before them are history), per kv head, broadcast to its query heads."""
        b = v_rows_BSKE.shape[0]
        lce_BTC = self.lce(v_rows_BSKE.reshape(b, v_rows_BSKE.shape[1], -1), t)
        lce_BTKE = lce_BTC.reshape(b, t, self.n_kv_heads, 1, self.head_dim)
        groups = self.n_heads // self.n_kv_heads
        return jnp.broadcast_to(lce_BTKE, (b, t, self.n_kv_heads, groups, self.head_dim)).reshape(
            b, t, self.n_heads, self.head_dim)

    def __call__(self, x_BTD, ctx: ForwardContext, cache: BlockRoutingCache | None = None) -> MixerOutput:
        if ctx.segment_ids_BT is not None:
            raise ValueError("bilevel_routing does not support packed documents (segment_ids): the block-sparse "
                             "kernel has no segment mask")
        q_BTHE, k_BTKE, v_BTKE = self.project(x_BTD)
        q_BTHE, k_BTKE = self.position_qk(q_BTHE, k_BTKE, ctx.positions_BT)
        if self.image_side is not None:
            if ctx.mode != "full":
                raise ValueError("bilevel_routing: the image form (image_side) is non-causal and has no cached "
                                 "decoding")
            return MixerOutput(self.output(self._attend_image(q_BTHE, k_BTKE, v_BTKE)))
        if ctx.mode == "decode":
            o_BTHE, cache = self._decode(q_BTHE, k_BTKE, v_BTKE, ctx, cache)
        else:
            o_BTHE, routing = self._attend_full(q_BTHE, k_BTKE, v_BTKE)
            if self.lce is not None:
                history = jnp.zeros_like(v_BTKE[:, :self.lce_kernel - 1])
                o_BTHE = o_BTHE + self._local_context(jnp.concatenate([history, v_BTKE], 1), v_BTKE.shape[1])
            if ctx.mode == "prefill":
                cache = self._prefill(q_BTHE, k_BTKE, v_BTKE, ctx.lengths_B, cache)
        metrics = {}
        if ctx.diagnostics and ctx.mode == "full":
            t = x_BTD.shape[1]
            metrics["attended_fraction"] = jnp.float32(routed_context(t, self.block, self.top_k) / ((t + 1) / 2))
        return MixerOutput(self.output(o_BTHE), cache, metrics=metrics)

    # -- decode ------------------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int) -> BlockRoutingCache:
        if self.image_side is not None:
            raise ValueError("bilevel_routing: the image form (image_side) is non-causal and has no cached decoding")
        n_blocks = -(-max_len // self.block)
        k, e = self.n_kv_heads, self.head_dim
        q_blocks = n_blocks if self.router == "bra" else 0
        return BlockRoutingCache(KVCache.empty(batch, max_len, k, e, self.cache_dtype),
                                 jnp.zeros((batch, n_blocks, k, e), jnp.float32),
                                 jnp.zeros((batch, q_blocks, k, e), jnp.float32),
                                 jnp.zeros((batch, k, e), jnp.float32))

    def _prefill(self, q_BTHE, k_BTKE, v_BTKE, lengths_B, cache: BlockRoutingCache) -> BlockRoutingCache:
        """The right-padded prompts' keys, values and summaries (blocks past a prompt's end are rewritten when the
        decode completes them)."""
        b, t = q_BTHE.shape[:2]
        zeros_B = jnp.zeros((b,), jnp.int32)
        pad = ((0, 0), (0, -t % self.block), (0, 0), (0, 0))
        kv = cache.kv.write(k_BTKE, v_BTKE, zeros_B)
        k_pooled = write_at(cache.k_pooled_BNKE, pool_blocks(jnp.pad(k_BTKE.astype(kv.k_BSKE.dtype), pad),
                                                             self.block), zeros_B)
        q_pooled, q_open = cache.q_pooled_BNKE, cache.q_open_BKE
        if self.router == "bra":
            q_sum_BTKE = self._group_sum(q_BTHE)
            q_pooled = write_at(q_pooled, pool_blocks(jnp.pad(q_sum_BTKE, pad), self.block), zeros_B)
            position_T = jnp.arange(t)
            open_BT = (position_T >= lengths_B[:, None] // self.block * self.block) & (position_T < lengths_B[:, None])
            q_open = jnp.einsum("bt,btke->bke", open_BT.astype(jnp.float32), q_sum_BTKE)
        return BlockRoutingCache(kv, k_pooled, q_pooled, q_open)

    def _decode(self, q_BTHE, k_BTKE, v_BTKE, ctx: ForwardContext, cache: BlockRoutingCache):
        b, t = q_BTHE.shape[:2]
        bs = self.block
        kv = cache.kv.write(k_BTKE, v_BTKE, ctx.lengths_B)
        position_BT = ctx.lengths_B[:, None] + jnp.arange(t)
        block_BT = position_BT // bs
        n_blocks = cache.k_pooled_BNKE.shape[1]
        # Blocks completed by a new token: their pooled keys from the cache (scattered; other tokens drop).
        completes_BT = (position_BT + 1) % bs == 0
        target_BT = jnp.where(completes_BT, block_BT, n_blocks)
        block_rows = jax.vmap(lambda k_SKE, starts_T: jax.vmap(
            lambda start: jax.lax.dynamic_slice_in_dim(k_SKE, start, bs))(starts_T))
        k_rows_BSKE = jnp.pad(kv.k_BSKE, ((0, 0), (0, -kv.k_BSKE.shape[1] % bs), (0, 0), (0, 0)))  # whole blocks
        block_keys_BTbKE = block_rows(k_rows_BSKE, block_BT * bs)
        batch = jnp.arange(b)[:, None]
        k_pooled = cache.k_pooled_BNKE.at[batch, target_BT].set(
            pool_blocks(block_keys_BTbKE.reshape(b * t, bs, self.n_kv_heads, self.head_dim), bs).reshape(
                b, t, self.n_kv_heads, self.head_dim), mode="drop")
        q_sum_BTKE = self._group_sum(q_BTHE)
        q_pooled, q_open = cache.q_pooled_BNKE, cache.q_open_BKE
        if self.router == "bra":
            # Running query sum of each new token's block: the open block's sum (if it is the same block) plus the
            # new tokens of that block up to this one.
            same_BTT = (block_BT[:, :, None] == block_BT[:, None, :]) & (jnp.arange(t)[:, None] >= jnp.arange(t))
            continues_BT = block_BT == (ctx.lengths_B // bs)[:, None]
            sums_BTKE = (jnp.einsum("bts,bske->btke", same_BTT.astype(jnp.float32), q_sum_BTKE)
                         + continues_BT[..., None, None] * q_open[:, None])
            q_pooled = q_pooled.at[batch, target_BT].set(sums_BTKE / bs, mode="drop")
            q_open = jnp.where(completes_BT[:, -1, None, None], 0.0, sums_BTKE[:, -1])
            descriptor_BTKE = jnp.take_along_axis(q_pooled, jnp.maximum(block_BT - 1, 0)[:, :, None, None], axis=1)
        else:
            descriptor_BTKE = q_sum_BTKE
        scores = self._scores(descriptor_BTKE, k_pooled)
        lists, counts = select_past_blocks(scores, jnp.broadcast_to(block_BT[:, None], scores.shape[:-1]), self.top_k)
        o_BTHE = decode_block_attention(q_BTHE, kv.k_BSKE, kv.v_BSKE, lists, counts, position_BT, block_k=bs,
                                        implementation=self.sparse_implementation)
        if self.lce is not None:
            back = self.lce_kernel - 1
            index_BR = ctx.lengths_B[:, None] - back + jnp.arange(back + t)
            v_rows = jnp.take_along_axis(kv.v_BSKE, jnp.maximum(index_BR, 0)[:, :, None, None], axis=1)
            v_rows = jnp.where((index_BR >= 0)[:, :, None, None], v_rows, 0).astype(v_BTKE.dtype)
            o_BTHE = o_BTHE + self._local_context(v_rows, t)
        return o_BTHE, BlockRoutingCache(kv, k_pooled, q_pooled, q_open)

    # -- image form --------------------------------------------------------------------------------------------
    def _attend_image(self, q_BTHE, k_BTKE, v_BTKE):
        """BiFormer's non-causal BRA on an image_side^2 grid (raster order): regions made contiguous, top_k regions
        per region through the kernel (causal=False), LCE a 'same' depthwise Conv2d on V."""
        b, t = q_BTHE.shape[:2]
        n, r = self.image_side, self.regions_per_side
        if t != n * n:
            raise ValueError(f"bilevel_routing image form: T={t} tokens, expected image_side^2 = {n * n}")
        w = n // r  # region side

        def to_regions(x):  # raster [B, n*n, X, E] -> region-major [B, r*r*w*w, X, E]
            x = x.reshape(b, r, w, r, w, *x.shape[2:])
            return jnp.swapaxes(x, 2, 3).reshape(b, t, *x.shape[5:])

        q_r, k_r, v_r = (to_regions(x) for x in (q_BTHE, k_BTKE, v_BTKE))
        region = w * w
        qbar_BJKE = pool_blocks(self._group_sum(q_r), region)
        scores = self._scores(qbar_BJKE, pool_blocks(k_r, region))
        _, ids = jax.lax.top_k(scores, self.top_k)
        lists = jnp.sort(ids, axis=-1).astype(jnp.int32)
        counts = jnp.full(lists.shape[:-1], self.top_k, jnp.int32)
        o_r = pallas_kernels.block_sparse_attention(q_r, k_r, v_r, lists, counts, block_q=region, block_k=region,
                                                    causal=False, implementation=self.sparse_implementation)
        o_BTHE = jnp.swapaxes(o_r.reshape(b, r, r, w, w, *o_r.shape[2:]), 2, 3).reshape(o_r.shape)
        if self.lce is not None:
            lce_BTC = self.lce(v_BTKE.reshape(b, n, n, -1)).reshape(b, t, self.n_kv_heads, 1, self.head_dim)
            groups = self.n_heads // self.n_kv_heads
            o_BTHE = o_BTHE + jnp.broadcast_to(lce_BTC, (b, t, self.n_kv_heads, groups, self.head_dim)).reshape(
                o_BTHE.shape)
        return o_BTHE

    # -- accounting --------------------------------------------------------------------------------------------
    def cache_bytes_per_token(self) -> int:
        """Keys and values; the float32 block summaries add K E 4 bytes ("bra": twice) per block_size tokens."""
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes(self.cache_dtype)

    def flops_per_token(self, seq_len: int) -> int:
        d, h, k, e = self.q_proj.in_features, self.n_heads, self.n_kv_heads, self.head_dim
        proj = 2 * d * e * (2 * h + 2 * k)
        if self.image_side is not None:
            t, regions = self.image_side**2, self.regions_per_side**2
            region = t // regions
            attend = 4 * h * e * self.top_k * region
            route = 2 * k * e * regions * regions / t  # region affinities A_r = qbar kbar^T
            lce = 2 * k * e * (self.lce_kernel or 0) ** 2
            return int(round(proj + attend + route + lce))
        attend = 4 * h * e * routed_context(seq_len, self.block, self.top_k)
        n_blocks = -(-seq_len // self.block)
        if self.router == "bra":  # one score per (block, past block) pair, per kv head
            route = 2 * k * e * (n_blocks * (n_blocks - 1) / 2) / seq_len
        else:  # one score per (token, past block) pair, per kv head
            route = 2 * k * e * float(np.mean(np.arange(seq_len) // self.block))
        lce = 2 * k * e * (self.lce_kernel or 0)
        return int(round(proj + attend + route + lce))
