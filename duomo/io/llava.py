"""transformers `LlavaForConditionalGeneration` directories <-> duomo's `VisionLanguageModel`: the CLIP vision
tower through duomo's CLIP names, the projector as is, the language model through `duomo.io.lm`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from duomo.data.tokenizers.lm import LMTokenizer, read_tokenizer_dir
from duomo.errors import CheckpointError
from duomo.io.checkpoint import load_into
from duomo.io.files import read_json, save_safetensors, write_json
from duomo.io.hf import duomo_to_hf, hf_to_duomo, hf_vision_fields
from duomo.io.lm import _read_weights, config_from_hf, config_to_hf, state_from_hf, state_to_hf
from duomo.models.clip.config import VisionConfig
from duomo.models.lm.vlm import VisionLanguageModel, VLMConfig, build_vlm
from duomo.nn.init import skip_init


def is_llava_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return read_json(config).get("model_type") == "llava"
    except CheckpointError:
        return False


def config_from_llava(hf: dict[str, Any]) -> VLMConfig:
    """duomo's VLM config from a LLaVA config.json."""
    vc = dict(hf.get("vision_config") or {})
    if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"LLaVA vision tower {vc.get('model_type')!r} is not built (CLIP vision only)")
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
        raise CheckpointError("only LLaVA's GELU projector with biases is built")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError("LLaVA with several vision feature layers is not built")
    select = {"default": "patch", "full": "all"}.get(hf.get("vision_feature_select_strategy", "default"))
    if select is None:
        raise CheckpointError(f"vision_feature_select_strategy {hf.get('vision_feature_select_strategy')!r}")
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    vision = hf_vision_fields(vc)
    vision["mean"], vision["std"] = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    return VLMConfig(
        vision=VisionConfig(**vision),
        lm=config_from_hf(text),
        vision_layer=layer,
        vision_select=select,
        projector="mlp",
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
    )


def _split_state(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(vision, projector, language) weights of a LLaVA state dict, in any of transformers' spellings."""
    vision, projector, language = {}, {}, {}
    for key, value in sd.items():
        k = (
            key.removeprefix("model.")
            if key.startswith(("model.vision_tower.", "model.multi_modal"))
            else key
        )
        if k.startswith("vision_tower."):
            rest = k.removeprefix("vision_tower.").removeprefix("vision_model.")
            vision[f"vision_model.{rest}"] = value
        elif k.startswith("multi_modal_projector."):
            projector[k.removeprefix("multi_modal_projector.")] = value
        elif k.startswith("model.language_model."):
            language["model." + k.removeprefix("model.language_model.")] = value
        elif k.startswith("language_model."):
            language[k.removeprefix("language_model.")] = value
        elif k == "lm_head.weight":
            language[k] = value
        else:
            raise CheckpointError(f"unexpected LLaVA weight {key!r}")
    return vision, projector, language


def read_llava(directory: str | os.PathLike) -> tuple[VisionLanguageModel, LMTokenizer | None]:
    """A LLaVA directory as (duomo VisionLanguageModel, its tokenizer or None)."""
    directory = Path(directory)
    cfg = config_from_llava(read_json(directory / "config.json"))
    vision_sd, projector_sd, language_sd = _split_state(_read_weights(directory))
    sd = {f"vision.{k.removeprefix('visual.')}": v for k, v in hf_to_duomo(vision_sd).items()}
    sd |= {f"projector.{k}": v for k, v in projector_sd.items()}
    sd |= {f"lm.{k}": v for k, v in state_from_hf(language_sd, cfg.lm).items()}
    with skip_init():
        model = build_vlm(cfg)
    load_into(model, sd)
    tokenizer = read_tokenizer_dir(directory) if (directory / "tokenizer.json").is_file() else None
    return model.eval(), tokenizer


def export_llava(
    model: VisionLanguageModel, directory: str | os.PathLike, tokenizer: LMTokenizer | None = None
) -> Path:
    """Write a LLaVA directory transformers reads (CLIP vision tower, GELU MLP projector, Llama LM)."""
    cfg = model.config
    if cfg.projector != "mlp" or cfg.pool or cfg.lm.layout != "llama" or cfg.vision.stem != "patch":
        raise CheckpointError(
            "LLaVA's layout has a CLIP patch-stem vision tower, an MLP projector, no pooling and a Llama LM; "
            "this model differs: save it in duomo's format instead"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vision = {f"visual.{k}": v for k, v in model.vision.state_dict().items()}
    sd = {f"vision_tower.{k}": v for k, v in duomo_to_hf(vision).items()}
    sd |= {f"multi_modal_projector.{k}": v for k, v in model.projector.state_dict().items()}
    sd |= {f"language_model.{k}": v for k, v in state_to_hf(model.lm, "llama").items()}
    save_safetensors(sd, directory / "model.safetensors")
    v = cfg.vision
    vision_config = {
        "model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
        "hidden_size": v.width, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
        "intermediate_size": int(v.width * v.mlp_ratio), "layer_norm_eps": v.norm_eps,
        "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(v.act, v.act), "projection_dim": v.width,
    }  # fmt: skip
    text = config_to_hf(cfg.lm, "llama")
    text.pop("architectures")
    write_json(
        {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "vision_config": vision_config,
            "text_config": text,
            "image_token_index": cfg.image_token_id,
            "vision_feature_layer": cfg.vision_layer,
            "vision_feature_select_strategy": "default" if cfg.vision_select == "patch" else "full",
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "image_seq_length": cfg.tokens_per_image,
            "tie_word_embeddings": cfg.lm.tie_embeddings,
        },
        directory / "config.json",
    )
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
