"""Every tokenizer duomo has, chosen by one registry keyed by a model config's `tokenizer` field.

- "clip": CLIP's byte-level BPE (`clip.py`), for CLIP text towers and duomo's tiny BEiT-3 models;
- "minilm": BERT WordPiece from the MiniLM package (`wordpiece.py`), for the LiT text tower;
- "beit3-spm": XLM-R SentencePiece, unilm's beit3.spm (`xlmr.py`), for Microsoft's BEiT-3 checkpoints;
- "bert-wordpiece": BERT WordPiece from a vocab.txt (`wordpiece.py`), Chinese-CLIP's 21,128 ids by default.

`build_tokenizer(cfg)` gives a callable tokenizer (texts -> ids [N, T]); the ones a BEiT-3 uses also have
`encode_with_padding`, `decode` and `bos_token_id` / `eos_token_id` / `pad_token_id`. `special_ids(cfg)`
gives (bos, eos, pad) without loading any file. Special ids always come from here, never from literals.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import torch

from duomo.errors import ConfigError

TokenizerBuilder = Callable[..., Any]
TOKENIZERS: dict[str, TokenizerBuilder] = {}
SPECIAL_IDS: dict[str, tuple[int, int, int]] = {
    "clip": (49406, 49407, 0),
    "beit3-spm": (0, 2, 1),
    "bert-wordpiece": (101, 102, 0),  # [CLS], [SEP], [PAD] of BERT vocabularies (Chinese-CLIP's included)
}


class TextTokenizer(Protocol):
    """What BEiT-3 tasks need of a tokenizer."""

    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode_with_padding(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, T], padding mask [N, T], True at padding), T the longest text of the batch."""
        ...

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of one sequence of ids."""
        ...


def register_tokenizer(name: str, builder: TokenizerBuilder) -> None:
    """Make `cfg.tokenizer == name` use `builder(cfg, **options)`."""
    TOKENIZERS[name] = builder


def build_tokenizer(cfg: Any, **options: Any) -> Any:
    """The tokenizer a model config names (a CLIP `TextConfig` or a `BEiT3Config`); `options` such as
    `spm_path` go to its builder. A config whose `vocab_size` is smaller than the tokenizer's is refused."""
    name = getattr(cfg, "tokenizer", None)
    if name not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {name!r}; known: {sorted(TOKENIZERS)}")
    tok = TOKENIZERS[name](cfg, **options)
    vocab, have = getattr(cfg, "vocab_size", None), getattr(tok, "vocab_size", None)
    if vocab is not None and have is not None and vocab < have:
        where = f" ({tok.spm_path})" if hasattr(tok, "spm_path") else ""
        raise ConfigError(
            f"the {name!r} tokenizer{where} has {have} ids but the model's vocab_size is {vocab}; "
            "is this the tokenizer the checkpoint was trained with?"
        )
    return tok


def special_ids(cfg: Any) -> tuple[int, int, int]:
    """(bos, eos, pad) ids of the tokenizer a config names, without loading any file."""
    name = getattr(cfg, "tokenizer", None)
    if name not in SPECIAL_IDS:
        raise ConfigError(f"tokenizer {name!r} has no start/end ids; known: {sorted(SPECIAL_IDS)}")
    return SPECIAL_IDS[name]


def _clip(cfg: Any, **_: Any) -> Any:
    from duomo.data.tokenizers.clip import get_tokenizer

    length = getattr(cfg, "context_length", None)
    return get_tokenizer(length) if length else get_tokenizer()


def _minilm(cfg: Any, **_: Any) -> Any:
    from duomo.data.tokenizers.wordpiece import minilm_tokenizer

    return minilm_tokenizer(cfg)


def _xlmr(cfg: Any, spm_path: str | os.PathLike | None = None, **_: Any) -> Any:
    from duomo.data.tokenizers.xlmr import shared_beit3_tokenizer

    extra = getattr(cfg, "extra", None) or {}
    return shared_beit3_tokenizer(spm_path or extra.get("spm"))  # a folder may bring its own .spm


register_tokenizer("clip", _clip)
register_tokenizer("minilm", _minilm)
register_tokenizer("beit3-spm", _xlmr)


def _bert_wordpiece(cfg: Any, **_: Any) -> Any:
    from duomo.data.tokenizers.wordpiece import bert_wordpiece_tokenizer

    return bert_wordpiece_tokenizer(cfg)


register_tokenizer("bert-wordpiece", _bert_wordpiece)
