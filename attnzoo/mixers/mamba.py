"""Mamba (Mamba-1): the selective state-space mixer S6.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752; the layer follows
state-spaces/mamba `mamba_ssm/modules/mamba_simple.py` (`Mamba`) and HF transformers `MambaMixer`, whose parameter
names are kept: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj (Flax `kernel`s are the transposed PyTorch
`weight`s; conv1d.weight keeps PyTorch's [d_inner, 1, d_conv] layout).

With I = d_inner = expand * d_model channels, N = d_state, R = dt_rank:

    x, z   = in_proj(u)                                     u [B,T,D] -> x, z [B,T,I]
    x      = SiLU(causal depthwise conv1d(x))               d_conv taps per channel, with bias
    dl, B, C = x_proj(x)                                    [R], [N], [N] per token (no bias)
    dt     = softplus(dt_proj(dl))                          [I] per token (dt_proj has the bias)
    A      = -exp(A_log)                                    [I, N], S4D-real init A[i, n] = -(n + 1)
    h_t[i,n] = exp(dt_t[i] A[i,n]) h_{t-1}[i,n] + dt_t[i] B_t[n] x_t[i]         (Euler form of B-bar, as the code)
    y_t[i]   = sum_n C_t[n] h_t[i,n] + D[i] x_t[i]
    out    = out_proj(y * SiLU(z))

Initialisation as the reference (mamba_simple.py's `Mamba` with mixer_seq_simple.py's `_init_weights`, which
transformers' MambaMixer / `_init_weights` repeat): in_proj, x_proj and out_proj have PyTorch's nn.Linear init,
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and zero biases; with `rescale_prenorm_residual` (the reference's default)
out_proj is then divided by sqrt(the model's residual branches: one per layer plus one per MLP, the reference's
n_residuals_per_layer * n_layer); dt_proj.weight ~ U(-s, s) (`dt_init="random"`) or = s (`"constant"`) with
s = dt_scale R^-1/2; dt_proj.bias = inverse softplus of dt ~ LogUniform[dt_min, dt_max] floored at dt_init_floor;
A_log[i, n] = log(n + 1); D = 1 (A_log and D in float32 always); conv1d keeps PyTorch's Conv1d init. (transformers'
MambaConfig defaults rescale_prenorm_residual to false: `rescale_prenorm_residual=false` gives its init.) Other
mixers here use a fan-in normal init with residual outputs shrunk by 1/sqrt(2 n_layers).

The scan (`selective_scan`) is pure JAX in one of two forms, picked per backend at trace time; both rematerialise
each chunk of `chunk_size` positions in the backward pass and agree up to float rounding:

- on CPU, `sequential_scan`: the recurrence one position at a time (a lax.scan over each chunk inside a lax.scan
  over chunks): B T I N elementwise work and residuals of one chunk, B Q I N floats;
- elsewhere, `chunked_scan`: within a chunk of Q positions the decay from s to t is exp(sum_{s<r<=t} dt_r A) per
  (channel, state), built from chunk-local cumulative sums of dt A (the stable segment sum of Mamba-2's
  ssd_minimal: no differences of cumsums), every exponent <= 0 so nothing overflows, and a lax.scan carries the
  [B, I, N] state across chunks; memory per chunk B Q^2 I N floats and Q times the sequential form's elementwise
  work, in T / Q sequential steps instead of T.

Mamba-1 has no Pallas kernel of its own yet: its decay is per channel and state (I x N), while the shared chunked
linear-attention kernel takes one scalar decay per head; expressing Mamba-1 there needs I heads of value width 1,
each with its own keys B decayed per state n, i.e. a vector (not scalar) decay -- a different kernel (the
reference's fused selective scan keeps the (I-tile x N) state in registers).

Decode state (`MambaCache`): the last d_conv - 1 conv inputs and the ssm state [B, I, N], a constant size (so
`cache_bytes_per_token() == 0`). Prefill of right-padded prompts sets dt = 0 at positions >= the prompt length (the
state is carried unchanged through them) and keeps the conv window of the last valid inputs. Packed documents
(`segment_ids_BT`) restart the conv and the state at each document's first token.

FLOPs per token (`flops_per_token`, independent of the sequence length; 2 per multiply-add, biases and activations
not counted):

    2 D 2I (in_proj) + 2 I d_conv (conv) + 2 I (R + 2N) (x_proj) + 2 R I (dt_proj) + 2 I D (out_proj)
    + 9 I N (scan: the count of state-spaces/mamba issue #110 for the selective scan) + I (D skip) + I (z gate)

Extra shape letters here: I inner channels (d_inner), N state size, R dt rank, P conv history rows (d_conv - 1),
S history and new rows together (P + T); inside a chunk Q target and S source positions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.cache import rows_before
from attnzoo.config import ModelConfig
from attnzoo.layers import DepthwiseConv1d
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports
from attnzoo.registry import register


@dataclasses.dataclass(frozen=True)
class MambaOptions:
    """d_state: N, the state size per channel (16). d_conv: taps of the causal depthwise conv (4). expand: d_inner =
    expand * d_model (2). dt_rank: R, the rank of the dt projection; "auto" = ceil(d_model / 16).
    dt_min, dt_max: the log-uniform range of the initial dt; dt_init_floor: its lower clamp.
    dt_init: dt_proj.weight ~ U(-s, s) ("random") or = s ("constant"), s = dt_scale * dt_rank^-1/2; dt_scale (1).
    rescale_prenorm_residual: out_proj's init divided by sqrt(the model's residual branches) (true, as the reference).
    conv_bias: a bias in conv1d (true). bias: biases in in_proj and out_proj (false).
    chunk_size: positions per chunk of the scan (an implementation knob: the result does not depend on it); the
    chunked form (off CPU) holds B Q^2 I N floats per chunk, the sequential one (CPU) remembers one state per chunk
    for the backward pass."""

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | Literal["auto"] = "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_init: Literal["random", "constant"] = "random"
    dt_scale: float = 1.0
    rescale_prenorm_residual: bool = True
    conv_bias: bool = True
    bias: bool = False
    chunk_size: int = 16

    def __post_init__(self):
        for name, least in (("d_state", 1), ("d_conv", 1), ("expand", 1), ("chunk_size", 1)):
            value = getattr(self, name)
            if value < least:
                raise ValueError(f"{name}={value} must be an integer >= {least}")
        if self.dt_rank != "auto" and self.dt_rank < 1:
            raise ValueError(f"dt_rank={self.dt_rank} must be an integer >= 1 or 'auto'")
        if not 0 < self.dt_min < self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} and dt_max={self.dt_max} must satisfy 0 < dt_min < dt_max")
        if self.dt_init_floor < 0:
            raise ValueError(f"dt_init_floor={self.dt_init_floor} must be >= 0")
        if self.dt_scale <= 0:
            raise ValueError(f"dt_scale={self.dt_scale} must be > 0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MambaCache:
    """The conv inputs of the last d_conv - 1 tokens (oldest first) and the ssm state h (float32)."""

    conv_BPI: jax.Array
    ssm_BIN: jax.Array


def selective_scan(x_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h_BIN, *, chunk_size: int, segment_ids_BT=None):
    """y_t = sum_n C_t h_t (no D term) for h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t from h_{-1} = h_BIN; returns
    (y [B,T,I] float32, final state [B,I,N] float32). A token whose segment id differs from the previous token's
    starts its document from a zero state; positions with dt = 0 leave the state unchanged.

    On CPU `sequential_scan` (~30x faster there), elsewhere `chunked_scan`, whose Q-fold extra elementwise work
    buys T / Q sequential steps instead of T (the module docstring)."""
    scan = sequential_scan if jax.default_backend() == "cpu" else chunked_scan
    return scan(x_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h_BIN, chunk_size=chunk_size, segment_ids_BT=segment_ids_BT)


def scan_chunks(x_BTI, dt_BTI, B_BTN, C_BTN, segment_ids_BT, chunk_size: int):
    """The scan's inputs in float32 as [chunks, B, Q, ...], T padded to whole chunks of Q = min(chunk_size, T)
    (padding has x = dt = 0: it leaves the state alone), with `starts` [chunks, B, Q]: True at each token whose
    segment id differs from the previous token's (a document start, where the state resets)."""
    b, t = dt_BTI.shape[:2]
    q = min(chunk_size, t)
    n_chunks = -(-t // q)
    starts_BT = jnp.zeros((b, t), bool)
    if segment_ids_BT is not None:
        starts_BT = starts_BT.at[:, 1:].set(segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1])

    def chunks(a):
        a = jnp.pad(a, [(0, 0), (0, n_chunks * q - t)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n_chunks, q, *a.shape[2:]), 1, 0)

    f32 = jnp.float32
    return tuple(chunks(a) for a in (x_BTI.astype(f32), dt_BTI.astype(f32), B_BTN.astype(f32), C_BTN.astype(f32),
                                     starts_BT))


