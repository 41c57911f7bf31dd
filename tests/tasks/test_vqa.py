"""VQA: losses, a tiny fine-tune through the one trainer beating the majority answer, save/load, users'
own VQA manifests end to end, the Python API and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from duomo.cli import main
from duomo.data.shapes import ShapesDataset
from duomo.errors import CheckpointError, InputError
from duomo.io.beit3_tasks import load_task, save_task
from duomo.models.beit3 import BEiT3, BEiT3ForCaptioning, VQAModel, get_beit3_config
from duomo.tasks.beit3.data import vqa_source, vqa_table
from duomo.tasks.beit3.train import beit3_train_config, fit_task
from duomo.tasks.beit3.vqa import answer, best_answer, evaluate_vqa, question_type
from duomo.train.objectives.beit3 import VQAObjective

torch.set_num_threads(1)
CFG = get_beit3_config("beit3-micro")


def table(size: int = 4, answers: list[str] | None = None):  # noqa: ANN201
    return vqa_table(vqa_source("shapes", CFG, size), CFG, answers)


def tiny(answers: list[str]) -> VQAModel:
    """A 2-layer VQA model."""
    torch.manual_seed(0)
    return VQAModel(BEiT3(CFG), answers)


def test_question_kinds_cover_the_shapes_questions() -> None:
    ds = ShapesDataset("train", size=40, max_objects=5, image_size=16)
    for i in range(len(ds)):
        for q, _ in ds.scene(i).metadata["qa"]:
            assert question_type(q) in {"colour", "shape", "count", "position", "size", "exists"}


def test_loss_is_unilm_bce_times_answers() -> None:
    data = table()
    model = tiny(data.extra["answers"])
    batch = data.batch(torch.arange(6))
    out = VQAObjective()(model, batch)
    logits = model(batch["pixels"], batch["tokens"], batch["padding_mask"])
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["scores"]) * logits.shape[-1]
    assert float(out["loss"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_ce_loss_is_softmax_cross_entropy_and_unknown_losses_are_refused() -> None:
    data = table()
    model = tiny(data.extra["answers"])
    batch = data.batch(torch.arange(6))
    out = VQAObjective("ce")(model, batch)
    logits = model(batch["pixels"], batch["tokens"], batch["padding_mask"])
    want = torch.nn.functional.cross_entropy(logits, batch["scores"].argmax(-1))
    assert float(out["loss"].detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    with pytest.raises(InputError, match="unknown VQA loss"):
        VQAObjective("mse")


@pytest.mark.slow
def test_tiny_finetune_beats_majority_answer(tmp_path) -> None:
    data = table(60)
    model = tiny(data.extra["answers"])
    # from scratch the model first collapses to the majority answer, then learns question priors (~300 steps)
    cfg = beit3_train_config(
        out=str(tmp_path / "vqa"), steps=300, batch_size=16, lr=2e-3, save_every=300, quiet=True, plot=False
    )
    result = fit_task(model, VQAObjective("bce"), data, cfg, "vqa")
    scores = evaluate_vqa(model, data)
    assert scores["accuracy"] > scores["majority_baseline"] + 0.05, scores
    again, config = load_task(result["model"], "vqa")
    assert again.answers == model.answers and config["task"] == "vqa"


def test_save_load_answer(tmp_path) -> None:
    data = table()
    model = tiny(data.extra["answers"]).eval()
    save_task(model, tmp_path / "vqa", "vqa")
    again, _ = load_task(tmp_path / "vqa", "vqa")
    assert again.answers == model.answers
    image = ShapesDataset("val", 2, image_size=32)[0]["image"]
    a1, p1 = answer(model, image, "what color is the star?")
    a2, p2 = answer(again, image, "what color is the star?")
    assert a1 == a2 and a1 in model.answers and p1 == pytest.approx(p2) and 0.0 <= p1 <= 1.0
    with pytest.raises(InputError, match="question is empty"):
        answer(model, image, "  ")


def test_a_ce_model_reports_softmax_probabilities_and_keeps_its_loss(tmp_path) -> None:
    data = table()
    model = tiny(data.extra["answers"])
    model.loss = "ce"
    save_task(model, tmp_path / "vqa", "vqa")
    again, _ = load_task(tmp_path / "vqa", "vqa")
    assert again.loss == "ce"
    b = data.batch(torch.arange(1))
    label, p = best_answer(again, b["pixels"], b["tokens"], b["padding_mask"])
    with torch.no_grad():
        logits = again(b["pixels"], b["tokens"], b["padding_mask"])[0]
    assert label == again.answers[int(logits.argmax())]
    assert p == pytest.approx(float(torch.softmax(logits, -1).max()), rel=1e-5)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no model folder"):
        load_task(tmp_path / "nothing", "vqa")
    torch.manual_seed(0)
    save_task(BEiT3ForCaptioning(BEiT3(CFG), 49406, 49407), tmp_path / "cap", "caption")
    with pytest.raises(CheckpointError, match="not a 'vqa' model"):
        load_task(tmp_path / "cap", "vqa")


def write_manifest(root, n_images: int = 12) -> str:  # noqa: ANN001
    """A VQA manifest a user might write: one question per line, soft answers, a corrupt image, a bad row."""
    root.mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset("train", n_images, image_size=32, max_objects=1)
    rows = []
    for i in range(n_images):
        ds[i]["image"].save(root / f"{i}.png")
        main = ds.scene(i).main
        rows.append({"image": f"{i}.png", "question": "what color is it?", "answer": main.colour})
        rows.append(
            {"image": f"{i}.png", "question": "what shape is it?", "answers": [main.shape] * 3 + ["blob"]}
        )
    (root / "broken.png").write_bytes(b"not a png")
    rows.append({"image": "broken.png", "question": "what color is it?", "answer": "red"})
    rows.append({"image": "0.png", "question": "", "answer": "red"})  # empty question: skipped, counted
    path = root / "my_vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_cli_trains_on_a_users_vqa_manifest_and_ask_answers_with_it(tmp_path, capsys) -> None:
    manifest = write_manifest(tmp_path / "data")
    out = tmp_path / "vqa"
    args = [
        "beit3-train",
        "vqa",
        "--data",
        manifest,
        "--config",
        "beit3-micro",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "--eval-data",
        f"train={manifest}",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "skipped 2 bad or unusable rows" in captured.err  # the empty question and the corrupt image
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["split"] == "train" and 0 <= record["accuracy"] <= 1
    assert record["questions"] == 24  # 12 images x 2 questions; the broken image's row is not duplicated
    model, config = load_task(out, "vqa")
    assert "blob" in model.answers and "red" in model.answers  # the vocabulary comes from the data
    assert config["data"] == manifest
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoints").is_dir()
    assert main(args) == 1  # a non-empty --out is refused before any work
    assert "not empty" in capsys.readouterr().err
    assert main(["ask", str(tmp_path / "data" / "3.png"), "what color is it?", "--model", str(out)]) == 0
    text, prob = capsys.readouterr().out.strip().split("\t")
    assert text in model.answers and 0 <= float(prob) <= 1

    import duomo

    pipe = duomo.load(out)
    assert pipe.task == "vqa"
    got = pipe.ask(str(tmp_path / "data" / "3.png"), ["what color is it?", "what shape is it?"])
    assert len(got) == 2 and got[0][0] == text


def test_cli_ask_and_caption(tmp_path, capsys) -> None:
    data = table()
    save_task(tiny(data.extra["answers"]), tmp_path / "vqa", "vqa")
    torch.manual_seed(0)
    save_task(BEiT3ForCaptioning(BEiT3(CFG), 49406, 49407), tmp_path / "cap", "caption")
    image = tmp_path / "img.png"
    ShapesDataset("val", 1, image_size=32)[0]["image"].save(image)

    assert main(["ask", str(image), "what shape is on the left?", "--model", str(tmp_path / "vqa")]) == 0
    text, prob = capsys.readouterr().out.strip().split("\t")
    assert text in data.extra["answers"] and 0 <= float(prob) <= 1
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


def test_the_exported_shapes_manifest_gives_the_built_in_table(tmp_path) -> None:
    out = tmp_path / "vqa"
    args = ["data", "export", "shapes", str(out), "--task", "vqa", "--size", "6", "--max-objects", "2"]
    assert main([*args, "--image-size", str(CFG.image_size)]) == 0
    built_in, exported = table(6), vqa_table(vqa_source(str(out), CFG), CFG)
    assert exported.extra["answers"] == built_in.extra["answers"] and exported.texts == built_in.texts
    torch.testing.assert_close(exported.pixels, built_in.pixels, rtol=0, atol=0)
    for key, value in built_in.columns.items():
        assert torch.equal(exported.columns[key], value), key
    assert torch.equal(exported.image_index, built_in.image_index)


@pytest.mark.slow
def test_caption_and_classify_train_on_users_own_files(tmp_path, capsys) -> None:  # noqa: ANN001
    """Captions from a pair manifest; classes from an ImageFolder tree with a corrupt file in it."""
    ds = ShapesDataset("train", 12, image_size=32, max_objects=1)
    pairs, tree = tmp_path / "pairs", tmp_path / "tree"
    pairs.mkdir()
    lines = ["image,caption"]
    for i in range(12):
        sample = ds[i]
        sample["image"].save(pairs / f"{i}.png")
        lines.append(f"{i}.png,{sample['text']}")
        (tree / sample["label_name"].split()[0]).mkdir(parents=True, exist_ok=True)
        sample["image"].save(tree / sample["label_name"].split()[0] / f"{i}.png")
    (pairs / "captions.csv").write_text("\n".join(lines) + "\n")
    colour = next(p for p in tree.iterdir())
    (colour / "broken.png").write_bytes(b"not a png")
    base = ["--config", "beit3-micro", "--steps", "2", "--batch-size", "4"]
    out = tmp_path / "cap"
    assert (
        main(["beit3-train", "caption", "--data", str(pairs / "captions.csv"), "--out", str(out), *base]) == 0
    )
    model, _ = load_task(out, "caption")
    assert model.vocab is not None and len(model.vocab) > 3
    out = tmp_path / "cls"
    args = ["beit3-train", "classify", "--data", str(tree), "--out", str(out), "--eval-data", f"train={tree}"]
    assert main([*args, *base]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 bad or unusable rows" in captured.err
    record = json.loads(captured.out.strip().splitlines()[-1])
    assert record["split"] == "train" and 0 <= record["accuracy"] <= 1
    model, config = load_task(out, "classify")
    assert model.classes == sorted(p.name for p in tree.iterdir()) and config["label"] == "class"
    import duomo

    [[(label, prob)]] = duomo.load(out).classify(str(colour / next(colour.glob("*[0-9].png")).name))
    assert label in model.classes and 0 <= prob <= 1
