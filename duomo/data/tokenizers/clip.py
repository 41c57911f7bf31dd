"""CLIP's byte-level BPE tokenizer, on the Hugging Face `tokenizers` library.

Token ids are identical to OpenCLIP's `SimpleTokenizer` (and to OpenAI CLIP's, up to the names of the two
special tokens): the same 49,408-entry vocabulary, text cleaning, pre-tokenizer split, merges and truncation.
Cleaning (ftfy, HTML unescape, whitespace, lower case) runs in Python with the calls OpenCLIP makes, because
`tokenizers`' normalizers differ from `str.split()` and `str.lower()` on rare characters; splitting, byte
mapping and merging run in Rust, batched and in parallel.

The vocabulary is OpenCLIP's `bpe_simple_vocab_16e6.txt.gz`, shipped unchanged in `assets/` (MIT, see NOTICE).

One known difference: `tokenizers`' regex engine knows Unicode 14, while OpenCLIP's `regex` module follows
the newest Unicode. About 17k code points assigned as letters or digits since (Unicode 15-17, e.g. CJK
extensions H-J) split differently; text of characters assigned by Unicode 14 tokenizes identically.
"""

from __future__ import annotations

import gzip
import html
import itertools
import re
from functools import cache, lru_cache
from importlib import resources

import ftfy
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from duomo.errors import InputError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# As CLIP: 256 bytes + 256 bytes-at-word-end + 48,894 merges + 2 specials = 49,408 tokens.
NUM_MERGES = 49152 - 256 - 2
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77

# CLIP's pre-tokenizer: contractions, runs of letters, single digits, runs of anything else but spaces.
# OpenCLIP compiles it with the `regex` module and re.IGNORECASE; on lower-cased text that differs from the
# plain pattern in two characters only, written out here for Oniguruma (the engine of `tokenizers`): "'ſ"
# (long s) is the contraction "'s", and U+0345 (combining ypogegrammeni, case-folds to a letter) matches no
# branch, so it is dropped.
SPLIT_PATTERN = r"""'s|'ſ|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+"""


def basic_clean(text: str) -> str:
    """Repair mojibake, unescape HTML entities (twice, for double-escaped text) and strip, as CLIP does."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines, Unicode spaces) into one space."""
    return " ".join(text.split())


# ftfy and html.unescape leave printable ASCII without "&" (plus tab and newline) unchanged, and ftfy costs
# ~100 us a caption: such text, most English captions, skips both. The parity tests check this shortcut.
PLAIN_ASCII = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def clean_text(text: str) -> str:
    """CLIP's full cleaning: `basic_clean`, `whitespace_clean`, then lower case."""
    if PLAIN_ASCII.fullmatch(text) is None:
        text = basic_clean(text)
    return whitespace_clean(text).lower()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the BPE base alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def read_merges() -> list[tuple[str, str]]:
    """The merge rules shipped with the package, in priority order (the file's first line is a header)."""
    # The file holds 262k merges; CLIP uses only the first, so reading stops there.
    path = resources.files("duomo.data").joinpath("assets", VOCAB_FILE)
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [tuple(line.split()) for line in itertools.islice(lines, 1, NUM_MERGES + 1)]


@lru_cache(maxsize=1)
def build_bpe_tokenizer() -> Tokenizer:
    """The `tokenizers` pipeline: CLIP split -> byte-level -> BPE with '</w>' word ends; built once."""
    merges = read_merges()
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            # The split above replaces GPT-2's; only the byte -> character mapping is wanted here.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    tokenizer.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
    return tokenizer


@lru_cache(maxsize=1)
def special_split() -> pre_tokenizers.Split:
    """OpenCLIP's whole pattern, which tries the special tokens first at every position."""
    return pre_tokenizers.Split(
        Regex(f"{SOT_TOKEN}|{EOT_TOKEN}|{SPLIT_PATTERN}"), behavior="removed", invert=True
    )


def not_text_error(bad: object) -> InputError:
    """The error for something handed to the tokenizer that is not a string."""
    return InputError(
        f"the tokenizer takes a string or a list of strings, got {type(bad).__name__} {bad!r:.60}; "
        "convert captions to str first (bytes: .decode('utf-8'))"
    )


