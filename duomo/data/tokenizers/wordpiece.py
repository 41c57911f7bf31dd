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


# ---- BERT WordPiece from a vocab.txt: Chinese-CLIP's (cn_clip's 21,128 ids) ----

CN_CLIP_PACKAGE, CN_CLIP_MODULE = "cn-clip", "cn_clip"
CN_CLIP_CONTEXT = 52  # cn_clip.clip.tokenize's default


def cn_clip_vocab() -> Path:
    """The vocab.txt inside the installed `cn-clip` package (install it with --no-deps), or ConfigError."""
    import importlib.util

    from duomo.errors import ConfigError

    spec = importlib.util.find_spec(CN_CLIP_MODULE)
    vocab = None if spec is None or spec.origin is None else Path(spec.origin).parent / "clip" / "vocab.txt"
    if vocab is None or not vocab.is_file():
        raise ConfigError(
            f"the 'bert-wordpiece' tokenizer needs a vocab.txt: pip install --no-deps {CN_CLIP_PACKAGE} (its "
            "Chinese vocabulary), or set text.extra.vocab to a BERT vocab.txt"
        )
    return vocab


class BertWordPieceTokenizer:
    """BERT's basic + WordPiece tokenizer (lower case, CJK characters split, accents stripped) on the
    `tokenizers` library, from a vocab.txt: ids identical to cn_clip's `FullTokenizer` and to transformers'
    `BertTokenizer`. Texts -> [B, context_length] `[CLS] pieces [SEP]` then 0s (cn_clip.clip.tokenize)."""

    def __init__(self, vocab: str | Path, context_length: int = CN_CLIP_CONTEXT) -> None:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        ids: dict[str, int] = {}
        with open(vocab, encoding="utf-8") as f:
            for i, line in enumerate(f):
                ids.setdefault(line.rstrip("\n"), i)
        self.vocab_path, self.context_length = Path(vocab), int(context_length)
        self.vocab_size = len(ids)
        self.cls_token_id, self.sep_token_id = ids["[CLS]"], ids["[SEP]"]
        self.bos_token_id, self.eos_token_id, self.pad_token_id = self.cls_token_id, self.sep_token_id, 0
        # cn_clip's WordpieceTokenizer gives up on words over 200 characters (tokenizers' default: 100)
        tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=200))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.tokenizer = tok

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one text, without [CLS]/[SEP]."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Zero-padded [B, context_length] ids; long texts are cut and still end with [SEP]."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        rows = []
        for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = [self.cls_token_id, *enc.ids[: length - 2], self.sep_token_id]
            rows.append(ids + [self.pad_token_id] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of one sequence of ids (special tokens and padding dropped)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.tokenizer.decode([i for i in ids if i not in (0, self.cls_token_id, self.sep_token_id)])

    def __getstate__(self) -> dict[str, Any]:
        """Pickle as the vocab path (DataLoader workers rebuild the Rust tokenizer)."""
        return {"vocab": str(self.vocab_path), "context_length": self.context_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["vocab"], state["context_length"])  # type: ignore[misc]


def bert_wordpiece_tokenizer(text_cfg: Any) -> BertWordPieceTokenizer:
    """Tokenizer-registry builder for `tokenizer == "bert-wordpiece"` (`extra["vocab"]`, else cn-clip's)."""
    extra = getattr(text_cfg, "extra", None) or {}
    vocab = extra.get("vocab") or cn_clip_vocab()
    return BertWordPieceTokenizer(vocab, getattr(text_cfg, "context_length", CN_CLIP_CONTEXT))
