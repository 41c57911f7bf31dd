"""A tiny chat model for tests: a word-level tokenizer with a ChatML template, a random 2-layer Llama saved
as a transformers directory, joined with the shipped shapes-tiny image tower in a duomo chat folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from duomo.data.tokenizers.lm import LMTokenizer
from duomo.io.chat import assemble, save_chat
from duomo.io.lm import export_hf_lm
from duomo.models.clip.config import VisionConfig
from duomo.models.lm.config import LMConfig
from duomo.models.lm.model import CausalLM
from duomo.models.lm.vlm import VLMConfig

TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
WORDS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
WORDS += [
    "red",
    "green",
    "blue",
    "star",
    "circle",
    "what",
    "colour",
    "is",
    "the",
    "a",
    "an",
    "it",
    "yes",
    "no",
    "hi",
    "hello",
    "describe",
    "picture",
    "?",
]


def tiny_tokenizer() -> LMTokenizer:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    return LMTokenizer(backend, "<|im_start|>", "<|im_end|>", "<|endoftext|>", TEMPLATE)


def tiny_lm_dir(out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = LMConfig(
        vocab_size=len(WORDS), width=32, layers=2, heads=4, kv_heads=2, mlp_width=64, max_positions=256
    )
    return export_hf_lm(CausalLM(cfg), out, "llama", tiny_tokenizer())


def tiny_chat_dir(out: Path, seed: int = 0, scope: str = "all") -> Path:
    lm_dir = tiny_lm_dir(out.parent / f"{out.name}-lm", seed)
    lm_cfg = LMConfig(
        vocab_size=len(WORDS), width=32, layers=2, heads=4, kv_heads=2, mlp_width=64, max_positions=256
    )
    vision = VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4)
    cfg = VLMConfig(vision=vision, lm=lm_cfg, pool=2, image_token_id=len(WORDS))
    lora = {"rank": 2, "alpha": 4.0, "targets": ["q_proj", "v_proj"], "scope": scope}
    torch.manual_seed(seed)
    model, _ = assemble(cfg, "shapes-tiny", str(lm_dir), lora)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if name.endswith(".lora_b"):
                p.normal_(0, 0.1)  # not the identity, so the saved adapters matter
    meta = {"vision_from": "shapes-tiny", "lm_from": str(lm_dir), "system": "be brief", "lora": lora,
            "trained": ["projector", "lora"]}  # fmt: skip
    return save_chat(model, out, meta)
