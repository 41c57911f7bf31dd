"""VQA manifests: both row forms, soft scores, answer vocabularies, bad rows skipped and counted, errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from duomo.data.vqa import VQAData, build_answer_vocabulary, read_vqa_manifest, soft_scores
from duomo.errors import InputError


def test_soft_scores_follow_vqav2() -> None:
    assert soft_scores(["red"]) == {"red": 1.0}
    ten = ["2"] * 7 + ["3"] * 2 + ["4"]
    assert soft_scores(ten) == {"2": 1.0, "3": pytest.approx(2 / 3), "4": pytest.approx(1 / 3)}


def test_both_row_forms_csv_and_skips(tmp_path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "question": "what color?", "answers": ["Red", "red", "pink"]},
        {"image": "a.png", "qa": [["what shape?", "square"], ["is it big?", "no"]]},
        {"image": "a.png", "question": "  ", "answer": "x"},
        {"image": "", "question": "q?", "answer": "x"},
        {"image": "a.png", "question": "q?"},
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = VQAData.from_manifest(path)
    assert [r.question for r in data.records] == ["what color?", "what shape?", "is it big?"]
    assert data.records[0].answers == ("red", "red", "pink")
    assert data.skipped.count == 3
    assert build_answer_vocabulary(data.records) == ["no", "pink", "red", "square"]
    assert data[0]["image"].size == (8, 8)
    csv = tmp_path / "q.csv"
    csv.write_text("image,question,answer\na.png,how many?,2|2|3\n")
    assert read_vqa_manifest(csv)[0].answers == ("2", "2", "3")


def test_corrupt_images_are_skipped_when_loaded(tmp_path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"image": "bad.png", "question": "q?", "answer": "a"})
        + "\n"
        + json.dumps({"image": "good.png", "question": "r?", "answer": "b"})
        + "\n"
    )
    data = VQAData.from_manifest(path)
    assert data[0]["question"] == "r?" and data.skipped.count == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("image,caption\na.png,x\n", "needs columns image, question"),
        ('{"image": "a.png"}\n', "no 'question'"),
        ('{"question": "q"}\n', "no 'image'"),
        ('{"image": "a.png", "qa": "oops"}\n', "'qa' must be a list"),
        ('{"image": "a.png", "question": "q", "answers": 3}\n', "answers must be a list"),
        ('{"image": "a.png", "question": "", "answer": "x"}\n', "no usable questions"),
        ("not json\n", "not valid JSON"),
    ],
)
def test_malformed_manifests_name_the_problem(tmp_path, text: str, match: str) -> None:
    path = tmp_path / ("q.csv" if text.startswith("image,") else "q.jsonl")
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_vqa_manifest(path)


def test_missing_manifest_and_vocabulary_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_vqa_manifest(tmp_path / "none.jsonl")
    with pytest.raises(InputError, match="no answer occurs"):
        build_answer_vocabulary(read_vqa_manifest(_one(tmp_path)), min_count=5)


def _one(tmp_path):  # noqa: ANN001, ANN202
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "a"}) + "\n")
    return path
