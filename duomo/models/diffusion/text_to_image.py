"""A text-to-image model as one module: a CLIP text tower (frozen), a denoiser, an optional autoencoder.

`GeneratorConfig` is the JSON of a generator folder; `TextToImage` holds the parts. The text tower is
duomo's own CLIP `TextTransformer`: its token states (after the final LayerNorm, `text_skip` layers early as
SD 2.x and `clip_skip` do) are what the denoiser cross-attends to, and its pooled, projected embedding (the
vector CLIP compares with images) optionally joins the timestep conditioning. Sampling lives in
`duomo.tasks.diffusion`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from duomo.errors import ConfigError
from duomo.models.clip.config import TextConfig, _section
from duomo.models.clip.text import TextTransformer, pool_index
from duomo.models.diffusion.dit import DiT, DiTConfig
from duomo.models.diffusion.schedule import NoiseSchedule, ScheduleConfig
from duomo.models.validate import check_fields

ARCHITECTURE = "text-to-image"


def _unet() -> tuple[type, type]:
    from duomo.models.diffusion.unet import UNet, UNetConfig

    return UNetConfig, UNet


# denoiser kind -> (config class, module class), resolved when first used
DENOISERS: dict[str, Callable[[], tuple[type, type]]] = {"dit": lambda: (DiTConfig, DiT), "unet": _unet}


@dataclass
class GeneratorConfig:
    """Everything needed to rebuild a generator: its parts' configs and its sampling defaults."""

    denoiser_kind: str = "dit"
    denoiser: dict[str, Any] = field(default_factory=dict)  # the kind's own config fields
    text: TextConfig = field(default_factory=TextConfig)
    text_embed_dim: int = 512  # the text tower's projection (the pooled embedding's size)
    text_skip: int = 0  # condition on the token states this many layers before the last (SD 2.x: 1)
    pooled: bool = False  # also pass the pooled text embedding to the denoiser
    pad_token_id: int | None = None  # None: the tokenizer's padding (0); SD 1.x pads with the end token
    autoencoder: dict[str, Any] | None = None  # AutoencoderKL fields; None: the denoiser works on pixels
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: int = 32  # output pixels per side
    sampler: str = "dpm"  # defaults for generate()
    steps: int = 25
    guidance: float = 4.0

    def __post_init__(self) -> None:
        check_fields(self, "generator")
        if self.denoiser_kind not in DENOISERS:
            raise ConfigError(
                f"unknown denoiser kind {self.denoiser_kind!r}; choose one of {sorted(DENOISERS)}"
            )
        self.denoiser_config()  # its own fields checked now, not when the model is built
        if not 0 <= self.text_skip < self.text.layers:
            raise ConfigError(
                f"generator.text_skip must be in [0, {self.text.layers - 1}], got {self.text_skip}"
            )

    def denoiser_config(self) -> Any:
        """The denoiser's own config object."""
        config_cls, _ = DENOISERS[self.denoiser_kind]()
        return config_cls.from_dict(dict(self.denoiser))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, tagged with its architecture."""
        return {"architecture": ARCHITECTURE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        """Build from JSON, naming unknown fields and refusing another architecture."""
        if not isinstance(data, dict):
            raise ConfigError(f"a generator config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        arch = data.pop("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ConfigError(f"config is for architecture {arch!r}, not {ARCHITECTURE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown generator config fields {sorted(unknown)}; known: {sorted(known)}")
        text = _section(TextConfig, dict(data.pop("text", {}) or {}))
        schedule = data.pop("schedule", None)
        schedule = ScheduleConfig.from_dict(schedule) if isinstance(schedule, dict) else ScheduleConfig()
        try:
            return cls(text=text, schedule=schedule, **data)
        except TypeError as exc:
            raise ConfigError(f"malformed generator config: {exc}") from exc


class TextToImage(nn.Module):
    """Text tower + denoiser (+ autoencoder): `forward(x_t, t, tokens)` is the denoiser's prediction."""

    def __init__(
        self,
        cfg: GeneratorConfig,
        text: TextTransformer,
        denoiser: nn.Module,
        autoencoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.text = text
        self.denoiser = denoiser
        self.autoencoder = autoencoder
        self.noise_schedule = NoiseSchedule(cfg.schedule)

    # the trainer's frozen-feature cache (`duomo.train.frozen_cache`) memoises this per distinct caption
    frozen_features = "text_states"

    def features_frozen(self) -> bool:
        """True when the text tower does not learn (the cache may then reuse its outputs)."""
        return not any(p.requires_grad for p in self.text.parameters())

    def text_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token states [B, T, width] the denoiser attends to."""
        return self.text.token_states(tokens, self.config.text_skip)

    def pooled_embedding(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The text tower's projected sentence embedding [B, text_embed_dim], L2-normalised as CLIP uses it.

        With `text_skip=0` it is read off the cached final states (the tower's own pooling and projection);
        otherwise the tower runs once more to its last layer."""
        if self.config.text_skip:
            return nn.functional.normalize(self.text(tokens), dim=-1)
        index = pool_index(tokens, self.text.cfg.pool, self.text.cfg.eos_token_id)
        pooled = states[torch.arange(states.shape[0], device=states.device), index]
        return nn.functional.normalize(self.text.proj(pooled), dim=-1)

    def condition(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token states, pooled embedding or None) for token ids [B, T]."""
        states = self.text_states(tokens)
        pooled = self.pooled_embedding(tokens, states) if self.config.pooled else None
        return states, pooled

    def denoise(
        self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor | None
    ) -> torch.Tensor:
        """The denoiser's prediction for x at timesteps t given precomputed conditioning."""
        if self.config.pooled:
            return self.denoiser(x, t, states, pooled)
        return self.denoiser(x, t, states)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Prediction for noisy x [B, C, H, W] at timesteps t [B] given caption token ids [B, T]."""
        states, pooled = self.condition(tokens)
        return self.denoise(x, t, states.to(x.dtype), None if pooled is None else pooled.to(x.dtype))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Gradient checkpointing in the denoiser."""
        if not hasattr(self.denoiser, "set_grad_checkpointing"):
            raise ConfigError(f"{type(self.denoiser).__name__} does not support gradient checkpointing")
        self.denoiser.set_grad_checkpointing(enabled)


def build_text_to_image(cfg: GeneratorConfig, autoencoder: nn.Module | None = None) -> TextToImage:
    """A generator with random weights from its config (an autoencoder, when it has one, given or built)."""
    _, denoiser_cls = DENOISERS[cfg.denoiser_kind]()
    denoiser = denoiser_cls(cfg.denoiser_config())
    if autoencoder is None and cfg.autoencoder is not None:
        from duomo.models.diffusion.autoencoder import AutoencoderConfig, AutoencoderKL

        autoencoder = AutoencoderKL(AutoencoderConfig.from_dict(dict(cfg.autoencoder)))
    return TextToImage(cfg, TextTransformer(cfg.text, cfg.text_embed_dim), denoiser, autoencoder)
