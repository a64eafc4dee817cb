"""Compressed Convolutional Attention (CCA) and its grouped-query form (CCGQA).

Figliolia, Alonso, Iyer, Anthony, Millidge (Zyphra), "Compressed Convolutional Attention", arXiv 2510.04476; the
forward pass follows the paper's Appendix A listing and the official ZAYA1 code (`Zyphra/transformers`,
`models/zaya/modeling_zaya.py`, class `CCA`), whose parameter names are kept here.

The whole attention runs in a compressed latent: queries in width D / C1 (H heads), keys and values in D / C2
(K heads), one head width E for both, so H / K = C2 / C1 (CCA: C1 = C2 = C). Registered: "cca" with C = 4 (the
paper's 4x KV compression) and "ccgqa" with C1 = 2, C2 = 8 (8x KV: the paper's MoE CCGQA, "8q2kv" of 16 heads, and
ZAYA1's production setting; the paper reports its dense runs' ratios inconsistently). With q0 = x W_q [B,T,H,E],
k0 = x W_k [B,T,K,E] and g(h) = h // (H / K):

    packed = [q0; k0]                                                    (N = (H + K) E channels)
    qc, kc = conv1(conv0(pad(packed)))          causal convs over time, one left pad of (k_seq - 1) + (k_ch - 1):
                                                conv0 depthwise (k_seq taps), conv1 one dense E x E mix per head
                                                (k_ch taps); both with biases
    q_h = qc_h + (q0_h + k0_g(h)) / 2,   k_g = kc_g + mean_{h in g} (q0_h + k0_g) / 2           (q-k mean)
    v   = [x_t W_v1 ; x_{t-1} W_v2]      per token, split along the K E channels                  (value shift)
    q <- sqrt(E) q / |q|,   k <- sqrt(E) k / |k| * exp(beta_g)           (beta per kv head, init 0)
    q, k <- RoPE on the first rope_fraction of each head               (in the latent: no extra RoPE head)
    o = softmax(q k^T / sqrt(E) + causal mask) v,    y = o W_o           (W_o: H E -> D, the one up-projection)

Cost per layer (paper Table II, E = D): params 2D^2/C1 + 2D^2/C2 + conv, KV cache 2D/C2 per token, forward FLOPs
(1/C1 + 1/C2) 4D^2 + 4 D ctx / C1 + conv per token: C times below MHA at C1 = C2 = C, the conv aside.

Decode keeps, beside the plain GQA KV cache (normalised, rotated keys), the last (k_seq - 1) + (k_ch - 1) pre-conv
packed rows (the conv state) and the previous token's x W_v2 (the value-shift state). Packed documents
(`segment_ids_BT`) restart both: rows of another document read as zero, as before a sequence's first token
(an attnzoo decision; the official code masks the hidden states in prefill).

Extra shape letters here: N the packed q/k width (H + K) E, P the rows of history a stream keeps, W the window of
rows a new row's convolution reads (P + 1), S = P + T history and new rows together.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from attnzoo.attention import attention, cached_attention
from attnzoo.cache import rows_before, write_at
from attnzoo.config import ModelConfig
from attnzoo.diagnostics import attention_diagnostics
from attnzoo.layers import apply_rope, dense
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports, average_context, dtype_bytes
from attnzoo.registry import register


@dataclasses.dataclass(frozen=True)
class CCAOptions:
    """compression: C (CCA), or C1 for the query latent (CCGQA): query latent width d_model / compression.
    kv_compression: C2, the key/value latent d_model / kv_compression; a multiple of compression (group size
      C2 / C1); none: = compression (CCA).
    head_dim: E, shared by queries, keys and values; default the model's head width, or the kv latent's width
      d_model / kv_compression where that is narrower (then the latent holds one kv head: e.g. ccgqa's 8x kv
      compression in a model of 4 heads).
    convs: 0, 1 (the depthwise sequence conv only) or 2 (then the per-head channel conv): the paper's ablation.
    k_seq, k_ch: kernel sizes of the sequence (depthwise) and channel (per-head) convs; 2 and 2 in the official code.
    qk_mean: add the pre-conv q-k mean back as a residual. value_shift: half the value channels from token t - 1.
    rope_fraction: share of each head's width rotated by RoPE (0.5 in the official code; 0: no RoPE)."""

    compression: int = 4
    kv_compression: int | None = None
    head_dim: int | None = None
    convs: Literal[0, 1, 2] = 2
    k_seq: int = 2
    k_ch: int = 2
    qk_mean: bool = True
    value_shift: bool = True
    rope_fraction: float = 0.5

    def __post_init__(self):
        for name in ("compression", "kv_compression", "head_dim", "k_seq", "k_ch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be an integer >= 1")
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction={self.rope_fraction} must lie in [0, 1]")


