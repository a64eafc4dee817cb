"""Block-sparse flash attention: softmax attention over per-(batch, kv head, query block) lists of selected key
blocks, the shared kernel of the routing mixers (BiFormer-1D, MoBA, NSA selection, Routing
Transformer). Implementations (see `pallas_kernels.ops`): pallas_triton.py (+ pallas_triton_bwd.py), reference.py
(xla); imported on first use. `transpose_block_indices` builds the per-kv-block lists of the dK/dV pass;
`check_block_indices` validates lists (also under jit, as a flag)."""

from pallas_kernels.block_sparse_attention.api import (
                                                       block_index_problems,
                                                       block_sparse_attention,
                                                       check_block_indices,
                                                       transpose_block_indices,
)
from pallas_kernels.block_sparse_attention.reference import block_sparse_attention_reference

__all__ = ["block_index_problems", "block_sparse_attention", "block_sparse_attention_reference",
           "check_block_indices", "transpose_block_indices"]
