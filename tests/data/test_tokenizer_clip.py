"""CLIP tokenizer: ids identical to OpenCLIP's SimpleTokenizer, padding/truncation, decode, input errors."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from duomo.data.tokenizers.clip import CLIPTokenizer, clean_text, get_tokenizer
from duomo.errors import InputError

CORPUS = [
    "a photo of a cat.",
    "A Photo Of A CAT",
    "",
    "   ",
    "\t\n \r\n",
    "Don't stop! It's fine, isn't it? They're here; we've won; I'm sure; you'll see; he'd go.",
    "DON'T IT'S THEY'RE",
    "it'ſ the long s",
    "café naïve résumé Ångström Øresund ÇA façade jalapeño",
    "e\u0301 vs é (combining vs precomposed)",
    "Crème brûlée — “curly quotes” ‘single’ … «guillemets»",
    "🐱 cat emoji 👍🏽 thumbs 👨‍👩‍👧 family 🇫🇷 flag",
    "猫の写真 一只猫的照片 고양이 사진",
    "Фото кошки, φωτογραφία γάτας, صورة قطة, תמונה של חתול, बिल्ली की तस्वीर",
    "Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp; double",
    "<b>real tags</b> &nbsp; a&b a & b",
    "multiple     spaces\tand\ttabs\n\nand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2003em",
    "numbers 0 12 345 6789 3.14159 1,000,000 2024-01-31 1st 2nd 3rd ½ ² ٣ ๓",
    "punctuation!!! ??? ... --- ___ *** ### @@@ $$$ %%% ^^^ (()) [[]] {{}} ||| \\\\ // ~~ `` ;; ::",
    "MiXeD CaSe WoRdS and UPPER and lower",
    "mojibake: cafÃ© and â€œquotedâ€\x9d",
    "control\x00chars\x07here\x1b[31m and \x7f del",
    "ﬁne ﬂow ligatures, ｆｕｌｌｗｉｄｔｈ, İstanbul, straße, ǅemal, Ω",
    "ypogegrammeni a\u0345b \u0345! alone",
    "zero\u200bwidth\u200cjoiner\u200dand\ufeffbom",
    "https://example.com/path?q=1&x=2#frag user@example.com #hashtag @mention",
    "a" * 500,
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcano",
    " ".join(["word"] * 200),
    "spelled specials: <start_of_text> x <end_of_text> y !<end_of_text> <END_OF_TEXT>",
]


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    """The shared tokenizer."""
    return get_tokenizer()


def test_vocabulary_and_special_ids(tok: CLIPTokenizer) -> None:
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok.context_length == 77
    assert get_tokenizer() is tok


def test_pickles_as_a_reference_to_the_shared_tokenizer(tok: CLIPTokenizer) -> None:
    blob = pickle.dumps(get_tokenizer(16))
    assert len(blob) < 200
    assert pickle.loads(blob) is get_tokenizer(16)
    assert pickle.loads(pickle.dumps(tok)) is tok


def test_known_ids_without_open_clip(tok: CLIPTokenizer) -> None:
    assert tok.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tok.encode("A  PHOTO\tof a Cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tok.encode("Tom &amp; Jerry") == tok.encode("tom & jerry")
    assert tok.encode("") == []


def test_batch_shape_padding_and_dtype(tok: CLIPTokenizer) -> None:
    out = tok(["a photo of a cat.", "a dog", ""])
    assert out.shape == (3, 77) and out.dtype == torch.long
    assert out[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert out[0, 8:].eq(0).all()
    assert out[2, :2].tolist() == [49406, 49407] and out[2, 2:].eq(0).all()
    assert tok("one text").shape == (1, 77)
    assert tok(("a", "b")).shape == (2, 77)
    assert tok([]).shape == (0, 77)
    assert tok(["a dog"], context_length=16).shape == (1, 16)
    assert CLIPTokenizer(context_length=32)("a dog").shape == (1, 32)


def test_truncation_keeps_end_token(tok: CLIPTokenizer) -> None:
    long = " ".join(["word"] * 200)
    out = tok([long, "short"], context_length=10)
    assert out[0].tolist() == [49406] + tok.encode(long)[:8] + [49407]
    assert out[1, -1] == 0
    assert tok(long)[0, -1] == 49407
    assert tok(long, context_length=2)[0].tolist() == [49406, 49407]


def test_encode_matches_batch(tok: CLIPTokenizer) -> None:
    assert [tok.encode(t) for t in CORPUS] == tok.encode_batch(CORPUS)


def test_decode_round_trip(tok: CLIPTokenizer) -> None:
    text = "a photo of a dog playing on the beach at sunset"
    assert tok.decode(tok(text)[0]) == text
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok("Two Dogs, ONE ball!")[0]) == "two dogs , one ball !"
    for text in ["café crème 🐱 猫", "don't stop, it's 3.14!", "Tom &amp; Jerry", "a" * 40]:
        ids = tok.encode(text)
        assert tok.encode(tok.decode(ids)) == ids
    assert tok.decode([49406, 320, 1929, 49407, 0, 0]) == "a dog"
    assert tok.decode(torch.tensor([49406, 49407, 0])) == ""


def test_bad_input_raises_input_error(tok: CLIPTokenizer) -> None:
    for bad in [123, None, b"bytes", ["ok", 5], [None], {"a": 1}]:
        with pytest.raises(InputError, match="string"):
            tok(bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="string"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="context_length"):
        tok("a", context_length=1)
    with pytest.raises(InputError, match="context_length"):
        CLIPTokenizer(context_length=-5)
    with pytest.raises(InputError, match="1-D"):
        tok.decode(tok(["a", "b"]))
    with pytest.raises(InputError, match="49408"):
        tok.decode([320, 50000])


def test_input_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        get_tokenizer()(42)  # type: ignore[arg-type]


# --- parity with OpenCLIP ---


@pytest.fixture(scope="module")
def reference():
    """OpenCLIP's own pure-Python tokenizer."""
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    return open_clip_tokenizer.SimpleTokenizer()


