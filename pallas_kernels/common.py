"""Pieces every kernel in pallas_kernels shares: backend choice, interpret mode, CUDA cross-lowering."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "pallas", "xla", "cudnn")

# Finite so that fully masked rows give exp(MASK - m) = 0 instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not one of {', '.join(map(repr, IMPLEMENTATIONS))}")


def on_gpu() -> bool:
    """True when the default backend is a GPU (the kernels then compile; elsewhere they interpret)."""
    return jax.default_backend() == "gpu"


# The Pallas kernels pass every CPU check (interpret mode, CUDA cross-lowering) but have not yet been compiled and
# timed on a real GPU (experiments/gpu_checks.sh). Until a GPU run sets this True, "auto" keeps to cuDNN / XLA on
# GPU and the kernels are an explicit opt-in (implementation="pallas").
PALLAS_IN_AUTO = False


def auto_uses_pallas() -> bool:
    return PALLAS_IN_AUTO and on_gpu()


def default_interpret() -> bool:
    """Pallas kernels run in interpret mode off GPU, so `implementation="pallas"` works everywhere."""
    return not on_gpu()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_power_of_2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


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
