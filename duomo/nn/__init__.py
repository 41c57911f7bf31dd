"""Building blocks: attention, Transformer blocks and stacks. Pure tensors, no I/O."""

from duomo.nn.attention import MultiHeadAttention, causal_mask, reference_attention
from duomo.nn.transformer import MLP, QuickGELU, Transformer, TransformerBlock, make_activation

__all__ = [
    "MLP",
    "MultiHeadAttention",
    "QuickGELU",
    "Transformer",
    "TransformerBlock",
    "causal_mask",
    "make_activation",
    "reference_attention",
]
