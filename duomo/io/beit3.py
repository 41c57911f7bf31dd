"""BEiT-3 checkpoints in torchscale's layout (Microsoft's unilm releases): read, check, convert, export.

A released checkpoint is `{"model": {"beit3.<torchscale names>": ..., <task head names>: ...}}`; the bare
backbone (`torchscale.model.BEiT3.state_dict()`) has the same names without `beit3.`. Both load; task heads
(`pooler.*`, `head.*` for VQA, `vision_head`/`language_head`/`logit_scale` for retrieval, `fc_norm.*`,
`head.*` for image classification) keep unilm's names.
Reading is safe: safetensors, or `torch.load(weights_only=True)` through duomo.io.files.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duomo.errors import CheckpointError, ConfigError
from duomo.io.checkpoint import load_into
from duomo.io.files import StateDict, load_weights, save_safetensors, save_torch
from duomo.models.beit3 import BEiT3, BEiT3Config, BEiT3ForImageClassification, BEiT3ForRetrieval, BEiT3ForVQA
from duomo.models.clip.vit import interpolate_positions

log = logging.getLogger(__name__)

PREFIX = "beit3."
# torchscale module path <-> duomo module path. {i}: layer index; {e}: expert, A/B <-> vision/text.
NAMES = [
    ("vision_embed.proj", "vision_embed.patch_embed"),
    ("vision_embed.cls_token", "vision_embed.cls_token"),
    ("vision_embed.mask_token", "vision_embed.mask_token"),
    ("text_embed", "text_embed"),
    ("encoder.embed_positions.{e}", "pos_embed.{e}"),
    ("encoder.layernorm_embedding.{e}", "embed_norm.{e}"),
    ("encoder.layers.{i}.self_attn_layer_norm.{e}", "encoder.blocks.{i}.norm1.{e}"),
    ("encoder.layers.{i}.self_attn.q_proj.{e}", "encoder.blocks.{i}.attn.q.{e}"),
    ("encoder.layers.{i}.self_attn.k_proj.{e}", "encoder.blocks.{i}.attn.k.{e}"),
    ("encoder.layers.{i}.self_attn.v_proj.{e}", "encoder.blocks.{i}.attn.v.{e}"),
    ("encoder.layers.{i}.self_attn.inner_attn_ln.{e}", "encoder.blocks.{i}.attn.inner_norm.{e}"),
    ("encoder.layers.{i}.self_attn.out_proj.{e}", "encoder.blocks.{i}.attn.proj.{e}"),
    ("encoder.layers.{i}.final_layer_norm.{e}", "encoder.blocks.{i}.norm2.{e}"),
    ("encoder.layers.{i}.ffn.{e}.fc1", "encoder.blocks.{i}.mlp.{e}.fc1"),
    ("encoder.layers.{i}.ffn.{e}.ffn_layernorm", "encoder.blocks.{i}.mlp.{e}.norm"),
    ("encoder.layers.{i}.ffn.{e}.fc2", "encoder.blocks.{i}.mlp.{e}.fc2"),
    ("encoder.layer_norm.{e}", "encoder.norm.{e}"),
]
EXPERTS = {"A": "vision", "B": "text"}
TORCHSCALE_EXTRA_TOKENS = 3  # rows of the vision position table before the patches: 2 unused (fairseq) + cls


def _pattern(template: str, experts: tuple[str, ...]) -> re.Pattern:
    """A regex for `template` followed by an optional parameter name (`.weight`, `.bias`)."""
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    body = body.replace(r"\{e\}", "(?P<e>" + "|".join(experts) + ")")
    return re.compile(body + r"(?P<rest>(\.\w+)?)$")


_TO_DUOMO = [(_pattern(ts, tuple(EXPERTS)), ours) for ts, ours in NAMES]
_TO_TORCHSCALE = [(_pattern(ours, tuple(EXPERTS.values())), ts) for ts, ours in NAMES]
_EXPERT_BACK = {v: k for k, v in EXPERTS.items()}


def _rename(key: str, table: list[tuple[re.Pattern, str]], experts: Mapping[str, str]) -> str | None:
    """`key` renamed by the first matching template, or None."""
    for pattern, target in table:
        m = pattern.match(key)
        if m is None:
            continue
        if "{i}" in target:
            target = target.replace("{i}", m["i"])
        if "{e}" in target:
            target = target.replace("{e}", experts[m["e"]])
        return target + m["rest"]
    return None


def torchscale_to_duomo(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A bare torchscale BEiT3 state dict in duomo's names; keys no template knows are kept as they are."""
    return {(_rename(k, _TO_DUOMO, EXPERTS) or k): v for k, v in sd.items()}


