"""BEiT-3 retrieval (dual encoder, contrastive) and image classification: unilm's head layout, learning,
save/load, the CLI and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from duomo.cli import main
from duomo.data.shapes import COLOURS, SHAPES
from duomo.errors import CheckpointError, InputError
from duomo.io.beit3_tasks import load_task, save_task
from duomo.models.beit3 import (
    BEiT3,
    BEiT3ForImageClassification,
    BEiT3ForRetrieval,
    ClassifyModel,
    get_beit3_config,
)
from duomo.tasks.beit3.classify import classify_image, evaluate_classify
from duomo.tasks.beit3.data import caption_source, caption_table, classify_source, classify_table
from duomo.tasks.beit3.retrieval import evaluate_retrieval
from duomo.tasks.beit3.train import beit3_train_config, fit_task
from duomo.train.objectives.beit3 import RetrievalObjective, classify_objective

torch.set_num_threads(1)
CFG = get_beit3_config("beit3-micro")


def train_config(out: Path, steps: int, batch_size: int, lr: float):  # noqa: ANN201
    """The one trainer's config for a short in-process run, a metrics line every step."""
    return beit3_train_config(
        out=str(out),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        log_every=1,
        save_every=steps,
        workers=0,
        quiet=True,
        plot=False,
    )


def losses(out: Path) -> list[float]:
    """The per-step training losses a run logged."""
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


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


def test_contrastive_finetuning_learns_to_match_images_and_captions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BEiT3ForRetrieval(BEiT3(CFG))
    train = caption_table(caption_source("shapes", CFG, 64, seed=0), CFG)
    result = fit_task(
        model, RetrievalObjective(), train, train_config(tmp_path / "ret", 60, 16, 2e-3), "retrieval"
    )
    records = losses(tmp_path / "ret")
    assert len(records) == 60
    first = sum(records[:5]) / 5
    last = sum(records[-5:]) / 5
    assert last < first - 0.3, (first, last)
    scores = evaluate_retrieval(model, caption_table(caption_source("shapes:val", CFG, 16, seed=1), CFG))
    assert set(scores) >= {"i2t_R@1", "t2i_R@1", "mean_recall"} and 0 <= scores["mean_recall"] <= 1
    assert load_task(result["model"], "retrieval")[1]["task"] == "retrieval"


@pytest.mark.slow  # 300 training steps: ~3-4 s on one CPU thread
def test_classifier_beats_the_majority_class_on_colour(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source, classes = classify_source("shapes", CFG, "colour", 512, seed=0)
    assert classes == list(COLOURS)
    model = ClassifyModel(BEiT3(CFG), classes, "colour")
    fit_task(
        model,
        classify_objective,
        classify_table(source, CFG),
        train_config(tmp_path / "clf", 300, 32, 3e-3),
        "classify",
    )
    records = losses(tmp_path / "clf")
    assert records[-1] < records[0] - 0.5
    val, _ = classify_source("shapes:val", CFG, "colour", 128, seed=1)
    scores = evaluate_classify(model, classify_table(val, CFG))
    assert scores["accuracy"] > scores["majority_baseline"] + 0.1, scores  # 0.34 vs 0.20 measured


def test_save_load_roundtrips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clf = ClassifyModel(BEiT3(CFG), list(SHAPES), "shape")
    again, config = load_task(save_task(clf, tmp_path / "clf", "classify"))
    assert config["task"] == "classify"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(images), clf.eval()(images))
    assert again.classes == clf.classes and again.label == "shape"
    [(name, prob)] = classify_image(again, Image.new("RGB", (40, 40), "red"))
    assert name in clf.classes and 0 < prob <= 1
    ranked = classify_image(again, Image.new("RGB", (40, 40), "red"), top_k=3)
    assert len(ranked) == 3 and ranked[0] == (name, pytest.approx(prob))
    assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
    ret = BEiT3ForRetrieval(BEiT3(CFG))
    back, _ = load_task(save_task(ret, tmp_path / "ret", "retrieval"), "retrieval")
    with torch.no_grad():
        torch.testing.assert_close(back.encode_image(images), ret.eval().encode_image(images))
    with pytest.raises(CheckpointError, match="not a 'retrieval' model"):
        load_task(tmp_path / "clf", "retrieval")


def test_label_errors() -> None:
    with pytest.raises(InputError, match="unknown label"):
        classify_source("shapes", CFG, "size-ish", 4)
    with pytest.raises(InputError, match="use val"):
        classify_source("shapes:heldout", CFG, "pair", 4)


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
