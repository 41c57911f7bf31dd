"""The CLIP family: configs, ViT image tower, causal text tower, the dual encoder, the MiniLM text tower."""

from duomo.models.clip.config import CLIPConfig, TextConfig, VisionConfig
from duomo.models.clip.model import CLIP
from duomo.models.clip.text import TextTransformer
from duomo.models.clip.vit import VisionTransformer

__all__ = ["CLIP", "CLIPConfig", "TextConfig", "TextTransformer", "VisionConfig", "VisionTransformer"]
