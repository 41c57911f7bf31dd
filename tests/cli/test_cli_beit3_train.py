"""`duomo beit3-train` with a CLIP vision start (--vision-init) and a frozen vision pathway."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import duomo
from duomo.cli import main
from duomo.io.beit3_tasks import load_task
from duomo.tasks.beit3.start import start_backbone

SMALL = ["--config", "beit3-micro", "--steps", "2", "--size", "8", "--batch-size", "4", "--eval-size", "0"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved duomo CLIP (ViT-micro) with non-default weights."""
    pipe = duomo.load("ViT-micro")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pipe.model.visual.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return pipe.save(tmp_path_factory.mktemp("clip") / "micro")


def _visual(clip_dir: Path) -> torch.nn.Module:
    return duomo.load(str(clip_dir)).model.visual


@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_frozen_vision_keeps_the_clip_tower_and_trains_the_rest(
    task: str, clip_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / task
    args = ["beit3-train", task, "--out", str(out), "--vision-init", str(clip_dir), "--freeze-vision", *SMALL]
    assert main(args) == 0
    model, _ = load_task(out, task)
    visual = _visual(clip_dir)
    blocks = model.beit3.encoder.blocks
    torch.testing.assert_close(blocks[0].mlp.vision.fc1.weight, visual.transformer.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(model.beit3.pos_embed.vision.weight[2:], visual.pos_embed)
    # the text side did train: its expert moved away from the fresh init's text copy of the same seed
    fresh = start_backbone("beit3-micro", str(clip_dir))
    assert not torch.equal(blocks[0].mlp.text.fc1.weight, fresh.encoder.blocks[0].mlp.text.fc1.weight)


def test_pretrain_from_a_clip_tower_saves_its_architecture(clip_dir: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                "beit3-train",
                "pretrain",
                "--out",
                str(tmp_path / "mdm"),
                "--vision-init",
                str(clip_dir),
                *SMALL,
            ]
        )
        == 0
    )
    cfg = load_task(tmp_path / "mdm", "mdm")[0].beit3.cfg
    assert cfg.layernorm_embedding and not cfg.subln and cfg.mean == tuple(_visual(clip_dir).cfg.mean)


def test_pretrain_with_a_frozen_clip_tower_trains_only_the_language_side(
    clip_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mdm"
    args = ["beit3-train", "pretrain", "--out", str(out), "--vision-init", str(clip_dir), "--freeze-vision"]
    assert main([*args, *SMALL]) == 0
    backbone = load_task(out, "mdm")[0].beit3
    visual = _visual(clip_dir)
    torch.testing.assert_close(
        backbone.encoder.blocks[1].attn.q.vision.bias, visual.transformer.blocks[1].attn.qkv.bias[:64]
    )
    fresh = start_backbone("beit3-micro", str(clip_dir))
    assert not torch.equal(
        backbone.encoder.blocks[1].attn.q.text.weight, fresh.encoder.blocks[1].attn.q.text.weight
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["vqa", "--init", "somewhere", "--vision-init", "shapes-minilm"], "drop one of them"),
        (["pretrain", "--freeze-vision"], "add --vision-init"),
        (["segment"], "unknown task"),
        (["vqa", "--vision-init", "no-such-model-anywhere"], "unknown model"),
        (["vqa", "--vision-init", "beit3-micro"], "BEiT-3 config"),
    ],
)
def test_bad_combinations_stop_with_one_line(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["beit3-train", extra[0], "--out", str(tmp_path / "o"), *extra[1:], *SMALL]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_a_captioner_from_a_clip_tower_is_guided_by_that_clip(
    clip_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from duomo.data.shapes import ShapesDataset
    from duomo.tasks.beit3.caption import caption_image

    out = tmp_path / "cap"
    small = [a if a != "0" else "8" for a in SMALL]  # evaluate on 8 images a split
    args = ["beit3-train", "caption", "--out", str(out), "--vision-init", str(clip_dir), "--freeze-vision"]
    assert main([*args, *small]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["split"], r["decoding"]) for r in rows] == [
        ("val", "greedy"),
        ("val", "guided"),
        ("heldout", "greedy"),
        ("heldout", "guided"),
    ]
    assert all(0 <= r["grounded"] <= 1 and 0 <= r["main"] <= r["grounded"] for r in rows)

    image = tmp_path / "img.png"
    ShapesDataset("heldout", 1, image_size=32)[0]["image"].save(image)
    model, config = load_task(out, "caption")
    assert config["vision_init"] == str(clip_dir.resolve())
    for flags, guide in (([], "auto"), (["--guide", "none"], "none"), (["--guide-weight", "3"], "auto")):
        assert main(["caption", str(image), "-m", str(out), "--max-len", "4", *flags]) == 0
        weight = 3.0 if "--guide-weight" in flags else 0.5
        want = caption_image(
            model, str(image), max_len=4, guide=guide, guide_weight=weight, vision_init=config["vision_init"]
        )
        assert capsys.readouterr().out.strip() == want
    assert main(["caption", str(image), "-m", str(out), "--guide", "no-such-clip"]) == 1
    err = capsys.readouterr().err
    assert "caption guide" in err and "Traceback" not in err


def test_an_existing_output_folder_is_kept_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vqa"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["beit3-train", "vqa", "--out", str(out), *SMALL]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, nothing lost
    assert main(["beit3-train", "vqa", "--out", str(out), "--overwrite", *SMALL]) == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
