"""Chinese-CLIP checkpoints (the `cn_clip` package's layout) <-> duomo.

A cn_clip state dict holds `visual.*` in OpenAI CLIP's names (conv1, class_embedding, resblocks...),
`bert.*` in Hugging Face BERT's names (RoBERTa-wwm-ext: post-LN, token-type embeddings), `text_projection`
[hidden, embed_dim] applied to the [CLS] state, and `logit_scale`. duomo builds it as a CLIP with a ViT image
tower and a "bert" text tower (`pool: "first"`), tokenised by the "bert-wordpiece" tokenizer (cn_clip's
21,128-id vocabulary); tests check embeddings against cn_clip's own model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from duomo.errors import CheckpointError
from duomo.io.openclip import openclip_to_duomo
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
                "mlp_ratio": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
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
                "mlp_ratio": inter / hidden,
                "norm_eps": 1e-12,
                "eos_token_id": 102,
            },
        }
    )
