"""Which tokenizer a text tower uses: a registry keyed by `TextConfig.tokenizer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from duomo.errors import ConfigError

TokenizerBuilder = Callable[[Any], Callable[[list[str]], Any]]
TOKENIZERS: dict[str, TokenizerBuilder] = {}


def register_tokenizer(name: str, builder: TokenizerBuilder) -> None:
    """Make `TextConfig.tokenizer == name` use `builder(text_config)` (a callable: texts -> model inputs)."""
    TOKENIZERS[name] = builder


def _clip_tokenizer(text_cfg: Any) -> Callable[[list[str]], Any]:
    from duomo.data.tokenizer import get_tokenizer

    return get_tokenizer(text_cfg.context_length)


register_tokenizer("clip", _clip_tokenizer)


def build_tokenizer(text_cfg: Any) -> Callable[[list[str]], Any]:
    """The tokenizer for a text tower config: texts -> token ids [N, T] (or the tower's own input type)."""
    if text_cfg.tokenizer not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {text_cfg.tokenizer!r}; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[text_cfg.tokenizer](text_cfg)


def _minilm_tokenizer(text_cfg: Any) -> Callable[[list[str]], Any]:
    from duomo.models.clip.minilm import minilm_tokenizer

    return minilm_tokenizer(text_cfg)


register_tokenizer("minilm", _minilm_tokenizer)
