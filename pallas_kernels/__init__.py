"""Shared Pallas GPU kernels for attnzoo, each beside a pure-JAX reference.

    flash_attention(q, k, v, *, causal, ...)        FlashAttention-2 style forward + backward
    decode_attention(q, k_cache, v_cache, lengths)   split-K decode against a KV cache
"""

from pallas_kernels.common import IMPLEMENTATIONS, lower_for_cuda
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.flash_attention import flash_attention, flash_attention_reference

__all__ = ["IMPLEMENTATIONS", "decode_attention", "decode_attention_reference", "flash_attention",
           "flash_attention_reference", "lower_for_cuda"]
