"""Mamba-2: the SSD (state-space duality) mixer.

Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality",
arXiv 2405.21060; the layer follows state-spaces/mamba `mamba_ssm/modules/mamba2.py` (`Mamba2`, d_ssm = d_inner,
rmsnorm, norm_before_gate=False, D_has_hdim=False), whose parameter names are kept: in_proj, conv1d, dt_bias, A_log,
D, norm, out_proj (Flax `kernel`s are the transposed PyTorch `weight`s; conv1d.weight keeps PyTorch's
[channels, 1, d_conv] layout; norm.weight as RMSNormGated's).

With I = d_inner = expand * d_model, P = head_dim, H = I / P heads, G = n_groups (head h reads group h // (H / G)),
N = d_state:

    z, xBC, dt = in_proj(u)                     u [B,T,D] -> z [I], xBC = [x (I), B (G N), C (G N)], dt [H]
    x, B, C    = SiLU(causal depthwise conv1d(xBC))           d_conv taps per channel of xBC, with bias
    dt         = clamp(softplus(dt + dt_bias), dt_limit)      [H] per token (no clamp by default)
    A          = -exp(A_log)                                  one scalar per head
    S_t[h]     = exp(dt_t[h] A[h]) S_{t-1}[h] + B_t[g(h)]^T (dt_t[h] x_t[h])        S [N, P] per head
    y_t[h]     = C_t[g(h)] S_t[h] + D[h] x_t[h]
    out        = out_proj(RMSNorm_G(y * SiLU(z)) * norm.weight)       RMS over each of the G groups of I / G channels

The recurrence is the shared `pallas_kernels.chunked_linear_attention` op (q = C, k = B, v = dt x, log_decay = dt A,
state [B, H, N, P] float32). Defaults are the paper's / reference's: d_state 128, head_dim 64, chunk 256,
dt_limit (0, inf). What differs from the reference: in_proj / out_proj use the zoo's fan-in normal init instead of
PyTorch's uniform one, and a call shorter than the chunk runs with a smaller chunk (the result does not depend on it).

More in docs/mixers/mamba2.md: the kernel path, the defaults, the initialisation, the decode state, right-padded
prefill, packed documents and the FLOPs count.

Extra shape letters here: I inner channels (d_inner), N state size, P head width (head_dim), G groups,
C conv channels (I + 2 G N), W conv history rows (d_conv - 1), S history and new rows together (W + T).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from attnzoo.cache import rows_before
from attnzoo.config import ModelConfig
from attnzoo.layers import DepthwiseConv1d, dense
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports
from attnzoo.registry import register


@dataclasses.dataclass(frozen=True)
class Mamba2Options:
    """d_state: N, the state size per head (128). d_conv: taps of the causal depthwise conv over xBC (4). expand:
    d_inner = expand * d_model (2). head_dim: P, channels per head (64; must divide d_inner). n_groups: G, the number
    of B/C groups shared by H / G heads each (1; must divide the heads). chunk_size: tokens per chunk of the SSD
    algorithm (256; an implementation knob: the Triton kernel needs a power of 2 >= 16). dt_min, dt_max: the
    log-uniform range of the initial dt; dt_init_floor: its lower clamp. dt_limit_min, dt_limit_max: dt is clamped
    into [dt_limit_min, dt_limit_max] after the softplus (0 and none = inf: no clamp, the reference's default).
    A_init_min, A_init_max: A ~ U[A_init_min, A_init_max] per head at init (the reference's A_init_range (1, 16)).
    conv_bias: a bias in conv1d (true). bias: biases in in_proj and out_proj (false)."""

    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_limit_min: float = 0.0
    dt_limit_max: float | None = None
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    conv_bias: bool = True
    bias: bool = False

    def __post_init__(self):
        for name in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value} must be an integer >= 1")
        if not 0 < self.dt_min < self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} and dt_max={self.dt_max} must satisfy 0 < dt_min < dt_max")
        if self.dt_init_floor < 0:
            raise ValueError(f"dt_init_floor={self.dt_init_floor} must be >= 0")
        if self.dt_limit_min < 0 or (self.dt_limit_max is not None and self.dt_limit_max <= self.dt_limit_min):
            raise ValueError(f"dt_limit_min={self.dt_limit_min} and dt_limit_max={self.dt_limit_max} must satisfy "
                             f"0 <= dt_limit_min < dt_limit_max (none: no upper limit)")
        if not 0 < self.A_init_min <= self.A_init_max:
            raise ValueError(f"A_init_min={self.A_init_min} and A_init_max={self.A_init_max} must satisfy "
                             f"0 < A_init_min <= A_init_max")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mamba2Cache:
    """The conv inputs (x, B, C) of the last d_conv - 1 tokens (oldest first) and the ssm state (float32)."""

    conv_BWC: jax.Array
    ssm_BHNP: jax.Array


def document_index(segment_ids_BT):
    """[B, T] int32: 0 at token 0, + 1 at every token whose segment id differs from the previous token's, so equal
    indices mean one document even where packed ids are reused (0, 1, 0)."""
    starts_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    return jnp.cumsum(jnp.pad(starts_BT, [(0, 0), (1, 0)]), axis=1, dtype=jnp.int32)


class GatedRMSNorm(nnx.Module):
    """The reference's RMSNormGated with norm_before_gate=False: RMSNorm(y * SiLU(z)) over each group of
    `group_size` channels, times `weight` [I], in float32; eps 1e-5 as Mamba2's."""

    def __init__(self, dim: int, group_size: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.group_size, self.eps = group_size, eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, y_BTI, z_BTI):
        gated_BTI = y_BTI.astype(jnp.float32) * jax.nn.silu(z_BTI.astype(jnp.float32))
        grouped = gated_BTI.reshape(*gated_BTI.shape[:-1], -1, self.group_size)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + self.eps)
        return (grouped.reshape(gated_BTI.shape) * self.weight[...].astype(jnp.float32)).astype(z_BTI.dtype)


@register("mamba2", options=Mamba2Options)
class Mamba2(Mixer):
    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=("chunked_linear_attention",))
    inert_options = {"chunk_size": "the chunk length of the chunked scan: the same result up to float rounding"}

    @classmethod
    def check(cls, options: Mamba2Options, config: ModelConfig) -> None:
        d_inner = options.expand * config.d_model
        if d_inner % options.head_dim:
            raise ValueError(f"head_dim={options.head_dim} must divide d_inner = expand * d_model = {d_inner}")
        n_heads = d_inner // options.head_dim
        if n_heads % options.n_groups:
            raise ValueError(f"n_groups={options.n_groups} must divide the number of heads d_inner / head_dim = "
                             f"{n_heads}")

    def __init__(self, config: ModelConfig, options: Mamba2Options, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        d = config.d_model
        self.d_model, self.d_inner, self.d_state = d, options.expand * d, options.d_state
        self.head_dim, self.n_groups = options.head_dim, options.n_groups
        self.n_heads = self.d_inner // self.head_dim
        self.d_conv, self.chunk_size = options.d_conv, options.chunk_size
        self.dt_limit = (options.dt_limit_min, options.dt_limit_max)
        self.implementation = config.kernel("chunked_linear_attention")
        self.dtype = jnp.dtype(config.dtype)
        i, g, n, h = self.d_inner, self.n_groups, self.d_state, self.n_heads
        self.conv_channels = i + 2 * g * n
        param_dtype = jnp.dtype(config.param_dtype)
        kw = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = dense(d, i + self.conv_channels + h, use_bias=options.bias, **kw)
        self.conv1d = DepthwiseConv1d(self.conv_channels, options.d_conv, use_bias=options.conv_bias,
                                      param_dtype=param_dtype, rngs=rngs)
        # dt_bias = softplus^-1(dt), dt ~ LogUniform[dt_min, dt_max] >= floor; A ~ U[A_init_min, A_init_max].
        log_dt_H = jax.random.uniform(rngs.params(), (h,), jnp.float32, math.log(options.dt_min),
                                      math.log(options.dt_max))
        dt_H = jnp.maximum(jnp.exp(log_dt_H), options.dt_init_floor)
        self.dt_bias = nnx.Param(dt_H + jnp.log(-jnp.expm1(-dt_H)))
        A_H = jax.random.uniform(rngs.params(), (h,), jnp.float32, options.A_init_min, options.A_init_max)
        self.A_log = nnx.Param(jnp.log(A_H))
        self.D = nnx.Param(jnp.ones((h,), jnp.float32))
        self.norm = GatedRMSNorm(i, i // g, param_dtype=param_dtype)
        self.out_proj = dense(i, d, use_bias=options.bias, scale=1 / (2 * config.n_layers) ** 0.5, **kw)

    def __call__(self, x_BTD, ctx: ForwardContext, cache: Mamba2Cache | None = None) -> MixerOutput:
        b, t, _ = x_BTD.shape
        i, g, n, h, p, w = self.d_inner, self.n_groups, self.d_state, self.n_heads, self.head_dim, self.d_conv - 1
        decode = ctx.mode == "decode"
        # Document index per token (runs of equal segment ids); decode continues each cached sequence.
        documents_BT = None if decode or ctx.segment_ids_BT is None else document_index(ctx.segment_ids_BT)
        z_BTI, xBC_BTC, dt_BTH = jnp.split(self.in_proj(x_BTD), [i, i + self.conv_channels], axis=-1)

        history_BWC = cache.conv_BWC.astype(xBC_BTC.dtype) if decode else jnp.zeros((b, w, self.conv_channels),
                                                                                       xBC_BTC.dtype)
        rows_BSC = jnp.concatenate([history_BWC, xBC_BTC], axis=1)
        x_BTI, B_BTN, C_BTN = jnp.split(jax.nn.silu(self.conv1d(rows_BSC, t, documents_BT)), [i, i + g * n],
                                        axis=-1)
        x_BTHP = x_BTI.reshape(b, t, h, p)

        dt_BTH = jax.nn.softplus(dt_BTH.astype(jnp.float32) + self.dt_bias[...])
        if self.dt_limit != (0.0, None):  # softplus is already >= 0: the default limit is no clamp
            dt_BTH = jnp.clip(dt_BTH, *self.dt_limit)
        log_decay_BTH = dt_BTH * -jnp.exp(self.A_log[...])  # <= 0
        v_BTHP = (dt_BTH[..., None] * x_BTHP.astype(jnp.float32)).astype(x_BTHP.dtype)
        y_BTHP, ssm_BHNP = pallas_kernels.chunked_linear_attention(
            C_BTN.reshape(b, t, g, n), B_BTN.reshape(b, t, g, n), v_BTHP, log_decay_BTH,
            initial_state_BHEF=cache.ssm_BHNP if decode else None,
            lengths_B=ctx.lengths_B if ctx.mode == "prefill" else None, segment_ids_BT=documents_BT,
            chunk_size=self.call_chunk_size(t), return_final_state=True, implementation=self.implementation)
        y_BTHP = y_BTHP.astype(jnp.float32) + self.D[...][:, None] * x_BTHP.astype(jnp.float32)
        y_BTI = self.norm(y_BTHP.reshape(b, t, i), z_BTI)

        if ctx.mode != "full":
            end_B = jnp.full((b,), t, jnp.int32) if decode else ctx.lengths_B
            conv_BWC = rows_before(rows_BSC, end_B, w)
            if documents_BT is not None:  # a packed prefill: keep the rows of each prompt's last document only
                rows_document_BS = jnp.pad(documents_BT, [(0, 0), (w, 0)], mode="edge")
                last_B = jnp.take_along_axis(documents_BT, jnp.maximum(end_B - 1, 0)[:, None], axis=1)
                conv_BWC = jnp.where(rows_before(rows_document_BS == last_B, end_B, w)[..., None], conv_BWC, 0)
            cache = Mamba2Cache(conv_BWC.astype(cache.conv_BWC.dtype), ssm_BHNP)
        return MixerOutput(self.out_proj(y_BTI), cache)

    def call_chunk_size(self, t: int) -> int:
        """The op's chunk for a call of t tokens: chunk_size, or for a shorter call the smallest power of 2 >= t
        (at least 16), which only trims padding (the result does not depend on the chunk)."""
        return min(self.chunk_size, max(16, 1 << (t - 1).bit_length()))

    def init_cache(self, batch: int, max_len: int) -> Mamba2Cache:
        return Mamba2Cache(jnp.zeros((batch, self.d_conv - 1, self.conv_channels), self.dtype),
                           jnp.zeros((batch, self.n_heads, self.d_state, self.head_dim), jnp.float32))

    def flops_per_token(self, seq_len: int) -> int:
        d, i, g, n, h = self.d_model, self.d_inner, self.n_groups, self.d_state, self.n_heads
        q = min(self.chunk_size, seq_len)
        project = 2 * d * (i + self.conv_channels + h) + 2 * i * d
        convolve = 2 * self.conv_channels * self.d_conv
        # SSD per token: the chunk's C B^T and its product with dt x, the chunk state, the state read-out.
        ssd = 2 * g * q * n + 2 * q * i + 4 * n * i
        return project + convolve + ssd + 2 * i
