"""`duomo data export`: every format round-trips through the readers; OUT is never clobbered nor half-done."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import Dataset

import duomo.cli
from duomo.cli import data as data_cli
from duomo.data.catalog import open_export, open_pairs
from duomo.data.digits import DigitsDataset
from duomo.data.export import FORMATS, export_dataset
from duomo.data.pairs import FolderPairs, ManifestPairs, WebDatasetPairs
from duomo.data.shapes import ShapesDataset
from duomo.errors import InputError

READERS = {"folder": FolderPairs, "csv": ManifestPairs, "tsv": ManifestPairs, "jsonl": ManifestPairs}


def by_key(dataset: Dataset) -> dict[str, dict]:
    """Samples keyed by the last part of their key (folder keys carry the part-00000/ folder)."""
    samples = dataset if isinstance(dataset, WebDatasetPairs) else (dataset[i] for i in range(len(dataset)))
    return {s["key"].rsplit("/", 1)[-1]: s for s in samples}


@pytest.mark.parametrize("fmt", FORMATS)
def test_shapes_round_trip_through_every_format(tmp_path: Path, fmt: str) -> None:
    source = ShapesDataset("val", size=25, image_size=32, max_objects=2)
    result = export_dataset(source, tmp_path / "out", fmt, shard_size=10)
    assert result.count == 25
    if fmt == "wds":
        assert result.files == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    back = open_pairs(tmp_path / "out", shuffle_buffer=0) if fmt == "wds" else open_pairs(tmp_path / "out")
    assert type(back) is READERS.get(fmt, WebDatasetPairs)
    assert back.classes == source.classes
    got = by_key(back)
    assert len(got) == 25 and not back.skipped.count
    for i in range(25):
        want = source[i]
        s = got[want["key"]]
        assert s["text"] == want["text"] and s["label"] == want["label"]
        assert np.array_equal(np.asarray(s["image"]), np.asarray(want["image"]))  # PNG: lossless
        if fmt == "wds":
            assert s["qa"] == want["qa"]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["format"] == fmt and meta["count"] == 25


def test_digits_jpeg_manifest_and_folder_readers_directly(tmp_path: Path) -> None:
    source = DigitsDataset("test", size=12)
    export_dataset(source, tmp_path / "j", "jsonl", image_format="jpg")
    back = ManifestPairs(tmp_path / "j" / "manifest.jsonl")
    assert back.records[0].image.endswith(".jpg")
    for i in range(12):
        assert back[i]["key"] == source[i]["key"] and back[i]["label"] == source[i]["label"]
        diff = np.abs(np.asarray(back[i]["image"], np.int32) - np.asarray(source[i]["image"], np.int32))
        assert diff.mean() < 3  # JPEG: close, not exact
    export_dataset(source, tmp_path / "f", "folder")
    assert len(FolderPairs(tmp_path / "f")) == 12
    assert sorted(p.name for p in (tmp_path / "f" / "part-00000").iterdir())[:3] == [
        "digits-0005.cls",
        "digits-0005.png",
        "digits-0005.txt",
    ]


def test_shards_are_readable_by_the_webdataset_library(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    source = ShapesDataset(size=7, image_size=32)
    export_dataset(source, tmp_path / "w", "wds", shard_size=4)
    samples = list(wds.WebDataset(str(tmp_path / "w" / "shard-{000000..000001}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [source[i]["key"] for i in range(7)]
    assert samples[0]["txt"].decode() == source[0]["text"] and int(samples[0]["cls"]) == source[0]["label"]


def test_never_overwrites_silently(tmp_path: Path) -> None:
    out = tmp_path / "out"
    small = ShapesDataset(size=3, image_size=16)
    out.mkdir()
    export_dataset(small, out, "csv")  # an empty folder is fine
    with pytest.raises(InputError, match="not empty.*--overwrite"):
        export_dataset(small, out, "csv")
    export_dataset(ShapesDataset(size=5, image_size=16), out, "tsv", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "images", "manifest.tsv"]
    assert len(ManifestPairs(out / "manifest.tsv")) == 5
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a duomo export"):
        export_dataset(small, mine, "csv", overwrite=True)
    assert (mine / "precious.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="not a folder"):
        export_dataset(small, mine / "precious.txt", "csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no temporary folders left


class Exploding(Dataset):
    """Fails half-way, as an interrupted export would."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict:
        if i == 4:
            raise RuntimeError("disk on fire")
        return ShapesDataset(size=6, image_size=16)[i]


