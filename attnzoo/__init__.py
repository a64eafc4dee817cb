"""attnzoo: Flax NNX token mixers and a composable decoder LM, with shared Pallas kernels."""

from attnzoo.config import PRESETS, LayerSpec, ModelConfig, format_plan, get_preset, parse_plan
from attnzoo.generate import generate
from attnzoo.mixers.base import ForwardContext, MixerOutput, SharedParams
from attnzoo.model import LanguageModel, ModelOutput, Summary
from attnzoo.registry import get_mixer, register, registered

__all__ = ["PRESETS", "ForwardContext", "LanguageModel", "LayerSpec", "MixerOutput", "ModelConfig", "ModelOutput",
           "SharedParams", "Summary", "format_plan", "generate", "get_mixer", "get_preset", "parse_plan", "register",
           "registered"]
