"""Titans' neural long-term memory (LMM): an MLP whose weights are trained inside the forward pass.

Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time", arXiv 2501.00663 (sections 3.1, 3.2, 4.4).
Per head h (H heads of width E), with q_t, k_t, v_t the head's query / key / value of token t:

    loss        l(M; k, v) = ||M(k) - v||^2                                     (Eq. 12; theta is the step size)
    surprise    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)          (Eqs. 13-14, momentum)
    forgetting  M_t = (1 - alpha_t) M_{t-1} + S_t                               (weight decay)
    retrieval   y_t = M_{t-1}(q_t)                                               (Eq. 15, no update)
    gates       theta_t = max_lr sigmoid(x_t w_theta + b), eta_t = sigmoid(x_t w_eta + b),
                alpha_t = sigmoid(x_t w_alpha + b)       (data-dependent, per token and head)

M is an MLP of `memory_depth` L >= 1 layers without biases: widths E -> E x = E * memory_expansion -> ... -> E, GELU
between layers (L = 1: the matrix memory M(k) = k W). The initial weights M_0 are learned per head; S_0 = 0.
q, k, v come from x as in section 4.4: linear projections, a causal depthwise conv of `d_conv` taps, SiLU, and an
l2-normalised q and k. The head outputs go through a per-head RMSNorm and a sigmoid gate from x before o_proj.

What the paper leaves open, decided here: retrieval reads M_{t-1}, the memory before the token's own update (as MAC's
Eq. 21; `read_after_update=true` reads M_t); t' = t - (t mod b), the chunk's starting weights, for chunks of
b = `chunk_size` tokens (section 3.2's mini-batch form; chunk_size = 1 is the recurrent memory), whose momentum and
decay are unrolled in closed form and read out through TTT's dual form (Sun et al., arXiv 2407.04620); theta is
bounded by max_lr = 0.05, since stale in-chunk gradients diverge at larger steps. The linear memory without momentum
runs through `pallas_kernels.chunked_linear_attention`; decode is the recurrent form, equal to the chunked forward.

More in docs/mixers/titans_memory.md: the chunked closed form, the stability measurements behind max_lr, the kernel
path, the cost of the second-order training, the decode state and the FLOPs count.

Extra shape letters: P, Q a memory layer's input and output widths; T, S query and key positions inside a chunk;
N chunks; W conv history rows (d_conv - 1); C conv channels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from attnzoo.cache import rows_before
from attnzoo.config import ModelConfig
from attnzoo.layers import DepthwiseConv1d, RMSNorm, dense
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports, compiled_forward
from attnzoo.registry import register

# Gate biases at init: theta = 0.1 max_lr, eta = 0.5, alpha = 0.01 (slow forgetting); see "Stability" in
# docs/mixers/titans_memory.md.
THETA_BIAS, ETA_BIAS, ALPHA_BIAS = -math.log(9.0), 0.0, -math.log(99.0)


@dataclasses.dataclass(frozen=True)
class TitansMemoryOptions:
    """n_heads, head_dim: the memory's heads and their width E (default: the model's). memory_depth: L, layers of the
    memory MLP (1: a matrix memory). memory_expansion: hidden width E * memory_expansion of a deep memory.
    chunk_size: b, tokens whose gradients share the chunk's starting weights (1: fully recurrent); decode equals the
    full forward at this b. momentum: the surprise momentum S (false: eta = 0, S_t = -theta u_t). weight_decay: the
    forget gate alpha (false: alpha = 0). max_lr: theta's upper bound, the step size on ||M(k) - v||^2 (the paper
    gives none; larger steps with long chunks diverge, see docs/mixers/titans_memory.md). d_conv: taps of the causal
    depthwise conv after the q/k/v projections (none: no conv). read_after_update: token t reads M_t, the memory
    with its own pair written (false, the default: M_{t-1}, the memory before its update). The paper's ablations
    (Table 5) are memory_depth=1, d_conv=none, momentum=false, weight_decay=false."""

    n_heads: int | None = None
    head_dim: int | None = None
    memory_depth: int = 2
    memory_expansion: int = 4
    chunk_size: int = 16
    momentum: bool = True
    weight_decay: bool = True
    max_lr: float = 0.05
    d_conv: int | None = 4
    read_after_update: bool = False

    def __post_init__(self):
        for name in ("n_heads", "head_dim", "d_conv"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be a positive integer (or none)")
        for name in ("memory_depth", "memory_expansion", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value} must be an integer >= 1")
        if not self.max_lr > 0:
            raise ValueError(f"max_lr={self.max_lr} must be > 0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemoryState:
    """The memory's recurrent state per sequence and head, float32, one [B, H, P, Q] array per layer in each tuple:
    `start` the chunk-start weights the next gradient is taken at, `weights` M_t, `momentum` S_t (empty tuple when
    momentum is off)."""

    start: tuple
    weights: tuple
    momentum: tuple


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TitansMemoryCache:
    """The memory state and the last d_conv - 1 convolved-projection inputs (oldest first; [B, 0, C] without conv)."""

    memory: MemoryState
    conv_BWC: jax.Array


class Gates(NamedTuple):
    """theta [B, T, H]; log eta (None without momentum) and log(1 - alpha), float32."""

    theta: jax.Array
    log_eta: jax.Array | None
    log_keep: jax.Array


class KeyFactors(NamedTuple):
    """Per token s and layer l, `grad_{W_l} l(W; k_s, v_s) = inputs[l][s]^T deltas[l][s]`."""

    inputs: list
    deltas: list


class ChunkCoefficients(NamedTuple):
    """The closed-form momentum/decay coefficients of one chunk, per [B, H] (docs/mixers/titans_memory.md)."""

    weight_keep_BHT: jax.Array  # e^{LA_t}: W's weight in M_t
    into_weight_BHT: jax.Array | None  # B_t: S's weight in M_t
    momentum_keep_BHT: jax.Array | None  # e^{LE_t}: S's weight in S_t
    to_weight_BHTS: jax.Array  # gamma_ts theta_s: u_s's weight in M_t
    to_momentum_BHTS: jax.Array | None  # D_E[t, s] theta_s: u_s's weight in S_t


def gelu_and_slope(z):
    """GELU and its derivative at z (the key backward needs the slope)."""
    return jax.jvp(jax.nn.gelu, (z,), (jnp.ones_like(z),))


def mlp_apply(weights, x_BTHP):
    """M(x) for per-sequence, per-head weights ([B, H, P, Q] per layer), GELU between layers."""
    h = x_BTHP
    for i, w in enumerate(weights):
        h = jnp.einsum("bthp,bhpq->bthq", h, w)
        if i < len(weights) - 1:
            h = jax.nn.gelu(h)
    return h


def key_factors(weights, k_BSHP, v_BSHQ) -> KeyFactors:
    """The per-token gradient of ||M(k_s) - v_s||^2 at `weights`, by a hand-written backward: layer inputs and
    output-gradients (the outer autodiff differentiates through this, the second-order part of training)."""
    inputs, slopes, h = [], [], k_BSHP
    for i, w in enumerate(weights):
        inputs.append(h)
        h = jnp.einsum("bshp,bhpq->bshq", h, w)
        if i < len(weights) - 1:
            h, slope = gelu_and_slope(h)
            slopes.append(slope)
    deltas = [2 * (h - v_BSHQ)]
    for i in range(len(weights) - 1, 0, -1):
        deltas.insert(0, jnp.einsum("bshq,bhpq->bshp", deltas[0], weights[i]) * slopes[i - 1])
    return KeyFactors(inputs, deltas)


def chunk_coefficients(gates: Gates) -> ChunkCoefficients:
    """gamma, B, e^{LA}, e^{LE} of one chunk from its gates [B, T, H] (T = chunk positions)."""
    t = gates.theta.shape[1]
    causal_TS = jnp.tril(jnp.ones((t, t), bool))

    def segment_decay(log_BTH):  # D[t, s] = exp(sum_{s < r <= t} log), masked to s <= t before exp
        cum_BHT = jnp.cumsum(jnp.swapaxes(log_BTH, 1, 2), axis=-1)
        return jnp.exp(jnp.where(causal_TS, cum_BHT[..., :, None] - cum_BHT[..., None, :], -jnp.inf)), cum_BHT

    theta_BH1S = jnp.swapaxes(gates.theta, 1, 2)[..., None, :]
    decay_BHTS, keep_cum_BHT = segment_decay(gates.log_keep)
    if gates.log_eta is None:
        return ChunkCoefficients(jnp.exp(keep_cum_BHT), None, None, decay_BHTS * theta_BH1S, None)
    momentum_BHTS, momentum_cum_BHT = segment_decay(gates.log_eta)
    momentum_keep_BHT = jnp.exp(momentum_cum_BHT)
    gamma_BHTS = jnp.einsum("bhtj,bhjs->bhts", decay_BHTS, momentum_BHTS)
    into_weight_BHT = jnp.einsum("bhtj,bhj->bht", decay_BHTS, momentum_keep_BHT)
    return ChunkCoefficients(jnp.exp(keep_cum_BHT), into_weight_BHT, momentum_keep_BHT, gamma_BHTS * theta_BH1S,
                             momentum_BHTS * theta_BH1S)


def retrieve_in_chunk(weights, momentum, factors: KeyFactors, coeff: ChunkCoefficients, q_BTHP):
    """y_t = M_t(q_t) for every position t of the chunk (the dual form), from its start weights and momentum."""
    h = q_BTHP
    for i, (w, a_BSHP, delta_BSHQ) in enumerate(zip(weights, factors.inputs, factors.deltas)):
        z = jnp.einsum("bht,bthq->bthq", coeff.weight_keep_BHT, jnp.einsum("bthp,bhpq->bthq", h, w))
        if momentum:
            z = z + jnp.einsum("bht,bthq->bthq", coeff.into_weight_BHT,
                               jnp.einsum("bthp,bhpq->bthq", h, momentum[i]))
        scores_BHTS = jnp.einsum("bthp,bshp->bhts", h, a_BSHP) * coeff.to_weight_BHTS
        z = z - jnp.einsum("bhts,bshq->bthq", scores_BHTS, delta_BSHQ)
        h = jax.nn.gelu(z) if i < len(weights) - 1 else z
    return h


def fold_chunk(weights, momentum, factors: KeyFactors, coeff: ChunkCoefficients, n_valid_B):
    """(M, S) after the chunk's first n_valid_B tokens (unchanged where n_valid_B == 0)."""
    row_BT = jax.nn.one_hot(n_valid_B - 1, coeff.weight_keep_BHT.shape[-1], dtype=jnp.float32)  # -1: all zeros

    def at_row(x_BHT):
        return jnp.einsum("bt,bht->bh", row_BT, x_BHT)[..., None, None]

    def sum_updates(x_BHTS):  # sum_s coefficient[row, s] a_s^T delta_s, per layer
        c_BHS = jnp.einsum("bt,bhts->bhs", row_BT, x_BHTS)
        return [jnp.einsum("bhs,bshp,bshq->bhpq", c_BHS, a, d) for a, d in zip(factors.inputs, factors.deltas)]

    new_weights = [at_row(coeff.weight_keep_BHT) * w - u for w, u in zip(weights, sum_updates(coeff.to_weight_BHTS))]
    new_momentum = []
    if momentum:
        new_weights = [w + at_row(coeff.into_weight_BHT) * s for w, s in zip(new_weights, momentum)]
        new_momentum = [at_row(coeff.momentum_keep_BHT) * s - u
                        for s, u in zip(momentum, sum_updates(coeff.to_momentum_BHTS))]
    keep_B1111 = (n_valid_B > 0)[:, None, None, None]
    return (tuple(jnp.where(keep_B1111, new, old) for new, old in zip(new_weights, weights)),
            tuple(jnp.where(keep_B1111, new, old) for new, old in zip(new_momentum, momentum)))


