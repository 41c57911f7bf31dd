"""Building blocks: attention, Transformer blocks and stacks. Pure tensors, no I/O."""

from duomo.nn.attention import MultiHeadAttention, attend, causal_mask, reference_attention, split_heads
from duomo.nn.init import skip_init
from duomo.nn.transformer import MLP, QuickGELU, Transformer, TransformerBlock, make_activation, run_blocks

__all__ = [
    "MLP",
    "MultiHeadAttention",
    "QuickGELU",
    "Transformer",
    "TransformerBlock",
    "attend",
    "causal_mask",
    "make_activation",
    "reference_attention",
    "run_blocks",
    "skip_init",
    "split_heads",
]
