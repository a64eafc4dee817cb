"""attnzoo: Flax NNX token mixers and a composable decoder LM, with shared Pallas kernels."""

from attnzoo.cache import DecodeState
from attnzoo.config import PRESETS, BlockOptions, LayerSpec, ModelConfig, format_plan, get_preset, parse_plan
from attnzoo.generate import generate
from attnzoo.mixers.base import ForwardContext, Mixer, MixerOutput, SharedParams, Supports
from attnzoo.model import LanguageModel, ModelOutput, Summary
from attnzoo.registry import get_mixer, register, registered

__all__ = ["PRESETS", "BlockOptions", "DecodeState", "ForwardContext", "LanguageModel", "LayerSpec", "Mixer",
           "MixerOutput", "ModelConfig", "ModelOutput", "SharedParams", "Summary", "Supports", "format_plan",
           "generate", "get_mixer", "get_preset", "parse_plan", "register", "registered"]
