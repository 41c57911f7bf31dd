"""Model configs as data: one dataclass per config section, read from and written to JSON."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from duomo.errors import ConfigError
from duomo.models.validate import check_fields


@dataclass
class VisionConfig:
    """Vision Transformer tower."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    pool: str = "tok"  # "tok": class token, "avg": mean of patch tokens
    stem: str = "patch"  # "patch": one strided conv (ViT); "conv": stride-2 3x3 convs (Xiao et al. 2021)
    norm_eps: float = 1e-5
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        check_fields(self, "vision")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )


@dataclass
class TextConfig:
    """Causal text Transformer tower (CLIP style), or a named pretrained text encoder."""

    kind: str = "transformer"  # "transformer": duomo's own; other kinds are registered text towers
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"
    pool: str = "argmax"  # "argmax": highest token id (CLIP's end token), "eos": first eos_token_id
    eos_token_id: int = 49407
    norm_eps: float = 1e-5
    tokenizer: str = "clip"
    extra: dict[str, Any] = field(default_factory=dict)  # options of non-default kinds

    def __post_init__(self) -> None:
        check_fields(self, "text")


@dataclass
class CLIPConfig:
    """A dual encoder: vision tower, text tower, shared embedding size and temperature."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set for SigLIP-style models

    def __post_init__(self) -> None:
        check_fields(self, "model")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        """Build from duomo's JSON layout; OpenCLIP's (`vision_cfg`, `text_cfg`, `quick_gelu`) works too."""
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(data).__name__}")
        try:
            return cls._from_dict(dict(data))
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
            raise ConfigError(f"malformed model config: {exc}") from exc

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        quick_gelu = data.pop("quick_gelu", False)
        vision = dict(data.pop("vision", data.pop("vision_cfg", {})) or {})
        text = dict(data.pop("text", data.pop("text_cfg", {})) or {})
        for tower in (vision, text):
            if quick_gelu:
                tower.setdefault("act", "quick_gelu")
            if "head_width" in tower and "heads" not in tower:  # OpenCLIP's vision config
                tower["heads"] = tower["width"] // tower.pop("head_width")
            tower.pop("head_width", None)
        if "heads" not in vision and "width" in vision:
            vision["heads"] = vision["width"] // 64
        top = {f.name for f in dataclasses.fields(cls)} - {"vision", "text"}
        unknown = set(data) - top
        if unknown:
            raise ConfigError(f"unknown model config fields {sorted(unknown)}; known: {sorted(top)}")
        try:
            return cls(vision=_section(VisionConfig, vision), text=_section(TextConfig, text), **data)
        except TypeError as exc:
            raise ConfigError(f"malformed model config: {exc}") from exc


def _section(kind: type, values: dict[str, Any]) -> Any:
    """Build one config section, naming unknown fields instead of failing with a TypeError."""
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {kind.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    values = {k: tuple(v) if k in ("mean", "std") else v for k, v in values.items()}
    return kind(**values)
