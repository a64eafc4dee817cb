"""Shared Pallas GPU kernels for attnzoo, each op a table of implementations beside a pure-JAX reference
(`pallas_kernels.ops`):

    flash_attention(q, k, v, *, causal, ..., implementation)        cudnn, mosaic_gpu, triton, xla
    decode_attention(q, k_cache, v_cache, lengths, implementation)   triton, xla
    chunked_linear_attention(q, k, v, log_decay, implementation)     triton, xla
    block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_q, block_k, implementation)
                                                                     triton, xla

Importing the package (or `pallas_kernels.ops`) imports no op module and not jax.experimental.pallas: an op's api
module loads when its function is first looked up (`pallas_kernels.flash_attention`), a backend when it first runs,
the other names of `__all__` on first use (PEP 562).

Each op function shares its name with its subpackage, and the package attribute stays the function: to reach a
submodule, write `from pallas_kernels.flash_attention import reference` (`import pallas_kernels.flash_attention.api
as m` looks the attribute up, finds the function, and fails).
"""

import importlib
import sys
import types

_OPS = ("block_sparse_attention", "chunked_linear_attention", "decode_attention", "flash_attention")

_LAZY = {
    "available": "pallas_kernels.ops",
    "implementations": "pallas_kernels.ops",
    "lower_for_cuda": "pallas_kernels.common",
    "flash_attention_reference": "pallas_kernels.flash_attention.reference",
    "decode_attention_reference": "pallas_kernels.decode_attention.reference",
    "chunked_linear_attention_reference": "pallas_kernels.chunked_linear_attention.reference",
    "block_sparse_attention_reference": "pallas_kernels.block_sparse_attention.reference",
    "check_block_indices": "pallas_kernels.block_sparse_attention.api",
    "transpose_block_indices": "pallas_kernels.block_sparse_attention.api",
}

__all__ = [*_OPS, *_LAZY]


class _OpFunction:
    """The package attribute `op`: the function of `pallas_kernels.<op>.api`, imported on first lookup.

    A data descriptor (it defines `__set__`) because importing the subpackage `pallas_kernels.<op>` makes the import
    system run `setattr(pallas_kernels, op, <subpackage>)`, which would otherwise shadow the function. That binding is
    ignored; any other value (a test's spy) replaces the function."""

    def __init__(self, op: str):
        self.op = op

    def __get__(self, package, owner=None):
        if package is None:
            return self
        if self.op in vars(package):
            return vars(package)[self.op]
        return getattr(importlib.import_module(f"{__name__}.{self.op}.api"), self.op)

    def __set__(self, package, value):
        if not (isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{self.op}"):
            vars(package)[self.op] = value


# The package module's class, so that the op names can be data descriptors.
sys.modules[__name__].__class__ = type("_Package", (types.ModuleType,), {op: _OpFunction(op) for op in _OPS})


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
