"""BEiT-3: image patches and text tokens embedded into one Multiway Transformer, plus its task heads.

The default layout is torchscale's (Microsoft's released checkpoints): per-modality attention projections
and LayerNorms, Magneto's sub-LN, fairseq positions that start at row 2 of each position table.
`shared_attention=True` with `vl_layers > 0` gives the paper's layout
instead (see duomo.models.beit3.multiway).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from typing import Any

from duomo.errors import ConfigError
from duomo.models.factory import list_models, read_config_json
from duomo.models.validate import check_fields

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
        check_fields(self, "beit3")
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
    return list_models("beit3")


def get_beit3_config(name: str) -> BEiT3Config:
    """The config of a named BEiT-3 model, or of a JSON config file path."""
    data = read_config_json(name)
    if data.get("architecture", "clip") != "beit3":
        raise ConfigError(f"{name!r} is not a BEiT-3 config; see `duomo models` for the beit3 ones")
    return BEiT3Config.from_dict(data)
