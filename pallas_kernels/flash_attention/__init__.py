"""FlashAttention-2 style softmax attention (https://arxiv.org/abs/2307.08691): Pallas Triton kernels (forward,
dQ, dK/dV) with GQA/MQA, MLA head dims, causal / sliding-window / segment masks, soft cap, output gate and lse."""

from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.reference import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]
