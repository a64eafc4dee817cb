"""Pieces the state-space mixer tests share: building one mixer layer from a plan, running it once jitted, and the
PyTorch-layout projections and causal depthwise convolution their token-by-token references are written with."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnzoo import ModelConfig, get_mixer
from attnzoo.mixers.base import ForwardContext

BASE = dict(vocab_size=53, d_model=32, n_layers=1, n_heads=4, max_seq_len=64)


def build_mixer(plan: str, seed: int = 0, d_model: int = 32):
    """The single layer of `plan` (e.g. "mamba2(d_state=8)"), built as the model would build it."""
    cfg = ModelConfig(**{**BASE, "d_model": d_model, "plan": plan})
    return get_mixer(cfg.layers[0].mixer).cls(cfg, cfg.layer_options[0], shared=None, rngs=nnx.Rngs(seed))


def mixer_forward(mixer, x_BTD, ctx: ForwardContext):
    return nnx.jit(lambda mixer, x_BTD: mixer(x_BTD, ctx).y_BTD)(mixer, x_BTD)  # one compile, not op by op


def positions(b: int, t: int):
    return jnp.broadcast_to(jnp.arange(t), (b, t))


def linear(module, x):
    y = x @ module.kernel[...]
    return y if module.bias is None else y + module.bias[...]


def causal_conv1d(x_BTC, conv):
    """PyTorch Conv1d semantics of a depthwise causal convolution: weight [C, 1, K], K - 1 zeros of left padding."""
    b, t, c = x_BTC.shape
    weight = conv.weight[...]
    k = weight.shape[-1]
    padded = jnp.concatenate([jnp.zeros((b, k - 1, c)), x_BTC], axis=1)
    out = sum(padded[:, j:j + t] * weight[:, 0, j] for j in range(k))
    return out if conv.bias is None else out + conv.bias[...]