def memory_chunk(weights, momentum, q_BTHP, k_BTHP, v_BTHQ, gates: Gates, n_valid_B, *, read_after: bool = False,
                 implementation="auto", use_kernel: bool = True):
    """One chunk: (y_t = M_{t-1}(q_t) for its positions, or M_t(q_t) with read_after; M and S after its first
    n_valid_B tokens). A linear memory without momentum goes through `pallas_kernels.chunked_linear_attention`
    (unless use_kernel=False)."""
    # Both forms compute M_t(.) at row t; reading before the update, row t - 1 takes token t's query.
    q_read_BTHP = q_BTHP if read_after else jnp.pad(q_BTHP[:, 1:], ((0, 0), (0, 1), (0, 0), (0, 0)))
    if use_kernel and len(weights) == 1 and gates.log_eta is None:
        (w,) = weights
        delta_BTHQ = 2 * (jnp.einsum("bthp,bhpq->bthq", k_BTHP, w) - v_BTHQ)
        y_BTHQ, new_w = pallas_kernels.chunked_linear_attention(
            q_read_BTHP, k_BTHP, -gates.theta[..., None] * delta_BTHQ, gates.log_keep, initial_state_BHEF=w,
            lengths_B=n_valid_B, chunk_size=q_BTHP.shape[1], return_final_state=True, implementation=implementation)
        new_weights, new_momentum = (new_w,), ()
    else:
        factors = key_factors(weights, k_BTHP, v_BTHQ)
        coeff = chunk_coefficients(gates)
        y_BTHQ = retrieve_in_chunk(weights, momentum, factors, coeff, q_read_BTHP)
        new_weights, new_momentum = fold_chunk(weights, momentum, factors, coeff, n_valid_B)
    if not read_after:  # token 0 reads the chunk's start weights
        y_BTHQ = jnp.concatenate([mlp_apply(weights, q_BTHP[:, :1]), y_BTHQ[:, :-1]], axis=1)
    return y_BTHQ, new_weights, new_momentum


