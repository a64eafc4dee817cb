"""Titans' hybrids of the neural memory and attention: MAC (memory as context) and MAG (memory as gate); MAL is a plan.

Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663, section 4. The memory is
`attnzoo.mixers.titans_memory`; persistent memory (Eq. 19) is N_p learned, input-independent tokens
p = [p_1 .. p_{N_p}] (`n_persistent`) that every query may attend to. Softmax attention runs through
`attnzoo.attention` with the GQA projections of `attnzoo.mixers.gqa`.

MAG, "titans_mag" (Eqs. 26-28): both branches run over x~ = [p || x], the persistent tokens prepended to the input:

    y = SW-Attn*(x~)              a window of `window` tokens plus the persistent prefix (two softmax parts merged
                                  by their log-sum-exp; decode attends to [p; the window's cache rows])
    o = W_o (RMSNorm(y) * sigmoid(RMSNorm(M(x~))))     the gate "normalize y and M(x~) using learnable vector-valued
                                                        weights, followed by a non-linearity"

MAC, "titans_mac" (Eqs. 21-25): the sequence is cut into segments of `chunk_size` tokens (the memory's chunk, so the
memory is updated once per segment). For segment S^(i) with queries q = x W_Q of the memory:

    h = M_{i-1}(q)                       retrieval with the weights before the segment (chunk-start weights)
    y = Attn([p || h || S^(i)])          causal attention inside the segment, laid out p, h_0, x_0, h_1, x_1, ...
    M_i = update of M_{i-1} with keys / values / gates from y          (Eq. 24)
    o_t = W_o (RMSNorm(y_t) * sigmoid(RMSNorm(M_t(y_t))))              (Eq. 25; M_t: the memory after token t)

What differs from the paper, made causal token by token: MAC's segment interleaves h_s and x_s (a later h would leak
the future) and reads Eq. 25's memory after token t's own update (read_after_update=true by default); MAG's memory
writes p before the sequence's first token. MAL (Eqs. 29-31) needs no code: the plan "lmm[mlp=none],gqa(window=64)".

More in docs/mixers/titans.md: the layout of each hybrid, MAC's segments and decode cache, MAL, and the FLOPs count.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.attention import attention, cached_attention
from attnzoo.cache import KVCache
from attnzoo.config import ModelConfig
from attnzoo.layers import RMSNorm, dense
from attnzoo.mixers.base import (
    ForwardContext,
    Mixer,
    MixerOutput,
    SharedParams,
    Supports,
    average_context,
    compiled_forward,
)
from attnzoo.mixers.gqa import GQAOptions, GQAttention
from attnzoo.mixers.titans_memory import (
    Gates,
    LongTermMemory,
    MemoryState,
    NeuralMemory,
    TitansMemoryCache,
    TitansMemoryOptions,
    from_chunks,
    mlp_apply,
    next_start,
    to_chunks,
    token_index,
    valid_per_chunk,
)
from attnzoo.registry import register

KERNEL_OPS = ("flash_attention", "decode_attention", "chunked_linear_attention")


def check_persistent(n_persistent: int) -> None:
    if not isinstance(n_persistent, int) or n_persistent < 0:
        raise ValueError(f"n_persistent={n_persistent} must be an integer >= 0")


@dataclasses.dataclass(frozen=True)
class TitansMAGOptions(TitansMemoryOptions):
    """The memory's options (titans_memory.TitansMemoryOptions), plus window: the sliding window in tokens (the
    query's own included); n_persistent: N_p persistent memory tokens (0: none, the paper's "w/o persistent");
    rope: rotary positions in the attention."""

    window: int = 64
    n_persistent: int = 4
    rope: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window={self.window} must be an integer >= 1")
        check_persistent(self.n_persistent)


@dataclasses.dataclass(frozen=True)
class TitansMACOptions(TitansMemoryOptions):
    """The memory's options (titans_memory.TitansMemoryOptions; chunk_size is also the attention segment;
    read_after_update defaults to true, Eq. 25's output gate), plus n_persistent: N_p persistent memory tokens
    (0: none); rope: rotary positions in the segment attention."""

    read_after_update: bool = True
    n_persistent: int = 4
    rope: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_persistent(self.n_persistent)


def check_attention(options, config: ModelConfig) -> None:
    GQAttention.check(GQAOptions(rope=options.rope), config)


class MemoryGate(nnx.Module):
    """o = W_o (RMSNorm(y) * sigmoid(RMSNorm(m))): attention output y gated by the memory's m (Titans' ⊗)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, param_dtype = config.d_model, jnp.dtype(config.param_dtype)
        self.y_norm = RMSNorm(d, eps=config.norm_eps, param_dtype=param_dtype)
        self.m_norm = RMSNorm(d, eps=config.norm_eps, param_dtype=param_dtype)
        self.o_proj = dense(d, d, scale=1 / (2 * config.n_layers) ** 0.5, dtype=jnp.dtype(config.dtype),
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, y_BTD, m_BTD):
        gate_BTD = jax.nn.sigmoid(self.m_norm(m_BTD).astype(jnp.float32))
        return self.o_proj((self.y_norm(y_BTD).astype(jnp.float32) * gate_BTD).astype(y_BTD.dtype))

    def flops_per_token(self) -> int:
        return 2 * self.o_proj.in_features * self.o_proj.out_features


