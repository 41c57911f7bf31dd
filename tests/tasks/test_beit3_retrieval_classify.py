"""BEiT-3 retrieval (dual encoder, contrastive) and image classification: unilm's head layout, learning,
save/load, the CLI and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from duomo.cli import main
from duomo.errors import CheckpointError, InputError
from duomo.models.beit3 import BEiT3, BEiT3ForImageClassification, BEiT3ForRetrieval, get_beit3_config
from duomo.tasks import beit3_classify as classify
from duomo.tasks import beit3_retrieval as retrieval
from duomo.tasks.caption import ShapesCaptions

torch.set_num_threads(1)
CFG = get_beit3_config("beit3-micro")


def test_classification_head_has_unilms_names_and_pools_patches() -> None:
    torch.manual_seed(0)
    model = BEiT3ForImageClassification(BEiT3(CFG), num_classes=5).eval()
    heads = {k for k in model.state_dict() if not k.startswith("beit3.")}
    assert heads == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert float(model.head.weight.detach().abs().max()) <= 0.02 * 0.001 + 1e-9  # unilm's init_scale
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.beit3(images=images)
        torch.testing.assert_close(model(images), model.head(model.fc_norm(x[:, 1:].mean(1))))


def test_contrastive_finetuning_learns_to_match_images_and_captions() -> None:
    torch.manual_seed(0)
    model = BEiT3ForRetrieval(BEiT3(CFG))
    train = ShapesCaptions("train", 64, CFG, seed=0)
    records = retrieval.finetune_retrieval(model, train, steps=60, batch_size=16, lr=2e-3)
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < first - 0.3, (first, last)
    scores = retrieval.evaluate_retrieval(model, ShapesCaptions("val", 16, CFG, seed=1))
    assert set(scores) >= {"i2t_R@1", "t2i_R@1", "mean_recall"} and 0 <= scores["mean_recall"] <= 1


def test_classifier_beats_the_majority_class_on_colour() -> None:
    torch.manual_seed(0)
    model = classify.ClassifyModel(BEiT3(CFG), "colour")
    train = classify.ShapesClassification("train", 512, CFG, "colour", seed=0)
    records = classify.finetune_classify(model, train, steps=300, batch_size=32, lr=3e-3)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    scores = classify.evaluate_classify(
        model, classify.ShapesClassification("val", 128, CFG, "colour", seed=1)
    )
    assert scores["accuracy"] > scores["majority_baseline"] + 0.1, scores  # 0.34 vs 0.20 measured


def test_save_load_roundtrips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = classify.ClassifyModel(BEiT3(CFG), "shape")
    again = classify.load_classify(classify.save_classify(clf, tmp_path / "clf"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(images), clf.eval()(images))
    assert again.classes == clf.classes and again.label == "shape"
    name, prob = classify.classify_image(again, Image.new("RGB", (40, 40), "red"))
    assert name in clf.classes and 0 < prob <= 1
    ret = BEiT3ForRetrieval(BEiT3(CFG))
    back = retrieval.load_retrieval(retrieval.save_retrieval(ret, tmp_path / "ret"))
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(images), ret.eval().encode_image(images))
    with pytest.raises(CheckpointError, match="not a 'retrieval' model"):
        retrieval.load_retrieval(tmp_path / "clf")


def test_label_errors() -> None:
    with pytest.raises(InputError, match="unknown label"):
        classify.label_names("size-ish")
    with pytest.raises(InputError, match="use val"):
        classify.ShapesClassification("heldout", 4, CFG, "pair")


@pytest.mark.parametrize("task", ["retrieval", "classify"])
def test_cli_trains_saves_and_evaluates(
    task: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / task
    args = [
        "beit3-train",
        task,
        "--config",
        "beit3-micro",
        "--steps",
        "2",
        "--size",
        "16",
        "--batch-size",
        "4",
    ]
    assert main([*args, "--eval-size", "8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["split"] for r in rows] == ["val", "heldout"] and all(r["task"] == task for r in rows)
    assert (out / "model.safetensors").is_file()
    if task == "classify":
        assert main([*args, "--label", "nope", "--out", str(tmp_path / "bad")]) == 1
        assert "unknown label" in capsys.readouterr().err and not (tmp_path / "bad").exists()