def unchunk(y_CBQI, t: int):
    """[chunks, B, Q, I] -> [B, T, I] without the padding."""
    n_chunks, b, q, i = y_CBQI.shape
    return jnp.moveaxis(y_CBQI, 0, 1).reshape(b, n_chunks * q, i)[:, :t]


def sequential_scan(x_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h_BIN, *, chunk_size: int, segment_ids_BT=None):
    """`selective_scan` one position at a time: a lax.scan over each chunk's Q steps inside a lax.scan over chunks,
    each chunk rematerialised in the backward pass (residuals B Q I N per chunk, not B T I N). The fastest form on
    CPU: B T I N elementwise work, where the chunked form does Q times more (measured in KERNEL_NOTES.md)."""
    inputs = scan_chunks(x_BTI, dt_BTI, B_BTN, C_BTN, segment_ids_BT, chunk_size)

    def step(h_BIN, inputs):
        x_BI, dt_BI, B_BN, C_BN, start_B = inputs
        decay_BIN = jnp.where(start_B[:, None, None], 0.0, jnp.exp(dt_BI[..., None] * A_IN))
        h_BIN = decay_BIN * h_BIN + (dt_BI * x_BI)[..., None] * B_BN[:, None]
        return h_BIN, jnp.einsum("bin,bn->bi", h_BIN, C_BN)

    @jax.checkpoint
    def chunk_step(h_BIN, inputs):
        # unroll=1: unrolled steps run up to 1.5x faster but compile 5-10x slower in the backward pass.
        h_BIN, y_QBI = jax.lax.scan(step, h_BIN, tuple(jnp.moveaxis(a, 1, 0) for a in inputs))
        return h_BIN, jnp.moveaxis(y_QBI, 0, 1)

    h_BIN, y_CBQI = jax.lax.scan(chunk_step, h_BIN.astype(jnp.float32), inputs)
    return unchunk(y_CBQI, x_BTI.shape[1]), h_BIN


