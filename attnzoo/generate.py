"""Batched generation: prefill right-padded prompts of different lengths into the caches, then decode
token by token (greedy, temperature, top-k), all inside one jit."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_next(logits_BV, key, *, temperature: float, top_k: int | None):
    """Greedy when temperature == 0, else softmax(logits / temperature) restricted to the top-k tokens."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len", "temperature", "top_k"))
def _generate(graphdef, state, tokens_BP, lengths_B, key, *, max_new_tokens, max_len, temperature, top_k):
    model = nnx.merge(graphdef, state)
    batch = tokens_BP.shape[0]
    pick = functools.partial(sample_next, temperature=temperature, top_k=top_k)
    out = model(tokens_BP, caches=model.init_caches(batch, max_len), lengths_B=lengths_B, mode="prefill")
    key, sub = jax.random.split(key)
    first = pick(out.logits_BTV[jnp.arange(batch), lengths_B - 1], sub)

    def step(carry, _):
        caches, token_B, key = carry
        out = model(token_B[:, None], caches=caches, mode="decode", check_capacity=False)  # sized to fit
        key, sub = jax.random.split(key)
        return (out.caches, pick(out.logits_BTV[:, 0], sub), key), token_B

    (_, last, _), emitted_NB = jax.lax.scan(step, (out.caches, first, key), None, length=max_new_tokens - 1)
    return jnp.concatenate([emitted_NB.T, last[:, None]], axis=1)


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """Continue each prompt by `max_new_tokens` tokens (cut after `eos_id` if given). Prompts may differ in length."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: give at least one prompt, each with at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"temperature={temperature} must be >= 0 and top_k={top_k} >= 1 or None")
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), lengths.max()), np.int32)
    for row, prompt in zip(tokens, prompts):
        row[: len(prompt)] = prompt
    graphdef, state = nnx.split(model)
    new = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(seed),
                    max_new_tokens=max_new_tokens, max_len=int(lengths.max()) + max_new_tokens,
                    temperature=float(temperature), top_k=top_k)
    out = np.asarray(new).tolist()
    if eos_id is not None:
        out = [seq[: seq.index(eos_id) + 1] if eos_id in seq else seq for seq in out]
    return out
