"""What every decode cache shares: the model's decode state and the per-sequence write into a cache buffer.

`KVCache` (keys and values of every past token) serves the softmax mixers; a mixer with another state keeps its
cache class in its own file. The model keeps the per-sequence lengths and the capacity,
so a recurrent cache holds only its state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The caches of every layer, the tokens each sequence holds, and how many it may hold (`init_caches`)."""

    layers: tuple  # one cache per layer (a shared block still has one per depth)
    lengths_B: jax.Array  # int32, tokens seen per sequence
    capacity: int = dataclasses.field(metadata=dict(static=True))


def write_at(buffer_BS, new_BT, at_B):
    """`buffer_BS` with `new_BT` written along axis 1 at each sequence's own offset `at_B`."""
    write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), at, 0))
    return write(buffer_BS, new_BT, at_B)


def rows_before(rows_BSX, end_B, p: int):
    """The p rows before row end_B of each sequence: a fixed-size window of history (a convolution's state) read
    where each sequence's valid rows end."""
    return jax.vmap(lambda rows, end: jax.lax.dynamic_slice_in_dim(rows, end, p, axis=0))(rows_BSX, end_B)


def ensure_within_capacity(lengths_B: jax.Array, capacity: int) -> None:
    """Raise when a sequence would hold more than `capacity` tokens (a cache write past its end would overwrite
    the last slot and give silently wrong outputs). Concrete lengths raise ValueError at once; traced lengths raise
    when the computation runs."""
    message = (f"decode: a sequence would hold more than the cache capacity of {capacity} tokens; "
               f"size the caches with init_caches(batch, max_len) for the whole generation")
    if not isinstance(lengths_B, jax.core.Tracer):
        if int(np.max(np.asarray(lengths_B))) > capacity:
            raise ValueError(message)
        return

    def fail_if_over(over):
        if over:
            raise ValueError(message)

    jax.debug.callback(fail_if_over, jnp.any(lengths_B > capacity))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every past token; the model's DecodeState says how many entries are valid."""

    k_BSKE: jax.Array
    v_BSKE: jax.Array

    @classmethod
    def empty(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        zeros = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        return cls(zeros, zeros)

    def write(self, k_BTKE, v_BTKE, at_B) -> "KVCache":
        """The T new keys/values written at positions at_B .. at_B + T - 1 of each sequence."""
        return KVCache(write_at(self.k_BSKE, k_BTKE, at_B), write_at(self.v_BSKE, v_BTKE, at_B))
