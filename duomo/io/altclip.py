"""AltCLIP (an XLM-R text tower on CLIP's image tower) directories of transformers -> duomo.

The text tower is RoBERTa-style BERT (padding id 1, positions counted from 2, one token type) with AltCLIP's
head: a LayerNorm and a linear `transformation` on every state, the [CLS] row of that, then
`text_projection`. duomo builds it as a "bert" text tower with `extra` {pad_id 1, positions "roberta",
project_dim}; its ids are XLM-R's (fairseq layout, the "beit3-spm" SentencePiece tokenizer reads them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from duomo.errors import CheckpointError, ConfigError
from duomo.io.files import read_json
from duomo.io.hf import hf_vision_fields
from duomo.io.openclip import mlp_ratio
from duomo.models.clip.config import CLIPConfig
from duomo.models.clip.minilm import bert_to_duomo


def is_hf_altclip(path: str | os.PathLike) -> bool:
    """True for a transformers AltCLIPModel directory."""
    config = Path(path) / "config.json"
    return config.is_file() and read_json(config).get("model_type") == "altclip"


# transformers' AltCLIPVisionConfig defaults (ViT-L-14), for keys a config.json leaves out
ALTCLIP_VISION_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 14,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
}


def altclip_config(config: Mapping[str, Any], spm: str | None = None) -> CLIPConfig:
    """transformers AltCLIPConfig dict -> `CLIPConfig`."""
    vc, tc = config.get("vision_config") or {}, config.get("text_config") or {}
    try:
        t_width = tc.get("hidden_size", 1024)
        pad = tc.get("pad_token_id", 1)
        return CLIPConfig.from_dict(
            {
                "embed_dim": config.get("projection_dim", 768),
                "init_logit_scale": config.get("logit_scale_init_value", 2.6592),
                "vision": hf_vision_fields(vc, defaults=ALTCLIP_VISION_DEFAULTS),
                "text": {
                    "kind": "bert",
                    "tokenizer": "beit3-spm",
                    "pool": "first",
                    "context_length": min(77, tc.get("max_position_embeddings", 514) - pad - 1),
                    "vocab_size": tc.get("vocab_size", 250002),
                    "width": t_width,
                    "layers": tc.get("num_hidden_layers", 24),
                    "heads": tc.get("num_attention_heads", 16),
                    "mlp_ratio": mlp_ratio(tc.get("intermediate_size", 4096), t_width),
                    "act": tc.get("hidden_act", "gelu"),
                    "norm_eps": tc.get("layer_norm_eps", 1e-5),
                    "eos_token_id": 2,
                    "extra": {
                        "pad_id": pad,
                        "positions": "roberta",
                        "project_dim": tc.get("project_dim", 768),
                        "max_positions": tc.get("max_position_embeddings", 514),
                        **(
                            {"spm": spm} if spm else {}
                        ),  # XLM-R's SentencePiece model, when the folder has it
                    },
                },
            }
        )
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"malformed AltCLIP config: {exc}") from exc


def altclip_to_duomo(sd: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """AltCLIPModel names -> duomo names."""
    from duomo.io.hf import hf_to_duomo

    vision = {  # AltCLIP names its vision stack "encoder.layer" where CLIP says "encoder.layers"
        k.replace("vision_model.encoder.layer.", "vision_model.encoder.layers."): v
        for k, v in sd.items()
        if not k.startswith(("text_model.", "text_projection."))
    }
    prefix = "text_model.roberta."
    text = {
        k[len(prefix) :].replace("encoder.layers.", "encoder.layer."): v
        for k, v in sd.items()
        if k.startswith(prefix)
    }
    out = hf_to_duomo(vision)
    try:
        out.update({f"text.encoder.{k}": v for k, v in bert_to_duomo(text, layers).items()})
        for ours, theirs in (("pre_norm", "pre_LN"), ("transformation", "transformation")):
            for kind in ("weight", "bias"):
                out[f"text.{ours}.{kind}"] = sd[f"text_model.{theirs}.{kind}"]
        out["text.proj.weight"] = sd["text_projection.weight"]
    except KeyError as exc:
        raise CheckpointError(f"not an AltCLIP text tower (no {exc})") from exc
    return out


def read_hf_altclip(directory: str | os.PathLike) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """(config, duomo state dict) of a transformers AltCLIPModel directory."""
    from duomo.io.hf import read_hf_weights

    directory = Path(directory)
    spm = directory / "sentencepiece.bpe.model"
    cfg = altclip_config(read_json(directory / "config.json"), str(spm) if spm.is_file() else None)
    return cfg, altclip_to_duomo(read_hf_weights(directory, cfg), cfg.text.layers)