def as_text_list(texts: object) -> list[str]:
    """One string or a list/tuple of strings as a list; anything else raises InputError."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise not_text_error(texts)
    for text in texts:
        if not isinstance(text, str):
            raise not_text_error(text)
    return list(texts)


def check_context_length(context_length: object) -> int:
    """A padded length must be an int with room for <start_of_text> and <end_of_text>."""
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise InputError(f"context_length must be an int >= 2 (start + end token), got {context_length!r}")
    return context_length


class CLIPTokenizer:
    """CLIP's lower-cased byte-level BPE: texts -> [N, context_length] ids, <sot> ... <eot> 0 0 ..."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        """Use the shipped vocabulary (built once per process); `context_length` is the default length."""
        self.tokenizer = build_bpe_tokenizer()
        self.vocab_size: int = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.context_length: int = check_context_length(context_length)
        self.sot_token_id: int = self.tokenizer.token_to_id(SOT_TOKEN)
        self.eot_token_id: int = self.tokenizer.token_to_id(EOT_TOKEN)

    pad_token_id = 0

    @property
    def bos_token_id(self) -> int:
        """<start_of_text>, under the name every duomo tokenizer gives its start id."""
        return self.sot_token_id

    @property
    def eos_token_id(self) -> int:
        """<end_of_text>."""
        return self.eot_token_id

    def encode_with_padding(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [N, T], padding mask [N, T], True at padding), trimmed to the longest text."""
        ids = self(texts, context_length)
        eot = (ids == self.eot_token_id).int().argmax(1)
        pad = torch.arange(ids.shape[1]).unsqueeze(0) > eot.unsqueeze(1)
        length = int(eot.max()) + 1
        return ids[:, :length], pad[:, :length]

    def __reduce__(self) -> tuple:
        """Pickle as a call to `get_tokenizer`: data-loader workers rebuild it rather than copy 49k tokens."""
        return get_tokenizer, (self.context_length,)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text after cleaning, without <start_of_text>/<end_of_text>."""
        if not isinstance(text, str):
            raise not_text_error(text)
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """BPE ids of many texts, without start/end tokens; the Rust side runs a batch in parallel."""
        cleaned = [clean_text(t) for t in as_text_list(texts)]
        if len(cleaned) == 1:  # no thread pool for one text, so data-loader workers forked later stay quiet
            ids = [self.tokenizer.encode(cleaned[0], add_special_tokens=False).ids]
        else:
            ids = [e.ids for e in self.tokenizer.encode_batch_fast(cleaned, add_special_tokens=False)]
        for i, text in enumerate(cleaned):
            if SOT_TOKEN in text or EOT_TOKEN in text:
                ids[i] = self.encode_spelled_specials(text)
        return ids

    def encode_spelled_specials(self, text: str) -> list[int]:
        """Ids of cleaned text that spells out a special token, split exactly as OpenCLIP splits it."""
        # OpenCLIP turns a written "<end_of_text>" into the end token, unless a punctuation run before it
        # swallows its "<" ("!<end_of_text>"). `tokenizers` would cut every special out before splitting,
        # so this rare case is split here with OpenCLIP's own pattern and the pieces encoded one by one.
        specials = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}
        ids: list[int] = []
        for piece, _ in special_split().pre_tokenize_str(text):
            if piece in specials:
                ids.append(specials[piece])
            else:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False).ids)
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """Zero-padded [N, context_length] ids; a text too long is cut and still ends with <end_of_text>."""
        context_length = check_context_length(context_length or self.context_length)
        rows = []
        for ids in self.encode_batch(texts):
            ids = ids[: context_length - 2]
            rows.append([self.sot_token_id, *ids, self.eot_token_id] + [0] * (context_length - 2 - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), context_length)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of one sequence of ids: start/end tokens and padding dropped, word ends read as spaces."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise InputError(f"decode takes one sequence (1-D), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:  # what follows the first <end_of_text> is padding
            ids = ids[: ids.index(self.eot_token_id)]
        while ids and ids[-1] == 0:  # also padding: id 0 is "!" without a word end, which never ends a text
            ids.pop()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def get_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH) -> CLIPTokenizer:
    """The shared CLIPTokenizer for this context length."""
    return shared_tokenizer(context_length)


@cache
def shared_tokenizer(context_length: int) -> CLIPTokenizer:
    """One tokenizer per length (a positional key, so get_tokenizer() and get_tokenizer(77) are the same)."""
    return CLIPTokenizer(context_length)