def test_a_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_dataset(Exploding(), tmp_path / "out", "wds", shard_size=2)
    assert list(tmp_path.iterdir()) == []
    export_dataset(ShapesDataset(size=2, image_size=16), tmp_path / "prev", "folder")
    with pytest.raises(RuntimeError):
        export_dataset(Exploding(), tmp_path / "prev", "folder", overwrite=True)
    assert len(FolderPairs(tmp_path / "prev")) == 2  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]


def test_bad_export_arguments(tmp_path: Path) -> None:
    small = ShapesDataset(size=2, image_size=16)
    with pytest.raises(InputError, match="format"):
        export_dataset(small, tmp_path / "o", "parquet")
    with pytest.raises(InputError, match="image format"):
        export_dataset(small, tmp_path / "o", "csv", image_format="gif")
    with pytest.raises(InputError, match="shard_size"):
        export_dataset(small, tmp_path / "o", "wds", shard_size=0)
    with pytest.raises(InputError, match="no samples"):
        export_dataset(ShapesDataset(size=0), tmp_path / "o", "csv")
    with pytest.raises(InputError, match="dataset.json"):
        open_export(tmp_path)


@pytest.fixture()
def cli() -> None:
    """The `data` command group on duomo's app (registered here if the lead has not wired it yet)."""
    if not any(group.name == "data" for group in duomo.cli.app.registered_groups):
        data_cli.register(duomo.cli.app)


def test_cli_export_info_and_preview(tmp_path: Path, cli: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "shapes"
    argv = ["data", "export", "shapes", str(out), "--format", "wds", "--size", "30", "--split", "heldout"]
    assert duomo.cli.main([*argv, "--shard-size", "10", "--image-size", "32", "--max-objects", "2"]) == 0
    assert "wrote 30 shapes samples" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json"] + [
        f"shard-00000{i}.tar" for i in range(3)
    ]
    back = open_pairs(out, shuffle_buffer=0)
    assert [s["key"] for s in back][:2] == ["shapes-heldout-0-00000000", "shapes-heldout-0-00000001"]
    assert duomo.cli.main(argv) == 1  # OUT is not empty
    assert "--overwrite" in capsys.readouterr().err.replace("\n", " ")
    assert (
        duomo.cli.main(["data", "export", "digits", str(tmp_path / "d"), "-f", "csv", "--split", "test"]) == 0
    )
    assert len(ManifestPairs(tmp_path / "d" / "manifest.csv")) == 359
    assert duomo.cli.main(["data", "export", "mnist", str(tmp_path / "m")]) == 1
    assert duomo.cli.main(["data", "export", "shapes", str(tmp_path / "x"), "--format", "zip"]) == 1
    capsys.readouterr()
    assert duomo.cli.main(["data", "info", str(tmp_path / "d")]) == 0
    info = capsys.readouterr().out
    assert "samples: 359" in info and "classes (10): zero, one" in info
    sheet = tmp_path / "sheet.png"
    assert duomo.cli.main(["data", "preview", "shapes:val", str(sheet), "--n", "10", "--captions", "2"]) == 0
    assert sheet.is_file() and "shapes-val-0-00000009" in capsys.readouterr().out
    assert duomo.cli.main(["data", "preview", "digits", str(sheet)]) == 1  # exists, no --overwrite
