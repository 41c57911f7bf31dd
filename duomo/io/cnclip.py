"""Chinese-CLIP checkpoints (the `cn_clip` package's layout) <-> duomo.

A cn_clip state dict holds `visual.*` in OpenAI CLIP's names (conv1, class_embedding, resblocks...),
`bert.*` in Hugging Face BERT's names (RoBERTa-wwm-ext: post-LN, token-type embeddings), `text_projection`
[hidden, embed_dim] applied to the [CLS] state, and `logit_scale`. duomo builds it as a CLIP with a ViT image
tower and a "bert" text tower (`pool: "first"`), tokenised by the "bert-wordpiece" tokenizer (cn_clip's
21,128-id vocabulary); tests check embeddings against cn_clip's own model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from duomo.errors import CheckpointError, ConfigError
from duomo.io.files import read_json
from duomo.io.openclip import mlp_ratio, openclip_to_duomo
from duomo.models.clip.config import CLIPConfig
from duomo.models.clip.minilm import bert_to_duomo


def is_cnclip(sd: Mapping[str, Any]) -> bool:
    """Whether a state dict is in cn_clip's layout."""
    return "text_projection" in sd and any(k.startswith("bert.") for k in sd) and "visual.conv1.weight" in sd


def cnclip_to_duomo(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cn_clip names -> duomo names."""
    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    bert = {k.removeprefix("bert."): v for k, v in sd.items() if k.startswith("bert.")}
    layers = 1 + max(int(k.split(".")[2]) for k in bert if k.startswith("encoder.layer."))
    out = {k: v for k, v in openclip_to_duomo(visual).items() if k.startswith("visual.")}
    try:
        out.update({f"text.encoder.{k}": v for k, v in bert_to_duomo(bert, layers).items()})
    except KeyError as exc:
        raise CheckpointError(f"the bert.* weights are not a BERT encoder (no {exc})") from exc
    out["text.proj.weight"] = sd["text_projection"].t().contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return out


def cnclip_config(sd: Mapping[str, torch.Tensor], context_length: int = 52) -> CLIPConfig:
    """The architecture of a cn_clip ViT checkpoint, read from its weight shapes."""
    conv = sd["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vis_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
    hidden = sd["bert.embeddings.word_embeddings.weight"].shape[1]
    txt_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("bert.encoder.layer."))
    inter = sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    return CLIPConfig.from_dict(
        {
            "embed_dim": sd["text_projection"].shape[1],
            "vision": {
                "image_size": grid * patch,
                "patch_size": patch,
                "width": width,
                "layers": vis_layers,
                "heads": width // 64,
                "act": "quick_gelu",  # cn_clip's ViT is OpenAI's
                "mlp_ratio": mlp_ratio(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], width),
            },
            "text": {
                "kind": "bert",
                "tokenizer": "bert-wordpiece",
                "pool": "first",
                "context_length": context_length,
                "vocab_size": sd["bert.embeddings.word_embeddings.weight"].shape[0],
                "width": hidden,
                "layers": txt_layers,
                "heads": max(1, hidden // 64),
                "mlp_ratio": mlp_ratio(inter, hidden),
                "norm_eps": 1e-12,
                "eos_token_id": 102,
            },
        }
    )


# ---- Hugging Face ChineseCLIPModel directories ----


def is_hf_chinese_clip(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json is a transformers ChineseCLIPModel's."""
    config = Path(path) / "config.json"
    return config.is_file() and read_json(config).get("model_type") == "chinese_clip"


def hf_chinese_clip_config(config: Mapping[str, Any], preprocessor: Mapping[str, Any] | None) -> CLIPConfig:
    """transformers ChineseCLIPConfig dict -> `CLIPConfig` (a ViT and a "bert" text tower)."""
    from duomo.io.hf import hf_vision_fields

    vc, tc = config.get("vision_config") or {}, config.get("text_config") or {}
    try:
        t_width = tc.get("hidden_size", 768)
        vision = hf_vision_fields(vc, preprocessor)
        text = {
            "kind": "bert",
            "tokenizer": "bert-wordpiece",
            "pool": "first",
            "context_length": 52,
            "vocab_size": tc.get("vocab_size", 21128),
            "width": t_width,
            "layers": tc.get("num_hidden_layers", 12),
            "heads": tc.get("num_attention_heads", 12),
            "mlp_ratio": mlp_ratio(tc.get("intermediate_size", 3072), t_width),
            "act": tc.get("hidden_act", "gelu"),
            "norm_eps": tc.get("layer_norm_eps", 1e-12),
            "eos_token_id": 102,
        }
        return CLIPConfig.from_dict(
            {
                "embed_dim": config.get("projection_dim", 512),
                "vision": vision,
                "text": text,
                "init_logit_scale": config.get("logit_scale_init_value", 2.6592),
            }
        )
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"malformed HF Chinese-CLIP config: {exc}") from exc


