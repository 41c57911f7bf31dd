"""The BEiT-3 family: config, Multiway Transformer, backbone, heads, a vision pathway from a CLIP."""

from duomo.models.beit3.backbone import BEiT3, VisionEmbedding, create_beit3
from duomo.models.beit3.config import ARCHITECTURE, BEiT3Config, get_beit3_config, list_beit3_models
from duomo.models.beit3.heads import (
    BEiT3ForCaptioning,
    BEiT3ForImageClassification,
    BEiT3ForMDM,
    BEiT3ForRetrieval,
    BEiT3ForVQA,
    ClassifyModel,
    MaskedLMHead,
    Pooler,
    TextMaskEmbedding,
    VQAModel,
    caption_attention_mask,
)
from duomo.models.beit3.multiway import KVCache, LayerCache, Multiway, MultiwayTransformer

__all__ = [
    "ARCHITECTURE",
    "BEiT3",
    "BEiT3Config",
    "BEiT3ForCaptioning",
    "BEiT3ForImageClassification",
    "BEiT3ForMDM",
    "BEiT3ForRetrieval",
    "BEiT3ForVQA",
    "ClassifyModel",
    "KVCache",
    "LayerCache",
    "MaskedLMHead",
    "Multiway",
    "MultiwayTransformer",
    "Pooler",
    "TextMaskEmbedding",
    "VQAModel",
    "VisionEmbedding",
    "caption_attention_mask",
    "create_beit3",
    "get_beit3_config",
    "list_beit3_models",
]
