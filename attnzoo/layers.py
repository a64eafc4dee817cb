"""Small shared modules: RMSNorm, SwiGLU MLP, rotary position embedding."""

from __future__ import annotations

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


def apply_rope(x_BTHD, positions_BT, *, base: float):
    """Rotary embedding, rotate-half convention (RoFormer, arXiv 2104.09864), in float32."""
    half = x_BTHD.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angle_BTF)[:, :, None, :], jnp.sin(angle_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTHD.dtype)