def persistent_tokens(config: ModelConfig, n: int, rngs: nnx.Rngs) -> nnx.Param | None:
    """N_p learned tokens in the model width, at the scale of the normalised inputs they sit beside."""
    if not n:
        return None
    return nnx.Param(jax.random.normal(rngs.params(), (n, config.d_model), jnp.dtype(config.param_dtype)))


def merge_softmax_parts(o_a, lse_a, o_b, lse_b):
    """Softmax attention over the union of two key sets from each part's output and log-sum-exp ([B, H, T])."""
    lse = jnp.logaddexp(lse_a, lse_b)
    w_a, w_b = (jnp.swapaxes(jnp.exp(x - lse), 1, 2)[..., None] for x in (lse_a, lse_b))
    return (o_a.astype(jnp.float32) * w_a + o_b.astype(jnp.float32) * w_b).astype(o_a.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TitansMAGCache:
    """The memory's state and the attention's keys / values of every token (read through the window)."""

    memory: TitansMemoryCache
    kv: KVCache


@register("titans_mag", options=TitansMAGOptions)
class TitansMAG(Mixer):
    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=KERNEL_OPS)

    @classmethod
    def check(cls, options: TitansMAGOptions, config: ModelConfig) -> None:
        check_attention(options, config)

    def __init__(self, config: ModelConfig, options: TitansMAGOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.memory = LongTermMemory(config, options, rngs=rngs)
        self.attention = GQAttention(config, GQAOptions(window=options.window, rope=options.rope), rngs=rngs)
        self.window, self.n_persistent = options.window, options.n_persistent
        self.persistent = persistent_tokens(config, options.n_persistent, rngs)
        self.combine = MemoryGate(config, rngs=rngs)

    def persistent_kv(self):
        """The persistent tokens' keys and values [1, N_p, K, E] (no rotary position: they have none)."""
        _, k_1PKE, v_1PKE = self.attention.project(self.persistent[...][None].astype(self.attention.cache_dtype))
        return k_1PKE, v_1PKE

    def attend(self, x_BTD, ctx: ForwardContext, cache: KVCache | None):
        """Sliding-window attention with the persistent prefix: ([B, T, D], cache)."""
        attn = self.attention
        q_BTHE, k_BTKE, v_BTKE = attn.project(x_BTD)
        q_BTHE, k_BTKE = attn.position_qk(q_BTHE, k_BTKE, ctx.positions_BT)
        if ctx.mode == "decode":
            cache = cache.write(k_BTKE, v_BTKE, ctx.lengths_B)
            return attn.output(self.attend_cached(q_BTHE, cache, ctx.lengths_B)), cache
        o_BTHE, lse_BHT = attention(q_BTHE, k_BTKE, v_BTKE, causal=True, sliding_window=self.window,
                                    return_lse=True, implementation=attn.flash_implementation)
        if self.persistent is not None:
            b = x_BTD.shape[0]
            k_BPKE, v_BPKE = (jnp.broadcast_to(a, (b, *a.shape[1:])) for a in self.persistent_kv())
            o_p, lse_p = attention(q_BTHE, k_BPKE, v_BPKE, causal=False, return_lse=True,
                                   implementation=attn.flash_implementation)
            o_BTHE = merge_softmax_parts(o_BTHE, lse_BHT, o_p, lse_p)
        if ctx.mode == "prefill":
            cache = cache.write(k_BTKE, v_BTKE, jnp.zeros((x_BTD.shape[0],), jnp.int32))
        return attn.output(o_BTHE), cache

    def attend_cached(self, q_BTHE, cache: KVCache, lengths_B):
        """Each new token against [p; the last `window` cached rows up to itself], through the decode kernel: the
        rows are gathered per (sequence, new token) and laid after p, so that no window cuts the prefix off."""
        b, t, h, e = q_BTHE.shape
        capacity = cache.k_BSKE.shape[1]
        w = min(self.window, capacity)
        held_BT = lengths_B[:, None] + jnp.arange(t)[None, :] + 1  # tokens held once new token i is in
        start_BT = jnp.clip(held_BT - w, 0, capacity - w)
        rows = jax.vmap(jax.vmap(lambda rows, start: jax.lax.dynamic_slice_in_dim(rows, start, w), (None, 0)))
        k_BTWKE, v_BTWKE = rows(cache.k_BSKE, start_BT), rows(cache.v_BSKE, start_BT)
        if self.persistent is not None:
            k_p, v_p = (jnp.broadcast_to(a[:, None], (b, t, *a.shape[1:])).astype(cache.k_BSKE.dtype)
                        for a in self.persistent_kv())
            k_BTWKE, v_BTWKE = jnp.concatenate([k_p, k_BTWKE], axis=2), jnp.concatenate([v_p, v_BTWKE], axis=2)
        lengths = (self.n_persistent + jnp.minimum(held_BT, w)).reshape(b * t)
        o = cached_attention(q_BTHE.reshape(b * t, 1, h, e), k_BTWKE.reshape(b * t, *k_BTWKE.shape[2:]),
                             v_BTWKE.reshape(b * t, *v_BTWKE.shape[2:]), lengths,
                             implementation=self.attention.decode_implementation)
        return o.reshape(b, t, h, -1)

    @compiled_forward
    def __call__(self, x_BTD, ctx: ForwardContext, cache: TitansMAGCache | None = None) -> MixerOutput:
        prefix_PD = None if self.persistent is None else self.persistent[...]
        memory = self.memory.forward(x_BTD, ctx, None if cache is None else cache.memory, prefix_PD)
        y_BTD, kv = self.attend(x_BTD, ctx, None if cache is None else cache.kv)
        if ctx.mode != "full":
            cache = TitansMAGCache(memory.cache, kv)
        return MixerOutput(self.combine(y_BTD, memory.y_BTD), cache)

    def init_cache(self, batch: int, max_len: int) -> TitansMAGCache:
        return TitansMAGCache(self.memory.init_cache(batch, max_len), self.attention.init_cache(batch, max_len))

    def cache_bytes_per_token(self) -> int:
        return self.attention.cache_bytes_per_token()

    def flops_per_token(self, seq_len: int) -> int:
        attn = self.attention
        prefix = 4 * attn.n_heads * attn.head_dim * self.n_persistent
        return (self.memory.flops_per_token(seq_len) + attn.flops_per_token(seq_len) + prefix
                + self.combine.flops_per_token())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TitansMACCache:
    """The memory's state (and the conv history of its queries), and the current segment's keys / values in the
    layout h_0, x_0, h_1, x_1, ... ([B, 2 chunk_size, K, E]; the persistent tokens' are recomputed)."""

    memory: TitansMemoryCache
    segment: KVCache


@register("titans_mac", options=TitansMACOptions)
class TitansMAC(Mixer):
    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=KERNEL_OPS)

    @classmethod
    def check(cls, options: TitansMACOptions, config: ModelConfig) -> None:
        check_attention(options, config)

    def __init__(self, config: ModelConfig, options: TitansMACOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.memory = NeuralMemory(config, options, rngs=rngs, conv_keys=False)
        self.attention = GQAttention(config, GQAOptions(rope=options.rope), rngs=rngs)
        self.segment, self.n_persistent = options.chunk_size, options.n_persistent
        self.persistent = persistent_tokens(config, options.n_persistent, rngs)
        self.combine = MemoryGate(config, rngs=rngs)
        self.d_model = config.d_model

    def retrieve_context(self, weights, q_BTHE, x_BTD):
        """h = M(q) with the segment's start weights, read out into the model width."""
        return self.memory.read_out(mlp_apply(weights, q_BTHE), x_BTD)

    def with_persistent(self, tokens_BND):
        """[p || tokens]."""
        if self.persistent is None:
            return tokens_BND
        b, _, d = tokens_BND.shape
        p = jnp.broadcast_to(self.persistent[...].astype(tokens_BND.dtype), (b, self.n_persistent, d))
        return jnp.concatenate([p, tokens_BND], axis=1)

    def memory_inputs(self, y_BTD):
        memory = self.memory
        k_BTHE, v_BTHE = memory.keys_values(y_BTD)
        return memory.queries(y_BTD), k_BTHE, v_BTHE, memory.gates(y_BTD)

    def segment_forward(self, carry, xs, *, track_start: bool):
        """One segment of the full / prefill forward: (carry, (o [B, b, D], the segment's h/x keys and values))."""
        start, weights, momentum = carry
        x_BCD, q_BCHE, n_valid_B = xs
        b, c, _ = x_BCD.shape
        attn, n_p = self.attention, self.n_persistent
        h_BCD = self.retrieve_context(weights, q_BCHE, x_BCD)
        seq_BND = self.with_persistent(jnp.stack([h_BCD, x_BCD], axis=2).reshape(b, 2 * c, -1))
        positions_N = jnp.concatenate([jnp.arange(n_p), n_p + jnp.repeat(jnp.arange(c), 2)])
        q_BNHE, k_BNKE, v_BNKE = attn.project(seq_BND)
        q_BNHE, k_BNKE = attn.position_qk(q_BNHE, k_BNKE, jnp.broadcast_to(positions_N, (b, positions_N.size)))
        o_BNHE = attention(q_BNHE, k_BNKE, v_BNKE, causal=True, implementation=attn.flash_implementation)
        y_BCD = attn.output(o_BNHE[:, n_p + 1::2])
        q_m, k_m, v_m, gates = self.memory_inputs(y_BCD)
        m_BCHE, new_weights, new_momentum = self.memory.chunk(weights, momentum, q_m, k_m, v_m, gates, n_valid_B)
        if track_start:
            start = next_start(start, weights, new_weights, n_valid_B, c)
        o_BCD = self.combine(y_BCD, self.memory.read_out(m_BCHE, y_BCD))
        return (start, new_weights, new_momentum), (o_BCD, k_BNKE[:, n_p:], v_BNKE[:, n_p:])

    def decode_step(self, carry, xs):
        """One new token per sequence (decode): (carry, o [B, D])."""
        state, segment = carry
        x_BD, q_BHE, pos_B = xs  # pos_B: the token's index in its sequence
        attn, n_p, c = self.attention, self.n_persistent, self.segment
        b = x_BD.shape[0]
        j_B = pos_B % c
        x_B1D = x_BD[:, None]
        h_B1D = self.retrieve_context(state.start, q_BHE[:, None], x_B1D)
        q_B2HE, k_B2KE, v_B2KE = attn.project(jnp.concatenate([h_B1D, x_B1D], axis=1))
        q_B2HE, k_B2KE = attn.position_qk(q_B2HE, k_B2KE, jnp.broadcast_to((n_p + j_B)[:, None], (b, 2)))
        segment = segment.write(k_B2KE, v_B2KE, 2 * j_B)
        k_BSKE, v_BSKE = segment.k_BSKE, segment.v_BSKE
        if self.persistent is not None:
            _, k_p, v_p = attn.project(self.persistent[...][None].astype(x_BD.dtype))
            _, k_p = attn.position_qk(k_p, k_p, jnp.arange(n_p)[None])
            k_BSKE = jnp.concatenate([jnp.broadcast_to(k_p, (b, *k_p.shape[1:])).astype(k_BSKE.dtype), k_BSKE], 1)
            v_BSKE = jnp.concatenate([jnp.broadcast_to(v_p, (b, *v_p.shape[1:])).astype(v_BSKE.dtype), v_BSKE], 1)
        o_B1HE = cached_attention(q_B2HE[:, 1:], k_BSKE, v_BSKE, n_p + 2 * j_B + 2,
                                  implementation=attn.decode_implementation)
        y_B1D = attn.output(o_B1HE)
        q_m, k_m, v_m, gates = self.memory_inputs(y_B1D)
        gates = Gates(*(None if g is None else g[:, 0] for g in gates))
        m_BHE, state = self.memory.step(state, q_m[:, 0], k_m[:, 0], v_m[:, 0], gates, (pos_B + 1) % c == 0)
        o_B1D = self.combine(y_B1D, self.memory.read_out(m_BHE[:, None], y_B1D))
        return (state, segment), o_B1D[:, 0]

    @compiled_forward
    def __call__(self, x_BTD, ctx: ForwardContext, cache: TitansMACCache | None = None) -> MixerOutput:
        if ctx.segment_ids_BT is not None and ctx.mode == "full":
            raise ValueError("titans_mac: packed documents (segment_ids_BT) are not supported; the memory has no "
                             "per-document reset")
        b, t, _ = x_BTD.shape
        memory, c, decode = self.memory, self.segment, ctx.mode == "decode"
        history_BWC = memory.conv_history(b, None if cache is None else cache.memory, decode)
        q_BTHE, _, _, rows_BSC = memory.project_input(x_BTD, history_BWC)
        if decode:
            xs = (jnp.swapaxes(x_BTD, 0, 1), jnp.swapaxes(q_BTHE, 0, 1), jnp.swapaxes(token_index(ctx, t), 0, 1))
            (state, segment), o_TBD = jax.lax.scan(self.decode_step, (cache.memory.memory, cache.segment), xs)
            o_BTD = jnp.swapaxes(o_TBD, 0, 1)
        else:
            prefill = ctx.mode == "prefill"
            lengths_B = ctx.lengths_B if prefill else jnp.full((b,), t, jnp.int32)
            x_NBCD, q_NBCHE = to_chunks(x_BTD, c), to_chunks(q_BTHE, c)
            xs = (x_NBCD, q_NBCHE, valid_per_chunk(lengths_B, x_NBCD.shape[0], c))
            state = memory.initial_state(b)
            body = jax.checkpoint(lambda carry, xs: self.segment_forward(carry, xs, track_start=prefill))
            carry = (state.start if prefill else (), state.weights, state.momentum)
            (start, weights, momentum), (o_NBCD, k_NB2KE, v_NB2KE) = jax.lax.scan(body, carry, xs)
            o_BTD = from_chunks(o_NBCD, t)
            state = MemoryState(start if prefill else weights, weights, momentum)
            if prefill:  # the keys / values of the segment each sequence's next token falls in
                segment_B = jnp.minimum(lengths_B // c, k_NB2KE.shape[0] - 1)
                segment = KVCache(k_NB2KE[segment_B, jnp.arange(b)], v_NB2KE[segment_B, jnp.arange(b)])
        if ctx.mode != "full":
            conv_BWC = memory.conv_tail(rows_BSC, cache.memory, None if decode else ctx.lengths_B)
            cache = TitansMACCache(TitansMemoryCache(state, conv_BWC),
                                   KVCache(segment.k_BSKE.astype(cache.segment.k_BSKE.dtype),
                                           segment.v_BSKE.astype(cache.segment.v_BSKE.dtype)))
        return MixerOutput(o_BTD, cache)

    def init_cache(self, batch: int, max_len: int) -> TitansMACCache:
        attn = self.attention
        return TitansMACCache(self.memory.empty_cache(batch),
                              KVCache.empty(batch, 2 * self.segment, attn.n_kv_heads, attn.head_dim, attn.cache_dtype))

    def flops_per_token(self, seq_len: int) -> int:
        memory, attn = self.memory, self.attention
        d, he = self.d_model, memory.n_heads * memory.head_dim
        b = min(self.segment, seq_len)
        n = self.n_persistent + 2 * b
        memory_size = sum(p * q for p, q in memory.widths)
        attend = n / b * (2 * d * attn.head_dim * (attn.n_heads + 2 * attn.n_kv_heads)
                          + 4 * attn.n_heads * attn.head_dim * average_context(n, None))
        flops = (memory.projection_flops_per_token(d) + memory.memory_flops_per_token(seq_len) + 2 * d * he
                 + 2 * memory.n_heads * memory_size + 4 * d * he + attend
                 + 2 * attn.n_heads * attn.head_dim * d + self.combine.flops_per_token())
        return int(round(flops))
