"""FlashAttention-2 style softmax attention (https://arxiv.org/abs/2307.08691) with GQA/MQA, MLA head dims, causal /
sliding-window / segment masks, soft cap, output gate and lse. Implementations (see `pallas_kernels.ops`): cudnn.py,
pallas_mosaic_gpu.py, pallas_triton.py (+ pallas_triton_bwd.py, pallas_triton_common.py), xla_chunked.py (CPU:
query blocks over their visible keys), reference.py (xla); imported on first use."""

from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.reference import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]
