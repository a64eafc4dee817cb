"""Small shared modules: RMSNorm, SwiGLU MLP, rotary position embedding (with the frequency scalings of long-context
checkpoints); and the pieces several mixers share (a causal depthwise conv, feature maps, a compiled `__call__`), so
that no mixer imports another for a helper."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32 (arXiv 1910.07467)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def dense(d_in: int, d_out: int, *, dtype, param_dtype, rngs: nnx.Rngs, scale: float = 1.0,
          use_bias: bool = False) -> nnx.Linear:
    """A projection with fan-in-scaled normal init (`scale` shrinks residual outputs); bias-free unless asked, a
    bias starting at zero."""
    init = jax.nn.initializers.normal(stddev=scale / d_in**0.5)
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=init, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)


class SwiGLU(nnx.Module):
    """out = W_down(silu(W_gate x) * W_up x) (arXiv 2002.05202)."""

    def __init__(self, d_model: int, hidden: int, *, dtype, param_dtype, out_scale: float, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = dense(d_model, hidden, **kw)
        self.up_proj = dense(d_model, hidden, **kw)
        self.down_proj = dense(hidden, d_model, scale=out_scale, **kw)

    def __call__(self, x_BTD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))

    def flops_per_token(self) -> int:
        d, h = self.up_proj.in_features, self.up_proj.out_features
        return 2 * 3 * d * h


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A rescaling of the rotary frequencies for context extension, as Hugging Face's `rope_parameters` name them.

    "linear" (position interpolation, arXiv 2306.15595): every frequency divided by `factor`.
    "llama3" (Llama 3.1): wavelengths longer than original_max_len / low_freq_factor divided by `factor`, shorter
    than original_max_len / high_freq_factor kept, those between blended linearly in original_max_len / wavelength.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling={self.kind!r} is not one of 'linear', 'llama3' (or none)")
        if self.factor <= 0:
            raise ValueError(f"rope_factor={self.factor} must be > 0")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"rope_low_freq_factor={self.low_freq_factor} and rope_high_freq_factor="
                             f"{self.high_freq_factor} must satisfy 0 < low < high")
        if self.original_max_len <= 0:
            raise ValueError(f"rope_original_max_len={self.original_max_len} must be positive")

    def apply(self, inv_freq_F):
        if self.kind == "linear":
            return inv_freq_F / self.factor
        wavelength_F = 2 * math.pi / inv_freq_F
        smooth_F = (self.original_max_len / wavelength_F - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        blended_F = (1 - smooth_F) * inv_freq_F / self.factor + smooth_F * inv_freq_F
        long_F = wavelength_F > self.original_max_len / self.low_freq_factor
        short_F = wavelength_F < self.original_max_len / self.high_freq_factor
        return jnp.where(long_F, inv_freq_F / self.factor, jnp.where(short_F, inv_freq_F, blended_F))


def apply_rope(x_BTHD, positions_BT, *, base: float, scaling: RopeScaling | None = None):
    """Rotary embedding, rotate-half convention (RoFormer, arXiv 2104.09864), in float32; `scaling` rescales the
    frequencies base^(-2i/D)."""
    half = x_BTHD.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angle_BTF)[:, :, None, :], jnp.sin(angle_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTHD.dtype)


# -- pieces several mixers share (one home, so that no mixer imports another for them) ---------------------------

NORMALIZER_EPS = 1e-6  # linear attention's q.z denominator floor (linear_attention, decon_approx)


class DepthwiseConv1d(nnx.Module):
    """PyTorch `Conv1d(I, I, d_conv, groups=I)` applied causally: weight [I, 1, d_conv], bias [I] (or none).
    PyTorch's default init U(-1/sqrt(d_conv), 1/sqrt(d_conv)), as the reference leaves it."""

    def __init__(self, channels: int, kernel_size: int, *, use_bias: bool, param_dtype, rngs: nnx.Rngs):
        bound = kernel_size**-0.5

        def uniform(shape):
            return nnx.Param(jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound))

        self.weight = uniform((channels, 1, kernel_size))
        self.bias = uniform((channels,)) if use_bias else None

    def __call__(self, rows_BSI, t: int, segment_ids_BT=None):
        """The outputs at the last t of the S rows (the first S - t are history), each reading its d_conv rows
        ending at itself; rows of another document read as zero."""
        kernel_size = self.weight.shape[-1]
        history = rows_BSI.shape[1] - t
        weight_WI = self.weight[...][:, 0].T.astype(rows_BSI.dtype)
        y_BTI = jnp.zeros(rows_BSI.shape[:1] + (t,) + rows_BSI.shape[2:], rows_BSI.dtype)
        for tap in range(kernel_size):  # tap kernel_size - 1 reads the current row
            back = kernel_size - 1 - tap
            rows_BTI = rows_BSI[:, history - back:history - back + t]
            if segment_ids_BT is not None and back:
                # History rows (before a sequence's start) are zeros outside decode, so only in-sequence rows count.
                earlier_BT = jnp.pad(segment_ids_BT, [(0, 0), (back, 0)], mode="edge")[:, :t]
                rows_BTI = jnp.where((earlier_BT == segment_ids_BT)[..., None], rows_BTI, 0)
            y_BTI = y_BTI + rows_BTI * weight_WI[tap]
        if self.bias is not None:
            y_BTI = y_BTI + self.bias[...].astype(y_BTI.dtype)
        return y_BTI


def taylor2_features(x_BTHD):
    """Based's TaylorExp: [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)], width 1 + d + d^2, so that
    phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d)."""
    d = x_BTHD.shape[-1]
    outer = (x_BTHD[..., :, None] * x_BTHD[..., None, :]).reshape(*x_BTHD.shape[:-1], d * d)
    return jnp.concatenate([jnp.ones_like(x_BTHD[..., :1]), x_BTHD / d**0.25, outer / math.sqrt(2 * d)], axis=-1)


def softmax_map(q_BTHE, k_BTKE, scale: float):
    """Causal softmax(q k^T * scale) [B,H,T,S] (kv heads repeated to the query heads) and the logits."""
    group = q_BTHE.shape[2] // k_BTKE.shape[2]
    k_BTHE = jnp.repeat(k_BTKE, group, axis=2)
    logits_BHTS = jnp.einsum("bthe,bshe->bhts", q_BTHE.astype(jnp.float32), k_BTHE.astype(jnp.float32)) * scale
    t = q_BTHE.shape[1]
    causal = jnp.tril(jnp.ones((t, k_BTHE.shape[1]), bool))
    return jax.nn.softmax(jnp.where(causal, logits_BHTS, -jnp.inf), axis=-1), jnp.where(causal, logits_BHTS, 0.0)