def hf_chinese_clip_to_duomo(sd: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """ChineseCLIPModel names -> duomo names: the vision side as HF CLIP's, the text side as BERT's."""
    from duomo.io.hf import hf_to_duomo

    vision = {k: v for k, v in sd.items() if not k.startswith(("text_model.", "text_projection."))}
    text = {k.removeprefix("text_model."): v for k, v in sd.items() if k.startswith("text_model.")}
    out = hf_to_duomo(vision)
    try:
        out.update({f"text.encoder.{k}": v for k, v in bert_to_duomo(text, layers).items()})
    except KeyError as exc:
        raise CheckpointError(f"the text_model weights are not a BERT encoder (no {exc})") from exc
    out["text.proj.weight"] = sd["text_projection.weight"]
    return out


def read_hf_chinese_clip(directory: str | os.PathLike) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """(config, duomo state dict) of a transformers ChineseCLIPModel directory."""
    from duomo.io.hf import read_hf_weights, read_preprocessor

    directory = Path(directory)
    cfg = hf_chinese_clip_config(read_json(directory / "config.json"), read_preprocessor(directory))
    return cfg, hf_chinese_clip_to_duomo(read_hf_weights(directory, cfg), cfg.text.layers)


def duomo_to_bert(sd: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """duomo `BertEncoder` names -> Hugging Face BertModel names (qkv split; token type 1 is zeros, as
    single-sentence models never use it)."""
    out = {
        "embeddings.word_embeddings.weight": sd["token_embed.weight"],
        "embeddings.position_embeddings.weight": sd["pos_embed"],
        "embeddings.token_type_embeddings.weight": torch.stack(
            [sd["type_embed"], torch.zeros_like(sd["type_embed"])]
        ),
        "embeddings.LayerNorm.weight": sd["embed_norm.weight"],
        "embeddings.LayerNorm.bias": sd["embed_norm.bias"],
    }
    for i in range(layers):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for part, value in zip(
                ("query", "key", "value"), sd[f"{src}attn.qkv.{kind}"].chunk(3), strict=True
            ):
                out[f"{dst}attention.self.{part}.{kind}"] = value
            out[f"{dst}attention.output.dense.{kind}"] = sd[f"{src}attn.proj.{kind}"]
            out[f"{dst}attention.output.LayerNorm.{kind}"] = sd[f"{src}norm1.{kind}"]
            out[f"{dst}intermediate.dense.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}output.dense.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
            out[f"{dst}output.LayerNorm.{kind}"] = sd[f"{src}norm2.{kind}"]
    return out


def export_hf_chinese_clip(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write a duomo CLIP with a "bert" text tower as a transformers ChineseCLIPModel directory."""
    from duomo.io.files import contiguous, save_safetensors, write_json
    from duomo.io.hf import ACTS_TO_HF, duomo_config_to_hf, duomo_to_hf, preprocessor_config
    from duomo.io.native import model_config

    cfg = model_config(model)
    t = cfg.text
    if t.kind != "bert" or t.pool != "first":
        raise CheckpointError("only a CLIP with a 'bert' text tower ([CLS] pooling) is a Chinese-CLIP model")
    state = model.state_dict()
    vision_sd = {k: val for k, val in state.items() if not k.startswith("text.")}
    text_sd = {
        k.removeprefix("text.encoder."): val for k, val in state.items() if k.startswith("text.encoder.")
    }
    out = {k: val for k, val in duomo_to_hf(vision_sd).items() if not k.startswith("text_")}
    out.update({f"text_model.{k}": val for k, val in duomo_to_bert(text_sd, t.layers).items()})
    out["text_projection.weight"] = state["text.proj.weight"]
    clip_cfg = duomo_config_to_hf(
        dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, kind="transformer", pool="eos"))
    )
    config = {
        "architectures": ["ChineseCLIPModel"],
        "model_type": "chinese_clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "vision_config": {**clip_cfg["vision_config"], "model_type": "chinese_clip_vision_model"},
        "text_config": {
            "model_type": "chinese_clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "intermediate_size": int(t.width * t.mlp_ratio),
            "hidden_act": ACTS_TO_HF.get(t.act, t.act),
            "max_position_embeddings": state["text.encoder.pos_embed"].shape[0],
            "type_vocab_size": 2,
            "layer_norm_eps": t.norm_eps,
            "pad_token_id": 0,
        },
        "torch_dtype": "float32",
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(contiguous(out), out_dir / "model.safetensors")
    write_json(preprocessor_config(cfg), out_dir / "preprocessor_config.json")
    write_json(config, out_dir / "config.json")
    return out_dir


def duomo_to_cnclip(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A duomo Chinese-CLIP (ViT + "bert" tower) -> cn_clip's state-dict names."""
    from duomo.io.native import model_config
    from duomo.io.openclip import duomo_to_openclip

    cfg = model_config(model)
    if cfg.text.kind != "bert" or cfg.text.pool != "first" or cfg.text.extra.get("project_dim"):
        raise CheckpointError("only a CLIP with a plain 'bert' text tower ([CLS] pooling) is a cn_clip model")
    state = model.state_dict()
    vision = {k: v for k, v in state.items() if k.startswith("visual.")}
    out = {k: v for k, v in duomo_to_openclip(vision).items() if k.startswith("visual.")}
    text = {k.removeprefix("text.encoder."): v for k, v in state.items() if k.startswith("text.encoder.")}
    out.update({f"bert.{k}": v for k, v in duomo_to_bert(text, cfg.text.layers).items()})
    out["text_projection"] = state["text.proj.weight"].t().contiguous()
    out["logit_scale"] = state["logit_scale"]
    return out


def export_cnclip(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write a cn_clip checkpoint (.pt: {"state_dict": {"module." + name: tensor}}, as cn_clip saves them)."""
    from duomo.io.files import atomic_write, contiguous

    path = Path(path)
    if path.suffix not in (".pt", ".pth"):
        raise CheckpointError(f"name the cn_clip checkpoint .pt, not {path.name!r}")
    state = {f"module.{k}": v for k, v in contiguous(duomo_to_cnclip(model)).items()}
    atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))
    return path