def _head_dim(config: ModelConfig, options: CCAOptions) -> int:
    """E: the option, else the model's head width, narrowed to the kv latent's width where that is smaller."""
    if options.head_dim is not None:
        return options.head_dim
    kv_compression = options.kv_compression or options.compression
    return min(config.dim_per_head, max(1, config.d_model // kv_compression))


def _geometry(config: ModelConfig, options: CCAOptions) -> tuple[int, int, int]:
    """(query heads H, kv heads K, head width E) of the latents."""
    head_dim = _head_dim(config, options)
    kv_compression = options.kv_compression or options.compression
    return (config.d_model // options.compression // head_dim, config.d_model // kv_compression // head_dim,
            head_dim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CCACache:
    """Keys and values of every past token (a plain GQA cache), plus the rows the causal convolutions and the value
    shift still read: the last P pre-conv packed q/k rows and the last x W_v2 row (none without value shift)."""

    k_BSKE: jax.Array
    v_BSKE: jax.Array
    qk_rows_BPN: jax.Array
    v_shift_rows_BPF: jax.Array

    def advance(self, k_BTKE, v_BTKE, at_B, qk_rows_BSN, v_shift_rows_BSF, end_B) -> "CCACache":
        """The T new keys/values written at at_B.., and the stream states taken as the rows just before end_B."""
        return CCACache(write_at(self.k_BSKE, k_BTKE, at_B), write_at(self.v_BSKE, v_BTKE, at_B),
                        rows_before(qk_rows_BSN, end_B, self.qk_rows_BPN.shape[1]),
                        rows_before(v_shift_rows_BSF, end_B, self.v_shift_rows_BPF.shape[1]))


def _windows(rows_BSX, t: int, segment_ids_BT):
    """For each of the t new rows (the last t of rows_BSX), the W = S - t + 1 rows ending at it, oldest first; rows
    of another document read as zero."""
    w = rows_BSX.shape[1] - t + 1
    windows_BTWX = jnp.stack([rows_BSX[:, i:i + t] for i in range(w)], axis=2)
    if segment_ids_BT is None:
        return windows_BTWX
    # History rows only exist before a sequence's start (full mode), where they are zero anyway.
    segments_BS = jnp.concatenate([jnp.repeat(segment_ids_BT[:, :1], w - 1, axis=1), segment_ids_BT], axis=1)
    same_BTW = jnp.stack([segments_BS[:, i:i + t] for i in range(w)], axis=2) == segment_ids_BT[:, :, None]
    return jnp.where(same_BTW[..., None], windows_BTWX, 0)


class CausalConv(nnx.Module):
    """A PyTorch-style Conv1d over time with `groups` groups of `group_width` channels each (depthwise: width 1),
    applied to windows of rows: W rows in, the W - kernel_size + 1 valid outputs out."""

    def __init__(self, groups: int, group_width: int, kernel_size: int, *, param_dtype, rngs: nnx.Rngs):
        bound = (group_width * kernel_size) ** -0.5  # PyTorch's default Conv1d init: U(-1/sqrt(fan_in), ..)

        def uniform(shape):
            return jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)

        self.weight = nnx.Param(uniform((kernel_size, groups, group_width, group_width)))  # [tap, group, in, out]
        self.bias = nnx.Param(uniform((groups * group_width,)))

    def __call__(self, windows_BTWN):
        kernel_size, groups, width, _ = self.weight.shape
        b, t, w, n = windows_BTWN.shape
        out = w - kernel_size + 1
        x = windows_BTWN.reshape(b, t, w, groups, width)
        weight = self.weight[...].astype(x.dtype)
        y = sum(jnp.einsum("btwgi,gio->btwgo", x[:, :, tap:tap + out], weight[tap]) for tap in range(kernel_size))
        return y.reshape(b, t, out, n) + self.bias[...].astype(x.dtype)


@register("cca", options=CCAOptions)
class CompressedConvAttention(Mixer):
    supports = Supports(decode=True, multi_token_decode=True, kernel_ops=("flash_attention", "decode_attention"))

    @classmethod
    def check(cls, options: CCAOptions, config: ModelConfig) -> None:
        d, head_dim = config.d_model, _head_dim(config, options)
        allowed = [c for c in range(1, d + 1) if d % c == 0 and (d // c) % head_dim == 0]
        kv_compression = options.kv_compression or options.compression
        for name, value in (("compression", options.compression), ("kv_compression", kv_compression)):
            if not allowed:
                raise ValueError(f"head_dim={head_dim} does not divide d_model={d}, so no {name} gives a latent of "
                                 f"whole heads; set the option head_dim to a divisor of d_model")
            if value not in allowed:
                raise ValueError(f"{name}={value} must split d_model={d} into a latent of whole heads of "
                                 f"head_dim={head_dim}; allowed: {', '.join(map(str, allowed))}")
        if kv_compression % options.compression:
            raise ValueError(f"kv_compression={kv_compression} must be a multiple of compression="
                             f"{options.compression} (query heads share kv heads in whole groups)")
        _, n_kv_heads, _ = _geometry(config, options)
        if options.value_shift and n_kv_heads * head_dim % 2:
            raise ValueError(f"value_shift=true splits the {n_kv_heads * head_dim} value channels in halves; "
                             f"they must be even (or set value_shift=false)")
        if round(options.rope_fraction * head_dim) % 2:
            raise ValueError(f"rope_fraction={options.rope_fraction} rotates {round(options.rope_fraction * head_dim)}"
                             f" of head_dim={head_dim} channels; that must be even (e.g. 0, 0.5, 1)")

    def __init__(self, config: ModelConfig, options: CCAOptions, *, shared: SharedParams | None = None,
                 rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = _geometry(config, options)
        h, k, e = self.n_heads, self.n_kv_heads, self.head_dim
        self.qk_mean = options.qk_mean
        self.rope_dims = round(options.rope_fraction * e)
        self.rope_base = config.rope_base
        self.flash_implementation = config.kernel("flash_attention")
        self.decode_implementation = config.kernel("decode_attention")
        self.cache_dtype = jnp.dtype(config.dtype)
        d, param_dtype = config.d_model, jnp.dtype(config.param_dtype)
        kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=param_dtype, rngs=rngs)
        self.linear_q = dense(d, h * e, **kw)
        self.linear_k = dense(d, k * e, **kw)
        # Without value shift both halves read token t: the same parameters as one projection, in the same layout.
        self.val_proj1 = dense(d, k * e // 2, **kw)
        self.val_proj2 = dense(d, k * e - k * e // 2, **kw)
        convs = [CausalConv((h + k) * e, 1, options.k_seq, param_dtype=param_dtype, rngs=rngs),
                 CausalConv(h + k, e, options.k_ch, param_dtype=param_dtype, rngs=rngs)][:options.convs]
        self.conv_qk = nnx.List(convs)
        self.temp = nnx.Param(jnp.zeros((k,), param_dtype))  # beta: key temperature exp(beta) per kv head
        self.o_proj = dense(h * e, d, scale=1 / (2 * config.n_layers) ** 0.5, **kw)
        # Rows of history each stream reads: the convs' one left pad, and one previous token for the value shift.
        self.qk_history = sum(conv.weight.shape[0] - 1 for conv in convs)
        self.v_shift_history = int(options.value_shift)

    def _normalize_and_rotate(self, q_BTHE, k_BTKE, positions_BT):
        """L2 norm scaled to sqrt(E) (in float32), the key temperature, then RoPE on the first rope_dims."""
        def unit(x):
            x = x.astype(jnp.float32)
            return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12) * self.head_dim**0.5

        q = unit(q_BTHE)
        k = unit(k_BTKE) * jnp.exp(self.temp[...].astype(jnp.float32))[:, None]
        if self.rope_dims:
            q, k = self._rope(q, positions_BT), self._rope(k, positions_BT)
        return q.astype(q_BTHE.dtype), k.astype(k_BTKE.dtype)

    def _rope(self, x_BTXE, positions_BT):
        rotated = apply_rope(x_BTXE[..., :self.rope_dims], positions_BT, base=self.rope_base)
        return jnp.concatenate([rotated, x_BTXE[..., self.rope_dims:]], axis=-1)

    def __call__(self, x_BTD, ctx: ForwardContext, cache: CCACache | None = None) -> MixerOutput:
        b, t, _ = x_BTD.shape
        h, k, e = self.n_heads, self.n_kv_heads, self.head_dim
        decode = ctx.mode == "decode"
        q0_BTHE = self.linear_q(x_BTD).reshape(b, t, h, e)
        k0_BTKE = self.linear_k(x_BTD).reshape(b, t, k, e)

        # Causal convs over the packed pre-conv rows: zeros before a sequence starts, the cached rows in decode.
        qk_new_BTN = jnp.concatenate([q0_BTHE.reshape(b, t, h * e), k0_BTKE.reshape(b, t, k * e)], axis=-1)
        qk_past_BPN = (cache.qk_rows_BPN.astype(qk_new_BTN.dtype) if decode
                       else jnp.zeros((b, self.qk_history, (h + k) * e), qk_new_BTN.dtype))
        qk_rows_BSN = jnp.concatenate([qk_past_BPN, qk_new_BTN], axis=1)
        windows_BTWN = _windows(qk_rows_BSN, t, ctx.segment_ids_BT)
        for conv in self.conv_qk:
            windows_BTWN = conv(windows_BTWN)
        q_BTHE, k_BTKE = jnp.split(windows_BTWN[:, :, 0], [h * e], axis=-1)
        q_BTHE, k_BTKE = q_BTHE.reshape(b, t, h, e), k_BTKE.reshape(b, t, k, e)
        if self.qk_mean:
            mean_BTKGE = (q0_BTHE.reshape(b, t, k, h // k, e) + k0_BTKE[:, :, :, None]) / 2
            q_BTHE = q_BTHE + mean_BTKGE.reshape(b, t, h, e)
            k_BTKE = k_BTKE + mean_BTKGE.mean(axis=3)

        # Value shift: the second half of the value channels from the previous row (the current one without shift).
        shifted_BTF = self.val_proj2(x_BTD)
        v_past_BPF = (cache.v_shift_rows_BPF.astype(shifted_BTF.dtype) if decode
                      else jnp.zeros((b, self.v_shift_history, shifted_BTF.shape[-1]), shifted_BTF.dtype))
        v_shift_rows_BSF = jnp.concatenate([v_past_BPF, shifted_BTF], axis=1)
        previous_BTF = _windows(v_shift_rows_BSF, t, ctx.segment_ids_BT)[:, :, 0]
        v_BTKE = jnp.concatenate([self.val_proj1(x_BTD), previous_BTF], axis=-1).reshape(b, t, k, e)

        q_BTHE, k_BTKE = self._normalize_and_rotate(q_BTHE, k_BTKE, ctx.positions_BT)
        scale = e**-0.5
        metrics = {}
        if decode:
            cache = cache.advance(k_BTKE, v_BTKE, ctx.lengths_B, qk_rows_BSN, v_shift_rows_BSF,
                                  jnp.full((b,), t, jnp.int32))
            o_BTHE = cached_attention(q_BTHE, cache.k_BSKE, cache.v_BSKE, ctx.lengths_B + t, scale=scale,
                                      implementation=self.decode_implementation)
        else:
            o_BTHE = attention(q_BTHE, k_BTKE, v_BTKE, causal=True, segment_ids_BT=ctx.segment_ids_BT, scale=scale,
                               return_lse=ctx.diagnostics, implementation=self.flash_implementation)
            if ctx.diagnostics:
                o_BTHE, lse_BHT = o_BTHE
                metrics = attention_diagnostics(q_BTHE, k_BTKE, lse_BHT, scale=scale)
                metrics["key_temperature"] = jnp.mean(jnp.exp(self.temp[...].astype(jnp.float32)))
            if ctx.mode == "prefill":  # right-padded prompts: the stream states end at each prompt's length
                cache = cache.advance(k_BTKE, v_BTKE, jnp.zeros((b,), jnp.int32), qk_rows_BSN, v_shift_rows_BSF,
                                      ctx.lengths_B)
        return MixerOutput(self.o_proj(o_BTHE.reshape(b, t, h * e)), cache, metrics=metrics)

    def init_cache(self, batch: int, max_len: int) -> CCACache:
        h, k, e, dtype = self.n_heads, self.n_kv_heads, self.head_dim, self.cache_dtype
        kv = jnp.zeros((batch, max_len, k, e), dtype)
        return CCACache(kv, kv, jnp.zeros((batch, self.qk_history, (h + k) * e), dtype),
                        jnp.zeros((batch, self.v_shift_history, self.val_proj2.out_features), dtype))

    def cache_bytes_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes(self.cache_dtype)

    def flops_per_token(self, seq_len: int) -> int:
        d, h, k, e = self.linear_q.in_features, self.n_heads, self.n_kv_heads, self.head_dim
        # W_q, W_k, W_v1 + W_v2 and W_o: (1/C1 + 1/C2) 4 D^2 at E H = D / C1, E K = D / C2.
        project = 2 * d * e * (2 * h + 2 * k)
        # One multiply-add per conv weight per token (depthwise k_seq N, per-head k_ch N E).
        convolve = sum(2 * conv.weight.size for conv in self.conv_qk)
        # q.k and p.v in the query latent, at the causal average context (halved).
        attend = 4 * h * e * average_context(seq_len, None)
        return int(round(project + convolve + attend))


# CCGQA as in the paper's MoE runs ("CCA-8q2kv") and ZAYA1: query latent D / 2 (C1 = 2), kv latent D / 8 (C2 = 8,
# an 8x smaller KV cache than MHA), group size 4. Other ratios: ccgqa(kv_compression=4), ...
register("ccgqa", options=CCAOptions, compression=2, kv_compression=8)(CompressedConvAttention)
