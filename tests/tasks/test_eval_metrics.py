"""Metric math against small hand-computed cases: top-k, per-class recall, retrieval R@K."""

import pytest
import torch

from duomo.tasks.clip.evaluate import classification_metrics, mean_per_class_recall, topk_accuracy
from duomo.tasks.clip.probe import few_shot_indices, stratified_split
from duomo.tasks.metrics import image_to_text_ranks, retrieval_metrics, text_to_image_ranks

SCORES = torch.tensor(
    [
        [0.9, 0.05, 0.03, 0.02],  # label 0: rank 1
        [0.1, 0.2, 0.6, 0.1],  # label 1: rank 2
        [0.3, 0.1, 0.2, 0.4],  # label 2: rank 3
        [0.1, 0.2, 0.3, 0.4],  # label 3: rank 1
        [0.5, 0.15, 0.3, 0.05],  # label 3: rank 4
    ]
)
LABELS = torch.tensor([0, 1, 2, 3, 3])


def test_topk_accuracy_by_hand():
    assert topk_accuracy(SCORES, LABELS, 1) == pytest.approx(2 / 5)
    assert topk_accuracy(SCORES, LABELS, 2) == pytest.approx(3 / 5)
    assert topk_accuracy(SCORES, LABELS, 3) == pytest.approx(4 / 5)
    assert topk_accuracy(SCORES, LABELS, 4) == 1.0
    assert topk_accuracy(SCORES, LABELS, 5) == 1.0  # k is capped at the number of classes


def test_mean_per_class_recall_weights_classes_equally():
    predictions = torch.tensor([0, 2, 3, 3, 0])
    # class recalls: 0 -> 1, 1 -> 0, 2 -> 0, 3 -> 1/2; accuracy would be 2/5
    assert mean_per_class_recall(predictions, LABELS) == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    # a class absent from the labels does not count, even when predicted
    assert mean_per_class_recall(torch.tensor([1, 1]), torch.tensor([1, 1])) == 1.0


def test_classification_metrics_bundle():
    metrics = classification_metrics(SCORES, LABELS)
    assert set(metrics) == {"top1", "top5", "mean_per_class_recall"}
    assert metrics["top1"] == pytest.approx(0.4) and metrics["top5"] == 1.0
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)


def test_retrieval_with_several_captions_per_image():
    # 3 images; captions 0,1 -> image 0; caption 2 -> image 1; captions 3,4,5 -> image 2
    text_image = torch.tensor([0, 0, 1, 2, 2, 2])
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.0, 0.2, 0.3],  # image 0: caption 1 ranks first -> i2t rank 0
            [0.8, 0.7, 0.6, 0.1, 0.0, 0.2],  # image 1: its caption 2 ranks third -> rank 2
            [0.9, 0.8, 0.7, 0.4, 0.6, 0.5],  # image 2: best own caption (4, 0.6) is fourth -> rank 3
        ]
    )
    assert image_to_text_ranks(sim, text_image).tolist() == [0, 2, 3]
    # text -> image: each column ranks the 3 images; the rank of its own image
    assert text_to_image_ranks(sim, text_image).tolist() == [2, 0, 1, 0, 0, 0]
    m = retrieval_metrics(sim, text_image, ks=(1, 3))
    assert m["i2t_R@1"] == pytest.approx(1 / 3)
    assert m["i2t_R@3"] == pytest.approx(2 / 3)  # image 2's best caption is 4th: a miss at 3
    assert m["t2i_R@1"] == pytest.approx(4 / 6)
    assert m["t2i_R@3"] == 1.0
    assert m["mean_recall"] == pytest.approx((1 / 3 + 2 / 3 + 4 / 6 + 1) / 4)


def test_retrieval_default_ks_and_ties_in_dataset_order():
    sim = torch.zeros(2, 2)  # every score ties: the earlier item ranks first
    m = retrieval_metrics(sim, [0, 1])
    assert set(m) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"mean_recall"}
    assert m["i2t_R@1"] == 0.5 and m["t2i_R@1"] == 0.5 and m["i2t_R@5"] == 1.0


def test_retrieval_checks_the_caption_mapping():
    with pytest.raises(ValueError, match="caption-to-image"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])


def test_stratified_and_few_shot_splits():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert sorted(kept.tolist() + held.tolist()) == list(range(16))
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 1, 0]  # a singleton class stays in train
    picked = few_shot_indices(labels, 3, seed=0)
    assert [int((labels[picked] == c).sum()) for c in range(3)] == [3, 3, 1]
