"""Readers of user data (manifests, caption folders, ImageFolder, WebDataset), skipping, collate, loaders."""

from __future__ import annotations

import csv
import io
import itertools
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from duomo.data.pairs import (
    FolderPairs,
    ImageFolderDataset,
    ManifestPairs,
    WebDatasetPairs,
    braceexpand,
    collate,
    expand_shards,
    make_collate,
    make_loader,
    shuffled,
)
from duomo.data.transforms import image_transform
from duomo.errors import DuomoError, ImageError, InputError


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    """A picklable stand-in tokenizer: [N, 4] ids (the length of each text, then padding)."""
    return torch.tensor([[len(t), 1, 2, 0] for t in texts], dtype=torch.long)


TRANSFORM = image_transform(32)


def image(seed: int, size: int = 24) -> Image.Image:
    """A small random RGB image."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---- manifests ----

CAPTIONS = [f'caption {i}, with "quotes", commas and ünïcode' for i in range(12)]


def make_rows(root: Path) -> list[dict]:
    """12 rows: 10 good images, a corrupt file at row 3 and a missing file at row 7."""
    (root / "imgs").mkdir()
    rows = []
    for i in range(12):
        name = f"imgs/{i:02d}.png"
        if i == 3:
            (root / name).write_bytes(b"this is not a png")
        elif i != 7:
            image(i).save(root / name)
        rows.append({"image": name, "caption": CAPTIONS[i], "label": i % 3})
    return rows


def write_manifest(root: Path, rows: list[dict], fmt: str, name: str = "data") -> Path:
    path = root / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        if fmt == "csv":
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.write("\t".join(rows[0]) + "\n")
            f.writelines("\t".join(str(v) for v in r.values()) + "\n" for r in rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_manifest_reads_pairs_and_skips_bad_images(tmp_path: Path, fmt: str) -> None:
    ds = ManifestPairs(write_manifest(tmp_path, make_rows(tmp_path), fmt))
    assert len(ds) == 12 and ds.classes == ["0", "1", "2"]
    samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped.count == 2  # the corrupt and the missing image, once each
    assert samples[0]["text"] == CAPTIONS[0] and samples[0]["label"] == 0 and samples[0]["key"] == "imgs/00"
    assert samples[3]["key"] == "imgs/04"  # the unreadable sample is replaced by the next readable one
    assert samples[7]["key"] == "imgs/08"
    assert all(s["image"].mode == "RGB" for s in samples)
    assert np.array_equal(np.asarray(samples[5]["image"]), np.asarray(image(5)))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_skips_are_counted_across_loader_workers(tmp_path: Path, fmt: str) -> None:
    ds = ManifestPairs(write_manifest(tmp_path, make_rows(tmp_path), fmt))
    loader = make_loader(ds, 4, TRANSFORM, fake_tokenizer, workers=2, shuffle=False, drop_last=False)
    batches = list(loader)
    assert [b["pixels"].shape for b in batches] == [(4, 3, 32, 32)] * 3  # batches stay full
    assert ds.skipped.count == 2  # counted in the workers, visible here


def test_manifest_errors_name_the_column_or_line(tmp_path: Path) -> None:
    rows = make_rows(tmp_path)
    no_caption = write_manifest(tmp_path, [{"image": r["image"], "label": 1} for r in rows], "csv", "a")
    with pytest.raises(InputError, match="no caption column.*'caption' or 'text'"):
        ManifestPairs(no_caption)
    no_image = write_manifest(tmp_path, [{"path": r["image"], "text": "x"} for r in rows], "tsv", "b")
    with pytest.raises(InputError, match="no 'image' column"):
        ManifestPairs(no_image)
    assert len(ManifestPairs(no_image, image_column="path")) == 12
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"image": "imgs/00.png", "caption": "a"}\n\n{"caption": "b"}\n')
    with pytest.raises(InputError, match="line 3 .* no 'image' key"):
        ManifestPairs(jsonl)
    jsonl.write_text('{"image": "imgs/00.png", "caption": "a"}\n{"image": oops}\n')
    with pytest.raises(InputError, match="line 2 .* not valid JSON"):
        ManifestPairs(jsonl)
    empty = tmp_path / "d.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        ManifestPairs(empty)
    with pytest.raises(InputError, match="does not exist"):
        ManifestPairs(tmp_path / "nope.csv")
    with pytest.raises(InputError, match=r"\.csv, \.tsv or \.jsonl"):
        ManifestPairs(tmp_path / "imgs" / "00.png")
    with pytest.raises(InputError, match="no 'title' column"):
        ManifestPairs(no_image, image_column="path", text_column="title")


def test_manifest_labels_keys_and_empty_rows(tmp_path: Path) -> None:
    make_rows(tmp_path)
    rows = [
        {"image": "imgs/00.png", "caption": "a cat", "label": "cat"},
        {"image": "imgs/00.png", "caption": "another caption of the same image", "label": "cat"},
        {"image": "imgs/01.png", "caption": "a dog", "label": "dog"},
        {"image": "imgs/02.png", "caption": "   ", "label": "dog"},
        {"image": str(tmp_path / "imgs" / "04.png"), "caption": "absolute path", "label": ""},
    ]
    ds = ManifestPairs(write_manifest(tmp_path, rows, "csv"))
    assert ds.classes == ["cat", "dog"] and [r.label for r in ds.records] == [0, 0, 1, None]
    assert [r.key for r in ds.records][:3] == ["imgs/00", "imgs/00#1", "imgs/01"]
    assert ds.skipped.count == 1  # the empty caption
    assert ds[3]["label"] is None and ds[3]["image"].size == (24, 24)
    ds = ManifestPairs(write_manifest(tmp_path, rows[:3], "jsonl"), classes=["dog", "cat"])
    assert [r.label for r in ds.records] == [1, 1, 0]
    with pytest.raises(InputError, match="not one of the given classes"):
        ManifestPairs(write_manifest(tmp_path, rows[:3], "jsonl", "e"), classes=["cow"])


# ---- folders ----


def test_folder_pairs_reads_sidecars_recursively(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    image(0).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "x.txt").write_text("  a red\nstar \n")
    image(1).save(tmp_path / "a" / "b" / "y.jpg")
    (tmp_path / "a" / "b" / "y.caption").write_text("a blue circle")
    (tmp_path / "a" / "b" / "y.cls").write_text("3\n")
    image(2).save(tmp_path / "z.png")  # no caption: skipped
    image(3).save(tmp_path / ".hidden" / "q.png")
    (tmp_path / ".hidden" / "q.txt").write_text("hidden")
    (tmp_path / "c.webp").write_bytes(b"corrupt")
    (tmp_path / "c.txt").write_text("a corrupt image")
    ds = FolderPairs(tmp_path)
    assert [r.key for r in ds.records] == ["a/b/y", "a/x", "c"]
    assert ds.skipped.count == 1
    assert ds[0]["text"] == "a blue circle" and ds[0]["label"] == 3
    assert ds[1]["text"] == "a red star" and ds[1]["label"] is None
    assert ds[2]["key"] == "a/b/y"  # c is corrupt: wraps around to the first sample
    assert ds.skipped.count == 2
    with pytest.raises(InputError, match="no images with caption files"):
        FolderPairs(_empty(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        FolderPairs(tmp_path / "missing")


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_all_unreadable_raises_a_clear_error(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"junk")
        (tmp_path / f"{i}.txt").write_text("junk")
    with pytest.raises(ImageError, match="could not be read"):
        FolderPairs(tmp_path)[0]


def test_image_folder_dataset(tmp_path: Path) -> None:
    for cls, n in (("cat", 3), ("golden_retriever", 2)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(n):
            image(i).save(tmp_path / cls / ("sub" if i else "") / f"{i}.png")
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path, templates=["a photo of a {}.", "a {}"])
    assert ds.classes == ["cat", "golden retriever"] and ds.folders == ["cat", "golden_retriever"]
    assert len(ds) == 6 and [r.label for r in ds.records] == [0, 0, 0, 0, 1, 1]
    samples = [ds[i] for i in range(len(ds))]
    assert ds.skipped.count == 1
    assert all(ds.classes[s["label"]] in s["text"] for s in samples)
    with pytest.raises(InputError, match="no images"):
        ImageFolderDataset(_empty(tmp_path / "cat"))


# ---- WebDataset ----


@pytest.fixture(scope="module", name="wds")
def wds_module():
    """The webdataset library, which writes the reference shards; skips the test without it."""
    return pytest.importorskip("webdataset")


def write_shards(wds, root: Path, shards: int = 4, per_shard: int = 6) -> list[str]:
    """Shards written with the webdataset library itself: jpg/png + txt, some cls and json."""
    keys = []
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:04d}.tar")) as sink:
            for j in range(per_shard):
                n = s * per_shard + j
                key = f"sample{n:04d}"
                sample = {"__key__": key, "txt": f"caption {n}"}
                sample["png" if n % 2 else "jpg"] = encoded(image(n), "PNG" if n % 2 else "JPEG")
                if n % 3 == 0:
                    sample["cls"] = str(n % 5)
                if n % 4 == 0:
                    sample["json"] = json.dumps({"qa": [["q?", "a"]]})
                sink.write(sample)
                keys.append(key)
    return keys


@pytest.fixture()
def shards(wds, tmp_path: Path) -> tuple[str, list[str]]:
    keys = write_shards(wds, tmp_path)
    return str(tmp_path / "shard-{0000..0003}.tar"), keys


def keys_of(dataset: WebDatasetPairs, workers: int = 2) -> list[str]:
    loader = make_loader(dataset, 5, TRANSFORM, fake_tokenizer, workers=workers, drop_last=False)
    return [k for batch in loader for k in batch["keys"]]


def test_reads_standard_shards_in_order_without_shuffle(shards: tuple[str, list[str]]) -> None:
    spec, keys = shards
    samples = list(WebDatasetPairs(spec, shuffle_buffer=0))
    assert [s["key"] for s in samples] == keys
    assert samples[5]["text"] == "caption 5" and samples[5]["label"] is None and samples[6]["label"] == 1
    assert samples[4]["qa"] == [("q?", "a")]
    assert np.array_equal(np.asarray(samples[1]["image"]), np.asarray(image(1)))  # png: lossless


def test_workers_split_the_shards_without_duplicates(shards: tuple[str, list[str]]) -> None:
    spec, keys = shards
    got = keys_of(WebDatasetPairs(spec, shuffle_buffer=8))
    assert sorted(got) == keys


@pytest.mark.parametrize("n_shards", [4, 3])  # 4 shards: dealt out; 3 shards < 4 readers: samples dealt out
def test_ranks_and_workers_together_see_each_sample_once(
    shards: tuple[str, list[str]], n_shards: int
) -> None:
    spec, keys = shards
    urls = expand_shards(spec)[:n_shards]
    per_rank = [keys_of(WebDatasetPairs(urls, shuffle_buffer=5, rank=r, world_size=2)) for r in range(2)]
    assert all(per_rank)
    assert sorted(per_rank[0] + per_rank[1]) == keys[: 6 * n_shards]


def test_shuffle_buffer_changes_order_but_keeps_the_samples(shards: tuple[str, list[str]]) -> None:
    spec, keys = shards
    ds = WebDatasetPairs(spec, shuffle_buffer=10, seed=1)
    first = [s["key"] for s in ds]
    second = [s["key"] for s in ds]  # the next pass reshuffles
    assert first != keys and sorted(first) == keys
    assert second != first and sorted(second) == keys
    assert [s["key"] for s in WebDatasetPairs(spec, shuffle_buffer=10, seed=1)] == first  # reproducible
    again = WebDatasetPairs(spec, shuffle_buffer=10, seed=1)
    again.set_epoch(1)
    assert [s["key"] for s in again] == second
    items = list(range(100))
    out = list(shuffled(items, 10, __import__("random").Random(0)))
    assert sorted(out) == items and out != items


def test_resample_streams_forever(shards: tuple[str, list[str]]) -> None:
    spec, keys = shards
    stream = iter(WebDatasetPairs(spec, shuffle_buffer=4, resample=True))
    got = [s["key"] for s in itertools.islice(stream, 100)]
    assert len(got) == 100 and set(got) <= set(keys) and len(set(got)) > 6


def test_bad_samples_and_truncated_shards_are_skipped(wds, tmp_path: Path) -> None:
    good = encoded(image(0))
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "ok1", "png": good, "txt": "fine"})
        sink.write({"__key__": "corrupt", "jpg": b"not a jpeg", "txt": "broken"})
        sink.write({"__key__": "nocaption", "png": good})
        sink.write({"__key__": "noimage", "txt": "just text"})
        sink.write(
            {
                "__key__": "ok2",
                "webp": encoded(image(1), "WEBP"),
                "json": json.dumps({"caption": "from json"}),
            }
        )
    with wds.TarWriter(str(tmp_path / "b.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"b{i}", "png": encoded(image(i, 64)), "txt": f"b {i}"})
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])  # truncated mid-shard
    ds = WebDatasetPairs(tmp_path, shuffle_buffer=0)
    samples = list(ds)
    keys = [s["key"] for s in samples]
    assert keys[:2] == ["ok1", "ok2"] and samples[1]["text"] == "from json"
    assert set(keys[2:]) <= {f"b{i}" for i in range(5)} and len(keys) < 7
    assert ds.skipped.count == 4  # corrupt, nocaption, noimage, and the rest of the truncated shard


def test_shard_specs(tmp_path: Path, shards: tuple[str, list[str]]) -> None:
    assert braceexpand("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert braceexpand("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    spec, _ = shards
    listed = expand_shards(spec)
    assert expand_shards(str(tmp_path)) == listed == expand_shards(str(tmp_path / "*.tar"))
    assert expand_shards(f"{listed[0]}::{listed[1]}") == listed[:2]
    with pytest.raises(InputError, match="does not exist"):
        WebDatasetPairs(str(tmp_path / "x-{0..1}.tar"))
    with pytest.raises(InputError, match="no shards"):
        WebDatasetPairs(str(tmp_path / "*.tgz"))
    with pytest.raises(InputError, match="rank"):
        WebDatasetPairs(spec, rank=2, world_size=2)


def test_pipe_urls_stream_through_webdataset(shards: tuple[str, list[str]]) -> None:
    spec, keys = shards
    url = f"pipe:cat {expand_shards(spec)[0]}"
    assert [s["key"] for s in WebDatasetPairs(url, shuffle_buffer=0)] == keys[:6]


# ---- batching ----


def test_collate_builds_tensors_and_drops_none() -> None:
    samples = [
        {"image": image(0), "text": "a", "label": 2, "key": "k0"},
        None,
        {"image": image(1, 40), "text": "bb", "label": None, "key": "k1"},
    ]
    batch = collate(samples, TRANSFORM, fake_tokenizer)
    assert batch["pixels"].shape == (2, 3, 32, 32) and batch["pixels"].dtype == torch.float32
    assert batch["tokens"].shape == (2, 4) and batch["tokens"][1, 0] == 2
    assert batch["labels"].tolist() == [2, -1] and batch["keys"] == ["k0", "k1"] and batch["skipped"] == 1
    assert collate([None], TRANSFORM, fake_tokenizer) is None
    fn = pickle.loads(pickle.dumps(make_collate(TRANSFORM, fake_tokenizer)))
    assert torch.equal(fn(samples)["pixels"], batch["pixels"])


def test_collate_with_the_clip_tokenizer_is_picklable() -> None:
    from duomo.data.tokenizers.clip import get_tokenizer

    fn = pickle.loads(pickle.dumps(make_collate(TRANSFORM, get_tokenizer(16))))
    batch = fn([{"image": image(0), "text": "a red star", "label": 1, "key": "k"}])
    assert batch["tokens"].shape == (1, 16) and batch["tokens"].dtype == torch.long


def test_make_loader_is_seeded_and_workers_do_not_change_the_order(tmp_path: Path) -> None:
    from duomo.data.shapes import ShapesDataset

    ds = ShapesDataset(size=24, image_size=32)

    def order(seed: int, workers: int) -> list[str]:
        loader = make_loader(ds, 8, TRANSFORM, fake_tokenizer, workers=workers, seed=seed)
        return [k for batch in loader for k in batch["keys"]]

    first = order(0, 0)
    assert sorted(first) == sorted(ds[i]["key"] for i in range(24)) and first != sorted(first)
    assert order(0, 0) == first and order(1, 0) != first
    assert order(0, 2) == first
    loader = make_loader(ds, 5, TRANSFORM, fake_tokenizer, workers=0, drop_last=True)
    assert len(list(loader)) == 4
    with pytest.raises(DuomoError):
        make_loader(ds, 0, TRANSFORM, fake_tokenizer)


def test_wds_write_read_with_tarfile_member_layout(tmp_path: Path) -> None:
    # members in sub-folders and "./" prefixes: keys keep the folder, as webdataset does
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("./d/k1.png", encoded(image(0))), ("./d/k1.txt", b"one"), ("d/k2.seg.png", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = WebDatasetPairs(tmp_path / "s.tar", shuffle_buffer=0)
    assert [s["key"] for s in ds] == ["d/k1"] and ds.skipped.count == 1  # d/k2 has neither image nor caption
