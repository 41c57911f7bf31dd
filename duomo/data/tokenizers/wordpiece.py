"""BERT WordPiece, lower-cased, from MiniLM's tokenizer.json (the "minilm" tokenizer of the registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from duomo.io.minilm import TOKENIZER_FILE, model_dir
from duomo.models.clip.config import TextConfig
from duomo.models.clip.minilm import PAD_ID


class MiniLMTokenizer:
    """BERT WordPiece (lower-cased) from MiniLM's tokenizer.json: texts -> ids [B, context_length], 0 pads."""

    def __init__(self, path: str | Path, context_length: int = 256) -> None:
        """`path`: a tokenizer.json file or the folder holding it."""
        path = Path(path)
        self.path = path / TOKENIZER_FILE if path.is_dir() else path
        self.context_length = int(context_length)
        self._tokenizer: Any = None

    @classmethod
    def from_config(cls, cfg: TextConfig) -> MiniLMTokenizer:
        """The tokenizer of a minilm text config (ConfigError when the MiniLM files are not installed)."""
        return cls(model_dir(cfg) / TOKENIZER_FILE, cfg.context_length)

    @property
    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer`, loaded on first use, truncating and padding to the context length."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.path))
            tok.enable_truncation(self.context_length)
            tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", length=self.context_length)
            self._tokenizer = tok
        return self._tokenizer

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids [B, context_length]: [CLS] words [SEP] then [PAD]s (long texts are truncated)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer.encode_batch(texts)
        return torch.tensor([e.ids for e in encoded], dtype=torch.long)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (for DataLoader workers) without the Rust tokenizer; it reloads on first use."""
        return {"path": self.path, "context_length": self.context_length, "_tokenizer": None}


def minilm_tokenizer(text_cfg: TextConfig) -> MiniLMTokenizer:
    """Tokenizer-registry builder for `TextConfig.tokenizer == "minilm"`."""
    return MiniLMTokenizer.from_config(text_cfg)
