"""Hard negative captions (NegCLIP swaps) and the seen-word-pair restriction that keeps them honest."""

from __future__ import annotations

import random

from duomo.data.shapes import ShapesDataset, heldout_pairs
from duomo.train.data import caption_bigrams, hard_negatives, swap_negative
from duomo.train.run import negative_vocabulary


def test_swap_replaces_one_attribute_with_another_of_its_group():
    rng = random.Random(0)
    for _ in range(50):
        neg = swap_negative("a small red star", rng)
        assert neg != "a small red star"
        changed = [(a, b) for a, b in zip(["a", "small", "red", "star"], neg.split(), strict=True) if a != b]
        assert len(changed) == 1


def test_without_attribute_words_the_words_are_reordered():
    neg = swap_negative("dog bites man", random.Random(1))
    assert sorted(neg.split()) == ["bites", "dog", "man"] and neg != "dog bites man"
    assert swap_negative("hello", random.Random(0)) == "not hello"


def test_caption_bigrams_mark_start_and_end():
    pairs = caption_bigrams(["A red star.", "a blue circle"])
    assert {("^", "a"), ("a", "red"), ("red", "star"), ("star", "$"), ("blue", "circle")} <= pairs
    assert ("red", "circle") not in pairs


def test_seen_pairs_restrict_swaps_to_combinations_with_a_positive():
    seen = caption_bigrams(["a red star", "a blue star", "a red circle"])
    negs = {swap_negative("a red star", random.Random(i), seen=seen) for i in range(100)}
    assert negs == {"a blue star", "a red circle"}  # "a blue circle" etc. never appear: no caption has them


def test_given_negatives_are_cycled_before_any_are_generated():
    sample = {"text": "a red star", "negatives": ["x", "y"]}
    assert hard_negatives(sample, 3, random.Random(0)) == ["x", "y", "x"]


def test_shapes_negatives_never_name_a_held_out_combination():
    data = ShapesDataset("train", size=2000)
    seen = negative_vocabulary(data)
    assert seen is not None
    held = {f"{c} {s}" for c, s in heldout_pairs()}
    rng = random.Random(0)
    for text in data.texts()[:300]:
        for neg in hard_negatives({"text": text}, 3, rng, seen):
            assert not any(h in neg for h in held), (text, neg)


def test_streams_without_texts_are_not_restricted():
    class Stream:
        pass

    assert negative_vocabulary(Stream()) is None


def test_folder_pairs_list_their_captions_and_skip_unreadable_ones(tmp_path):
    from PIL import Image

    from duomo.data.pairs import FolderPairs

    for name, caption in [("a", "a red star"), ("b", "a blue circle")]:
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    data = FolderPairs(tmp_path)
    (tmp_path / "b.txt").unlink()
    assert data.texts() == ["a red star"]
