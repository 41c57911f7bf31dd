"""The causal language model family (GPT-style decoders): Llama and GPT-2 layouts, KV cache."""

from duomo.models.lm.config import LMConfig
from duomo.models.lm.model import CausalLM, LMCache

__all__ = ["CausalLM", "LMCache", "LMConfig"]