def test_same_vocabulary_and_merges(tok: CLIPTokenizer, reference) -> None:
    from duomo.data.tokenizers.clip import read_merges

    assert tok.tokenizer.get_vocab(with_added_tokens=True) == reference.encoder
    assert read_merges() == list(reference.bpe_ranks)


def test_cleaning_matches(reference) -> None:
    from open_clip.tokenizer import _clean_lower

    assert [clean_text(t) for t in CORPUS] == [_clean_lower(t) for t in CORPUS]


def test_encode_parity_on_corpus(tok: CLIPTokenizer, reference) -> None:
    for text in CORPUS:
        assert tok.encode(text) == reference.encode(text), repr(text)


@pytest.mark.parametrize("context_length", [77, 16, 5, 2])
def test_tokenize_parity_with_truncation(tok: CLIPTokenizer, reference, context_length: int) -> None:
    import open_clip

    texts = CORPUS + [t * 30 for t in CORPUS]
    assert torch.equal(tok(texts, context_length=context_length), open_clip.tokenize(texts, context_length))
    assert torch.equal(tok(texts, context_length=context_length), reference(texts, context_length))


def random_texts(n: int, seed: int) -> list[str]:
    """Random strings of ASCII (controls too), whitespace, entities and scripts all in Unicode <= 14."""
    rng = random.Random(seed)
    ranges = [
        (0x00, 0x7F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF),
        (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE5B), (0x1E00, 0x1EFF), (0x2000, 0x2064), (0x20A0, 0x20C0),
        (0x2100, 0x218B), (0x2460, 0x24FF), (0x3000, 0x303F), (0x3041, 0x30FF), (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3), (0xFF01, 0xFF60), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF),
    ]  # fmt: skip
    pieces = [
        "&amp;",
        "&lt;",
        "&gt;",
        "&#39;",
        "&quot;",
        "'s",
        "'t",
        "'re",
        "'ll",
        "'ſ",
        "\u0345",
        "  ",
        "\n",
        "\t",
    ]

    def piece() -> str:
        if rng.random() < 0.15:
            return rng.choice(pieces)
        lo, hi = rng.choice(ranges)
        return chr(rng.randint(lo, hi))

    return ["".join(piece() for _ in range(rng.randrange(0, 40))) for _ in range(n)]


def test_encode_parity_on_random_text(tok: CLIPTokenizer, reference) -> None:
    texts = random_texts(3000, seed=0)
    for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
        assert ids == reference.encode(text), repr(text)