def memory_step(state: MemoryState, q_BHP, k_BHP, v_BHQ, gates: Gates, chunk_end_B, *, read_after: bool = False
                ) -> tuple:
    """The recurrent form for one token per sequence (decode): (y [B, H, Q], the next state), y read from the
    weights before the token's update (after it with read_after). gates hold [B, H]."""
    factors = key_factors(state.start, k_BHP[:, None], v_BHQ[:, None])
    updates = [jnp.einsum("bhp,bhq->bhpq", a[:, 0], d[:, 0]) for a, d in zip(factors.inputs, factors.deltas)]
    theta, keep = gates.theta[..., None, None], jnp.exp(gates.log_keep)[..., None, None]
    if gates.log_eta is None:
        momentum = ()
        weights = tuple(keep * w - theta * u for w, u in zip(state.weights, updates))
    else:
        eta = jnp.exp(gates.log_eta)[..., None, None]
        momentum = tuple(eta * s - theta * u for s, u in zip(state.momentum, updates))
        weights = tuple(keep * w + s for w, s in zip(state.weights, momentum))
    start = tuple(jnp.where(chunk_end_B[:, None, None, None], w, s) for w, s in zip(weights, state.start))
    y_BHQ = mlp_apply(weights if read_after else state.weights, q_BHP[:, None])[:, 0]
    return y_BHQ, MemoryState(start, weights, momentum)