def duomo_to_torchscale(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A duomo BEiT3 state dict in torchscale's names (loads into `torchscale.model.BEiT3` strictly)."""
    return {(_rename(k, _TO_TORCHSCALE, _EXPERT_BACK) or k): v for k, v in sd.items()}


def split_checkpoint(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """(backbone in torchscale names without `beit3.`, task-head tensors) of a unilm or bare checkpoint."""
    if any(k.startswith(PREFIX) for k in sd):
        backbone = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
        heads = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
        return backbone, heads
    return dict(sd), {}


def _require(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(
            f"{source} is not a BEiT-3 checkpoint in torchscale's layout: no {key!r} "
            f"(first keys: {list(sd)[:5]})"
        )
    return sd[key]


def infer_beit3_config(backbone: Mapping[str, torch.Tensor], source: str = "checkpoint") -> BEiT3Config:
    """The `BEiT3Config` of a torchscale-named backbone, from its shapes.

    Weights cannot show the head count (taken as width / 64, as in every released size) nor post-LN vs
    pre-LN when sub-LN is absent (taken as pre-LN); pass a config where these differ.
    """
    width = _require(backbone, "text_embed.weight", source)
    patch = _require(backbone, "vision_embed.proj.weight", source)
    vision_pos = _require(backbone, "encoder.embed_positions.A.weight", source)
    text_pos = _require(backbone, "encoder.embed_positions.B.weight", source)
    fc1 = _require(backbone, "encoder.layers.0.ffn.A.fc1.weight", source)
    layers = 1 + max(int(m.group(1)) for k in backbone if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    patches = vision_pos.shape[0] - TORCHSCALE_EXTRA_TOKENS
    grid = math.isqrt(max(patches, 0))
    if grid * grid != patches:
        raise CheckpointError(
            f"{source}: a vision position table of {vision_pos.shape[0]} rows is no square grid"
        )
    vocab_size, dim = width.shape
    subln = "encoder.layers.0.self_attn.inner_attn_ln.A.weight" in backbone
    try:
        return BEiT3Config(
            image_size=grid * patch.shape[-1],
            patch_size=patch.shape[-1],
            in_chans=patch.shape[1],
            width=dim,
            layers=layers,
            heads=max(dim // 64, 1),
            ffn_dim=fc1.shape[0],
            vocab_size=vocab_size,
            max_text_positions=text_pos.shape[0],
            subln=subln,
            normalize_output="encoder.layer_norm.A.weight" in backbone,
            layernorm_embedding="encoder.layernorm_embedding.A.weight" in backbone,
        )
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def resize_vision_positions(backbone: StateDict, cfg: BEiT3Config) -> StateDict:
    """Resize the vision positions to `cfg.image_size` (bicubic), as unilm does to fine-tune at 384 or 480."""
    key = "encoder.embed_positions.A.weight"
    table = backbone.get(key)
    if table is None or table.shape[0] == cfg.pos_offset + 1 + cfg.num_patches:
        return backbone
    grid = cfg.image_size // cfg.patch_size
    extra, patches = table[: cfg.pos_offset], table[cfg.pos_offset :]
    resized = interpolate_positions(patches.float(), grid).to(table.dtype)
    return {**backbone, key: torch.cat([extra, resized])}


def read_beit3(
    path: str | os.PathLike, config: BEiT3Config | None = None
) -> tuple[BEiT3Config, StateDict, StateDict]:
    """Read a BEiT-3 checkpoint -> (config, backbone state dict in duomo names, task heads in unilm names).

    `config` replaces the inferred architecture; a different image size resizes the vision positions.
    """
    raw = load_weights(path)  # safe; unwraps {"model": ...} / {"module": ...} and DDP's `module.`
    backbone, heads = split_checkpoint(raw)
    cfg = config or infer_beit3_config(backbone, str(path))
    return cfg, torchscale_to_duomo(resize_vision_positions(backbone, cfg)), heads


def _load(model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> nn.Module:
    """load_into with the file named in the error."""
    try:
        return load_into(model, sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_beit3(path: str | os.PathLike, config: BEiT3Config | None = None) -> BEiT3:
    """The BEiT-3 backbone of a checkpoint (any task heads beside it are left out), in eval mode."""
    cfg, backbone, heads = read_beit3(path, config)
    if heads:
        log.info(
            "%s: loading the backbone only; left out %d head tensors (%s)",
            path,
            len(heads),
            sorted(heads)[:5],
        )
    return _load(BEiT3(cfg), backbone, path).eval()


def _with_heads(
    backbone: StateDict, heads: StateDict, wanted: tuple[str, ...], path: Any, task: str
) -> StateDict:
    """The full state dict of a task model: `beit3.`-prefixed backbone plus the task's head tensors."""
    if not any(k.startswith(wanted) for k in heads):
        raise CheckpointError(
            f"{path} holds no {task} head ({', '.join(wanted)}...); it has {len(heads)} head tensors "
            f"({sorted(heads)[:5]}). Load it with load_beit3 for the backbone alone"
        )
    return {**{PREFIX + k: v for k, v in backbone.items()}, **heads}


def load_beit3_vqa(path: str | os.PathLike, config: BEiT3Config | None = None) -> BEiT3ForVQA:
    """A unilm VQA checkpoint (e.g. beit3_base_patch16_480_vqa.pth) as BEiT3ForVQA, in eval mode."""
    cfg, backbone, heads = read_beit3(path, config)
    sd = _with_heads(backbone, heads, ("pooler.", "head."), path, "VQA")
    num_answers = _require(heads, "head.3.weight", str(path)).shape[0]
    return _load(BEiT3ForVQA(BEiT3(cfg), num_answers), sd, path).eval()


def load_beit3_retrieval(path: str | os.PathLike, config: BEiT3Config | None = None) -> BEiT3ForRetrieval:
    """A unilm retrieval / `-itc` checkpoint as BEiT3ForRetrieval, in eval mode."""
    cfg, backbone, heads = read_beit3(path, config)
    sd = _with_heads(backbone, heads, ("vision_head.", "language_head."), path, "retrieval")
    return _load(BEiT3ForRetrieval(BEiT3(cfg)), sd, path).eval()


def to_unilm(model: nn.Module) -> StateDict:
    """The state dict of a BEiT3 or task model in unilm's names (`beit3.<torchscale names>` + heads)."""
    if isinstance(model, BEiT3):
        cfg, sd = model.cfg, {PREFIX + k: v for k, v in duomo_to_torchscale(model.state_dict()).items()}
    else:
        backbone = getattr(model, "beit3", None)
        if not isinstance(backbone, BEiT3):
            raise CheckpointError(f"{type(model).__name__} has no BEiT-3 backbone to export")
        cfg = backbone.cfg
        sd = {}
        for k, v in model.state_dict().items():
            if k.startswith(PREFIX):
                k = PREFIX + (_rename(k[len(PREFIX) :], _TO_TORCHSCALE, _EXPERT_BACK) or k[len(PREFIX) :])
            sd[k] = v
    if (
        cfg.shared_attention
        or cfg.vl_layers
        or cfg.pos_offset != 2
        or cfg.act != "gelu"
        or cfg.stem != "patch"
    ):
        raise CheckpointError(
            "only the torchscale layout exports to unilm/torchscale (shared_attention=False, vl_layers=0, "
            "pos_offset=2, act='gelu', stem='patch'); save this model in duomo's own format instead"
        )
    return sd


def load_beit3_classifier(
    path: str | os.PathLike, config: BEiT3Config | None = None
) -> BEiT3ForImageClassification:
    """A unilm image-classification checkpoint (e.g. beit3_base_patch16_224_in1k.pth) as
    BEiT3ForImageClassification, in eval mode."""
    cfg, backbone, heads = read_beit3(path, config)
    sd = _with_heads(backbone, heads, ("fc_norm.",), path, "image-classification")
    num_classes = _require(heads, "head.weight", str(path)).shape[0]
    return _load(BEiT3ForImageClassification(BEiT3(cfg), num_classes), sd, path).eval()


def export_beit3(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a BEiT3 or task model as a unilm-style checkpoint: .pth/.pt (torch.save) or .safetensors."""
    path = Path(path)
    sd = to_unilm(model)
    if path.suffix == ".safetensors":
        save_safetensors(sd, path)
    elif path.suffix in (".pth", ".pt", ".bin"):
        save_torch(sd, path)
    else:
        raise CheckpointError(f"name the BEiT-3 export file .pth or .safetensors, not {path.name!r}")
    return path


def torchscale_config(cfg: BEiT3Config) -> dict[str, Any]:
    """Keyword arguments of `torchscale.architecture.config.EncoderConfig` for the same architecture."""
    if cfg.shared_attention or cfg.vl_layers or cfg.pos_offset != 2 or cfg.act != "gelu":
        raise ConfigError("torchscale builds only the decoupled layout with gelu and fairseq positions")
    return dict(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        vocab_size=cfg.vocab_size,
        multiway=True,
        encoder_embed_dim=cfg.width,
        encoder_attention_heads=cfg.heads,
        encoder_ffn_embed_dim=cfg.ffn_dim,
        encoder_layers=cfg.layers,
        max_source_positions=cfg.max_text_positions,
        layernorm_eps=cfg.norm_eps,
        subln=cfg.subln,
        deepnorm=cfg.deepnorm,
        encoder_normalize_before=cfg.normalize_before,
        normalize_output=cfg.normalize_output,
        layernorm_embedding=cfg.layernorm_embedding,
        no_scale_embedding=not cfg.scale_embedding,
        drop_path_rate=cfg.drop_path_rate,
        no_output_layer=True,
    )
