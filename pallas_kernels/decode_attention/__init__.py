"""Split-K decode attention (Flash-Decoding) against a KV cache. Implementations (see `pallas_kernels.ops`):
pallas_triton.py, reference.py (xla); imported on first use."""

from pallas_kernels.decode_attention.api import decode_attention
from pallas_kernels.decode_attention.reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]
