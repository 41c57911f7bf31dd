"""BEiT-3: image patches and text tokens embedded into one Multiway Transformer, plus its task heads.

The default layout is torchscale's (Microsoft's released checkpoints): per-modality attention projections
and LayerNorms, Magneto's sub-LN, fairseq positions that start at row 2 of each position table.
`shared_attention=True` with `vl_layers > 0` gives the paper's layout instead (see duomo.models.multiway).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from duomo.errors import ConfigError, InputError
from duomo.models.multiway import Multiway, MultiwayTransformer, route
from duomo.models.vit import conv_stem, interpolate_positions

CONFIG_DIR = resources.files("duomo.models") / "configs"
ARCHITECTURE = "beit3"  # the "architecture" field of a BEiT-3 config JSON


@dataclass
class BEiT3Config:
    """A BEiT-3 backbone: patch and token embeddings, position tables, Multiway Transformer."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    vocab_size: int = 64010
    max_text_positions: int = 1024  # rows of the text position table (torchscale's max_source_positions)
    pos_offset: int = 2  # fairseq: positions start at 2, rows 0 and 1 of each position table stay unused
    act: str = "gelu"
    norm_eps: float = 1e-5
    subln: bool = True  # Magneto: a LayerNorm inside attention and inside the feed-forward (needs pre-LN)
    normalize_before: bool = True  # pre-LN; False is post-LN
    deepnorm: bool = False  # DeepNet: post-LN with residuals scaled by (2 * layers) ** 0.25
    normalize_output: bool = True  # a final LayerNorm (unilm's VQA and ImageNet models have none)
    layernorm_embedding: bool = False
    scale_embedding: bool = False  # multiply token and patch embeddings by sqrt(width)
    shared_attention: bool = False  # the paper's layout: one attention + LayerNorm for both modalities
    vl_layers: int = 0  # top layers with a vision-language expert for image+text input
    drop_path_rate: float = 0.0
    stem: str = (
        "patch"  # "patch": one strided conv (released models); "conv": duomo's conv stem (vit.conv_stem)
    )
    tokenizer: str = "beit3-spm"  # XLM-R SentencePiece (unilm's beit3.spm), pad id 1
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "conv"):
            raise ConfigError(f"unknown vision stem {self.stem!r}; choose 'patch' or 'conv'")
        if self.image_size % self.patch_size != 0:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.width % self.heads != 0:
            raise ConfigError(f"width {self.width} is not divisible by {self.heads} heads")
        if self.subln and not self.normalize_before:
            raise ConfigError("subln needs normalize_before=True (sub-LN is a pre-LN scheme)")
        if self.deepnorm and (self.normalize_before or self.subln):
            raise ConfigError("deepnorm is post-LN: set normalize_before=False and subln=False")
        if not 0 <= self.vl_layers <= self.layers:
            raise ConfigError(f"vl_layers {self.vl_layers} must lie between 0 and layers {self.layers}")
        if self.max_text_positions <= self.pos_offset:
            raise ConfigError(f"max_text_positions {self.max_text_positions} leaves no room for text")
        self.mean, self.std = tuple(self.mean), tuple(self.std)

    @property
    def num_patches(self) -> int:
        """Patches per image at `image_size`."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, tagged with its architecture."""
        return {"architecture": ARCHITECTURE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BEiT3Config:
        """Build from duomo's JSON layout, naming unknown fields instead of failing with a TypeError."""
        data = dict(data)
        arch = data.pop("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ConfigError(f"config is for architecture {arch!r}, not {ARCHITECTURE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown BEiT3Config fields {sorted(unknown)}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"malformed BEiT-3 config: {exc}") from exc


def list_beit3_models() -> list[str]:
    """Names of the built-in BEiT-3 configs."""
    from duomo.models.factory import list_models

    return list_models("beit3")


def get_beit3_config(name: str) -> BEiT3Config:
    """The config of a named BEiT-3 model, or of a JSON config file path."""
    from duomo.models.factory import read_config_json

    data = read_config_json(name)
    if data.get("architecture", "clip") != "beit3":
        raise ConfigError(f"{name!r} is not a BEiT-3 config; see `duomo models` for the beit3 ones")
    return BEiT3Config.from_dict(data)


class VisionEmbedding(nn.Module):
    """Conv patch embedding with a class token prepended and a mask token for masked image modelling."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        if cfg.stem == "conv":
            if cfg.in_chans != 3:
                raise ConfigError(f"the conv stem takes RGB images, not in_chans={cfg.in_chans}")
            try:
                self.patch_embed: nn.Module = conv_stem(cfg.width, cfg.patch_size)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        else:
            self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.width, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))

    def forward(self, images: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> [B, 1 + patches, width]; `masked` [B, patches] marks patches to hide."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if masked is not None:
            w = masked.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)


class BEiT3(nn.Module):
    """The BEiT-3 backbone: images, texts, or image+text pairs -> hidden states [B, T, width]."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_init: str | None = None  # the CLIP whose image tower started the vision pathway, if any
        self.grid = cfg.image_size // cfg.patch_size
        self.vision_embed = VisionEmbedding(cfg)
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = Multiway(  # one table per modality; rows [offset:] hold [cls, patches] or text
            nn.Embedding(cfg.pos_offset + 1 + cfg.num_patches, cfg.width),
            nn.Embedding(cfg.max_text_positions, cfg.width),
        )
        self.embed_norm = (
            Multiway.copies(lambda: nn.LayerNorm(cfg.width, eps=cfg.norm_eps))
            if cfg.layernorm_embedding
            else nn.Identity()
        )
        self.encoder = MultiwayTransformer(
            cfg.width,
            cfg.layers,
            cfg.heads,
            cfg.ffn_dim,
            act=cfg.act,
            norm_eps=cfg.norm_eps,
            subln=cfg.subln,
            shared_attention=cfg.shared_attention,
            vl_layers=cfg.vl_layers,
            normalize_before=cfg.normalize_before,
            normalize_output=cfg.normalize_output,
            deepnorm=cfg.deepnorm,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.embed_scale = math.sqrt(cfg.width) if cfg.scale_embedding else 1.0
        self.init_weights()

    def init_weights(self) -> None:
        """unilm's fine-tuning init: truncated normal(0.02) Linears, unit LayerNorms, small embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.text_embed.weight, std=self.cfg.width**-0.5)
        for table in (self.pos_embed.vision, self.pos_embed.text):
            nn.init.trunc_normal_(table.weight, std=0.02)
        nn.init.trunc_normal_(self.vision_embed.cls_token, std=0.02)
        nn.init.trunc_normal_(self.vision_embed.mask_token, std=0.02)

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image at the configured size: the class token and the patches."""
        return 1 + self.cfg.num_patches

    def embed_images(self, images: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, C, H, W] -> patch embeddings plus positions [B, 1 + patches, width]."""
        if images.ndim != 4 or images.shape[1] != self.cfg.in_chans:
            raise InputError(
                f"expected images shaped [B, {self.cfg.in_chans}, H, W], got {tuple(images.shape)}"
            )
        x = self.vision_embed(images, masked) * self.embed_scale
        pos = self.pos_embed.vision.weight[self.cfg.pos_offset :]
        grid = math.isqrt(x.shape[1] - 1)
        if grid * grid != x.shape[1] - 1:
            raise InputError(f"non-square patch grid from images {tuple(images.shape)}: resize to a square")
        if grid != self.grid:
            pos = interpolate_positions(pos, grid)
        return x + pos.to(x.dtype)

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> token embeddings plus positions [B, T, width]."""
        if tokens.ndim != 2:
            raise InputError(f"expected token ids shaped [B, T], got {tuple(tokens.shape)}")
        offset, t = self.cfg.pos_offset, tokens.shape[1]
        if offset + t > self.cfg.max_text_positions:
            longest = self.cfg.max_text_positions - offset
            raise InputError(f"text of {t} tokens is longer than this model's {longest}; truncate it")
        x = self.text_embed(tokens) * self.embed_scale
        return x + self.pos_embed.text.weight[offset : offset + t].to(x.dtype)

    def forward(
        self,
        images: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, width] of images, texts, or image+text pairs (image tokens first).

        `text_padding_mask` [B, T_text]: True (or 1) at padding, as unilm's `padding_mask`.
        `attn_mask` [T, T] or [B, T, T]: True where a token may attend (e.g. captioning's causal text part).
        `vision_mask` [B, patches]: True at patches replaced by the mask token (masked image modelling).
        """
        if images is None and text is None:
            raise InputError("BEiT3 needs images, text, or both")
        parts = []
        if images is not None:
            parts.append(self.embed_images(images, vision_mask))
        if text is not None:
            parts.append(self.embed_text(text))
        split = parts[0].shape[1] if images is not None else 0  # number of image tokens
        x = route(self.embed_norm, torch.cat(parts, dim=1), split)

        mask = None
        if text_padding_mask is not None and text is not None:
            if text_padding_mask.shape != text.shape:
                raise InputError(
                    f"text_padding_mask {tuple(text_padding_mask.shape)} must match text {tuple(text.shape)}"
                )
            pad = F.pad(text_padding_mask.bool(), (split, 0), value=False)  # image tokens are never padding
            x = x * (~pad).unsqueeze(-1).to(x.dtype)
            mask = ~pad[:, None, None, :]  # every token may attend to every non-padding token
        if attn_mask is not None:
            allowed = attn_mask.bool()
            allowed = allowed.unsqueeze(1) if allowed.ndim == 3 else allowed
            mask = allowed if mask is None else mask & allowed
        return self.encoder(x, split, mask)


class Pooler(nn.Module):
    """First token -> LayerNorm -> Linear -> tanh (unilm's pooler for VQA)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(x[:, 0])))


class BEiT3ForVQA(nn.Module):
    """VQA as classification over an answer vocabulary, from the fused [image ; question] sequence.

    Parameter names are unilm's BEiT3ForVisualQuestionAnswering's (`pooler.*`, `head.0/1/3.*`), so its
    fine-tuned checkpoints load once the `beit3.*` backbone names are converted. Train with binary
    cross-entropy on soft answer scores (unilm scales the mean loss by the number of answers).
    """

    def __init__(self, backbone: BEiT3, num_answers: int = 3129) -> None:
        super().__init__()
        dim = backbone.cfg.width
        self.beit3 = backbone
        self.pooler = Pooler(dim)
        self.head = nn.Sequential(
            nn.Linear(dim, dim * 2), nn.LayerNorm(dim * 2), nn.GELU(), nn.Linear(dim * 2, num_answers)
        )
        for module in [*self.pooler.modules(), *self.head.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self, images: torch.Tensor, question: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images [B, C, H, W], question ids [B, T] (padding_mask True at padding) -> answer logits [B, A]."""
        x = self.beit3(images=images, text=question, text_padding_mask=padding_mask)
        return self.head(self.pooler(x))


class BEiT3ForRetrieval(nn.Module):
    """Dual encoder on one backbone (unilm's BEiT3ForRetrieval, the `-itc` checkpoints): first-token heads."""

    def __init__(self, backbone: BEiT3) -> None:
        super().__init__()
        dim = backbone.cfg.width
        self.beit3 = backbone
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for head in (self.vision_head, self.language_head):
            nn.init.trunc_normal_(head.weight, std=0.02, a=-0.02, b=0.02)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images [B, C, H, W] -> embeddings [B, width]."""
        x = self.vision_head(self.beit3(images=images)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Token ids [B, T] (padding_mask True at padding) -> embeddings [B, width]."""
        x = self.language_head(self.beit3(text=tokens, text_padding_mask=padding_mask)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x


class BEiT3ForImageClassification(nn.Module):
    """Image classification on the vision-only forward (unilm's BEiT3ForImageClassification): the mean of the
    patch tokens (class token left out) -> LayerNorm `fc_norm` -> Linear `head`; the head starts 1000x
    smaller than its std-0.02 init (unilm's init_scale 0.001)."""

    def __init__(self, backbone: BEiT3, num_classes: int) -> None:
        super().__init__()
        dim = backbone.cfg.width
        self.beit3 = backbone
        self.fc_norm = nn.LayerNorm(dim)  # unilm's default norm_layer: eps 1e-5
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.02, b=0.02)
        with torch.no_grad():
            self.head.weight.mul_(0.001)
            self.head.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> class logits [B, num_classes]."""
        x = self.beit3(images=images)
        return self.head(self.fc_norm(x[:, 1:].mean(1)))


def create_beit3(config: str | BEiT3Config) -> BEiT3:
    """Build a randomly initialised BEiT-3 backbone from a config name, JSON path or `BEiT3Config`."""
    cfg = config if isinstance(config, BEiT3Config) else get_beit3_config(config)
    return BEiT3(cfg)
