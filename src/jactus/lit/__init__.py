"""LightningModules: the outer shell around plain-PyTorch backbones."""

from .base import TaskModule
from .qa import CausalLMQA
from .vision import ImageClassifier

__all__ = ["TaskModule", "ImageClassifier", "CausalLMQA"]