def memory_layer_widths(head_dim: int, depth: int, expansion: int) -> list[tuple[int, int]]:
    """(P, Q) of each memory layer: E -> E x -> ... -> E, or E -> E for the matrix memory."""
    if depth == 1:
        return [(head_dim, head_dim)]
    hidden = head_dim * expansion
    return [(head_dim, hidden)] + [(hidden, hidden)] * (depth - 2) + [(hidden, head_dim)]


def memory_flops_per_head(widths, chunk: int, momentum: bool) -> int:
    """Forward FLOPs per token of one head's memory (docs/mixers/titans_memory.md, "FLOPs per token")."""
    size = sum(p * q for p, q in widths)
    flops = 2 * size + 2 * (size - widths[0][0] * widths[0][1]) + 2 * size + 2 * chunk * sum(p + q for p, q in widths)
    flops += 2 * size  # fold into W
    if momentum:
        flops += 2 * size + 2 * size + 2 * chunk * chunk + 2 * chunk
    return flops


def l2_normalize(x, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def to_chunks(x_BT, chunk: int):
    """[B, T, ...] -> [N, B, chunk, ...], zero-padded to whole chunks (padding is never folded into the state)."""
    b, t = x_BT.shape[:2]
    n = -(-t // chunk)
    x_BT = jnp.pad(x_BT, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x_BT.ndim - 2))
    return jnp.moveaxis(x_BT.reshape(b, n, chunk, *x_BT.shape[2:]), 1, 0)


def from_chunks(x_NBC, t: int):
    """[N, B, chunk, ...] -> [B, T, ...]."""
    x_BNC = jnp.moveaxis(x_NBC, 0, 1)
    return x_BNC.reshape(x_BNC.shape[0], -1, *x_BNC.shape[3:])[:, :t]


def valid_per_chunk(lengths_B, n_chunks: int, chunk: int):
    """[N, B]: how many of each chunk's tokens are real (the rest are right padding)."""
    return jnp.clip(lengths_B[None, :] - chunk * jnp.arange(n_chunks)[:, None], 0, chunk).astype(jnp.int32)


def next_start(previous, chunk_start, folded, n_valid_B, chunk: int):
    """The start weights for the token after a chunk: the folded weights once the chunk is full, the chunk's own
    start weights while it is partial (a prefill ending inside it), the previous ones after the sequence ended."""
    full_B4, some_B4 = (n_valid_B == chunk)[:, None, None, None], (n_valid_B > 0)[:, None, None, None]
    return tuple(jnp.where(full_B4, f, jnp.where(some_B4, w, p)) for p, w, f in zip(previous, chunk_start, folded))


def scan_memory(state: MemoryState, q_BTHE, k_BTHE, v_BTHE, gates: Gates, lengths_B, *, chunk: int,
                track_start: bool, implementation, use_kernel: bool, read_after: bool = False):
    """`NeuralMemory.scan`: a `lax.scan` over chunks, each rematerialised in the backward pass."""
    b, t = q_BTHE.shape[:2]
    xs = tuple(to_chunks(x, chunk) for x in (q_BTHE, k_BTHE, v_BTHE)) + (
        Gates(*(None if g is None else to_chunks(g, chunk) for g in gates)),)
    n_valid_NB = valid_per_chunk(jnp.full((b,), t) if lengths_B is None else lengths_B, xs[0].shape[0], chunk)

    @jax.checkpoint  # only the carried state is stored per chunk; the chunk is recomputed in the backward
    def body(carry, chunk_xs):
        start, weights, momentum = carry
        (q, k, v, gates), n_valid_B = chunk_xs
        y, new_weights, new_momentum = memory_chunk(weights, momentum, q, k, v, gates, n_valid_B, read_after=read_after,
                                                    implementation=implementation, use_kernel=use_kernel)
        if track_start:
            start = next_start(start, weights, new_weights, n_valid_B, chunk)
        return (start, new_weights, new_momentum), y

    carry = (state.start if track_start else (), state.weights, state.momentum)
    (start, weights, momentum), y_NBCHE = jax.lax.scan(body, carry, (xs, n_valid_NB))
    return from_chunks(y_NBCHE, t), MemoryState(start if track_start else weights, weights, momentum)


def token_index(ctx: ForwardContext, t: int):
    """[B, T]: each new token's index in its sequence in a decode call (chunk boundaries count tokens, whatever
    positions the caller passes)."""
    return ctx.lengths_B[:, None] + jnp.arange(t)[None, :]


def decode_memory(state: MemoryState, q_BTHE, k_BTHE, v_BTHE, gates: Gates, index_BT, *, chunk: int,
                  read_after: bool = False):
    """`NeuralMemory.decode`: the recurrent step over the T new tokens of each sequence at token indices index_BT."""
    def step(state, xs):
        q, k, v, gates, pos_B = xs
        y, state = memory_step(state, q, k, v, gates, (pos_B + 1) % chunk == 0, read_after=read_after)
        return state, y

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q_BTHE, k_BTHE, v_BTHE)) + (
        Gates(*(None if g is None else jnp.swapaxes(g, 0, 1) for g in gates)), jnp.swapaxes(index_BT, 0, 1))
    state, y_TBHE = jax.lax.scan(step, state, xs)
    return jnp.swapaxes(y_TBHE, 0, 1), state


