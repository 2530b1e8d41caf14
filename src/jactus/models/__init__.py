"""Backbones: timm vision models and HF causal LMs, including the embedded DINOv2-S and SmolLM2-135M."""

from .base import LoadedModel, cache_dir
from .causal_lm import EMBEDDED_LMS, byte_level_tokenizer, create_causal_lm
from .vision import EMBEDDED_VISION, create_vision_model

__all__ = ["EMBEDDED_LMS", "EMBEDDED_VISION", "LoadedModel", "byte_level_tokenizer", "cache_dir",
           "create_causal_lm", "create_vision_model"]