def chunked_scan(x_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h_BIN, *, chunk_size: int, segment_ids_BT=None):
    """`selective_scan` as chunked quadratic forms: within a chunk of Q positions the decay from s to q is
    exp(sum_{s<r<=q} dt_r A) per (channel, state), built from chunk-local cumulative sums of masked copies of dt A
    (the stable segment sum of Mamba-2's ssd_minimal: a difference cs_q - cs_s of one cumsum loses up to ~1e-4
    relative after a large decay step, KERNEL_NOTES.md), masked to -inf before exp outside s <= q in one document,
    so every exponent is <= 0 and nothing overflows; a lax.scan carries the [B, I, N] state across chunks. Memory
    per chunk: B Q^2 I N floats."""
    inputs = scan_chunks(x_BTI, dt_BTI, B_BTN, C_BTN, segment_ids_BT, chunk_size)
    q = inputs[0].shape[2]
    causal_QS = jnp.tril(jnp.ones((q, q), bool))
    strictly_below_QS = jnp.tril(jnp.ones((q, q), bool), -1)

    @jax.checkpoint  # keep one chunk's B Q^2 I N decays alive at a time, in the backward pass too
    def chunk_step(h_BIN, inputs):
        x_BQI, dt_BQI, B_BQN, C_BQN, starts_BQ = inputs
        log_decay_BQIN = dt_BQI[..., None] * A_IN  # <= 0
        segment_sum_BQSIN = jnp.cumsum(
            jnp.where(strictly_below_QS[None, :, :, None, None], log_decay_BQIN[:, :, None], 0.0), axis=1)
        resets_BQ = jnp.cumsum(starts_BQ, axis=1)  # documents started in this chunk up to each position
        within_BQS = causal_QS & (resets_BQ[:, :, None] == resets_BQ[:, None, :])
        decay_BQSIN = jnp.exp(jnp.where(within_BQS[..., None, None], segment_sum_BQSIN, -jnp.inf))
        u_BSI = dt_BQI * x_BQI
        y_BQI = jnp.einsum("bqn,bsn,bqsin,bsi->bqi", C_BQN, B_BQN, decay_BQSIN, u_BSI)
        # The state carried in, decayed from the chunk start, for the positions before the chunk's first reset.
        carried_BQIN = jnp.where((resets_BQ == 0)[..., None, None], jnp.exp(jnp.cumsum(log_decay_BQIN, axis=1)), 0.0)
        y_BQI = y_BQI + jnp.einsum("bqn,bqin,bin->bqi", C_BQN, carried_BQIN, h_BIN)
        h_BIN = carried_BQIN[:, -1] * h_BIN + jnp.einsum("bsin,bsi,bsn->bin", decay_BQSIN[:, -1], u_BSI, B_BQN)
        return h_BIN, y_BQI

    h_BIN, y_CBQI = jax.lax.scan(chunk_step, h_BIN.astype(jnp.float32), inputs)
    return unchunk(y_CBQI, x_BTI.shape[1]), h_BIN


