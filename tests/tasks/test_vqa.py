"""VQA on shapes: answer vocabulary, a tiny fine-tune beating the majority answer, save/load, CLI."""

from __future__ import annotations

import pytest
import torch

from duomo.cli import main
from duomo.data.shapes import ShapesDataset
from duomo.errors import CheckpointError, InputError
from duomo.models.beit3 import BEiT3, get_beit3_config
from duomo.tasks.caption import BEiT3ForCaptioning, save_caption
from duomo.tasks.vqa import (
    ShapesVQA,
    VQAModel,
    VQAObjective,
    answer,
    best_answer,
    evaluate_vqa,
    finetune_vqa,
    load_vqa,
    question_type,
    save_vqa,
    shapes_answers,
)

torch.set_num_threads(1)
CFG = get_beit3_config("beit3-micro")


def tiny() -> VQAModel:
    """A 2-layer VQA model over the shapes answers."""
    torch.manual_seed(0)
    return VQAModel(BEiT3(CFG), shapes_answers())


def test_answer_vocabulary_covers_every_split() -> None:
    answers = set(shapes_answers())
    assert len(answers) == len(shapes_answers())
    for split in ("train", "val", "heldout"):
        ds = ShapesDataset(split, size=40, max_objects=5, image_size=16)
        for i in range(len(ds)):
            for q, a in ds.scene(i).metadata["qa"]:
                assert a in answers, (q, a)
                assert question_type(q) in {"colour", "shape", "count", "position", "size", "exists"}


def test_loss_is_unilm_bce_times_answers() -> None:
    model = tiny()
    data = ShapesVQA("train", 4, CFG, model.answers, max_objects=1)
    batch = data.batch(torch.arange(6))
    out = VQAObjective()(model, batch)
    logits = model(batch["pixels"], batch["tokens"], batch["padding_mask"])
    scores = torch.nn.functional.one_hot(batch["target"], len(model.answers)).float()
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, scores) * len(model.answers)
    assert float(out["loss"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_ce_loss_is_softmax_cross_entropy_and_unknown_losses_are_refused() -> None:
    model = tiny()
    batch = ShapesVQA("train", 4, CFG, model.answers, max_objects=1).batch(torch.arange(6))
    out = VQAObjective("ce")(model, batch)
    logits = model(batch["pixels"], batch["tokens"], batch["padding_mask"])
    want = torch.nn.functional.cross_entropy(logits, batch["target"])
    assert float(out["loss"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    with pytest.raises(InputError, match="unknown VQA loss"):
        VQAObjective("mse")


def test_tiny_finetune_beats_majority_answer() -> None:
    model = tiny()
    data = ShapesVQA("train", 60, CFG, model.answers, max_objects=1)
    # from scratch the model first collapses to the majority answer, then learns question priors (~300 steps)
    finetune_vqa(model, data, steps=300, batch_size=16, lr=2e-3)
    result = evaluate_vqa(model, data)
    assert result["accuracy"] > result["majority_baseline"] + 0.05, result


def test_save_load_answer(tmp_path) -> None:
    model = tiny().eval()
    save_vqa(model, tmp_path / "vqa")
    again = load_vqa(tmp_path / "vqa")
    assert again.answers == model.answers
    image = ShapesDataset("val", 2, image_size=32)[0]["image"]
    a1, p1 = answer(model, image, "what color is the star?")
    a2, p2 = answer(again, image, "what color is the star?")
    assert a1 == a2 and a1 in model.answers and p1 == pytest.approx(p2) and 0.0 <= p1 <= 1.0


def test_a_ce_trained_model_reports_softmax_probabilities_and_keeps_its_loss(tmp_path) -> None:
    model = tiny()
    data = ShapesVQA("train", 4, CFG, model.answers, max_objects=1)
    finetune_vqa(model, data, steps=1, batch_size=4, loss="ce")
    assert model.loss == "ce"
    save_vqa(model, tmp_path / "vqa")
    again = load_vqa(tmp_path / "vqa")
    assert again.loss == "ce"
    b = data.batch(torch.arange(1))
    label, p = best_answer(again, b["pixels"], b["tokens"], b["padding_mask"])
    with torch.no_grad():
        logits = again(b["pixels"], b["tokens"], b["padding_mask"])[0]
    assert label == again.answers[int(logits.argmax())]
    assert p == pytest.approx(float(torch.softmax(logits, -1).max()), rel=1e-5)
    with pytest.raises(InputError, match="unknown VQA loss"):
        finetune_vqa(model, data, steps=1, loss="hinge")


def test_load_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no model folder"):
        load_vqa(tmp_path / "nothing")
    torch.manual_seed(0)
    save_caption(BEiT3ForCaptioning(BEiT3(CFG)), tmp_path / "cap")
    with pytest.raises(CheckpointError, match="not a 'vqa' model"):
        load_vqa(tmp_path / "cap")


def test_cli_ask_and_caption(tmp_path, capsys) -> None:
    from duomo.cli import app
    from duomo.cli.beit3 import register

    if "ask" not in {c.name for c in app.registered_commands}:  # until duomo.cli lists duomo.cli.beit3
        register(app)
    save_vqa(tiny(), tmp_path / "vqa")
    torch.manual_seed(0)
    save_caption(BEiT3ForCaptioning(BEiT3(CFG)), tmp_path / "cap")
    image = tmp_path / "img.png"
    ShapesDataset("val", 1, image_size=32)[0]["image"].save(image)

    assert main(["ask", str(image), "what shape is on the left?", "--model", str(tmp_path / "vqa")]) == 0
    text, prob = capsys.readouterr().out.strip().split("\t")
    assert text in shapes_answers() and 0 <= float(prob) <= 1
    assert (
        main(["caption", str(image), "--model", str(tmp_path / "cap"), "--beam", "2", "--max-len", "3"]) == 0
    )
    capsys.readouterr()

    assert main(["ask", str(tmp_path / "missing.png"), "q?", "--model", str(tmp_path / "vqa")]) == 1
    assert "no such image file" in capsys.readouterr().err
    assert main(["ask", str(image), "q?", "--model", str(tmp_path / "cap")]) == 1
    assert "not a 'vqa' model" in capsys.readouterr().err
    assert main(["caption", str(image), "--model", str(tmp_path / "vqa")]) == 1
    assert "not a 'caption' model" in capsys.readouterr().err
    assert main(["ask", str(image), "q?", "--model", str(tmp_path / "none")]) == 1
    assert "no model folder" in capsys.readouterr().err
