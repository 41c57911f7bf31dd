"""`evaluate` and `duomo eval`: records, chance-level random models, probes, multi-caption retrieval."""

import json

import pytest
import torch
from PIL import Image

import duomo
from duomo.errors import InputError
from duomo.tasks.clip.evaluate import evaluate, extract_features, open_eval_data, write_records
from duomo.tasks.clip.probe import linear_probe

RECORD_KEYS = {"dataset", "split", "model", "task", "metrics", "n"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: extra threads only contend for the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return duomo.load("ViT-micro", device="cpu")


def test_random_model_zero_shot_is_near_chance(pipe):
    (record,) = evaluate(pipe, "digits", ["zeroshot"], size=200)
    assert set(record) >= RECORD_KEYS and record["task"] == "zeroshot" and record["n"] == 200
    assert record["dataset"] == "digits" and record["split"] == "test" and record["model"] == "ViT-micro"
    assert record["templates"][0] == "a picture of a handwritten digit {}."  # digits' own eval prompts
    metrics = record["metrics"]
    assert set(metrics) == {"top1", "top5", "mean_per_class_recall"}
    assert metrics["mean_per_class_recall"] < 0.3  # 10 classes: chance is 0.1


def test_linear_probe_on_digits_is_well_above_chance(pipe):
    (record,) = evaluate(pipe, "digits", ["probe"])
    assert record["metrics"]["top1"] > 0.6  # chance 0.1: random ViT features still separate the digits
    assert record["probe"]["n_train"] > 1000 and record["probe"]["C"] > 0


def test_few_shot_probe_uses_k_per_class(pipe):
    data = open_eval_data("digits", size=300, image_size=32)[0]
    train, test = extract_features(pipe, data.train), extract_features(pipe, data.test)
    result = linear_probe(train.images, train.labels, test.images, test.labels, 10, k_shot=5)
    assert result.n_train == 50 and result.k_shot == 5 and result.metrics["top1"] > 0.2


def test_shapes_gives_val_and_heldout_records_for_every_task(pipe, tmp_path):
    records = evaluate(pipe, "shapes", ["zeroshot", "retrieval", "probe"], model_name="m", size=40)
    assert [(r["split"], r["task"]) for r in records] == [
        (split, task) for split in ("val", "heldout") for task in ("zeroshot", "retrieval", "probe")
    ] + [("heldout-all", "zeroshot")]  # the held-out images again: only the label space differs
    assert all(set(r) >= RECORD_KEYS and r["model"] == "m" for r in records)
    retrieval = records[1]["metrics"]
    assert set(retrieval) >= {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"}
    assert all(0 <= v <= 1 for r in records for v in r["metrics"].values())
    out = write_records(records[:2], tmp_path / "res" / "eval.jsonl")
    write_records(records[2:3], out)
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == records[0]


def test_heldout_all_scores_heldout_images_against_every_combination(pipe):
    (record,) = evaluate(pipe, "shapes:heldout-all", ["zeroshot"], size=20)
    data = open_eval_data("shapes:heldout-all", size=20)[0]
    assert record["split"] == "heldout-all" and len(data.classes) == 64
    assert all(data.classes[data.test[i]["label"]] == data.test[i]["label_name"] for i in range(20))


def test_user_templates_are_used_and_recorded(pipe):
    (record,) = evaluate(pipe, "shapes:heldout", ["zeroshot"], templates=["{}", "a {} shape"], size=20)
    assert record["templates"] == ["{}", "a {} shape"] and record["split"] == "heldout"
    with pytest.raises(InputError, match="placeholder"):
        evaluate(pipe, "shapes:heldout", ["zeroshot"], templates=["no slot"], size=20)


def _manifest(tmp_path):
    """3 images, 2 captions each (COCO-style rows), no labels."""
    rows = ["image,caption"]
    for colour in ["red", "green", "blue"]:
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{colour}.png")
        rows += [f"{colour}.png,a {colour} square", f"{colour}.png,something {colour}"]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_retrieval_groups_the_captions_of_one_image(pipe, tmp_path):
    path = _manifest(tmp_path)
    (data,) = open_eval_data(str(path))
    feats = extract_features(pipe, data.test, batch_size=4)
    assert len(feats.keys) == 3 and len(feats.texts) == 6
    assert feats.text_image.tolist() == [0, 0, 1, 1, 2, 2]
    (record,) = evaluate(pipe, str(path), ["retrieval"])
    assert record["n"] == 3 and record["n_texts"] == 6 and record["split"] == "all"
    assert (
        record["metrics"]["i2t_R@5"] == 1.0 and record["metrics"]["t2i_R@5"] == 1.0
    )  # only 3 images, 6 texts


def test_unlabelled_data_skips_or_refuses_classification(pipe, tmp_path):
    path = _manifest(tmp_path)
    with pytest.raises(InputError, match="no class labels"):
        evaluate(pipe, str(path), ["zeroshot"])
    records = evaluate(pipe, str(path), ["zeroshot", "retrieval"])
    assert [r["task"] for r in records] == ["retrieval"]
    with pytest.raises(InputError, match="unknown eval task"):
        evaluate(pipe, str(path), ["captioning"])


def _cli(argv, capsys):
    from duomo.cli import app, main

    if not any(c.name == "eval" for c in app.registered_commands):  # until duomo.cli wires the group
        from duomo.cli import eval as eval_cli

        eval_cli.register(app)
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_eval_prints_records_and_appends_jsonl(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    argv = [
        "eval",
        "-m",
        "ViT-micro",
        "-d",
        "digits",
        "--size",
        "60",
        "-t",
        "zeroshot,retrieval",
        "-o",
        str(out),
    ]
    code, stdout, stderr = _cli(argv, capsys)
    assert code == 0, stderr
    printed = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [r["task"] for r in printed] == ["zeroshot", "retrieval"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == printed
    code, _, stderr = _cli(["eval", "-m", "ViT-micro", "-d", "digits", "-t", "vqa"], capsys)
    assert code == 1 and "unknown eval task" in stderr
