"""Helpers every kernel in pallas_kernels shares: tile arithmetic, padding, the input checks of the op APIs,
interpret mode and CUDA cross-lowering. Imports jax only (never jax.experimental.pallas), so the op APIs that use
it stay light."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

# Finite so that fully masked rows give exp(MASK - m) = 0 instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# The kernels run their softmax in base 2: logits * LOG2E, exp2, and lse back to natural log with LN2.
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def on_gpu() -> bool:
    """True when the default backend is a GPU (the kernels then compile; elsewhere they interpret)."""
    return jax.default_backend() == "gpu"


def default_interpret() -> bool:
    """Pallas kernels run in interpret mode off GPU, so every implementation runs everywhere."""
    return not on_gpu()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def pad_axis(x, axis: int, size: int, value=0):
    """x padded with `value` at the end of `axis` to `size`."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def column_chunks(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, width) power-of-2 column tiles covering round_up(d, 16), largest first: 192 -> 128 + 64,
    576 -> 512 + 64, 72 -> 64 + 16 (Triton loads power-of-2 tiles only; this spends no work on power-of-2 padding)."""
    padded, chunks, off = round_up(d, 16), [], 0
    while off < padded:
        width = 1 << ((padded - off).bit_length() - 1)
        chunks.append((off, width))
        off += width
    return tuple(chunks)


# --------------------------------------------------------------------------------------------------- input checks

def check_attention_inputs(q, k, v, *, k_name: str = "k", v_name: str = "v") -> None:
    """q [B, T, Hq, Dqk], k [B, S, Hkv, Dqk], v [B, S, Hkv, Dv] in one float dtype, with Hq % Hkv == 0."""
    for name, x in (("q", q), (k_name, k), (v_name, v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q, {k_name}, {v_name} must share one dtype of bfloat16/float16/float32, got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if k.shape[0] != q.shape[0] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{k_name} and {v_name} must have q's batch ({q.shape[0]}) and the same seq and heads, got "
                         f"{k_name} {k.shape}, {v_name} {v.shape}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and {k_name} must share head_dim, got q {q.shape[3]} and {k_name} {k.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} heads, {k_name} has {k.shape[2]}: q heads must be a multiple of kv "
                         f"heads")


def check_options(*, sliding_window=None, logits_soft_cap=None, **blocks) -> None:
    """sliding_window an int >= 1, logits_soft_cap > 0, each block (keyword: its name) a power of 2 >= 16 (Triton's
    tile rule); None means unset for all of them."""
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"sliding_window must be an int >= 1 or None, got {sliding_window!r}")
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be > 0 or None, got {logits_soft_cap!r}")
    for name, block in blocks.items():
        if block is not None and (block < 16 or block & (block - 1)):
            raise ValueError(f"{name} must be a power of 2 >= 16 (Triton's tile rule) or None, got {block!r}")


# ------------------------------------------------------------------------------------------------ cross-lowering

@contextlib.contextmanager
def cuda_target(device_kind: str = "NVIDIA H200", num_cores: int = 132):
    """Context under which `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` works on a CPU-only
    jaxlib, so tests can lower GPU kernels (and hit Triton's shape rules) without a GPU."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower_for_cuda(fn, *args, **kwargs) -> str:
    """Lower `fn(*args, **kwargs)` for CUDA on any machine and return the StableHLO text.

    `args` may be arrays or `jax.ShapeDtypeStruct`s. Raises the lowering error (e.g. Triton's power-of-2 rule)."""
    with cuda_target():
        lowered = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
    return lowered.as_text()
