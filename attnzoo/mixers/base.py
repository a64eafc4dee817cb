"""What every token mixer shares: the forward context, the output record, option parsing, accounting hooks.

A mixer is an `nnx.Module` registered by name with

    __init__(self, config: ModelConfig, spec: LayerSpec, *, shared: SharedParams, rngs: nnx.Rngs)
    __call__(self, x_BTD, ctx: ForwardContext, cache=None) -> MixerOutput
    init_cache(self, batch: int, max_len: int) -> cache pytree      (decode state of this mixer kind; it exposes
                                                                     `lengths_B`, the tokens seen per sequence)
    flops_per_token(self, seq_len: int) -> int                       (forward FLOPs, averaged over seq_len)
    cache_bytes_per_token(self) -> int                               (decode-cache growth per token)

`ctx.mode` is static: "full" (training / scoring), "prefill" (fill an empty cache from right-padded prompts of
`ctx.lengths` tokens), "decode" (append the new tokens at each sequence's cache length).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Mode = Literal["full", "prefill", "decode"]


@dataclasses.dataclass(frozen=True)
class ForwardContext:
    mode: Mode
    positions_BT: jax.Array
    segment_ids_BT: jax.Array | None = None
    lengths_B: jax.Array | None = None  # prefill: prompt lengths
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. input embeddings for later variants


class MixerOutput(NamedTuple):
    y_BTD: jax.Array
    cache: Any = None
    aux_loss: jax.Array | float = 0.0  # already weighted; added to the training loss
    metrics: dict[str, jax.Array] = {}  # diagnostics logged beside the loss


class SharedParams(nnx.Module):
    """Modules shared by several layers, built once per key by the model (e.g. a weight dictionary that every
    attention layer draws from). A mixer class asks for one with a classmethod
    `make_shared(config, rngs) -> dict[str, nnx.Module]`."""

    def __init__(self, modules: dict[str, nnx.Module]):
        self.modules = nnx.Dict(modules)

    def __getitem__(self, key: str) -> nnx.Module:
        return self.modules[key]


def resolve_options(options_cls: type, mixer: str, given: dict[str, Any]):
    """Build the mixer's frozen options dataclass, naming the allowed fields when one is unknown."""
    allowed = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"plan: mixer {mixer!r} has no option {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return options_cls(**given)


def average_context(seq_len: int, window: int | None) -> float:
    """Mean number of keys a causal query sees over positions 0..seq_len-1 (window-limited if given)."""
    w = seq_len if window is None else min(window, seq_len)
    # positions < w see i+1 keys; the rest see w.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def dtype_bytes(dtype) -> int:
    return jnp.dtype(dtype).itemsize
