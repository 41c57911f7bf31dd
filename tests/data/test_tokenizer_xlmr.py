"""BEiT-3's XLM-R SentencePiece tokenizer: ids identical to transformers' XLMRobertaTokenizer and to unilm's
token path, padding/truncation, decode, errors for missing/corrupt/unconfigured .spm files, task wiring.

A tiny SentencePiece model is trained in a temporary folder (unilm's beit3.spm is not shipped).
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch

from duomo.data.tokenizers import build_tokenizer, special_ids
from duomo.data.tokenizers.clip import CLIPTokenizer
from duomo.data.tokenizers.xlmr import (
    BEIT3_SPM_URL,
    SPM_ENV,
    BEiT3Tokenizer,
    resolve_spm_path,
)
from duomo.errors import ConfigError, InputError
from duomo.models.beit3 import get_beit3_config

torch.set_num_threads(1)

WORDS = [
    *["the", "a", "an", "red", "blue", "green", "yellow", "purple", "star", "circle", "square", "triangle"],
    *["is", "are", "on", "left", "right", "of", "what", "color", "shape", "how", "many", "there", "big"],
    *["small", "below", "above", "where", "How", "What", "Red", "Star", "café", "naïve", "wörld", "über"],
    *["2", "3", "10", "42"],
]
SUFFIXES = ["", "", "s", "ed", "ing", "er", "est", "ly"]
PUNCT = ["", "", "", "?", ".", ",", "!"]

CORPUS = [
    "what color is the star?",
    "How many RED circles are there",
    "",
    " ",
    "   leading, trailing   and  inner   spaces  ",
    "tab\tand\nnewline",
    "Héllo wörld — café naïve über",
    "日本語のテキストと中文",
    "emoji 😀👍 mixed",
    "ｆｕｌｌｗｉｄｔｈ\u3000ＡＢＣ",  # NFKC: full-width letters and space
    "ﬁ ligature ℌ ①",
    "non\u00a0breaking\u2003em space",
    "zero\u200bwidth",
    "combining e\u0301 vs é",
    "123 4,567.89 !!!",
    "a <mask> b",
    "a<mask>b and <s>start</s> <pad><unk>",
    "what color is the <mask> ?",
    "left right " * 30,
]
PLAIN = [c for c in CORPUS if "<" not in c]


def train_spm(spm, folder: Path, model_type: str) -> Path:
    """A ~200-piece SentencePiece model (unk 0, <s> 1, </s> 2, as XLM-R's) trained on generated sentences."""
    rng = random.Random(0)
    sentences = [
        " ".join(
            rng.choice(WORDS) + rng.choice(SUFFIXES) + rng.choice(PUNCT) for _ in range(rng.randint(2, 12))
        )
        for _ in range(400)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    prefix = folder / model_type
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(prefix),
        vocab_size=200,
        model_type=model_type,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module", name="spm")
def spm_module():
    """The sentencepiece package; skips the test without it (tests of duomo alone run regardless)."""
    return pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def spm_paths(spm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A unigram model (XLM-R's and, as far as known, beit3.spm's type) and a BPE one."""
    folder = tmp_path_factory.mktemp("spm")
    return {kind: train_spm(spm, folder, kind) for kind in ("unigram", "bpe")}


@pytest.fixture(scope="module")
def tok(spm_paths: dict[str, Path]) -> BEiT3Tokenizer:
    """The tokenizer on the unigram model, 16 tokens by default."""
    return BEiT3Tokenizer(spm_paths["unigram"], context_length=16)


@pytest.fixture(scope="module")
def hf(spm, spm_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """transformers' XLMRobertaTokenizer on the unigram model, as unilm builds it.

    transformers 4 takes the .spm path (a sentencepiece-backed tokenizer). transformers 5 dropped that class:
    `XLMRobertaTokenizer(path)` fails and `XLMRobertaTokenizer(vocab_file=path)` silently builds a 5-token
    vocabulary; `from_pretrained` on a folder with `sentencepiece.bpe.model` converts the model (needs
    protobuf). That conversion reads every model as unigram, so it is compared on the unigram model only.
    """
    transformers = pytest.importorskip("transformers")
    from transformers import XLMRobertaTokenizer

    path = spm_paths["unigram"]
    if int(transformers.__version__.split(".")[0]) < 5:
        ref = XLMRobertaTokenizer(str(path))
    else:
        pytest.importorskip("google.protobuf")
        folder = tmp_path_factory.mktemp("xlmr")
        shutil.copy(path, folder / "sentencepiece.bpe.model")
        ref = XLMRobertaTokenizer.from_pretrained(str(folder))
    processor = spm.SentencePieceProcessor(model_file=str(path))
    assert len(ref) == processor.get_piece_size() + 2  # loaded the model, not a fallback vocabulary
    return ref


def unilm_ids(processor, text: str) -> list[int]:
    """transformers 4's XLMRobertaTokenizer path as unilm calls it: pieces, then `_convert_token_to_id`."""
    fairseq = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    ids = []
    for piece in processor.encode(text, out_type=str):
        if piece in fairseq:
            ids.append(fairseq[piece])
        else:
            spm_id = processor.piece_to_id(piece)
            ids.append(spm_id + 1 if spm_id else 3)
    return ids


# ---- ids ----------------------------------------------------------------------------------------------
def test_special_ids_and_vocabulary_follow_fairseq(tok: BEiT3Tokenizer, spm, spm_paths) -> None:
    pieces = spm.SentencePieceProcessor(model_file=str(spm_paths["unigram"])).get_piece_size()
    assert 100 <= pieces <= 200
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == pieces + 1
    assert tok.vocab_size == pieces + 2


def test_special_ids_match_transformers(tok: BEiT3Tokenizer, hf) -> None:
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.mask_token_id == tok.mask_token_id
    assert len(hf) == tok.vocab_size


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers_tokenize_then_convert(tok: BEiT3Tokenizer, hf, text: str) -> None:
    """unilm's call: `convert_tokens_to_ids(tokenize(text))`, special tokens in the text included."""
    assert tok.encode(text) == hf.convert_tokens_to_ids(hf.tokenize(text))


@pytest.mark.parametrize("context_length", [2, 3, 5, 16, 64])
def test_batch_matches_transformers_padding_and_truncation(tok: BEiT3Tokenizer, hf, context_length) -> None:
    """<s> pieces[:T - 2] </s> <pad>...: transformers' max_length padding + truncation, and unilm's layout."""
    want = hf(CORPUS, padding="max_length", truncation=True, max_length=context_length)["input_ids"]
    assert torch.equal(tok(CORPUS, context_length), torch.tensor(want))


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_encode_matches_unilm_token_path(spm, spm_paths, model_type: str) -> None:
    """Pieces -> ids as transformers 4 does (covers BPE models, which transformers 5 converts differently)."""
    path = spm_paths[model_type]
    tok = BEiT3Tokenizer(path)
    processor = spm.SentencePieceProcessor(model_file=str(path))
    for text in PLAIN:
        assert tok.encode(text) == unilm_ids(processor, text), text


def test_unknown_characters_become_unk(tok: BEiT3Tokenizer) -> None:
    ids = tok.encode("日本語")
    assert 3 in ids
    assert 1 not in tok.encode(" ".join(PLAIN))  # id 1 is padding, or a "<pad>" written in the text


def test_padding_mask_counts_tokens(tok: BEiT3Tokenizer) -> None:
    """A "<pad>" in the text is id 1 (as in transformers) but not padding (as in unilm's mask)."""
    ids, pad = tok.encode_with_padding(["red <pad> star", "red"], 16)
    assert ids[0].tolist().count(1) == 1 and not pad[0].any()
    n = len(tok.encode("red")) + 2
    assert pad[1].tolist() == [False] * n + [True] * (ids.shape[1] - n)
    assert torch.equal(tok.padding_mask(ids)[1], pad[1])


def test_text_is_not_lowercased(tok: BEiT3Tokenizer) -> None:
    assert tok.encode("Red Star") != tok.encode("red star")


def test_call_pads_with_one_and_ends_with_eos(tok: BEiT3Tokenizer) -> None:
    ids = tok(["what color is the star", "", "left right " * 30])
    assert ids.dtype == torch.long and ids.shape == (3, 16)
    assert (ids[:, 0] == 0).all()
    assert ids[1].tolist() == [0, 2] + [1] * 14
    assert ids[2, -1].item() == 2 and 1 not in ids[2].tolist()  # cut to 14 pieces, still ends with </s>
    assert tok("what color", context_length=5).shape == (1, 5)
    assert tok("one text").shape == (1, 16)


def test_encode_with_padding_trims_to_the_longest(tok: BEiT3Tokenizer) -> None:
    texts = ["what color is the star", "a"]
    ids, pad = tok.encode_with_padding(texts, 32)
    full = tok(texts, 32)
    n = len(tok.encode(texts[0])) + 2
    assert ids.shape == pad.shape == (2, n)
    assert torch.equal(ids, full[:, :n])
    assert torch.equal(pad, ids == 1)
    assert pad.dtype == torch.bool and not pad[0].any() and pad[1].sum() == n - len(tok.encode("a")) - 2
    assert torch.equal(tok.padding_mask(full), full == 1)


# ---- decode -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["what color is the star?", "How many Red circles are there", "café naïve"])
def test_decode_round_trip(tok: BEiT3Tokenizer, text: str) -> None:
    ids = tok(text, 64)[0]
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", PLAIN)
def test_decode_matches_transformers(tok: BEiT3Tokenizer, hf, text: str) -> None:
    """Special tokens, <unk> included, dropped as with skip_special_tokens=True."""
    assert tok.decode(tok(text, 256)[0]) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)


def test_decode_joins_pieces_as_sentencepiece(tok: BEiT3Tokenizer, spm, spm_paths) -> None:
    processor = spm.SentencePieceProcessor(model_file=str(spm_paths["unigram"]))
    for text in PLAIN:
        known = [i for i in processor.encode(text) if i != processor.unk_id()]
        assert tok.decode(tok(text, 256)[0]) == processor.decode(known), text


def test_decode_stops_at_eos_and_drops_specials(tok: BEiT3Tokenizer) -> None:
    star = tok.encode("star")
    assert tok.decode([0, *star, tok.mask_token_id, 2, *tok.encode("left"), 1, 1]) == "star"
    assert tok.decode([]) == ""


def test_decode_rejects_bad_ids(tok: BEiT3Tokenizer) -> None:
    with pytest.raises(InputError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(InputError, match="lie in"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(InputError, match="lie in"):
        tok.decode([-1])


# ---- inputs, pickling ---------------------------------------------------------------------------------
def test_non_text_input_raises_input_error(tok: BEiT3Tokenizer) -> None:
    with pytest.raises(InputError, match="string"):
        tok(42)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="string"):
        tok(["fine", b"bytes"])  # type: ignore[list-item]
    with pytest.raises(InputError, match="context_length"):
        tok("x", context_length=1)


def test_pickles_by_path(tok: BEiT3Tokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.spm_path == tok.spm_path and clone.context_length == tok.context_length
    assert torch.equal(clone(CORPUS), tok(CORPUS))


# ---- missing, corrupt, unconfigured files ------------------------------------------------------------
@pytest.mark.usefixtures("spm")  # without sentencepiece, loading fails before the file is looked at
def test_missing_file_names_the_path_and_the_download(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "beit3.spm"
    with pytest.raises(ConfigError, match="no SentencePiece model") as err:
        BEiT3Tokenizer(path)
    assert str(path) in str(err.value) and BEIT3_SPM_URL in str(err.value) and SPM_ENV in str(err.value)


@pytest.mark.usefixtures("spm")  # without sentencepiece, loading fails before the file is looked at
@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model\n", bytes(range(256)) * 4])
def test_corrupt_file_names_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "beit3.spm"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="is not a SentencePiece model") as err:
        BEiT3Tokenizer(path)
    assert str(path) in str(err.value) and BEIT3_SPM_URL in str(err.value)


@pytest.mark.usefixtures("spm")  # without sentencepiece, loading fails before the file is looked at
def test_a_folder_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        BEiT3Tokenizer(tmp_path)


def test_no_path_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SPM_ENV, raising=False)
    with pytest.raises(ConfigError, match="beit3.spm") as err:
        resolve_spm_path()
    assert SPM_ENV in str(err.value) and BEIT3_SPM_URL in str(err.value)
    cfg = dataclasses.replace(get_beit3_config("beit3-micro"), tokenizer="beit3-spm")
    with pytest.raises(ConfigError, match=SPM_ENV):
        build_tokenizer(cfg)


def test_argument_beats_environment(monkeypatch: pytest.MonkeyPatch, spm_paths, tmp_path: Path) -> None:
    monkeypatch.setenv(SPM_ENV, str(spm_paths["bpe"]))
    assert resolve_spm_path() == spm_paths["bpe"]
    assert resolve_spm_path(spm_paths["unigram"]) == spm_paths["unigram"]
    monkeypatch.setenv(SPM_ENV, str(tmp_path / "missing.spm"))
    with pytest.raises(ConfigError, match="missing.spm"):
        build_tokenizer(dataclasses.replace(get_beit3_config("beit3-micro"), tokenizer="beit3-spm"))


# ---- choosing the tokenizer of a BEiT-3 config -------------------------------------------------------
def spm_config(vocab_size: int = 256):
    """beit3-micro with the SentencePiece tokenizer and room for the test vocabulary."""
    return dataclasses.replace(get_beit3_config("beit3-micro"), tokenizer="beit3-spm", vocab_size=vocab_size)


def test_clip_configs_keep_clip_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    from duomo.data.tokenizers.clip import get_tokenizer

    monkeypatch.delenv(SPM_ENV, raising=False)
    cfg = get_beit3_config("beit3-micro")
    assert cfg.tokenizer == "clip"
    tok = build_tokenizer(cfg, spm_path="/ignored/for/clip.spm")
    assert isinstance(tok, CLIPTokenizer)
    texts = ["what color is the star?", "a"]
    ids, pad = tok.encode_with_padding(texts, 32)
    clip = get_tokenizer(32)(texts)
    assert torch.equal(ids, clip[:, : ids.shape[1]]) and ids.shape[1] == 8  # trimmed after the longest <eot>
    assert pad.tolist()[1] == [False, False, False] + [True] * 5 and not pad[0].any()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == special_ids(cfg) == (49406, 49407, 0)


def test_spm_configs_use_the_file(monkeypatch: pytest.MonkeyPatch, spm_paths) -> None:
    monkeypatch.setenv(SPM_ENV, str(spm_paths["unigram"]))
    tok = build_tokenizer(spm_config())
    assert isinstance(tok, BEiT3Tokenizer) and tok.spm_path == spm_paths["unigram"]
    assert build_tokenizer(spm_config()) is tok  # loaded once
    assert build_tokenizer(spm_config(), spm_path=spm_paths["bpe"]).spm_path == spm_paths["bpe"]
    assert special_ids(spm_config()) == (0, 2, 1)


def test_default_beit3_config_uses_spm() -> None:
    from duomo.models.beit3 import BEiT3Config

    assert BEiT3Config().tokenizer == "beit3-spm"
    assert special_ids(BEiT3Config()) == (0, 2, 1)


def test_vocabulary_must_fit_the_model(spm_paths) -> None:
    with pytest.raises(ConfigError, match="vocab_size is 50"):
        build_tokenizer(spm_config(50), spm_path=spm_paths["unigram"])


def test_unknown_tokenizer_name() -> None:
    cfg = dataclasses.replace(get_beit3_config("beit3-micro"), tokenizer="gpt2")
    with pytest.raises(ConfigError, match="unknown tokenizer 'gpt2'"):
        build_tokenizer(cfg)
    with pytest.raises(ConfigError, match="tokenizer 'gpt2' has no start/end ids"):
        special_ids(cfg)


# ---- tasks: VQA and captioning route through the config's tokenizer ---------------------------------
ANSWERS = ["red", "blue", "star", "yes", "no"]


def test_vqa_questions_use_the_config_tokenizer(monkeypatch: pytest.MonkeyPatch, spm_paths) -> None:
    from PIL import Image

    from duomo.models.beit3 import BEiT3, VQAModel
    from duomo.tasks.beit3.vqa import answer

    monkeypatch.delenv(SPM_ENV, raising=False)
    path = spm_paths["unigram"]
    ids, pad = build_tokenizer(spm_config(), spm_path=path).encode_with_padding(
        ["What color is the star?"], 32
    )
    want = BEiT3Tokenizer(path)("What color is the star?", 32)
    assert torch.equal(ids[0], want[0, : ids.shape[1]]) and not pad.any()
    torch.manual_seed(0)
    model = VQAModel(BEiT3(spm_config()), ANSWERS)
    image = Image.new("RGB", (32, 32), "red")
    text, prob = answer(model, image, "what color is the star?", spm_path=path)
    assert text in ANSWERS and 0.0 <= prob <= 1.0
    text, prob = answer(
        model, image, "星星是什么颜色的？", spm_path=path
    )  # Chinese: XLM-R ids (or <unk>), no error
    assert text in ANSWERS and 0.0 <= prob <= 1.0
    with pytest.raises(ConfigError, match=SPM_ENV):
        answer(model, image, "what color is the star?")


def test_caption_model_and_decoding_use_the_config_tokenizer(
    monkeypatch: pytest.MonkeyPatch, spm_paths
) -> None:
    from duomo.models.beit3 import BEiT3, BEiT3ForCaptioning
    from duomo.tasks.beit3.caption import generate

    monkeypatch.delenv(SPM_ENV, raising=False)
    torch.manual_seed(0)
    model = BEiT3ForCaptioning(BEiT3(spm_config()), *special_ids(spm_config())[:2]).eval()
    assert (model.sot_id, model.eot_id) == (0, 2)
    images = torch.zeros(1, 3, 32, 32)
    [caption] = generate(model, images, max_len=3, spm_path=spm_paths["unigram"])
    assert isinstance(caption, str)
    with pytest.raises(ConfigError, match=SPM_ENV):
        generate(model, images, max_len=3)


def test_task_tables_tokenize_per_config(monkeypatch: pytest.MonkeyPatch, spm_paths) -> None:
    """CLIP configs give CLIP's ids exactly; SentencePiece ones BEiT3Tokenizer's."""
    from duomo.data.tokenizers.clip import get_tokenizer
    from duomo.tasks.beit3.data import (
        caption_source,
        caption_table,
        caption_vocabulary,
        vqa_source,
        vqa_table,
    )

    monkeypatch.delenv(SPM_ENV, raising=False)
    clip_cfg = get_beit3_config("beit3-micro")
    vqa = vqa_table(vqa_source("shapes", clip_cfg, 2), clip_cfg)
    clip_ids = get_tokenizer(32)(vqa.texts)
    n = vqa.columns["tokens"].shape[1]
    assert torch.equal(vqa.columns["tokens"], clip_ids[:, :n])
    caps = caption_table(caption_source("shapes", clip_cfg, 2), clip_cfg)
    assert 49406 not in caption_vocabulary(caps, 49406) and 49407 in caption_vocabulary(caps, 49406)

    path = spm_paths["unigram"]
    vqa = vqa_table(vqa_source("shapes", spm_config(), 2), spm_config(), spm_path=path)
    ids, pad = BEiT3Tokenizer(path).encode_with_padding(vqa.texts, 32)
    assert torch.equal(vqa.columns["tokens"][:, : ids.shape[1]], ids)
    assert torch.equal(vqa.columns["padding_mask"][:, : pad.shape[1]], pad)
    caps = caption_table(caption_source("shapes", spm_config(), 2), spm_config(), path)
    assert 0 not in caption_vocabulary(caps, 0) and 2 in caption_vocabulary(caps, 0)
    with pytest.raises(ConfigError, match=SPM_ENV):
        vqa_table(vqa_source("shapes", spm_config(), 2), spm_config())
