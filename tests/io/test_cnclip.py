"""Chinese-CLIP: cn_clip checkpoints load with exact embeddings; the tokenizer gives cn_clip's ids."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import duomo
from duomo.data.tokenizers import build_tokenizer
from duomo.io.cnclip import cnclip_config, cnclip_to_duomo, is_cnclip
from tests.io.reference_helpers import features, perturb

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cn_clip") is None or importlib.util.find_spec("six") is None,
    reason="cn_clip is not installed (pip install --no-deps cn-clip six)",
)
TEXTS = [
    "一只猫",
    "北京天安门，Tiananmen Square。",
    "a dog 在草地上！😀",
    "ｆｕｌｌ－ｗｉｄｔｈ（全角）",
    "汉字" * 40,
]


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """A tiny cn_clip CLIP with random (non-default) weights."""
    warnings.simplefilter("ignore")
    from cn_clip.clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=32,
        image_resolution=32,
        vision_layers=2,
        vision_width=64,
        vision_patch_size=8,
        vocab_size=21128,
        text_attention_probs_dropout_prob=0.0,
        text_hidden_act="gelu",
        text_hidden_dropout_prob=0.0,
        text_hidden_size=128,
        text_initializer_range=0.02,
        text_intermediate_size=256,
        text_max_position_embeddings=512,
        text_num_attention_heads=2,
        text_num_hidden_layers=2,
        text_type_vocab_size=2,
    ).eval()
    perturb(model)
    return model


def test_ids_equal_cn_clips_tokenize() -> None:
    from cn_clip.clip import tokenize

    cfg = duomo.models.get_model_config("ViT-tiny")  # any config: only its text section's tokenizer is read
    cfg.text.tokenizer, cfg.text.context_length = "bert-wordpiece", 52
    ours = build_tokenizer(cfg.text)(TEXTS)
    assert torch.equal(ours, tokenize(TEXTS, context_length=52))


def test_a_cn_clip_state_dict_loads_with_exact_embeddings(reference: torch.nn.Module, tmp_path: Path) -> None:
    sd = reference.state_dict()
    assert is_cnclip(sd)
    cfg = cnclip_config(sd)
    assert cfg.text.kind == "bert" and cfg.text.pool == "first" and cfg.vision.act == "quick_gelu"
    # as cn_clip saves its checkpoints: a training wrapper with DDP prefixes
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "cn.pt")
    pipe = duomo.load(tmp_path / "cn.pt")
    ids = pipe.tokenizer(TEXTS)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.model.encode_text(ids), reference.encode_text(ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            pipe.model.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-5
        )
    assert pipe.zero_shot_classify(images[:1], ["猫", "狗"])[0][0][0] in ("猫", "狗")
    assert set(cnclip_to_duomo(sd)) == set(pipe.model.state_dict())


def test_ids_equal_transformers_bert_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    from duomo.data.tokenizers.wordpiece import BertWordPieceTokenizer, cn_clip_vocab

    hf = transformers.BertTokenizer(str(cn_clip_vocab()), do_lower_case=True)
    ours = BertWordPieceTokenizer(cn_clip_vocab())
    corpus = [
        *TEXTS,
        "Café naïve résumé",
        "  多个   空格\t和\n换行 ",
        "x" * 250,
        "数字123和4.5%",
        "ｺﾝﾆﾁﾊ",
        "αβγ ΔΕΖ",
    ]
    for text in corpus:
        assert ours.encode(text) == hf.convert_tokens_to_ids(hf.tokenize(text)), text


def test_a_transformers_chinese_clip_directory_loads_with_exact_embeddings(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ChineseCLIPConfig(
        text_config=dict(
            vocab_size=21128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
        ),
        vision_config=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    ref = transformers.ChineseCLIPModel(cfg).eval()
    perturb(ref)
    ref.save_pretrained(tmp_path / "hf")
    pipe = duomo.load(tmp_path / "hf")
    ids = pipe.tokenizer(TEXTS)
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        want_text = features(ref.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()))
        want_image = features(ref.get_image_features(pixel_values=images))
        torch.testing.assert_close(pipe.model.encode_text(ids), want_text, rtol=0, atol=1e-5)
        torch.testing.assert_close(pipe.model.encode_image(images), want_image, rtol=0, atol=1e-5)


def test_export_to_transformers_round_trips(reference: torch.nn.Module, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.save(reference.state_dict(), tmp_path / "cn.pt")
    pipe = duomo.load(tmp_path / "cn.pt")
    pipe.save(tmp_path / "hf", fmt="hf")
    hf = transformers.ChineseCLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    again = duomo.load(tmp_path / "hf")
    ids = pipe.tokenizer(TEXTS)
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        want = pipe.model.encode_text(ids)
        torch.testing.assert_close(again.model.encode_text(ids), want, rtol=0, atol=1e-6)
        got = features(hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        got = features(hf.get_image_features(pixel_values=images))
        torch.testing.assert_close(got, pipe.model.encode_image(images), rtol=0, atol=1e-5)


def test_a_bert_tower_model_saves_in_duomos_format(reference: torch.nn.Module, tmp_path: Path) -> None:
    """A 'bert' tower is not MiniLM's: its encoder is saved with the model, never left to a package."""
    torch.save(reference.state_dict(), tmp_path / "cn.pt")
    pipe = duomo.load(tmp_path / "cn.pt")
    pipe.save(tmp_path / "native")
    again = duomo.load(tmp_path / "native")
    ids = pipe.tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(again.model.encode_text(ids), pipe.model.encode_text(ids), rtol=0, atol=0)


def test_export_to_cn_clip_round_trips(reference: torch.nn.Module, tmp_path: Path) -> None:
    torch.save(reference.state_dict(), tmp_path / "cn.pt")
    pipe = duomo.load(tmp_path / "cn.pt")
    pipe.save(tmp_path / "back.pt", fmt="cnclip")
    saved = torch.load(tmp_path / "back.pt", weights_only=True)["state_dict"]
    assert set(k.removeprefix("module.") for k in saved) == set(reference.state_dict())
    ids = pipe.tokenizer(TEXTS)
    images = torch.randn(2, 3, 32, 32)
    import copy

    other = copy.deepcopy(reference)
    other.load_state_dict({k.removeprefix("module."): v for k, v in saved.items()})
    with torch.no_grad():
        torch.testing.assert_close(other.encode_text(ids), reference.encode_text(ids), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            other.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-6
        )


def test_unmapped_scripts_give_unk_and_a_missing_vocabulary_names_the_package(monkeypatch) -> None:  # noqa: ANN001
    import importlib.util as util

    from duomo.data.tokenizers.wordpiece import BertWordPieceTokenizer, cn_clip_vocab
    from duomo.errors import ConfigError

    tok = BertWordPieceTokenizer(cn_clip_vocab())
    ids = tok(["𒀀𒀁 ꙮ", "🜁🜂"])  # cuneiform, a rare Cyrillic letter, alchemical symbols
    unk = tok.tokenizer.token_to_id("[UNK]")
    assert (ids == unk).any(dim=1).all()  # [UNK]-based, never an error
    monkeypatch.setattr(util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps cn-clip"):
        cn_clip_vocab()
