"""`duomo train`: flags, a JSON config, resume, data formats, clear errors (torchrun: test_train_ddp.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from train_helpers import ColourSquares

from duomo.cli import main

BASE = ["train", "--model", "ViT-micro", "--batch-size", "4", "--workers", "0", "--warmup", "1", "--quiet"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_on_shapes_then_resume(tmp_path) -> None:
    out = tmp_path / "run"
    assert main([*BASE, "--data", "shapes", "--steps", "2", "--log-every", "1", "--out", str(out)]) == 0
    from duomo.io import load_model

    model = load_model(out / "model")
    assert model.config.vision.image_size == 32
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    assert (out / "checkpoints" / "step-00000002.pt").is_file() and (out / "curves.png").is_file()

    args = [
        *BASE,
        "--data",
        "shapes",
        "--steps",
        "3",
        "--log-every",
        "1",
        "--out",
        str(out),
        "--resume",
        "latest",
    ]
    assert main(args) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    assert json.loads((out / "train_config.json").read_text())["steps"] == 3


def test_config_file_with_flag_overrides(tmp_path) -> None:
    out = tmp_path / "run"
    config = tmp_path / "cfg.json"
    fields = {
        "model": "ViT-micro",
        "data": "digits",
        "steps": 5,
        "batch_size": 4,
        "workers": 0,
        "quiet": True,
    }
    fields.update(loss="siglip", hard_negatives=1, lock_image=True)
    config.write_text(json.dumps(fields))
    assert main(["train", "--config", str(config), "--steps", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["steps"], saved["loss"], saved["hard_negatives"], saved["lock_image"]) == (
        1,
        "siglip",
        1,
        True,
    )
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["model"]["init_logit_bias"] == -10.0  # SigLIP's learnable bias is part of the exported model
    assert meta["meta"]["classes"][:2] == ["zero", "one"]


def _write_pairs(root: Path, n: int = 16) -> list[tuple[str, str, bytes]]:
    """n (key, caption, PNG bytes) samples of the tiny colour world."""
    data = ColourSquares(n, size=32)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        data[i]["image"].save(buf, format="PNG")
        out.append((f"s{i:03d}", data[i]["text"], buf.getvalue()))
    return out


def test_train_on_a_manifest_and_on_webdataset_shards(tmp_path) -> None:
    samples = _write_pairs(tmp_path)
    (tmp_path / "images").mkdir()
    rows = ["image,caption"]
    for key, text, png in samples:
        (tmp_path / "images" / f"{key}.png").write_bytes(png)
        rows.append(f"images/{key}.png,{text}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    args = [*BASE, "--steps", "2", "--hard-negatives", "1"]
    assert main([*args, "--data", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "a")]) == 0

    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"s-{shard:03d}.tar", "w") as tar:
            for key, text, png in samples[shard::2]:
                for ext, data in (("png", png), ("txt", text.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    assert main([*args, "--data", str(shards / "s-*.tar"), "--out", str(tmp_path / "b")]) == 0
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
        (["--data", "/nonexistent/pairs.csv"], "neither"),
        (["--config", "/nonexistent.json"], "does not exist"),
        (["--loss", "triplet"], "loss must be one of"),
        (["--model", "ViT-nope"], "unknown model"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, args: list[str], message: str) -> None:
    code = main([*BASE, "--steps", "1", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


def test_a_non_empty_out_is_refused_before_any_work(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*BASE, "--data", "shapes", "--steps", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, nothing lost
    assert main([*BASE, "--data", "shapes", "--steps", "1", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "model").is_dir()


def test_an_out_under_a_file_is_one_line(tmp_path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "file").write_text("x")
    assert main([*BASE, "--data", "shapes", "--steps", "1", "--out", str(tmp_path / "file" / "run")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