class NeuralMemory(nnx.Module):
    """The memory's parameters and its pieces: projections from a stream, gates, the learned initial weights M_0, the
    chunked scan, the recurrent step, the read-out. `conv_keys`: whether k and v come from the convolved input
    stream (lmm, MAG) or are projected without a conv from another stream (MAC's attention output)."""

    def __init__(self, config: ModelConfig, options: TitansMemoryOptions, *, rngs: nnx.Rngs, conv_keys: bool = True):
        d = config.d_model
        self.n_heads = options.n_heads or config.n_heads
        self.head_dim = options.head_dim or config.dim_per_head
        self.chunk_size, self.momentum, self.max_lr = options.chunk_size, options.momentum, options.max_lr
        self.weight_decay, self.conv_keys = options.weight_decay, conv_keys
        self.read_after_update = options.read_after_update
        self.implementation = config.kernel("chunked_linear_attention")
        self.dtype = jnp.dtype(config.dtype)
        h, e = self.n_heads, self.head_dim
        param_dtype = jnp.dtype(config.param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d, h * e, **kw)
        self.kv_proj = dense(d, 2 * h * e, **kw)
        self.gate_names = ("theta",) + ("eta",) * options.momentum + ("alpha",) * options.weight_decay
        self.gates_proj = dense(d, len(self.gate_names) * h, use_bias=True, **kw)
        biases = {"theta": THETA_BIAS, "eta": ETA_BIAS, "alpha": ALPHA_BIAS}
        self.gates_proj.bias = nnx.Param(jnp.repeat(jnp.asarray([biases[n] for n in self.gate_names], param_dtype), h))
        self.d_conv = options.d_conv
        self.conv_channels = (3 if conv_keys else 1) * h * e if options.d_conv else 0
        self.conv = (DepthwiseConv1d(self.conv_channels, options.d_conv, use_bias=True, param_dtype=param_dtype,
                                     rngs=rngs) if options.d_conv else None)
        self.widths = tuple(memory_layer_widths(e, options.memory_depth, options.memory_expansion))
        self.initial_weights = nnx.List([
            nnx.Param(jax.random.normal(rngs.params(), (h, p, q), jnp.float32) / math.sqrt(p)) for p, q in self.widths])
        self.out_norm = RMSNorm(e, eps=config.norm_eps, param_dtype=param_dtype)
        self.out_gate = dense(d, h * e, **kw)
        self.o_proj = dense(h * e, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)

    # -- projections -----------------------------------------------------------------------------------------
    def conv_history(self, batch: int, cache: TitansMemoryCache | None, decode: bool):
        w = (self.d_conv or 1) - 1
        if decode:
            return cache.conv_BWC.astype(self.dtype)
        return jnp.zeros((batch, w, self.conv_channels), self.dtype)

    def convolve(self, raw_BTC, history_BWC):
        """(SiLU(causal conv(raw)), the rows [history; raw] a cache keeps the tail of); SiLU alone without conv."""
        if self.conv is None:
            return jax.nn.silu(raw_BTC), raw_BTC[:, :0]
        rows_BSC = jnp.concatenate([history_BWC, raw_BTC], axis=1)
        return jax.nn.silu(self.conv(rows_BSC, raw_BTC.shape[1])), rows_BSC

    def conv_tail(self, rows_BSC, cache: TitansMemoryCache, lengths_B=None):
        """The conv history a cache keeps after this call: the last d_conv - 1 inputs of each sequence, whose rows
        after the history are its first lengths_B (a prefill's right-padded prompts; default all)."""
        if self.conv is None:
            return cache.conv_BWC
        end_B = (jnp.full(rows_BSC.shape[:1], rows_BSC.shape[1] - self.d_conv + 1, jnp.int32) if lengths_B is None
                 else lengths_B)
        return rows_before(rows_BSC, end_B, self.d_conv - 1).astype(cache.conv_BWC.dtype)

    def heads(self, x_BTC):
        return x_BTC.reshape(*x_BTC.shape[:2], -1, self.head_dim)

    def queries(self, x_BTD):
        """Memory queries from a stream without conv, l2-normalised, float32 [B, T, H, E]."""
        return l2_normalize(self.heads(jax.nn.silu(self.q_proj(x_BTD))))

    def keys_values(self, x_BTD):
        """Keys (l2-normalised) and values from a stream without conv, float32."""
        k_BTHE, v_BTHE = jnp.split(self.heads(jax.nn.silu(self.kv_proj(x_BTD))), 2, axis=2)
        return l2_normalize(k_BTHE), v_BTHE.astype(jnp.float32)

    def gates(self, x_BTD) -> Gates:
        logits = jnp.split(self.gates_proj(x_BTD).astype(jnp.float32), len(self.gate_names), axis=-1)
        by_name = dict(zip(self.gate_names, logits))
        theta = self.max_lr * jax.nn.sigmoid(by_name["theta"])
        log_eta = jax.nn.log_sigmoid(by_name["eta"]) if self.momentum else None
        log_keep = (jax.nn.log_sigmoid(-by_name["alpha"]) if self.weight_decay
                    else jnp.zeros_like(theta))  # log(1 - sigmoid(a)) = log sigmoid(-a)
        return Gates(theta, log_eta, log_keep)

    def project_input(self, x_BTD, history_BWC):
        """From the layer input: (q, k, v, rows for the conv cache); k and v only when conv_keys."""
        h, e = self.n_heads, self.head_dim
        if not self.conv_keys:
            q_BTC, rows = self.convolve(self.q_proj(x_BTD), history_BWC)
            return l2_normalize(self.heads(q_BTC)), None, None, rows
        raw_BTC = jnp.concatenate([self.q_proj(x_BTD), self.kv_proj(x_BTD)], axis=-1)
        qkv_BTC, rows = self.convolve(raw_BTC, history_BWC)
        q_BTC, k_BTC, v_BTC = jnp.split(qkv_BTC, [h * e, 2 * h * e], axis=-1)
        return (l2_normalize(self.heads(q_BTC)), l2_normalize(self.heads(k_BTC)),
                self.heads(v_BTC).astype(jnp.float32), rows)

    def read_out(self, y_BTHE, gate_source_BTD):
        """o_proj(RMSNorm(y) * sigmoid(gate(x))) per head: [B, T, D]."""
        b, t = y_BTHE.shape[:2]
        gate_BTHE = jax.nn.sigmoid(self.heads(self.out_gate(gate_source_BTD)).astype(jnp.float32))
        y_BTHE = (self.out_norm(y_BTHE) * gate_BTHE).astype(self.dtype)
        return self.o_proj(y_BTHE.reshape(b, t, -1))

    # -- memory ----------------------------------------------------------------------------------------------
    def initial_state(self, batch: int) -> MemoryState:
        weights = tuple(jnp.broadcast_to(w[...], (batch, *w.shape)) for w in self.initial_weights)
        momentum = tuple(jnp.zeros_like(w) for w in weights) if self.momentum else ()
        return MemoryState(weights, weights, momentum)

    def chunk(self, weights, momentum, q_BTHP, k_BTHP, v_BTHQ, gates: Gates, n_valid_B):
        return memory_chunk(weights, momentum, q_BTHP, k_BTHP, v_BTHQ, gates, n_valid_B,
                            read_after=self.read_after_update, implementation=self.implementation)

    def step(self, state: MemoryState, q_BHP, k_BHP, v_BHQ, gates: Gates, chunk_end_B):
        return memory_step(state, q_BHP, k_BHP, v_BHQ, gates, chunk_end_B, read_after=self.read_after_update)

    def scan(self, state: MemoryState, q_BTHE, k_BTHE, v_BTHE, gates: Gates, lengths_B=None,
             track_start: bool = False):
        """The chunked memory over a sequence from `state`: (y [B, T, H, E] float32, final MemoryState). Tokens at
        t >= lengths_B are not folded into the state; `track_start` keeps the start weights for a decode."""
        return scan_memory(state, q_BTHE, k_BTHE, v_BTHE, gates, lengths_B, chunk=self.chunk_size,
                           track_start=track_start, implementation=self.implementation, use_kernel=True,
                           read_after=self.read_after_update)

    def decode(self, state: MemoryState, q_BTHE, k_BTHE, v_BTHE, gates: Gates, index_BT):
        """The recurrent form over T new tokens per sequence at token indices `index_BT`: (y [B, T, H, E], state)."""
        return decode_memory(state, q_BTHE, k_BTHE, v_BTHE, gates, index_BT, chunk=self.chunk_size,
                             read_after=self.read_after_update)

    def empty_cache(self, batch: int) -> TitansMemoryCache:
        zeros = tuple(jnp.zeros((batch, self.n_heads, p, q), jnp.float32) for p, q in self.widths)
        w = (self.d_conv or 1) - 1
        return TitansMemoryCache(MemoryState(zeros, zeros, zeros if self.momentum else ()),
                                 jnp.zeros((batch, w, self.conv_channels), self.dtype))

    # -- accounting ------------------------------------------------------------------------------------------
    def memory_flops_per_token(self, seq_len: int) -> int:
        return self.n_heads * memory_flops_per_head(self.widths, min(self.chunk_size, seq_len), self.momentum)

    def projection_flops_per_token(self, d_model: int) -> int:
        """q, k, v, the output gate and o_proj, the gates and the conv, per token."""
        he = self.n_heads * self.head_dim
        return (2 * d_model * he * 4 + 2 * he * d_model + 2 * d_model * len(self.gate_names) * self.n_heads
                + 2 * self.conv_channels * (self.d_conv or 0))


