"""Chunked linear attention (the SSD / Lightning-2 / GLA recurrence with a data-dependent decay). Implementations
(see `pallas_kernels.ops`): pallas_triton.py, reference.py (xla); imported on first use."""

from pallas_kernels.chunked_linear_attention.api import chunked_linear_attention
from pallas_kernels.chunked_linear_attention.reference import (
                                                                chunked_linear_attention_reference,
                                                                linear_attention_step_reference,
)

__all__ = ["chunked_linear_attention", "chunked_linear_attention_reference", "linear_attention_step_reference"]
