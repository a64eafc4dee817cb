"""Hugging Face-format checkpoints in and out (Llama, Mistral, Qwen2, Qwen3, DeepSeek-V2/V3 MLA with dense MLPs,
Mamba-2): `load_pretrained(directory) -> (model, tokenizer)` and `save_pretrained(model, directory, tokenizer)`.
The per-architecture tables are in `attnzoo.interop.tables`."""

from attnzoo.data.tokenizers import HFTokenizer
from attnzoo.interop.pretrained import (
                                        CheckpointTensorError,
                                        load_pretrained,
                                        load_weights,
                                        read_config,
                                        save_pretrained,
)
from attnzoo.interop.tables import ARCHITECTURES, UnsupportedConfigError

__all__ = ["ARCHITECTURES", "CheckpointTensorError", "HFTokenizer", "UnsupportedConfigError", "load_pretrained",
           "load_weights", "read_config", "save_pretrained"]
