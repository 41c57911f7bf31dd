"""The shapes world in Chinese: the same scenes and answers, Chinese texts, all in the vocabulary."""

from __future__ import annotations

import pytest
import torch

from duomo.data.shapes import ShapesDataset
from duomo.data.shapes_zh import ANSWERS_ZH, COLOURS_ZH, EVAL_TEMPLATES_ZH, SHAPES_ZH, name_zh
from duomo.errors import InputError


def test_scenes_images_and_labels_are_the_english_ones() -> None:
    en = ShapesDataset("val", 12, image_size=32, max_objects=3)
    zh = ShapesDataset("val", 12, image_size=32, max_objects=3, language="zh")
    for i in range(12):
        a, b = en[i], zh[i]
        assert a["label"] == b["label"] and torch.equal(
            torch.tensor(list(a["image"].getdata())), torch.tensor(list(b["image"].getdata()))
        )
        assert a["text"] == en.scene(i).metadata["caption"] and a["text"] != b["text"]
        main = zh.scene(i).main
        assert COLOURS_ZH[main.colour] in b["text"] and SHAPES_ZH[main.shape] in b["text"]
        assert [ANSWERS_ZH[ans] for _, ans in a["qa"]] == [ans for _, ans in b["qa"]]
        assert all(q.endswith("？") for q, _ in b["qa"])


def test_the_english_stream_does_not_change_with_the_option() -> None:
    plain = ShapesDataset("train", 40, max_objects=2).texts()
    assert ShapesDataset("train", 40, max_objects=2, language="en").texts() == plain
    both = ShapesDataset("train", 40, max_objects=2, language="both").texts()
    chinese = [t for t in both if any("\u4e00" <= ch <= "\u9fff" for ch in t)]
    assert 8 < len(chinese) < 32 and set(both) - set(chinese) <= set(plain)
    with pytest.raises(InputError, match="unknown language"):
        ShapesDataset("train", 4, language="fr")


def test_every_chinese_text_is_in_chinese_clips_vocabulary() -> None:
    pytest.importorskip("cn_clip")
    from duomo.data.tokenizers.wordpiece import BertWordPieceTokenizer, cn_clip_vocab

    tok = BertWordPieceTokenizer(cn_clip_vocab())
    unk = tok.tokenizer.token_to_id("[UNK]")
    ds = ShapesDataset("train", 200, max_objects=5, language="zh")
    texts = ds.texts() + [q for i in range(200) for q, _ in ds.scene(i).metadata["qa"]]
    texts += [t.format(name_zh("red", "star")) for t in EVAL_TEMPLATES_ZH]
    assert not [t for t in texts if unk in tok.encode(t)]


def test_export_in_chinese(tmp_path) -> None:  # noqa: ANN001
    import json

    from duomo.cli import main

    assert (
        main(
            [
                "data",
                "export",
                "shapes",
                str(tmp_path / "zh"),
                "--format",
                "jsonl",
                "--size",
                "3",
                "--language",
                "zh",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "zh" / "manifest.jsonl").read_text().splitlines()]
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in row["caption"]) for row in rows)
