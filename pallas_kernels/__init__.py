"""Shared Pallas GPU kernels for attnzoo, each op a table of implementations beside a pure-JAX reference
(`pallas_kernels.ops`):

    flash_attention(q, k, v, *, causal, ..., implementation)        cudnn, mosaic_gpu, triton, xla
    decode_attention(q, k_cache, v_cache, lengths, implementation)   triton, xla
    chunked_linear_attention(q, k, v, log_decay, implementation)     triton, xla
    block_sparse_attention(q, k, v, kv_block_indices, kv_block_counts, *, block_q, block_k, implementation)
                                                                     triton, xla

Importing the package (or `pallas_kernels.ops`) imports no kernel module and not jax.experimental.pallas: the
backends load on first use. The op functions are bound at import, from their light api modules, because their
subpackages share their names: a later submodule import would otherwise leave the attribute the subpackage. The
rest loads lazily (PEP 562).
"""

import importlib

from pallas_kernels.block_sparse_attention.api import block_sparse_attention
from pallas_kernels.chunked_linear_attention.api import chunked_linear_attention
from pallas_kernels.decode_attention.api import decode_attention
from pallas_kernels.flash_attention.api import flash_attention

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

__all__ = ["block_sparse_attention", "chunked_linear_attention", "decode_attention", "flash_attention", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
