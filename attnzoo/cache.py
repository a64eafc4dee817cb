"""Decode caches, one kind per mixer family. Each is a pytree carried through prefill and decode steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every past token; `lengths_B` counts the valid entries of each sequence."""

    k_BSHD: jax.Array
    v_BSHD: jax.Array
    lengths_B: jax.Array

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_heads: int, k_dim: int, v_dim: int, dtype) -> "KVCache":
        return cls(jnp.zeros((batch, max_len, kv_heads, k_dim), dtype),
                   jnp.zeros((batch, max_len, kv_heads, v_dim), dtype),
                   jnp.zeros((batch,), jnp.int32))

    def prefill(self, k_BTHD, v_BTHD, lengths_B) -> "KVCache":
        """Write right-padded prompts at positions 0..T-1; entries at or past `lengths_B` are ignored later."""
        k = jax.lax.dynamic_update_slice(self.k_BSHD, k_BTHD.astype(self.k_BSHD.dtype), (0, 0, 0, 0))
        v = jax.lax.dynamic_update_slice(self.v_BSHD, v_BTHD.astype(self.v_BSHD.dtype), (0, 0, 0, 0))
        return KVCache(k, v, lengths_B.astype(jnp.int32))

    def append(self, k_BTHD, v_BTHD) -> "KVCache":
        """Append T new tokens at each sequence's own length."""
        write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (at, 0, 0)))
        t = k_BTHD.shape[1]
        return KVCache(write(self.k_BSHD, k_BTHD, self.lengths_B), write(self.v_BSHD, v_BTHD, self.lengths_B),
                       self.lengths_B + t)
