"""Images inside a language model (PaLM-E, LLaVA): a vision tower's patch states, projected into the language
model's embedding space, stand in the token sequence where the text has image placeholders.

    image -> vision tower (states of one layer; class token dropped or kept; optionally pooled to n x n)
          -> projector (linear, or Linear-GELU-Linear) -> [image tokens, width of the LM]
    text ids with `image_token_id` placeholders -> LM embeddings, placeholders replaced by image tokens
          -> the causal LM (its cache, decoding and losses unchanged)

Any number of images, anywhere in the text: each placeholder run of `tokens_per_image` ids takes one image.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duomo.errors import ConfigError, InputError
from duomo.models.clip.config import VisionConfig
from duomo.models.clip.vit import VisionTransformer
from duomo.models.lm.config import LMConfig
from duomo.models.lm.model import CausalLM, LMCache
from duomo.models.validate import check_known_fields
from duomo.nn.lora import PositionGate, apply_lora_by_name

ARCHITECTURE = "vision-language"
PROJECTORS = ("linear", "mlp")
SELECTS = ("patch", "all")


@dataclass
class VLMConfig:
    """The parts and how they join."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    vision_layer: int = -2  # transformers' hidden_states index (LLaVA: -2)
    vision_select: str = "patch"  # "patch": drop the class token (LLaVA's "default"); "all": keep it
    pool: int = 0  # 0: every patch; n: the patch grid average-pooled to n x n tokens
    projector: str = "mlp"
    image_token_id: int = 0  # the placeholder id in token sequences (its embedding is never read)
    image_token: str = "<image>"  # the placeholder in text

    def __post_init__(self) -> None:
        for name in ("projector", "vision_select"):
            allowed = PROJECTORS if name == "projector" else SELECTS
            if getattr(self, name) not in allowed:
                raise ConfigError(f"vlm.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        grid = self.vision.image_size // self.vision.patch_size
        if self.pool and (self.pool > grid or self.vision_select == "all"):
            raise ConfigError(
                f"vlm.pool {self.pool} needs patch tokens only and at most the {grid}x{grid} grid"
            )
        if not -self.vision.layers - 1 <= self.vision_layer <= self.vision.layers:
            raise ConfigError(
                f"vlm.vision_layer {self.vision_layer} is outside the {self.vision.layers} blocks"
            )

    @property
    def tokens_per_image(self) -> int:
        if self.pool:
            return self.pool * self.pool
        grid = self.vision.image_size // self.vision.patch_size
        return grid * grid + (1 if self.vision_select == "all" else 0)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lm"] = self.lm.to_dict()
        return {"architecture": ARCHITECTURE, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        if not isinstance(data, dict):
            raise ConfigError("a vision-language config must be a JSON object")
        data = dict(data)
        arch = data.pop("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ConfigError(f"config is for architecture {arch!r}, not {ARCHITECTURE!r}")
        check_known_fields(data, cls, "vlm")
        vision_fields = dict(data.pop("vision", {}) or {})
        check_known_fields(vision_fields, VisionConfig, "vlm.vision")
        for key in ("mean", "std"):
            if key in vision_fields:
                vision_fields[key] = tuple(vision_fields[key])
        vision = VisionConfig(**vision_fields)
        lm = LMConfig.from_dict(dict(data.pop("lm", {}) or {}))
        try:
            return cls(vision=vision, lm=lm, **data)
        except TypeError as exc:
            raise ConfigError(f"malformed vlm config: {exc}") from exc


class Projector(nn.Module):
    """Vision width -> LM width: one Linear, or LLaVA-1.5's Linear-GELU-Linear."""

    def __init__(self, kind: str, vision_width: int, lm_width: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, lm_width)
        self.linear_2 = nn.Linear(lm_width, lm_width) if kind == "mlp" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(F.gelu(x))


class VisionLanguageModel(nn.Module):
    """Vision tower + projector + causal LM (parts injected, as `CLIP` takes its towers)."""

    def __init__(self, cfg: VLMConfig, vision: VisionTransformer, lm: CausalLM) -> None:
        super().__init__()
        self.config = cfg
        self.vision = vision
        self.vision.proj = nn.Identity()  # the tower's CLIP projection is never used here
        self.projector = Projector(cfg.projector, cfg.vision.width, cfg.lm.width)
        self.lm = lm
        self.lora_gate: PositionGate | None = None  # set by attach_lora(scope="image")

    def attach_lora(self, targets: list[str], rank: int, alpha: float, scope: str = "image") -> list[str]:
        """LoRA adapters on the language model's `targets` layers. scope "image": they act only at image-token
        positions (CogVLM's visual expert, low-rank): text is processed by the base weights, so a text-only
        conversation gets exactly the base model's answers; "all": everywhere (LLaVA's LoRA)."""
        if scope not in ("image", "all"):
            raise ConfigError(f"LoRA scope must be image or all, got {scope!r}")
        self.lora_gate = PositionGate() if scope == "image" else None
        return apply_lora_by_name(self.lm, targets, rank, alpha, gate=self.lora_gate)

    @contextlib.contextmanager
    def gated(self, ids: torch.Tensor) -> Iterator[None]:
        """Within the block, image-scoped adapters act at the image placeholders of `ids`."""
        if self.lora_gate is None:
            yield
            return
        slots = ids == self.config.image_token_id
        self.lora_gate.positions = slots.float() if bool(slots.any()) else None
        try:
            yield
        finally:
            self.lora_gate.positions = None

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] -> image tokens [N, tokens_per_image, LM width]."""
        cfg = self.config
        states = self.vision.layer_states(images, cfg.vision_layer)
        if cfg.vision_select == "patch":
            states = states[:, 1:]
        if cfg.pool:
            n, t, c = states.shape
            grid = int(t**0.5)
            states = states.transpose(1, 2).reshape(n, c, grid, grid)
            states = F.adaptive_avg_pool2d(states, cfg.pool).flatten(2).transpose(1, 2)
        return self.projector(states)

    def embed(self, ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """LM input embeddings of ids [B, T], every placeholder run replaced by the next image's tokens."""
        slots = ids == self.config.image_token_id
        embeds = self.lm.embed(ids.masked_fill(slots, 0))
        count = int(slots.sum())
        per = self.config.tokens_per_image
        n_images = 0 if images is None else images.shape[0]
        if count != n_images * per:
            raise InputError(
                f"the text has {count // per if per else 0} image placeholder(s) and {n_images} image(s) "
                "were given; each image needs exactly one placeholder"
            )
        if n_images:
            tokens = self.image_tokens(images).to(embeds.dtype).reshape(-1, embeds.shape[-1])
            embeds = embeds.masked_scatter(slots[..., None], tokens)
        return embeds

    def forward(
        self,
        ids: torch.Tensor,
        images: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: LMCache | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] of a batch of (multimodal) sequences; with `select` [B, T] (bool), only the
        selected positions' logits [n, vocab] (training scores the labelled positions alone)."""
        embeds = self.embed(ids, images)
        with self.gated(ids):
            if select is None:
                return self.lm(embeds=embeds, mask=mask, cache=cache)
            hidden = self.lm.hidden_states(embeds, mask, cache)
        return self.lm.lm_head(hidden[select])

    def prefill(self, ids: torch.Tensor, images: torch.Tensor | None, cache: LMCache) -> torch.Tensor:
        """A prompt [1, T] through the model into `cache`; the last position's logits [vocab] (decoding then
        continues on `self.lm` with text tokens only)."""
        embeds = self.embed(ids, images)
        with self.gated(ids):
            return self.lm(embeds=embeds, cache=cache, last_only=True)[0, -1]

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.lm.set_grad_checkpointing(enabled)
        self.vision.transformer.grad_checkpointing = enabled


def build_vlm(cfg: VLMConfig) -> VisionLanguageModel:
    """A vision-language model with random weights from its config."""
    return VisionLanguageModel(cfg, VisionTransformer(cfg.vision, cfg.vision.width), CausalLM(cfg.lm))
