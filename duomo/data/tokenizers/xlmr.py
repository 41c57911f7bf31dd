"""BEiT-3's text tokenizer, XLM-RoBERTa SentencePiece (unilm's `beit3.spm`); which tokenizer a BEiT-3 uses.

Microsoft's BEiT-3 checkpoints were trained on ids from `transformers.XLMRobertaTokenizer("beit3.spm")`
(fairseq's dictionary layout): `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, then the SentencePiece pieces with
their ids shifted by one (SentencePiece's own `<unk>` becomes 3), and `<mask>` last. unilm's data code
(`beit3/datasets.py`) calls `tokenizer.tokenize` + `convert_tokens_to_ids` on the raw text (no lower-casing,
no other cleaning: SentencePiece normalises), cuts to `max_len - 2` pieces, adds `<s>` and `</s>` by hand and
pads with 1. `BEiT3Tokenizer` reproduces those ids with `sentencepiece` alone; `tests/data/
test_spm_tokenizer.py` checks them against `transformers`.

The .spm file is not shipped (it is unilm's): get it from unilm's README link, `BEIT3_SPM_URL`, and pass its
path, or set `$DUOMO_BEIT3_SPM`. Which tokenizer a model uses is its config's `tokenizer` field, resolved by
the one registry in `duomo.data.tokenizers`.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from duomo.data.tokenizers.clip import as_text_list, check_context_length, not_text_error
from duomo.errors import ConfigError, InputError

SPM_ENV = "DUOMO_BEIT3_SPM"
BEIT3_SPM_URL = "https://github.com/addf400/files/releases/download/beit3/beit3.spm"
DEFAULT_CONTEXT_LENGTH = 64  # unilm's --num_max_bpe_tokens default

# fairseq's dictionary layout, as XLMRobertaTokenizer's `fairseq_tokens_to_ids`
BOS_TOKEN, PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, MASK_TOKEN = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1  # SentencePiece id i (i > 0) is token id i + 1


def where_to_get() -> str:
    """The hint every missing-file error ends with."""
    return (
        f"download unilm's beit3.spm from {BEIT3_SPM_URL} and pass its path (spm_path=..., CLI --spm) "
        f"or set ${SPM_ENV}"
    )


def resolve_spm_path(spm_path: str | os.PathLike | None = None) -> Path:
    """The .spm file to use: `spm_path`, else `$DUOMO_BEIT3_SPM`; ConfigError when neither is set."""
    if spm_path is None or str(spm_path) == "":
        spm_path = os.environ.get(SPM_ENV) or None
    if spm_path is None:
        raise ConfigError(
            "this BEiT-3 config uses tokenizer 'beit3-spm' (XLM-R SentencePiece), which needs unilm's "
            "beit3.spm file; " + where_to_get()
        )
    return Path(spm_path).expanduser()


def _load_processor(path: Path) -> Any:
    """A SentencePieceProcessor for `path`; ConfigError naming the file when it is missing or not a model."""
    try:
        import sentencepiece as spm
    except ImportError as exc:
        raise ConfigError(
            "the 'beit3-spm' tokenizer needs the sentencepiece package: pip install 'duomo[interop]' "
            "(or pip install sentencepiece)"
        ) from exc
    if not path.is_file():
        raise ConfigError(f"no SentencePiece model at {path}; " + where_to_get())
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise ConfigError(
            f"{path} is not a SentencePiece model ({str(exc).strip() or type(exc).__name__}); "
            "is it unilm's beit3.spm? " + where_to_get()
        ) from exc
    if processor.get_piece_size() < 1:
        raise ConfigError(f"{path} holds an empty SentencePiece vocabulary; " + where_to_get())
    return processor


class BEiT3Tokenizer:
    """unilm's BEiT-3 text ids: texts -> [N, context_length] `<s> pieces </s> <pad>...`, pad id 1.

    Ids are those of `transformers.XLMRobertaTokenizer(spm_path)` (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3,
    piece i -> i + 1, `<mask>` = pieces + 1). Special tokens written in the text ("<mask>", "</s>", ...)
    become their ids, as with `transformers`. Text is not lower-cased (unilm does not).
    """

    def __init__(self, spm_path: str | os.PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        """Load the SentencePiece model at `spm_path` (ConfigError if missing or corrupt)."""
        self.spm_path = Path(spm_path).expanduser()
        self.sp = _load_processor(self.spm_path)
        self.context_length: int = check_context_length(context_length)
        self.bos_token_id, self.pad_token_id, self.eos_token_id = BOS_ID, PAD_ID, EOS_ID
        self.unk_token_id = UNK_ID
        self.num_pieces: int = self.sp.get_piece_size()
        self.mask_token_id: int = self.num_pieces + FAIRSEQ_OFFSET
        self.vocab_size: int = self.num_pieces + FAIRSEQ_OFFSET + 1  # as XLMRobertaTokenizer: <mask> last
        self.special_ids = {
            BOS_TOKEN: BOS_ID,
            PAD_TOKEN: PAD_ID,
            EOS_TOKEN: EOS_ID,
            UNK_TOKEN: UNK_ID,
            MASK_TOKEN: self.mask_token_id,
        }
        # transformers cuts special tokens out of the text first (longest match), then runs SentencePiece on
        # the pieces between them; SentencePiece drops the whitespace around them either way.
        names = sorted(self.special_ids, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    def __reduce__(self) -> tuple:
        """Pickle as the file path (data-loader workers reload the model)."""
        return BEiT3Tokenizer, (str(self.spm_path), self.context_length)

    def __repr__(self) -> str:
        return f"BEiT3Tokenizer({str(self.spm_path)!r}, context_length={self.context_length})"

    def _piece_ids(self, text: str) -> list[int]:
        """Token ids of text without special tokens: SentencePiece ids shifted by one, its <unk> as 3."""
        return [UNK_ID if i == 0 else i + FAIRSEQ_OFFSET for i in self.sp.encode(text)]

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without `<s>`/`</s>` (unilm's `convert_tokens_to_ids(tokenize(text))`)."""
        if not isinstance(text, str):
            raise not_text_error(text)
        ids: list[int] = []
        for part in self._special_split.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self._piece_ids(part))
        return ids

    def encode_batch(self, texts: str | list[str]) -> list[list[int]]:
        """Token ids of many texts, without `<s>`/`</s>`."""
        return [self.encode(t) for t in as_text_list(texts)]

    def _padded(
        self, texts: str | list[str], context_length: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T] ids and the number of real tokens (<s> and </s> included) of each row."""
        context_length = check_context_length(context_length or self.context_length)
        rows, lengths = [], []
        for ids in self.encode_batch(texts):
            ids = ids[: context_length - 2]
            rows.append([BOS_ID, *ids, EOS_ID] + [PAD_ID] * (context_length - 2 - len(ids)))
            lengths.append(len(ids) + 2)
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)
        return ids, torch.tensor(lengths, dtype=torch.long)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """[N, context_length] ids: `<s>`, the first context_length - 2 pieces, `</s>`, then pad id 1."""
        return self._padded(texts, context_length)[0]

    def padding_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True where `ids` is the pad id 1: padding, unless a text spelled out "<pad>" (which transformers,
        and so this tokenizer, turn into id 1); `encode_with_padding` counts tokens instead."""
        return ids == PAD_ID

    def encode_with_padding(
        self, texts: str | list[str], context_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, padding mask, True at padding) as unilm builds them (the mask from each text's length),
        both cut to the longest text of the batch, as duomo's CLIP path does."""
        ids, lengths = self._padded(texts, context_length)
        pad = torch.arange(ids.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
        length = int(lengths.max()) if len(lengths) else ids.shape[1]
        return ids[:, :length], pad[:, :length]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of one sequence up to its first `</s>`, special tokens dropped (`<unk>` too, as transformers'
        `decode(ids, skip_special_tokens=True)` does); SentencePiece joins the pieces."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise InputError(f"decode takes one sequence (1-D), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        pieces = [i - FAIRSEQ_OFFSET for i in ids if i not in (BOS_ID, PAD_ID, UNK_ID, self.mask_token_id)]
        return self.sp.decode(pieces)


@lru_cache(maxsize=8)
def _shared_spm(path: str, mtime_ns: int, size: int) -> BEiT3Tokenizer:
    """One loaded tokenizer per file version (the key changes when the file is replaced)."""
    return BEiT3Tokenizer(path)


def shared_beit3_tokenizer(spm_path: str | os.PathLike | None = None) -> BEiT3Tokenizer:
    """The BEiT3Tokenizer of `spm_path` (else `$DUOMO_BEIT3_SPM`), loaded once per process."""
    path = resolve_spm_path(spm_path)
    if not path.is_file():
        _load_processor(path)  # raises the ConfigError naming the path
    stat = path.stat()
    return _shared_spm(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
