"""The causal language model's config: one dataclass for the Llama layout (Llama, SmolLM2, Qwen2) and the
GPT-2 layout, read from and written to JSON with did-you-mean errors for unknown fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from duomo.errors import ConfigError
from duomo.models.validate import check_fields, check_known_fields

ARCHITECTURE = "causal-lm"
LAYOUTS = ("llama", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LMConfig:
    """Sizes and choices of a decoder-only Transformer.

    llama: RMSNorm, rotary positions (theta, optional scaling), grouped-query attention, SwiGLU MLP.
    gpt2: LayerNorm, learned absolute positions, GELU (tanh) MLP, biases everywhere."""

    layout: str = "llama"
    vocab_size: int = 32000
    width: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 0  # 0: as many as `heads` (multi-head); fewer: grouped-query attention
    head_dim: int = 0  # 0: width // heads
    mlp_width: int = 1376
    max_positions: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    attention_bias: bool = False  # q/k/v biases (Qwen2: true)
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "lm")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"lm.layout must be one of {list(LAYOUTS)}, got {self.layout!r}")
        kv = self.num_kv_heads
        if self.heads % kv:
            raise ConfigError(f"lm.heads {self.heads} is not a multiple of lm.kv_heads {kv}")
        if self.layout == "llama" and self.dim_per_head % 2:
            raise ConfigError(f"lm: rotary positions need an even head size, got {self.dim_per_head}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES:
                raise ConfigError(
                    f"lm.rope_scaling type {kind!r} is not built; use one of {list(ROPE_TYPES)}"
                )

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.width // self.heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, tagged with its architecture."""
        return {"architecture": ARCHITECTURE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        """Build from JSON, naming unknown fields (with a did-you-mean); other architectures refused."""
        if not isinstance(data, dict):
            raise ConfigError(f"a language-model config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        arch = data.pop("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ConfigError(f"config is for architecture {arch!r}, not {ARCHITECTURE!r}")
        check_known_fields(data, cls, "lm")
        return cls(**data)
