"""Fine-tuning on a tiny shapes ImageFolder: beats chance, saves/loads, LoRA merges; `duomo finetune`."""

import json

import pytest
import torch

import duomo
from duomo.api.finetuned import load_finetuned
from duomo.data.pairs import ImageFolderDataset
from duomo.data.shapes import ShapesDataset, render_scene
from duomo.errors import InputError
from duomo.nn.lora import LoRALinear
from duomo.tasks.clip.evaluate import evaluate
from duomo.tasks.clip.finetune import FinetuneConfig, finetune, open_labelled, save_finetuned

CLASSES = ("red circle", "blue square", "green triangle", "yellow star")
PER_CLASS = 20


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: extra threads only contend for the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder of 4 single-object shapes classes, 20 images each, 32 px."""
    root = tmp_path_factory.mktemp("shapes_folder")
    world = ShapesDataset("train", size=5000, image_size=32, seed=0)
    counts = dict.fromkeys(CLASSES, 0)
    for i in range(len(world)):
        scene = world.scene(i)  # attributes only: cheap
        name = scene.main.name
        if counts.get(name, PER_CLASS) < PER_CLASS:
            (root / name.replace(" ", "_")).mkdir(exist_ok=True)
            render_scene(scene, 32).save(root / name.replace(" ", "_") / f"{i:05d}.png")
            counts[name] += 1
        if all(c == PER_CLASS for c in counts.values()):
            return root
    raise AssertionError(f"not enough samples: {counts}")


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    return duomo.load("ViT-micro", device="cpu")


def test_full_finetune_beats_chance_and_leaves_the_pipeline_alone(folder, pipe):
    data = ImageFolderDataset(folder)
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    cfg = FinetuneConfig(mode="full", epochs=15, lr=1e-3, head_lr=1e-2, batch_size=16, seed=0)
    result = finetune(pipe, data, cfg)
    assert result.classes == sorted(CLASSES) and result.n_val == 16 and result.n_train == 64
    assert len(result.history) == 15 and result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.after["top1"] >= 0.5  # chance: 0.25
    assert result.after["top1"] > result.before["top1"]
    assert all(torch.equal(v, pipe.model.state_dict()[k]) for k, v in before.items())


def test_head_starts_as_the_zero_shot_classifier(folder, pipe):
    data = ImageFolderDataset(folder)
    result = finetune(pipe, data, FinetuneConfig(mode="probe", epochs=1, lr=1e-12))  # effectively untouched
    (record,) = evaluate(pipe, str(folder), ["zeroshot"])
    assert record["n"] == 4 * PER_CLASS
    images = [data[i]["image"] for i in range(0, 80, 7)]
    pixels = torch.stack([pipe.preprocess(img) for img in images])
    with torch.no_grad():
        finetuned = result.model(pixels).softmax(-1)
    zero_shot = pipe.zero_shot_probs(images, result.classes, result.templates)
    assert torch.allclose(finetuned, zero_shot, atol=1e-4)


def test_lora_mode_trains_adapters_then_merges_them(folder, pipe):
    data = ImageFolderDataset(folder)
    cfg = FinetuneConfig(mode="lora", epochs=2, lr=1e-3, lora_rank=2, val_fraction=0.25)
    result = finetune(pipe, data, cfg)
    assert not any(isinstance(m, LoRALinear) for m in result.model.modules())
    changed = [
        k
        for k, v in result.model.visual.state_dict().items()
        if not torch.equal(v, pipe.model.visual.state_dict()[k])
    ]
    assert changed and all(".attn." in k for k in changed)  # only the adapted attention projections moved


def test_wise_alpha_zero_gives_back_the_zero_shot_weights(folder, pipe):
    result = finetune(pipe, ImageFolderDataset(folder), FinetuneConfig(epochs=1, lr=1e-3, wise_alpha=0.0))
    original = pipe.model.visual.state_dict()
    assert all(torch.allclose(v, original[k]) for k, v in result.model.visual.state_dict().items())
    assert result.after == result.before


def test_saved_classifier_loads_and_predicts_the_same(folder, pipe, tmp_path):
    data = ImageFolderDataset(folder)
    result = finetune(pipe, data, FinetuneConfig(mode="probe", epochs=3, lr=1e-2))
    out = save_finetuned(result, pipe, tmp_path / "ft")
    assert {"config.json", "model.safetensors", "classifier.safetensors"} <= {p.name for p in out.iterdir()}
    loaded = load_finetuned(out)
    assert loaded.classes == result.classes
    images = [data[i]["image"] for i in (0, 25, 50, 75)]
    pixels = torch.stack([pipe.preprocess(img) for img in images])
    with torch.no_grad():
        expected = result.model(pixels).softmax(-1)
    assert torch.allclose(loaded.predict_proba(images), expected, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["meta"]["finetune"]["mode"] == "probe"


def test_bad_settings_and_unlabelled_data_are_input_errors(folder, pipe, tmp_path):
    with pytest.raises(InputError, match="mode"):
        finetune(pipe, ImageFolderDataset(folder), FinetuneConfig(mode="adapter"))
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("caption")
    with pytest.raises(InputError, match="class names"):
        open_labelled(str(tmp_path))
    assert open_labelled(str(folder), size=10).classes == sorted(CLASSES)


def test_cli_finetune_writes_a_model(folder, tmp_path, capsys):
    from duomo.cli import app, main

    if not any(c.name == "finetune" for c in app.registered_commands):  # until duomo.cli wires the group
        from duomo.cli import eval as eval_cli

        eval_cli.register(app)
    out = tmp_path / "model"
    argv = [
        "finetune",
        "-m",
        "ViT-micro",
        "-d",
        str(folder),
        "-o",
        str(out),
        "--mode",
        "probe",
        "--epochs",
        "2",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "finetune" and summary["mode"] == "probe" and len(summary["history"]) == 2
    assert (out / "classifier.safetensors").is_file()
    assert main(argv) == 1  # the folder is no longer empty
    assert "--overwrite" in capsys.readouterr().err
