"""Split-K decode attention (Flash-Decoding) against a KV cache, beside its pure-JAX reference."""

from pallas_kernels.decode_attention.api import decode_attention
from pallas_kernels.decode_attention.reference import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]
