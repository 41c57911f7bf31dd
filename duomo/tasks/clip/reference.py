"""Embeddings computed by the original libraries (open_clip, transformers), to check duomo's parity."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def openclip_model_from_export(path: Path):
    """Build an open_clip CLIP from an OpenCLIP state dict exported by duomo (with its sidecar config)."""
    import open_clip
    from safetensors.torch import load_file

    cfg_path = path.with_suffix(".json")
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("model_cfg", cfg)
    model = open_clip.model.CLIP(**cfg)
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def openclip_embeddings(
    path: Path, images: torch.Tensor, texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) image and text embeddings from open_clip for an exported OpenCLIP checkpoint."""
    import open_clip

    model = openclip_model_from_export(path)
    tokens = open_clip.tokenize(texts, context_length=model.context_length)
    with torch.inference_mode():
        return model.encode_image(images), model.encode_text(tokens)


def hf_embeddings(path: Path, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw image and text embeddings from transformers' CLIPModel for an exported HF directory."""
    import open_clip
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = CLIPModel.from_pretrained(str(path)).eval()
    tokens = open_clip.tokenize(texts, context_length=model.config.text_config.max_position_embeddings)
    with torch.inference_mode():
        img = model.get_image_features(pixel_values=images)
        txt = model.get_text_features(input_ids=tokens)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return img, txt