def torch_linear(d_in: int, d_out: int, *, use_bias: bool, scale: float = 1.0, dtype, param_dtype,
                 rngs: nnx.Rngs) -> nnx.Linear:
    """PyTorch nn.Linear's weight init U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming_uniform with a = sqrt(5)) times
    `scale`, and a zero bias (the reference's _init_weights zeroes Linear biases)."""
    bound = scale / d_in**0.5
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))


def residual_branches(config: ModelConfig) -> int:
    """Residual branches of the model: one mixer per layer plus one per MLP (the reference's n_residuals_per_layer *
    n_layer for a uniform stack)."""
    return config.n_layers + sum(block.mlp is not None for block in config.block_options)


@register("mamba", options=MambaOptions)
class Mamba(Mixer):
    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=())
    inert_options = {"chunk_size": "the chunk length of the scan: the same result up to float rounding"}

    def __init__(self, config: ModelConfig, options: MambaOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        d = config.d_model
        self.d_model, self.d_inner, self.d_state = d, options.expand * d, options.d_state
        self.d_conv, self.chunk_size = options.d_conv, options.chunk_size
        self.dt_rank = math.ceil(d / 16) if options.dt_rank == "auto" else options.dt_rank
        self.dtype = jnp.dtype(config.dtype)
        i, n, r = self.d_inner, self.d_state, self.dt_rank
        param_dtype = jnp.dtype(config.param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = torch_linear(d, 2 * i, use_bias=options.bias, **kw)
        self.conv1d = DepthwiseConv1d(i, options.d_conv, use_bias=options.conv_bias, param_dtype=param_dtype,
                                      rngs=rngs)
        self.x_proj = torch_linear(i, r + 2 * n, use_bias=False, **kw)
        # dt_proj: U(-s, s) or constant s weight, s = dt_scale R^-1/2; bias = softplus^-1(dt),
        # dt ~ LogUniform[dt_min, dt_max] >= floor.
        dt_init_std = options.dt_scale * r**-0.5

        def dt_weight(key, shape, dtype):
            if options.dt_init == "constant":
                return jnp.full(shape, dt_init_std, dtype)
            return jax.random.uniform(key, shape, dtype, -dt_init_std, dt_init_std)

        log_dt_I = jax.random.uniform(rngs.params(), (i,), jnp.float32, math.log(options.dt_min),
                                      math.log(options.dt_max))
        dt_I = jnp.maximum(jnp.exp(log_dt_I), options.dt_init_floor)
        inverse_softplus_I = dt_I + jnp.log(-jnp.expm1(-dt_I))
        self.dt_proj = nnx.Linear(r, i, kernel_init=dt_weight,
                                  bias_init=lambda key, shape, dtype: inverse_softplus_I.astype(dtype), **kw)
        # S4D-real: A[i, n] = -(n + 1). A_log and D stay float32 whatever the model's param dtype.
        self.A_log = nnx.Param(jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32)), (i, n)))
        self.D = nnx.Param(jnp.ones((i,), jnp.float32))
        out_scale = residual_branches(config) ** -0.5 if options.rescale_prenorm_residual else 1.0
        self.out_proj = torch_linear(i, d, use_bias=options.bias, scale=out_scale, **kw)

    def __call__(self, x_BTD, ctx: ForwardContext, cache: MambaCache | None = None) -> MixerOutput:
        b, t, _ = x_BTD.shape
        i, n, r, p = self.d_inner, self.d_state, self.dt_rank, self.d_conv - 1
        decode = ctx.mode == "decode"
        x_BTI, z_BTI = jnp.split(self.in_proj(x_BTD), 2, axis=-1)

        history_BPI = cache.conv_BPI.astype(x_BTI.dtype) if decode else jnp.zeros((b, p, i), x_BTI.dtype)
        rows_BSI = jnp.concatenate([history_BPI, x_BTI], axis=1)
        segment_ids_BT = None if decode else ctx.segment_ids_BT
        x_BTI = jax.nn.silu(self.conv1d(rows_BSI, t, segment_ids_BT))

        dt_low_BTR, B_BTN, C_BTN = jnp.split(self.x_proj(x_BTI), [r, r + n], axis=-1)
        dt_BTI = jax.nn.softplus(self.dt_proj(dt_low_BTR).astype(jnp.float32))
        if ctx.mode == "prefill":  # right padding: dt = 0 carries the state unchanged past each prompt's end
            dt_BTI = jnp.where((jnp.arange(t)[None] < ctx.lengths_B[:, None])[..., None], dt_BTI, 0.0)
        A_IN = -jnp.exp(self.A_log[...])
        h_BIN = cache.ssm_BIN if decode else jnp.zeros((b, i, n), jnp.float32)
        y_BTI, h_BIN = selective_scan(x_BTI, dt_BTI, A_IN, B_BTN, C_BTN, h_BIN, chunk_size=self.chunk_size,
                                      segment_ids_BT=segment_ids_BT)
        y_BTI = y_BTI + self.D[...] * x_BTI.astype(jnp.float32)
        y_BTI = y_BTI.astype(self.dtype) * jax.nn.silu(z_BTI)

        if ctx.mode != "full":
            end_B = jnp.full((b,), t, jnp.int32) if decode else ctx.lengths_B
            cache = MambaCache(rows_before(rows_BSI, end_B, p).astype(cache.conv_BPI.dtype), h_BIN)
        return MixerOutput(self.out_proj(y_BTI), cache)

    def init_cache(self, batch: int, max_len: int) -> MambaCache:
        return MambaCache(jnp.zeros((batch, self.d_conv - 1, self.d_inner), self.dtype),
                          jnp.zeros((batch, self.d_inner, self.d_state), jnp.float32))

    def flops_per_token(self, seq_len: int) -> int:
        d, i, n, r = self.d_model, self.d_inner, self.d_state, self.dt_rank
        project = 2 * d * 2 * i + 2 * i * (r + 2 * n) + 2 * r * i + 2 * i * d
        convolve = 2 * i * self.d_conv
        # The selective scan as counted by state-spaces/mamba (issue #110): 9 I N, plus the D skip and the z gate.
        scan = 9 * i * n + 2 * i
        return project + convolve + scan
