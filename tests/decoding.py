"""Reference decoding for tests: greedy continuation by re-scoring the whole sequence at every step (no caches)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


def greedy_by_rescoring(model, prompt: list[int], n: int) -> list[int]:
    """The n greedy tokens after `prompt`, each from a full forward of everything so far (the padding after the
    sequence is invisible to a causal model)."""
    forward = nnx.jit(lambda model, tokens: model(tokens).logits_BTV)
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.zeros((1, len(prompt) + n), jnp.int32).at[0, : len(seq)].set(jnp.asarray(seq))
        seq.append(int(jnp.argmax(forward(model, padded)[0, len(seq) - 1])))
    return seq[len(prompt):]