@register("lmm", options=TitansMemoryOptions)
class LongTermMemory(Mixer):
    """The memory alone as a token mixer (Titans' "LMM"); MAL is a plan with attention after it, see titans.py."""

    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=("chunked_linear_attention",))

    def __init__(self, config: ModelConfig, options: TitansMemoryOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.memory = NeuralMemory(config, options, rngs=rngs)
        self.d_model = config.d_model

    @compiled_forward
    def __call__(self, x_BTD, ctx: ForwardContext, cache: TitansMemoryCache | None = None) -> MixerOutput:
        if ctx.segment_ids_BT is not None and ctx.mode == "full":
            raise ValueError("lmm: packed documents (segment_ids_BT) are not supported; the memory has no "
                             "per-document reset")
        return self.forward(x_BTD, ctx, cache)

    def forward(self, x_BTD, ctx: ForwardContext, cache: TitansMemoryCache | None = None,
                prefix_PD=None) -> MixerOutput:
        """The memory over x, or over [prefix || x] (MAG's persistent tokens): the N_p prefix rows are written into
        the memory (and its conv) ahead of every sequence by the full forward and the prefill, their outputs
        dropped; a decode continues that state (its chunk boundaries count the prefix's rows)."""
        b, t, _ = x_BTD.shape
        memory, decode = self.memory, ctx.mode == "decode"
        n_p = 0 if prefix_PD is None else prefix_PD.shape[0]
        stream_BSD = x_BTD
        if n_p and not decode:
            prefix_BPD = jnp.broadcast_to(prefix_PD.astype(x_BTD.dtype), (b, *prefix_PD.shape))
            stream_BSD = jnp.concatenate([prefix_BPD, x_BTD], axis=1)
        q, k, v, rows_BSC = memory.project_input(stream_BSD, memory.conv_history(b, cache, decode))
        gates = memory.gates(stream_BSD)
        lengths_B = None if ctx.lengths_B is None else ctx.lengths_B + n_p
        if decode:
            y_BTHE, state = memory.decode(cache.memory, q, k, v, gates, token_index(ctx, t) + n_p)
        else:
            y_BSHE, state = memory.scan(memory.initial_state(b), q, k, v, gates, lengths_B,
                                        track_start=ctx.mode == "prefill")
            y_BTHE = y_BSHE[:, n_p:]
        if ctx.mode != "full":
            cache = TitansMemoryCache(state, memory.conv_tail(rows_BSC, cache, None if decode else lengths_B))
        return MixerOutput(memory.read_out(y_BTHE, x_BTD), cache)

    def init_cache(self, batch: int, max_len: int) -> TitansMemoryCache:
        return self.memory.empty_cache(batch)

    def flops_per_token(self, seq_len: int) -> int:
        return self.memory.projection_flops_per_token(self.d_model) + self.memory.memory_flops_per_token(seq_len)
